"""End to end: `visa score --recipe embedded` of this checkout against another version, in one run.

Both arms run the same command (``python -m visa.cli score --recipe embedded``, library defaults, no
thread settings) in a fresh child process, one after the other, on the same data; each arm's code
comes from its own source folder through ``PYTHONPATH``, so one virtual environment serves both.
Measured per arm: wall seconds of the child, its CPU seconds (user + system, from ``os.wait4``), its
peak RSS, samples per second (records / wall) and per CPU-second, and the agent timings of its
run.json. Then the two score tables are compared column by column on the rows they share: the
largest absolute difference of every numeric column (and the Spearman correlation of each score
column), and how many rows differ in every other column. Score quality is compared too: the AUROC of
every score column for clean against misaligned records (the examples' ``kind``), per arm.

Pools: ``examples`` is ``examples/llava.json`` as shipped (73 records, 19 photos). ``large`` is built
from it with a seed: every photo is turned into ``--variants`` new images (a random crop of 70-95% of
each side, a random scale of 60-100%, a horizontal flip half of the time), each carrying every
record of its photo (clean, misaligned and garbled conversations alike) under a new id; text-only
and multi-image records are repeated once per variant; the records are shuffled, so the samples of
one image are spread over the file as in real data.

Run from the repository root, with the other version's ``src`` folder, e.g. the release::

    git worktree add /tmp/visa-release bd62888      # or: git archive bd62888 | tar -x -C /tmp/visa-release
    .venv/bin/python benchmarks/embedded_speed.py --other-src /tmp/visa-release/src --pools examples large

``--ours-recipe`` runs this checkout's arm with another recipe (the other arm always runs its own
``embedded``): ``benchmarks/embedded_release_agents.yaml`` holds the agents the release ran, with this
version's parameters and without the probes and content clusters that the release did not compute,
so both arms do the same work.

The embedded language model is converted once before the first arm (untimed), so neither arm pays for
the one-time conversion. ``--order`` says which arm runs first on each pool (``alternate``: the other
version first on the first pool, this checkout first on the next, ...), so drifting machine load does
not favour one side. Results go to stdout as JSON (and to ``--out``/result.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from visa.run_folder import RunFolder  # the file names are the same in both versions

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


# -- pools ------------------------------------------------------------------------------------------
def make_large_pool(folder: Path, variants: int, seed: int) -> Path:
    """Photos of the examples as ``variants`` new images each, with their records; returns the data file."""
    rng = random.Random(seed)
    records = json.loads((EXAMPLES / "llava.json").read_text(encoding="utf-8"))
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    by_photo: dict[str, list[dict[str, Any]]] = {}
    others: list[dict[str, Any]] = []
    for record in records:
        image = record.get("image")
        if isinstance(image, str):
            by_photo.setdefault(image, []).append(record)
        else:
            others.append(record)
    out: list[dict[str, Any]] = []
    for v in range(variants):
        for photo, group in sorted(by_photo.items()):
            name = f"images/{Path(photo).stem}-v{v}{Path(photo).suffix}"
            _variant(EXAMPLES / photo, folder / name, rng)
            out += [{**r, "id": f"{r['id']}-v{v}", "image": name} for r in group]
        for r in others:
            copy = {**r, "id": f"{r['id']}-v{v}"}
            if isinstance(r.get("image"), list):
                for photo in r["image"]:
                    shutil.copyfile(EXAMPLES / photo, folder / photo)
            out.append(copy)
    rng.shuffle(out)
    path = folder / "pool.json"
    path.write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    return path


def _variant(source: Path, target: Path, rng: random.Random) -> None:
    with Image.open(source) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    w, h = image.size
    cw, ch = int(w * rng.uniform(0.7, 0.95)), int(h * rng.uniform(0.7, 0.95))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((left, top, left + cw, top + ch))
    scale = rng.uniform(0.6, 1.0)
    image = image.resize((max(16, int(cw * scale)), max(16, int(ch * scale))), Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    if target.suffix.lower() == ".png":
        image.save(target)
    else:
        image.save(target, quality=90)


# -- one arm ----------------------------------------------------------------------------------------
def run_arm(src: Path, data: Path, image_root: Path, out: Path, recipe: str = "embedded") -> dict[str, Any]:
    """``visa score --recipe <recipe>`` with the code in ``src``, in a child process; its costs and run.json."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-m", "visa.cli", "score", "--recipe", recipe, "--data", str(data),
               "--image-root", str(image_root), "--out", str(out)]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    stderr = process.stderr.read() if process.stderr else b""
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command} with {src} failed: {stderr.decode(errors='replace')[-2000:]}")
    run = json.loads(RunFolder(out).run_json.read_text(encoding="utf-8"))
    records = run["counts"]["records"]
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "src": str(src),
        "recipe": recipe,
        "records": records,
        "unique_images": run["counts"]["unique_images"],
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "samples_per_s": round(records / wall, 4),
        "samples_per_cpu_s": round(records / cpu, 4),
        "agents": run["timings"]["agents"],
        "threads": run["recipe"].get("execution", {}).get("threads", "not recorded"),
        "models": sorted({f"{k}: {v}" for a in run["agents"] for k, v in a.get("models", {}).items()}),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


# -- comparing tables -------------------------------------------------------------------------------
def compare_tables(ours: Path, other: Path) -> dict[str, Any]:
    """Column by column on the shared columns (rows matched by ``sample_id``)."""
    a, b = pq.read_table(ours), pq.read_table(other)
    if a.column("sample_id").to_pylist() != b.column("sample_id").to_pylist():
        raise RuntimeError("the two score tables do not list the same samples in the same order")
    numeric: dict[str, float | None] = {}
    spearman: dict[str, float | None] = {}
    differing_rows: dict[str, int] = {}
    for name in sorted(set(a.column_names) & set(b.column_names)):
        x, y = a.column(name), b.column(name)
        if pa.types.is_floating(x.type) or pa.types.is_integer(x.type):
            numeric[name], rho = _numeric_diff(x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False))
            if name.count(".") <= 1 and rho is not None:
                spearman[name] = rho
        else:
            differing_rows[name] = sum(u != v for u, v in zip(x.to_pylist(), y.to_pylist(), strict=True))
    present = [v for v in numeric.values() if v is not None]
    return {
        "max_abs_diff": max(present) if present else 0.0,
        "max_abs_diff_by_column": numeric,
        "spearman_by_column": spearman,
        "differing_rows_by_column": {k: v for k, v in differing_rows.items() if v},
        "only_in_ours": sorted(set(a.column_names) - set(b.column_names)),
        "only_in_other": sorted(set(b.column_names) - set(a.column_names)),
    }


def quality(table_path: Path) -> dict[str, float]:
    """AUROC of every score column for clean vs misaligned records (``meta.kind``; PT negated).

    The score quality that a speed change must not cost: P(a clean sample scores higher than a
    sample whose conversation belongs to another photo) + 1/2 P(tie), over non-null values.
    """
    table = pq.read_table(table_path)
    # the examples keep the kind under "meta": {"kind": ...}; older versions prefix metadata once more
    column = next((c for c in ("meta.kind", "meta.meta.kind") if c in table.column_names), None)
    if column is None:
        return {}
    kind = np.asarray(table.column(column).to_pylist(), dtype=object)
    out: dict[str, float] = {}
    for name in table.column_names:
        family = name.split(".")[0]
        if name.count(".") > 1 or family not in {"sc", "oa", "dp", "pt", "im"}:
            continue
        values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        values = -values if family == "pt" else values
        clean = values[(kind == "clean") & ~np.isnan(values)]
        noisy = values[(kind == "misaligned") & ~np.isnan(values)]
        if len(clean) and len(noisy):
            higher = (clean[:, None] > noisy[None, :]).mean()
            ties = (clean[:, None] == noisy[None, :]).mean()
            out[name] = round(float(higher + ties / 2), 4)
    return out


def _numeric_diff(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    x, y = x.astype(np.float64), y.astype(np.float64)
    if not np.array_equal(np.isnan(x), np.isnan(y)):
        return float("inf"), None  # a value present on one side only
    keep = ~np.isnan(x)
    if not keep.any():
        return None, None
    diff = float(np.max(np.abs(x[keep] - y[keep])))
    if keep.sum() < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return diff, None
    rx, ry = _ranks(x[keep]), _ranks(y[keep])
    return diff, round(float(np.corrcoef(rx, ry)[0, 1]), 6)


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


# -- main -------------------------------------------------------------------------------------------
def warm_model_cache(src: Path) -> None:
    """Convert the packaged GGUF once (untimed), so that no arm pays for the one-time conversion."""
    code = "from visa.backends.embedded_lm import EmbeddedLMBackend as B; b = B(); b.setup(); b.teardown()"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(src)}, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other-src", type=Path, required=True, help="the other version's src folder")
    parser.add_argument("--pools", nargs="+", default=["examples", "large"], choices=["examples", "large"])
    parser.add_argument("--variants", type=int, default=3, help="new images per photo in the large pool")
    parser.add_argument("--seed", type=int, default=0, help="seed of the large pool")
    parser.add_argument("--order", choices=["alternate", "other-first", "ours-first"], default="alternate")
    parser.add_argument("--out", type=Path, default=Path("/tmp/visa-embedded-speed"))
    parser.add_argument("--ours-recipe", default="embedded",
                        help="recipe of this checkout's arm (the other arm always runs its own 'embedded'), e.g. "
                        "benchmarks/embedded_release_agents.yaml: the release's agents, no probes, no clusters")
    args = parser.parse_args()
    ours, other = ROOT / "src", args.other_src.resolve()
    if not (other / "visa" / "cli.py").is_file():
        sys.exit(f"--other-src {other} holds no visa package")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    warm_model_cache(ours)
    results: dict[str, Any] = {"ours": str(ours), "other": str(other), "cpu_count": os.cpu_count(), "pools": {}}
    for n, pool in enumerate(args.pools):
        if pool == "examples":
            data, root = EXAMPLES / "llava.json", EXAMPLES
        else:
            data = make_large_pool(args.out / "pool", args.variants, args.seed)
            root = data.parent
        other_first = args.order == "other-first" or (args.order == "alternate" and n % 2 == 0)
        arms = [("other", other), ("ours", ours)] if other_first else [("ours", ours), ("other", other)]
        recipes = {"ours": str(Path(args.ours_recipe).resolve()) if args.ours_recipe.endswith(".yaml")
                   else args.ours_recipe, "other": "embedded"}
        measured = {name: run_arm(src, data, root, args.out / f"{pool}-{name}", recipes[name]) for name, src in arms}
        a, b = measured["ours"], measured["other"]
        results["pools"][pool] = {
            "data": str(data),
            "first": arms[0][0],
            "ours": a,
            "other": b,
            "samples_per_s_ratio": round(a["samples_per_s"] / b["samples_per_s"], 3),
            "cpu_s_ratio": round(b["cpu_s"] / a["cpu_s"], 3),
            "scores": compare_tables(RunFolder(args.out / f"{pool}-ours").scores,
                                     RunFolder(args.out / f"{pool}-other").scores),
            "auroc_clean_vs_misaligned": {
                name: quality(RunFolder(args.out / f"{pool}-{name}").scores) for name in ("ours", "other")
            },
        }
        print(json.dumps({pool: {k: results["pools"][pool][k] for k in ("samples_per_s_ratio", "cpu_s_ratio")}}),
              file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2)
    (args.out / "result.json").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
