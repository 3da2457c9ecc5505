"""The paper's model path end to end on one GPU, at random init, through `visa score`.

What runs: a recipe with the real agents on full-size architectures with random weights (speed does
not depend on the weights; no hub is reachable): SAM 2.1 Hiera-L automatic masks (SC, reference
settings), Grounding DINO base over the bundled 1,886-tag vocabulary (OA, the full procedure), and
a 2B-class Qwen2-VL-shaped model behind ONE transformers backend spec shared by the DP judge
(greedy generation with images), PT and IM (teacher forcing with and without the image). The
checkpoints are written to a scratch folder first and loaded by the agents as local models, so
`setup()`, the shared-engine cache and the local executor run exactly as in a user's run.

Prints one JSON object: per agent the items per second (images/s for SC, OA, DP; samples/s for PT
and IM; from the run's own timings), the peak GPU memory, the wall time of each phase, and the
checks: one engine set up per model spec, every agent produced results without error rows, and the
three MLLM agents shared one model object. ``ok`` is false when a check fails.

    PYTHONPATH=src python benchmarks/gpu_smoke.py                  # on a GPU machine (< 8 min on one H200)
    PYTHONPATH=src python benchmarks/gpu_smoke.py --tiny --images 3   # CPU check of the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
START = time.perf_counter()

QUESTIONS = [
    ("What is in the picture?", "A scene with several objects; the main one is in the centre."),
    ("Describe the colours.", "Mostly warm tones with a few darker areas near the edges."),
    ("Is there any text?", "No readable text is visible."),
    ("What could happen next?", "Nothing dramatic: it looks like a calm, everyday moment."),
]


def elapsed() -> float:
    return round(time.perf_counter() - START, 2)


def photos(n: int, tiny: bool) -> list[Image.Image]:
    """Real photos bundled with scikit-image / scikit-learn, cycled and cropped to ``n`` images."""
    from skimage import data

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry()]
    try:
        from sklearn.datasets import load_sample_images

        sources += list(load_sample_images().images)
    except ImportError:
        pass
    out = []
    for i in range(n):
        array = sources[i % len(sources)]
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        image = Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("RGB")
        if i >= len(sources):  # a different crop of a photo seen before: a new unique image
            w, h = image.size
            image = image.crop((i % 7, i % 5, w - i % 11, h - i % 3))
        out.append(image.resize((160, 120)) if tiny else image)
    return out


def write_dataset(folder: Path, images: list[Image.Image], per_image: int) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i, image in enumerate(images):
        image.save(folder / "img" / f"{i}.jpg", quality=92)
        for j in range(per_image):
            question, answer = QUESTIONS[(i + j) % len(QUESTIONS)]
            records.append({
                "id": f"s{i}-{j}",
                "image": f"img/{i}.jpg",
                "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
            })
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def write_checkpoints(folder: Path, tiny: bool, phases: dict) -> dict[str, str]:
    """SAM 2.1 Hiera-L, Grounding DINO base and a Qwen2-VL-2B-shaped model at random init, saved locally."""
    import torch
    from gpu_visual import bert_tokenizer, gdino_config
    from transformers import GroundingDinoForObjectDetection, GroundingDinoImageProcessor, Sam2Model

    from visa.agents.sam2 import sam2_config
    from visa.testing import write_random_checkpoint

    torch.manual_seed(0)
    paths = {"sam2": folder / "sam2", "grounding_dino": folder / "grounding_dino", "vlm": folder / "vlm"}
    Sam2Model(sam2_config(tiny=tiny)).save_pretrained(paths["sam2"])
    phases["write_sam2_s"] = elapsed()
    tokenizer, _ = bert_tokenizer()
    GroundingDinoForObjectDetection(gdino_config(tiny, len(tokenizer))).save_pretrained(paths["grounding_dino"])
    tokenizer.save_pretrained(paths["grounding_dino"])
    GroundingDinoImageProcessor().save_pretrained(paths["grounding_dino"])
    phases["write_grounding_dino_s"] = elapsed()
    write_random_checkpoint("qwen2_vl", paths["vlm"], size="tiny" if tiny else "qwen2-vl-2b")
    phases["write_vlm_s"] = elapsed()
    return {name: str(path) for name, path in paths.items()}


def recipe_text(paths: dict[str, str], args: argparse.Namespace) -> str:
    device = args.device
    vlm = {"type": "transformers", "params": {"model": paths["vlm"], "device": device, "batch_size": args.batch_size}}
    spec = json.dumps(vlm)
    gdino_extra = "image_size: 320, max_image_size: 480," if args.tiny else ""
    return f"""
name: gpu-smoke
execution: {{shard_size: {args.shard_size}, hf_offline: true}}
scores:
  sc:
    agents:
      - {{name: sam2, type: sam2, params: {{model_id: {paths['sam2']}, device: {device}}}}}
  oa:
    agents:
      - name: grounding_dino
        type: grounding_dino
        params: {{model_id: {paths['grounding_dino']}, device: {device}, mode: full,
                  prompt_batch_size: {args.prompt_batch_size}, {gdino_extra} repeats: {args.repeats}}}
  dp:
    agents:
      - {{name: qwen2vl, type: judge, params: {{backend: {spec}, max_new_tokens: {args.max_new_tokens}}}}}
  pt:
    agents:
      - {{name: qwen2vl, type: perplexity, params: {{k: 10, backend: {spec}}}}}
  im:
    agents:
      - {{name: qwen2vl, type: mutual_information, params: {{backend: {spec}}}}}
"""


def watch_engines() -> dict[str, Any]:
    """Record which model object each MLLM agent's backend holds (to prove one shared model)."""
    from visa.backends import shared

    seen: dict[str, Any] = {"models": set(), "acquires": 0}
    acquire = shared.ENGINES.acquire

    def counting(spec: Any) -> Any:
        backend = acquire(spec)
        seen["acquires"] += 1
        seen["models"].add(id(getattr(backend, "model", None)))
        return backend

    shared.ENGINES.acquire = counting  # type: ignore[method-assign]
    return seen


def run(args: argparse.Namespace, report: dict) -> None:
    import tempfile

    import torch

    from visa.backends import shared
    from visa.recipe import load_recipe
    from visa.scoring import score

    cuda = torch.cuda.is_available()
    report["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    if args.device == "auto":
        args.device = "cuda" if cuda else "cpu"
    phases = report["phases"]
    with tempfile.TemporaryDirectory(prefix="visa-gpu-smoke-") as scratch:
        folder = Path(scratch)
        paths = write_checkpoints(folder / "models", args.tiny, phases)
        data = write_dataset(folder / "data", photos(args.images, args.tiny), args.per_image)
        recipe_path = folder / "recipe.yaml"
        recipe_path.write_text(recipe_text(paths, args))
        recipe = load_recipe(str(recipe_path))
        seen = watch_engines()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        record = score(recipe, data, folder / "run", image_root=data.parent)
        phases["score_s"] = elapsed()
        report["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
        report["agents"] = per_agent(record)
        report["scoring_seconds"] = record["timings"]["scoring_seconds"]
        report["records"] = record["counts"]["records"]
        report["unique_images"] = record["counts"]["unique_images"]
        report["errors"] = record["counts"]["errors"]
        key = recipe.scores["dp"].agents[0].params["backend"]
        from visa.backends.registry import BackendSpec

        engine_key = BackendSpec.model_validate(key).engine_key()
        checks = report["checks"]
        checks["one_engine_for_the_vlm"] = shared.ENGINES.setups.get(engine_key) == 1
        checks["three_agents_one_model_object"] = seen["acquires"] == 3 and len(seen["models"]) == 1
        checks["no_error_rows"] = not record["counts"]["errors"]
        checks["every_agent_scored"] = all(a["items"] > 0 and a["errors"] == 0 for a in report["agents"].values())
        checks["engines_released"] = engine_key not in shared.ENGINES.loaded()


def per_agent(record: dict) -> dict[str, dict]:
    units = {a["column"]: a["unit"] for a in record["agents"]}
    out = {}
    for column, timing in record["timings"]["agents"].items():
        seconds = timing["seconds"]
        rate = timing["items"] / seconds if seconds else None
        unit = "images_per_s" if units.get(column) == "image" else "samples_per_s"
        out[column] = {
            "items": timing["items"], "errors": timing["errors"], "seconds": seconds,
            unit: round(rate, 3) if rate else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random shapes (a CPU check of the script)")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--per-image", type=int, default=2, help="samples (conversations) per image")
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="MLLM requests per forward")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="DP judgement length")
    parser.add_argument("--prompt-batch-size", type=int, default=8, help="Grounding DINO prompts per forward")
    parser.add_argument("--repeats", type=int, default=3, help="Grounding DINO vocabulary repeats (reference: 3)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.tiny:
        args.max_new_tokens = min(args.max_new_tokens, 8)
        args.repeats = 1
    report: dict[str, Any] = {"tiny": args.tiny, "phases": {}, "checks": {}}
    try:
        run(args, report)
    except Exception:  # noqa: BLE001 - report what broke, with what was measured before it
        report["error"] = traceback.format_exc(limit=8)
    report["wall_s"] = elapsed()
    report["ok"] = "error" not in report and all(report["checks"].values()) and bool(report["checks"])
    print(json.dumps(report, indent=1, default=str))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
