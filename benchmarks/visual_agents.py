"""Throughput of the embedded (CPU, offline) visual agents on the bundled photos.

Every agent is set up once (timed), warmed up on one batch, then scores all bundled photos
(``examples/images``, 19 photos of 172-640 px) ``--repeats`` times through ``score_batch``, exactly
as the executor calls it: each agent applies the reference resize itself. Reported: setup seconds,
median wall seconds per image over the repeats and images/s, and the same in CPU time of this process
(with one thread, CPU time is what the wall time would be on an idle core: it stays meaningful
when other jobs share the machine). Variants show what the optional steps cost
(OCR recognition, face detection). Prints a Markdown table (and JSON with ``--json``).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/visual_agents.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from visa.agents.base import Agent, ImageItem
from visa.agents.felzenszwalb import FelzenszwalbAgent
from visa.agents.ocr_text import OcrTextAgent, OcrTextParams
from visa.agents.tagger import TaggerAgent, TaggerParams

VARIANTS: dict[str, tuple[str, Callable[[], Agent]]] = {
    "felzenszwalb": ("sc.felzenszwalb (defaults)", lambda: FelzenszwalbAgent()),
    "ocr_text": ("sc.ocr_text, detection + recognition (default)", lambda: OcrTextAgent()),
    "ocr_text_detect_only": (
        "sc.ocr_text, detection only (recognize: false)",
        lambda: OcrTextAgent(OcrTextParams(recognize=False)),
    ),
    "tagger": ("oa.tagger, classifier + faces (default)", lambda: TaggerAgent()),
    "tagger_no_faces": (
        "oa.tagger, classifier only (faces: false)",
        lambda: TaggerAgent(TaggerParams(faces=False)),
    ),
}


def bench(agent: Agent, items: list[ImageItem], repeats: int) -> dict[str, float]:
    started = time.perf_counter()
    agent.setup()
    setup_s = time.perf_counter() - started
    batch = agent.params.batch_size
    agent.score_batch(items[:batch])  # warm-up
    per_image: list[float] = []
    cpu_per_image: list[float] = []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        for i in range(0, len(items), batch):
            results = agent.score_batch(items[i : i + batch])
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                raise RuntimeError(f"{type(agent).__name__} failed: {failed[0]!r}")
        per_image.append((time.perf_counter() - started) / len(items))
        cpu_per_image.append((time.process_time() - cpu_started) / len(items))
    agent.teardown()
    seconds, cpu_seconds = statistics.median(per_image), statistics.median(cpu_per_image)
    return {
        "setup_s": setup_s,
        "s_per_image": seconds,
        "images_per_s": 1.0 / seconds,
        "cpu_s_per_image": cpu_seconds,
        "images_per_cpu_s": 1.0 / cpu_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=ROOT / "examples" / "images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--agents", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    items = [ImageItem(p.stem, Image.open(p).convert("RGB")) for p in paths]
    if not items:
        sys.exit(f"no images in {args.images}")
    results = {}
    for name in args.agents:
        label, build = VARIANTS[name]
        results[name] = {"label": label, **bench(build(), items, args.repeats)}

    print(
        f"{len(items)} photos from {args.images.name}/, {args.repeats} repeats, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}"
    )
    print("| agent | setup (s) | wall s/image | images/s | CPU s/image | images per CPU-second |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results.values():
        print(
            f"| {r['label']} | {r['setup_s']:.1f} | {r['s_per_image']:.3f} | {r['images_per_s']:.1f}"
            f" | {r['cpu_s_per_image']:.3f} | {r['images_per_cpu_s']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
