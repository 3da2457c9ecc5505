"""Time ``visa.selection.select`` on a synthetic LLaVA-OneVision-sized score table.

The table has the shape of ``scores.parquet``: ``--rows`` samples (default 3M) over ``--images``
unique images (default 1M), 1% error rows, 3% text-only rows, ``meta.source`` with 20 values, five
score families with two agents each (sc, oa, dp per image; pt, im per sample), auxiliary agent
fields and a ``text_hash`` column. Generation runs once into ``--dir``; the selection is then timed in
a fresh process (fusion + both stages + writing selection.parquet + updating run.json; the selected
records themselves are not written) and its peak RSS is read from ``getrusage``. The table also has
the content-cluster columns ``visa score`` writes (``cluster``: 64 clusters, ``cluster_distance``,
``cluster_typicality``) and two image guard fields (``sc.a.correlation``, ``sc.a.grid``, about 1% of
images below the gate of the ``clusters+gate`` mode); each mode of ``MODES`` is measured in its own
process, one after the other.

    PYTHONPATH=src .venv/bin/python benchmarks/select_3m.py --dir /tmp/visa_select_3m
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from visa.run_folder import RunFolder

FAMILIES = {"sc": "image", "oa": "image", "dp": "image", "pt": "sample", "im": "sample"}
AGENTS = ("a", "b")


def generate(run_dir: Path, rows: int, images: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, images, rows)
    text_only = rng.random(rows) < 0.03
    error = rng.random(rows) < 0.01
    unique_keys = pa.array([f"{k:032x}" for k in rng.integers(0, 2**63, images)], pa.string())
    index = pa.array(image, pa.int64(), mask=text_only)
    image_key = unique_keys.take(index)
    offsets = np.zeros(rows + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(~text_only)
    image_keys = pa.ListArray.from_arrays(pa.array(offsets), unique_keys.take(pa.array(image[~text_only])))
    sources = pa.array([f"source_{i:02d}" for i in range(20)])
    share = rng.dirichlet(np.ones(20))
    ids = pa.array(np.arange(rows).astype("U"), pa.string())
    cols: dict[str, pa.Array] = {
        "row": pa.array(np.arange(rows), pa.int64()),
        "line": pa.array(np.arange(rows) + 1, pa.int64()),
        "sample_id": ids,
        "image_key": image_key,
        "image_keys": image_keys,
        "error_kind": pa.array(np.where(error, "agent", None).tolist(), pa.string()),
        "error": pa.array(np.where(error, "agent im.a: failed", None).tolist(), pa.string()),
        "meta.source": sources.take(pa.array(rng.choice(20, size=rows, p=share))),
        "text_hash": pa.array(rng.integers(0, rows, rows).astype("U"), pa.string()),
    }
    quality = rng.normal(size=images)
    for family, unit in FAMILIES.items():
        common = rng.normal(size=images if unit == "image" else rows)
        for agent in AGENTS:
            if unit == "image":
                values = (quality + common + 0.5 * rng.normal(size=images))[image]
                values[text_only] = np.nan
            else:
                values = common + 0.5 * rng.normal(size=rows) + (0.3 if family == "im" else 2.0)
            values[rng.random(rows) < 0.002] = np.nan  # a few failed items
            cols[f"{family}.{agent}"] = pa.array(values, pa.float64(), mask=np.isnan(values))
    cols["sc.a.regions"] = pa.array(rng.integers(0, 200, rows), pa.int64())
    # content clusters as `visa score` writes them: 64 clusters of unequal size, most samples of an
    # image in its cluster, null on error and text-only rows
    cluster = rng.choice(64, size=images, p=rng.dirichlet(np.ones(64)))[image]
    moved = rng.random(rows) < 0.1
    cluster[moved] = rng.integers(0, 64, int(moved.sum()))
    unclustered = error | text_only
    cols["cluster"] = pa.array(cluster.astype(np.int32), pa.int32(), mask=unclustered)
    cols["cluster_distance"] = pa.array(rng.gamma(2.0, 0.5, rows), pa.float64(), mask=unclustered)
    cols["cluster_typicality"] = pa.array(rng.uniform(-0.2, 1.0, rows), pa.float64(), mask=unclustered)
    # two image guards per image (as the embedded recipe's gate reads): about 1% of images fail each
    for field, low in (("correlation", 1.0), ("grid", -10.0)):
        guard = (low + 5.0 + rng.normal(0, 2.0, images))[image]
        guard[text_only] = np.nan
        cols[f"sc.a.{field}"] = pa.array(guard, pa.float64(), mask=np.isnan(guard))
    pq.write_table(pa.table(cols), RunFolder(run_dir).scores)
    run = {
        "input": {"path": str(run_dir / "data.jsonl"), "format": "jsonl"},
        "recipe": {"name": "bench", "scores": {}},
        "agents": [
            {"column": f"{f}.{a}", "score": f, "name": a, "unit": unit}
            for f, unit in FAMILIES.items()
            for a in AGENTS
        ],
    }
    RunFolder(run_dir).run_json.write_text(json.dumps(run), encoding="utf-8")


#: What each measured mode selects with: quotas on meta.source without clusters (the original
#: measurement), the same with clusters ranking images within clusters, and clusters spreading the
#: budget themselves (no quota field).
MODES = {
    "off": {"quota_field": "meta.source", "clusters": "off"},
    "clusters+quota": {"quota_field": "meta.source", "clusters": "auto"},
    "clusters": {"clusters": "auto"},
    "clusters+gate": {"clusters": "auto", "image_gate": {"sc.a.correlation": 1.0, "sc.a.grid": -10.0}},
}


def measure(run_dir: Path, budget: str, mode: str = "off") -> dict:
    from visa.selection import SelectionOptions, select

    options = SelectionOptions(budget=budget, image_keep=0.5, **MODES[mode])
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    result = select(run_dir, options, write_records=False)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "mode": mode,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "peak_rss_mib": round(after.ru_maxrss / 1024),
        "stages": {k: round(v, 2) for k, v in result.timings.items()},
        "selected": result.summary["selected"],
        "dropped": result.summary["dropped"],
        "unique_images": result.summary["images"]["unique"],
        "clusters": len((result.summary.get("clusters") or {}).get("groups", {})),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/visa_select_3m"))
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--budget", default="2.5%")
    parser.add_argument("--regenerate", action="store_true")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.dir, args.budget, args.measure)))
        return
    scores = RunFolder(args.dir).scores
    stale = scores.is_file() and "cluster_typicality" not in pq.read_schema(scores).names
    if args.regenerate or stale or not scores.is_file():
        t = time.perf_counter()
        generate(args.dir, args.rows, args.images)
        print(
            f"generated {args.rows:,} rows in {time.perf_counter() - t:.1f} s -> {args.dir}", file=sys.stderr
        )
    for mode in args.modes.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--measure", mode, "--dir", str(args.dir), "--budget", args.budget],
            check=True,
            capture_output=True,
            text=True,
        )
        print(out.stdout.strip())


if __name__ == "__main__":
    main()
