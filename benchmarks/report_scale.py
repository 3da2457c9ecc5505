"""Size and build time of ``visa report`` on a synthetic LLaVA-OneVision-sized run folder.

Generates, once into ``--dir``, what a finished run leaves behind: ``scores.parquet`` with ``--rows``
samples (default 3M) over ``--images`` unique images (default 1M), 1% error rows of three kinds, 3%
text-only rows, ``meta.source`` (12 values), ``meta.meta.kind`` (4 values) and a unique ``meta.uid``,
five score families (sc and im with two agents, the others with one; fused columns), an auxiliary
list field and image statistics; ``selection.parquet`` (2.5% selected, every drop reason);
``run.json`` with counts, timings and Shapley reports. With ``--input`` it also writes the input as
JSONL (one short conversation per row) whose images cycle over the photos in ``examples/images``, so
the report really streams the input and decodes thumbnails; without it the galleries show scores only.

The report is then built in a fresh process, twice: with the default galleries and with
``gallery_size=0`` (no input pass); wall time, CPU time, peak RSS and the page's size are printed.

    PYTHONPATH=src .venv/bin/python benchmarks/report_scale.py --dir /tmp/visa_report_3m --input
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from visa.run_folder import RunFolder

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REASONS = ("error", "image_below_cut", "im_nonpositive", "pt_tail", "duplicate", "quota", "budget")


def _strings(prefix: str, values: np.ndarray) -> pa.Array:
    return pa.array(np.char.add(prefix, values.astype("U")), pa.string())


#: The synthetic run's agents per score family.
AGENTS = {
    "sc": ("felzenszwalb", "ocr"),
    "oa": ("tagger",),
    "dp": ("judge",),
    "pt": ("lm",),
    "im": ("lm", "pmi"),
}


def _score_columns(
    rng: np.random.Generator, image: np.ndarray, images: int, text_only: np.ndarray, error: np.ndarray
) -> dict[str, pa.Array]:
    """Agent columns (correlated within a family, image-level ones shared by an image's samples) and
    the families' fused columns (mean of z-scored agents)."""
    rows = image.size
    cols: dict[str, pa.Array] = {}
    quality = rng.normal(size=images)
    fused = {}
    for family, names in AGENTS.items():
        per_image = family in ("sc", "oa", "dp")
        common = rng.normal(size=images if per_image else rows)
        zs = []
        for name in names:
            noise = rng.normal(size=images if per_image else rows)
            if per_image:
                values = (quality + common + 0.5 * noise)[image]
                values[text_only] = np.nan
            else:
                values = common + 0.5 * noise
            if family == "sc":
                values = np.round(np.clip(20 + 8 * values, 0, None))
            elif family == "dp":
                values = np.clip(np.round(3 + values), 1, 5)
            values[error | (rng.random(rows) < 0.002)] = np.nan
            cols[f"{family}.{name}"] = pa.array(values, pa.float64(), mask=np.isnan(values))
            zs.append((values - np.nanmean(values)) / np.nanstd(values))
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rows where every agent is null
            fused[family] = np.nanmean(np.vstack(zs), axis=0) if len(zs) > 1 else zs[0]
    for family, values in fused.items():
        cols[family] = pa.array(values, pa.float64(), mask=np.isnan(values))
    return cols


def generate(run_dir: Path, rows: int, images: int, with_input: bool, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, images, rows)
    text_only = rng.random(rows) < 0.03
    error_kind = np.array([None, "missing", "agent", "not_image"], dtype=object)[
        np.where(rng.random(rows) < 0.01, rng.integers(1, 4, rows), 0)
    ]
    error = error_kind != None  # noqa: E711 - elementwise over a numpy object array
    unique_keys = _strings("img", np.arange(images))
    image_key = unique_keys.take(pa.array(image, pa.int64(), mask=text_only))
    offsets = np.zeros(rows + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(~text_only)
    image_keys = pa.ListArray.from_arrays(pa.array(offsets), unique_keys.take(pa.array(image[~text_only])))
    sample_ids = _strings("s", np.arange(rows))
    messages = np.where(error, np.char.add(error_kind.astype("U"), ": the image could not be used"), None)
    sources = pa.array([f"source_{i:02d}" for i in range(12)])
    kinds = pa.array(["clean", "ocr", "chart", "chat"])
    cols: dict[str, pa.Array] = {
        "row": pa.array(np.arange(rows), pa.int64()),
        "line": pa.array(np.arange(rows) + 1, pa.int64()),
        "sample_id": sample_ids,
        "image_key": image_key,
        "image_keys": image_keys,
        "error_kind": pa.array(error_kind.tolist(), pa.string()),
        "error": pa.array(messages.tolist(), pa.string()),
        "meta.source": sources.take(pa.array(rng.choice(12, rows, p=rng.dirichlet(np.ones(12))))),
        "meta.meta.kind": kinds.take(pa.array(rng.integers(0, 4, rows))),
        "meta.uid": _strings("u", rng.permutation(rows)),
    }
    cols.update(_score_columns(rng, image, images, text_only, error))
    vocabulary = pa.array(["person", "car", "dog", "tree", "table", "sky", "sign", "cup"])
    counts = rng.integers(0, 4, rows).astype(np.int32)
    label_offsets = np.zeros(rows + 1, dtype=np.int32)
    label_offsets[1:] = np.cumsum(counts)
    cols["oa.tagger.labels"] = pa.ListArray.from_arrays(
        pa.array(label_offsets), vocabulary.take(pa.array(rng.integers(0, 8, int(counts.sum()))))
    )
    cols["image.stats"] = pa.array(
        np.where(text_only, np.nan, 5 + 2 * rng.random(rows)), pa.float64(), mask=text_only
    )
    table = pa.table(cols)
    pq.write_table(table, RunFolder(run_dir).scores)

    # selection: every drop reason, 2.5% selected
    reason = np.array(REASONS, dtype=object)[rng.integers(1, len(REASONS), rows)]
    reason[error] = "error"
    chosen = rng.choice(np.flatnonzero(~error), size=int(0.025 * rows), replace=False)
    selected = np.zeros(rows, dtype=bool)
    selected[chosen] = True
    reason[selected] = None
    rank = np.full(rows, np.nan)
    rank[chosen] = np.arange(1, chosen.size + 1)
    pq.write_table(
        pa.table(
            {
                "row": cols["row"],
                "sample_id": sample_ids,
                "selected": pa.array(selected),
                "rank": pa.array(rank, pa.int64(), mask=np.isnan(rank), from_pandas=True),
                "visual_score": pa.array(rng.random(rows)),
                "instruction_score": pa.array(rng.random(rows)),
                "reason": pa.array(reason.tolist(), pa.string()),
            }
        ),
        RunFolder(run_dir).selection,
    )

    run = {
        "visa_version": "bench",
        "created": "2026-11-29T00:00:00+00:00",
        "input": {"path": str(run_dir / "data.jsonl"), "format": "jsonl", "image_root": str(EXAMPLES)},
        "recipe": {"name": "bench"},
        "agents": [
            {
                "column": f"{f}.{a}",
                "score": f,
                "name": a,
                "unit": "image" if f in ("sc", "oa", "dp") else "sample",
                "models": {},
            }
            for f, names in AGENTS.items()
            for a in names
        ],
        "counts": {
            "records": rows,
            "ok": int((~error).sum()),
            "unique_images": images,
            "text_only": int((text_only & ~error).sum()),
            "errors": {str(k): int((error_kind == k).sum()) for k in ("missing", "agent", "not_image")},
            "malformed": 0,
            "malformed_lines": [],
        },
        "timings": {
            "agents": {
                f"{f}.{a}": {"items": images, "errors": 0, "seconds": 1000.0}
                for f, names in AGENTS.items()
                for a in names
            },
            "scoring_seconds": 10000.0,
            "total_seconds": 10100.0,
        },
        "shapley": {
            "sc": {
                "unit": "image",
                "agents": ["sc.felzenszwalb", "sc.ocr"],
                "weights": {"sc.felzenszwalb": 0.5, "sc.ocr": 0.5},
                "pearson": [[1.0, 0.8], [0.8, 1.0]],
                "exact": True,
                "calibration_size": 1000,
            },
            "im": {
                "unit": "sample",
                "agents": ["im.lm", "im.pmi"],
                "weights": {"im.lm": 0.5, "im.pmi": 0.5},
                "pearson": [[1.0, 0.8], [0.8, 1.0]],
                "exact": True,
                "calibration_size": 1000,
            },
        },
        "selection": {"pool": rows, "budget": "2.5%", "selected": int(selected.sum())},
    }
    if with_input:
        write_input(run_dir / "data.jsonl", rows, text_only, rng)
        from visa.readers import open_input

        run["input"]["fingerprint"] = open_input(run_dir / "data.jsonl").fingerprint()
    RunFolder(run_dir).run_json.write_text(json.dumps(run), encoding="utf-8")


def write_input(path: Path, rows: int, text_only: np.ndarray, rng: np.random.Generator) -> None:
    photos = sorted(p.relative_to(EXAMPLES).as_posix() for p in (EXAMPLES / "images").iterdir())
    pick = rng.integers(0, len(photos), rows)
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            record = {
                "id": f"s{i}",
                "conversations": [
                    {
                        "from": "human",
                        "value": f"{'' if text_only[i] else '<image>'}\nWhat is shown in picture {i}?",
                    },
                    {"from": "gpt", "value": "A short answer that describes the picture in one sentence."},
                ],
            }
            if not text_only[i]:
                record["image"] = photos[pick[i]]
            out.write(json.dumps(record))
            out.write("\n")


def measure(run_dir: Path, gallery_size: int) -> dict:
    from visa.report import build_report

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    path = build_report(run_dir, out=run_dir / f"report-{gallery_size}.html", gallery_size=gallery_size)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    text = path.read_text(encoding="utf-8")
    return {
        "gallery_size": gallery_size,
        "seconds": round(seconds, 1),
        "cpu_seconds": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
        "peak_rss_mib": round(after.ru_maxrss / 1024),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "html_mib": round(len(text.encode()) / 2**20, 2),
        "img": len(re.findall(r"<img ", text)),
        "svg": len(re.findall(r"<svg ", text)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/visa_report_3m"))
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--input", action="store_true", help="also write the input JSONL (thumbnails, texts)")
    parser.add_argument("--gallery-size", type=int, default=12)
    parser.add_argument("--regenerate", action="store_true")
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.dir, args.measure)))
        return
    if args.regenerate or not RunFolder(args.dir).scores.is_file():
        t = time.perf_counter()
        generate(args.dir, args.rows, args.images, args.input)
        print(
            f"generated {args.rows:,} rows in {time.perf_counter() - t:.1f} s -> {args.dir}", file=sys.stderr
        )
    for size in (args.gallery_size, 0):
        out = subprocess.run(
            [sys.executable, __file__, "--dir", str(args.dir), "--measure", str(size)],
            check=True,
            capture_output=True,
            text=True,
        )
        print(out.stdout.strip())


if __name__ == "__main__":
    main()
