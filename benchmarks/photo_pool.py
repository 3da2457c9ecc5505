"""A larger clean pool for ``visa bench noise``: every freely licensed image available offline.

Writes ``OUT/pool.json`` (LLaVA records) and ``OUT/images/``; then run, for example::

    PYTHONPATH=src .venv/bin/python benchmarks/photo_pool.py --out runs/photo-pool
    OMP_NUM_THREADS=1 .venv/bin/visa bench noise --recipe embedded --data runs/photo-pool/pool.json \\
        --out runs/bench-noise-photos-s0 --seed 0 --budget 25%

Sources (nothing here is committed as an image; everything is regenerated from installed packages):

* ``examples/llava.json``: 19 photos of scikit-image, scikit-learn and matplotlib with the
  repository's hand-written conversations (licences in ``examples/LICENSES.md``);
* nine further scikit-image images with the short factual conversations below, checked against the
  pictures: ``gravel`` (CC0, CC0Textures), ``horse`` (CC0, openclipart), ``cell`` (CC0),
  ``microaneurysms`` (CC0, HRF database), ``logo`` (the scikit-image logo, shipped with the
  package under its BSD-3 licence), and the generated ``colorwheel``, ``checkerboard``,
  ``binary_blobs`` (seed 1) and ``shepp_logan_phantom`` (a mathematical phantom);
Not used: Debian's ``opencv-doc`` photos (no licence fit for redistribution, no conversations) and
the synthetic easy-VQA shapes (64-px drawings of one shape: a task family of its own, which a
pool of photos with injected noise would count as "clean" while every visual score rightly ranks
it with the information-poor images).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MAX_SIDE = 640

#: name -> (loader argument, conversations as (question, answer) pairs)
EXTRA: dict[str, list[tuple[str, str]]] = {
    "gravel": [
        ("What does this image show?", "A close-up of grey gravel: many small, angular stones packed together."),
        ("Is the image in colour?", "No, it is a greyscale picture of loose gravel."),
    ],
    "horse": [
        ("What animal is shown?", "A horse, drawn as a solid black silhouette on a white background."),
        ("Which way is the horse facing?", "It faces to the right, standing with all four legs on the ground."),
    ],
    "cell": [
        ("What kind of image is this?", "A grey microscopy image with one bright round cell on a darker banded background."),
        ("Where is the cell?", "The bright round cell sits right of the centre, slightly below the middle."),
    ],
    "microaneurysms": [
        ("What does this image show?", "A small grey detail of a retina with thin dark blood vessels and a few dark spots."),
        ("Are there blood vessels visible?", "Yes, a few thin dark vessels run across the picture."),
    ],
    "logo": [
        ("What is in this picture?", "A round logo split into a green and an orange half by a white S-shaped curve, with a snake drawn over it."),
        ("What colours does the logo use?", "Mainly green and orange, separated by a white curve, on a white background."),
    ],
    "colorwheel": [
        ("What is shown here?", "A colour wheel: a disc whose hue changes around the circle and that turns white at the centre, on black."),
        ("What colour is the centre of the disc?", "The centre is white; the colours get stronger towards the edge."),
    ],
    "checkerboard": [
        ("What pattern is this?", "A black and white checkerboard of square cells."),
        ("How many squares are there in each row?", "Eight squares per row, alternating black and white."),
    ],
    "binary_blobs": [
        ("Describe the image.", "White rounded blobs of different sizes scattered on a black background."),
        ("How many colours does the image have?", "Two: white blobs and a black background."),
    ],
    "shepp_logan_phantom": [
        ("What is this image?", "The Shepp-Logan phantom: grey ellipses inside a bright oval ring, on black, a test image for tomography."),
        ("What shapes are inside the oval?", "Two dark tilted ellipses in the middle, a lighter ellipse above them and a few small spots below."),
    ],
}


def _load_skimage(name: str) -> Image.Image:
    import skimage.data

    array = skimage.data.binary_blobs(length=512, rng=1) if name == "binary_blobs" else getattr(skimage.data, name)()
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        low, high = float(array.min()), float(array.max())
        array = (255 * (array - low) / max(high - low, 1e-9)).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 4:  # RGBA logo: flatten on white
        alpha = array[..., 3:4].astype(np.float64) / 255.0
        array = (array[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    image = Image.fromarray(array).convert("RGB")
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def _record(rid: str, image: str, question: str, answer: str) -> dict:
    return {
        "id": rid,
        "image": f"images/{image}",
        "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
    }


def _examples(out: Path) -> list[dict]:
    records = json.loads((EXAMPLES / "llava.json").read_text(encoding="utf-8"))
    kept = []
    for record in records:
        image = record.get("image")
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        if not isinstance(image, str) or meta.get("kind", "clean") != "clean":
            continue
        shutil.copyfile(EXAMPLES / image, out / "images" / Path(image).name)
        kept.append({**record, "image": f"images/{Path(image).name}"})
    return kept


def build(out: Path) -> Path:
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = _examples(out)
    for name, turns in EXTRA.items():
        _load_skimage(name).save(out / "images" / f"{name}.png")
        records.extend(_record(f"{name}-{i}", f"{name}.png", q, a) for i, (q, a) in enumerate(turns))
    path = out / "pool.json"
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for pool.json and images/")
    args = parser.parse_args()
    path = build(args.out)
    records = json.loads(path.read_text())
    images = {r["image"] for r in records}
    print(f"{path}: {len(records)} clean records on {len(images)} images")


if __name__ == "__main__":
    main()
