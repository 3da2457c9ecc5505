"""Peak memory of one worker scoring a shard of worst-case images and texts, with and without the budget.

Builds one shard (default 24 records) where every image is as large as the default limits allow
(``images.max_pixels`` = 64M pixels: 8000 x 8000 PNGs that compress to a few hundred kB, so the
files are small and the decoded pixels are huge), some images are large files (noise PNGs of
~40 MB), and some conversations are huge (a 50 MB answer, a 5 MB question). Each arm scores the
shard in a fresh subprocess with the cheap ``image_stats`` agent and reports that subprocess's
peak RSS (``ru_maxrss``), CPU seconds and the error kinds of the rows:

* ``budget``: the default ``execution.memory_budget_bytes`` (1 GiB) and ``max_text_chars``;
* ``unbounded``: a budget of 1 TiB and no practical text cap (what a worker held before the budget).

    PYTHONPATH=src .venv/bin/python benchmarks/worst_case_memory.py
    PYTHONPATH=src .venv/bin/python benchmarks/worst_case_memory.py --giant 16 --noisy 4 --arms budget
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 8000  # 64,000,000 pixels: exactly the default images.max_pixels


def build(folder: Path, giant: int, noisy: int, seed: int) -> Path:
    """The shard's records and images under ``folder``; returns the JSONL path."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(giant):  # different content per image, so none is deduplicated
        tile = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((SIDE, SIDE), Image.NEAREST)
        tile.save(folder / "img" / f"giant{i}.png", compress_level=1)
        records.append(_record(f"giant{i}", f"img/giant{i}.png", "Describe."))
    for i in range(noisy):  # large files: incompressible noise, 3,600 x 3,600 RGB (~39 MB as PNG)
        Image.fromarray(rng.integers(0, 256, (3600, 3600, 3), dtype=np.uint8)).save(folder / "img" / f"noise{i}.png")
        records.append(_record(f"noise{i}", f"img/noise{i}.png", "Describe."))
    records.append(_record("long-answer", "img/giant0.png", "Describe.", answer="word " * 10_000_000))
    records.append(_record("long-question", None, "why? " * 1_000_000))
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _record(rid: str, image: str | None, question: str, answer: str = "A picture.") -> dict:
    record: dict = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image:
        record["image"] = image
    return record


RECIPE = """
name: worst-case
execution: {{shard_size: 1000, memory_budget_bytes: {budget}, max_text_chars: {chars}}}
scores:
  image:
    agents: [{{name: stats, type: image_stats, params: {{batch_size: 16}}}}]
"""


def arm(data: Path, out: Path, budget: int, chars: int) -> dict:
    """Score in this process (called in a fresh subprocess) and report peak RSS and CPU time."""
    from collections import Counter

    import pyarrow.parquet as pq

    from visa.recipe import load_recipe
    from visa.run_folder import RunFolder
    from visa.scoring import score

    recipe_path = out.parent / f"{out.name}.yaml"
    recipe_path.write_text(RECIPE.format(budget=budget, chars=chars))
    started = time.perf_counter()
    score(load_recipe(recipe_path), data, out)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    kinds = Counter(pq.read_table(RunFolder(out).scores).column("error_kind").to_pylist())
    return {
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "rows": {str(k): v for k, v in sorted(kinds.items(), key=lambda kv: str(kv[0]))},
    }


ARMS = {"budget": (1 << 30, 1_000_000), "unbounded": (1 << 40, 1 << 40)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--giant", type=int, default=16, help="8000 x 8000 PNGs in the shard")
    parser.add_argument("--noisy", type=int, default=6, help="~39 MB noise PNGs in the shard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--arm", nargs=3, metavar=("DATA", "OUT", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        data, out, name = args.arm
        print(json.dumps(arm(Path(data), Path(out), *ARMS[name])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        data = build(Path(tmp) / "data", args.giant, args.noisy, args.seed)
        size = sum(p.stat().st_size for p in (Path(tmp) / "data").rglob("*") if p.is_file())
        print(f"shard: {args.giant} x {SIDE}x{SIDE} PNGs, {args.noisy} noise PNGs, a 50 MB answer, a 5 MB "
              f"question; {size / 2**20:.0f} MiB on disk; built in {time.perf_counter() - started:.0f} s")
        for name in args.arms:
            proc = subprocess.run(
                [sys.executable, __file__, "--arm", str(data), str(Path(tmp) / name), name],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                print(f"{name}: failed (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
                continue
            print(f"{name}: {proc.stdout.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
