"""Peak memory and throughput of streaming a LLaVA JSON array through a reader and ``normalize``.

Generates LLaVA-style JSON arrays (realistic records of ~300-600 bytes, 2-4 turns, a few text-only
and multi-image records) in a temporary folder, then streams each one in a fresh subprocess through
``open_input(path).iter_raw()`` + ``normalize`` and reports the subprocess's peak RSS and records/s.
Peak RSS that stays the same from the smallest to the largest N shows memory is flat in N.

    PYTHONPATH=src .venv/bin/python benchmarks/stream_memory.py            # N = 100,000 and 1,000,000
    PYTHONPATH=src .venv/bin/python benchmarks/stream_memory.py --sizes 20000 200000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_WORDS = [
    *("the", "a", "image", "shows", "man", "woman", "dog", "cat", "car", "street", "table", "red"),
    *("blue", "green", "large", "small", "two", "three", "standing", "sitting", "holding", "near"),
    *("behind", "left", "right", "background", "foreground", "building", "tree", "sky", "water"),
    *("people", "white", "black", "wooden", "metal", "plate", "food", "sign", "window", "door"),
]
_QUESTIONS = (
    "What is the man holding?",
    "Describe the image in detail.",
    "What color is the car on the left?",
    "How many people are visible in the picture?",
    "What is written on the sign?",
    "Where could this photo have been taken?",
)


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def _record(i: int, rng: random.Random) -> dict:
    turns = []
    for t in range(rng.choice((1, 1, 2))):
        question = rng.choice(_QUESTIONS)
        turns.append({"from": "human", "value": ("<image>\n" + question) if t == 0 else question})
        turns.append({"from": "gpt", "value": _sentence(rng, 15, 50)})
    rec: dict = {"id": f"{i:012d}"}
    kind = i % 20
    if kind == 0:  # text-only
        turns[0]["value"] = turns[0]["value"].removeprefix("<image>\n")
    elif kind == 1:  # multi-image
        rec["image"] = [f"coco/train2017/{i:012d}.jpg", f"gqa/images/{i + 7:07d}.jpg"]
    else:
        rec["image"] = f"coco/train2017/{i:012d}.jpg"
    rec["conversations"] = turns
    return rec


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        f.write("[\n")
        for i in range(n):
            if i:
                f.write(",\n")
            f.write(json.dumps(_record(i, rng)))
        f.write("\n]\n")


def stream(path: Path) -> dict:
    """Run inside the measuring subprocess: read every record, normalize it, report."""
    from visa.readers import open_input
    from visa.samples import RecordError, normalize

    clock = time.perf_counter
    t0 = clock()
    count = errors = 0
    normalizing = 0.0
    for raw in open_input(path).iter_raw():
        count += 1
        t = clock()
        try:
            normalize(raw)
        except RecordError:
            errors += 1
        normalizing += clock() - t
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "records": count,
        "errors": errors,
        "seconds": clock() - t0,
        "normalize_seconds": normalizing,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # ru_maxrss is in KiB on Linux
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(stream(args.worker)))
        return

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH")])
        ),
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="visa-stream-") as tmp:
        for n in args.sizes:
            path = Path(tmp) / f"llava_{n}.json"
            generate(path, n)
            size_mib = path.stat().st_size / 2**20
            out = subprocess.run(
                [sys.executable, __file__, "--worker", str(path)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            result = json.loads(out)
            rows.append((n, size_mib, result))
            path.unlink()
    header = (
        "N",
        "file MiB",
        "bytes/rec",
        "peak RSS MiB",
        "wall s",
        "CPU s",
        "rec/s wall",
        "rec/CPU-s",
        "read %",
    )
    print(("{:>10} {:>9} {:>9} {:>12} {:>7} {:>6} {:>10} {:>10} {:>6}").format(*header))
    for n, size_mib, r in rows:
        read_share = 100 * (r["seconds"] - r["normalize_seconds"]) / r["seconds"]
        print(
            f"{n:>10,} {size_mib:>9.0f} {size_mib * 2**20 / n:>9.0f} {r['peak_rss_mib']:>12.0f} "
            f"{r['seconds']:>7.1f} {r['cpu_seconds']:>6.1f} {r['records'] / r['seconds']:>10,.0f} "
            f"{r['records'] / r['cpu_seconds']:>10,.0f} {read_share:>6.0f}"
        )
        if r["errors"]:
            print(f"  {r['errors']} records failed to normalize")


if __name__ == "__main__":
    main()
