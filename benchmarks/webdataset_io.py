"""Throughput and peak memory of reading WebDataset shards, and of writing a selected subset back.

Generates WebDataset shards (10,000 samples a shard) of LLaVA records in a temporary folder: each
sample a ``{key}.json`` record and a ``{key}.jpg`` (one of 500 distinct 160x120 JPEGs of 3-4 kB),
5% text-only samples (no image member), 5% two-image samples (``{key}.0.jpg``, ``{key}.1.jpg``).
Then, each in a fresh subprocess (peak RSS is that subprocess's ``ru_maxrss``):

* ``read``: ``open_input(folder).iter_raw()`` + ``normalize`` over every sample;
* ``prepare``: what scoring does on the CPU before any agent, per 256-record shard
  (:func:`visa.pipeline.prepare_shard`: normalise, take each image's bytes, key them by content);
* ``write``: ``write_subset`` of every 10th sample into new shards.

Peak RSS that stays the same from the smallest to the largest N shows memory is flat in N.

    PYTHONPATH=src .venv/bin/python benchmarks/webdataset_io.py            # N = 10,000 and 100,000
    PYTHONPATH=src .venv/bin/python benchmarks/webdataset_io.py --sizes 20000 --seed 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_memory import _record  # noqa: E402  (the same generated LLaVA records)

SHARD_SAMPLES = 10_000
DISTINCT_IMAGES = 500


def _jpegs(seed: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(DISTINCT_IMAGES):
        base = np.linspace(0, 255, 160, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, (1, 1, 3))
        noise = rng.normal(0, 12, (120, 160, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=70)
        out.append(buf.getvalue())
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def generate(folder: Path, n: int, seed: int = 0) -> int:
    """Write ``n`` samples as shards under ``folder``; returns the total bytes written."""
    rng = random.Random(seed)
    jpegs = _jpegs(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, n, SHARD_SAMPLES):
        with tarfile.open(folder / f"train-{start // SHARD_SAMPLES:05d}.tar", "w") as tar:
            for i in range(start, min(n, start + SHARD_SAMPLES)):
                record = _record(i, rng)
                images = record.pop("image", None)
                key = f"{i:09d}"
                _add(tar, f"{key}.json", json.dumps(record).encode())
                if isinstance(images, list):
                    for k in range(len(images)):
                        _add(tar, f"{key}.{k}.jpg", rng.choice(jpegs))
                elif images is not None:
                    _add(tar, f"{key}.jpg", rng.choice(jpegs))
    return sum(p.stat().st_size for p in folder.glob("*.tar"))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _usage(t0: float, cpu0: float, count: int, **extra: float) -> dict:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "records": count,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": _cpu() - cpu0,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        **extra,
    }


def work(mode: str, folder: Path) -> dict:
    """Run inside the measuring subprocess."""
    from visa.readers import open_input
    from visa.samples import RecordError, normalize

    inp = open_input(folder)
    t0, cpu0 = time.perf_counter(), _cpu()
    if mode == "read":
        count = errors = 0
        for raw in inp.iter_raw():
            count += 1
            try:
                normalize(raw)
            except RecordError:
                errors += 1
        return _usage(t0, cpu0, count, errors=errors)
    if mode == "prepare":
        from itertools import islice

        from visa.images import ImageSource
        from visa.pipeline import prepare_shard

        source = ImageSource(folder)
        records = inp.iter_raw()
        count = errors = shard = 0
        while chunk := list(islice(records, 256)):
            rows = prepare_shard(shard, chunk, source, frozenset()).rows
            count += len(rows)
            errors += sum(r["error"] is not None for r in rows)
            shard += 1
        return _usage(t0, cpu0, count, errors=errors)
    total = sum(1 for _ in inp.iter_ids())
    t0, cpu0 = time.perf_counter(), _cpu()  # the write alone
    out = inp.write_subset(range(0, total, 10), folder.parent / "out")
    return _usage(t0, cpu0, total, written=len(range(0, total, 10)), out_mib=sum(
        p.stat().st_size for p in out.glob("*.tar")) / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(args.worker[0], Path(args.worker[1]))))
        return

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH")])
        ),
    }
    print(f"{'N':>9} {'MiB':>6} {'mode':>8} {'peak RSS MiB':>12} {'wall s':>7} {'CPU s':>6} "
          f"{'rec/s wall':>10} {'rec/CPU-s':>10}  notes")
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="visa-wds-") as tmp:
            folder = Path(tmp) / "shards"
            size_mib = generate(folder, n, args.seed) / 2**20
            for mode in ("read", "prepare", "write"):
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", mode, str(folder)],
                    env=env, check=True, capture_output=True, text=True,
                ).stdout
                r = json.loads(out)
                notes = f"{r['errors']} errors" if "errors" in r else f"{r['written']:,} samples, {r['out_mib']:.0f} MiB"
                print(f"{n:>9,} {size_mib:>6.0f} {mode:>8} {r['peak_rss_mib']:>12.0f} {r['seconds']:>7.1f} "
                      f"{r['cpu_seconds']:>6.1f} {r['records'] / r['seconds']:>10,.0f} "
                      f"{r['records'] / r['cpu_seconds']:>10,.0f}  {notes}", flush=True)


if __name__ == "__main__":
    main()
