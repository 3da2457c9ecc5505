"""Fidelity of the ``sam2`` agent's mask generator to SAM 2's own, on identical random weights.

Two independent implementations of SAM 2 automatic mask generation run on the same images with
the same weights and settings, and their mask sets are compared pixel for pixel:

* the reference: the ``sam2`` package's ``SAM2AutomaticMaskGenerator`` on its own model code, in a
  separate environment (it needs torchvision, which does not install beside this project's CPU
  torch; see BENCHMARKS.md for the one-time setup);
* ours: :class:`visa.agents.sam2.Sam2Agent` on transformers' ``Sam2Model``, in this environment.

The reference builds SAM 2.1 Hiera-T at random initialisation (seeded); the hypernetwork output
layers of its mask decoder are scaled up so that random masks are crisp and many pass the
reference thresholds (otherwise nearly every mask is filtered out and the comparison says
nothing). Its weights are written as safetensors and loaded into ``Sam2Model`` by a key mapping
written here. One substitution on the reference side: SAM 2's hole / sprinkle filling calls a
compiled CUDA kernel (``sam2._C``) that a CPU install lacks (the reference then silently skips the
filling), so the reference run gets scipy's 8-connected labelling in its place.

Each setting is run on each image; the report lists, per image and setting, how many masks each side
found, how many are identical, and for every mask of one side without an identical twin on the
other: its best IoU with the other side's masks and the quantities near a threshold (predicted IoU,
stability score), which name the cause. ``identical`` is true when every mask set matches exactly.

    PYTHONPATH=src .venv/bin/python benchmarks/sam2_fidelity.py                       # after the setup
    PYTHONPATH=src .venv/bin/python benchmarks/sam2_fidelity.py --reference-python PATH --images 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE_PYTHON = ROOT / ".sam2-venv" / "bin" / "python"

#: METHOD.md's reference settings, and the same without mask-to-mask refinement.
SETTINGS: dict[str, dict[str, Any]] = {
    "reference": {
        "points_per_side": 16, "pred_iou_thresh": 0.4, "stability_score_thresh": 0.92,
        "stability_score_offset": 0.7, "mask_threshold": 0.5, "box_nms_thresh": 0.7, "crop_n_layers": 1,
        "crop_nms_thresh": 0.7, "crop_overlap_ratio": 512 / 1500, "crop_n_points_downscale_factor": 2,
        "min_mask_region_area": 25, "use_m2m": True,
    },
}
#: Without mask-to-mask refinement.
SETTINGS["no_m2m"] = {**SETTINGS["reference"], "use_m2m": False}
#: Random masks from different points are near copies, so NMS leaves one or two: with both NMS off
#: (IoU thresholds 1.0) and the predicted-IoU test off, every mask that passes stability >= 0.5 and the
#: crop-edge filter is compared, i.e. decoding, filling, m2m, stability and crops mask by mask.
SETTINGS["loose_no_nms"] = {**SETTINGS["reference"], "pred_iou_thresh": 0.0, "stability_score_thresh": 0.5,
                            "box_nms_thresh": 1.0, "crop_nms_thresh": 1.0}
POINTS_PER_BATCH = 64
HIERA_T = {  # SAM 2.1 Hiera-T (configs/sam2.1/sam2.1_hiera_t.yaml)
    "hidden_size": 96, "num_attention_heads": 1, "blocks_per_stage": [1, 2, 7, 2],
    "embed_dim_per_stage": [96, 192, 384, 768], "num_attention_heads_per_stage": [1, 2, 4, 8],
    "window_size_per_stage": [8, 4, 14, 7], "global_attention_blocks": [5, 7, 9],
    "window_positional_embedding_background_size": [7, 7],
}


# -- images -------------------------------------------------------------------------------------------
def test_images(n: int, size: int) -> list[np.ndarray]:
    """Real photos bundled with scikit-image, resized so the long side is ``size`` (HWC uint8)."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.motorcycle_left()
              if hasattr(data, "motorcycle_left") else data.immunohistochemistry()]
    out = []
    for array in photos[:n]:
        image = Image.fromarray(array).convert("RGB")
        scale = size / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        out.append(np.asarray(image))
    return out


# -- the reference side (runs in the sam2 environment) ------------------------------------------------
def reference_role(work: Path, seed: int, gain: float, resolution: int, settings: list[str]) -> None:
    import torch
    from safetensors.torch import save_file
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.build_sam import build_sam2
    from sam2.utils import misc

    misc.get_connected_components = _scipy_connected_components
    torch.manual_seed(seed)
    model = build_sam2(
        "configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu",
        hydra_overrides_extra=[f"++model.image_size={resolution}"],
    )
    with torch.no_grad():
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(gain)
    keep = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(keep)}
    save_file(state, str(work / "weights.safetensors"))
    images = np.load(work / "images.npz")
    for name in settings:
        generator = SAM2AutomaticMaskGenerator(model, points_per_batch=POINTS_PER_BATCH, **SETTINGS[name])
        # The predictor spells out the feature sizes of a 1024-pixel input; give it those of this size.
        generator.predictor._bb_feat_sizes = [(resolution // s, resolution // s) for s in (4, 8, 16)]
        for key in sorted(images.files):
            started = time.perf_counter()
            masks = generator.generate(images[key])
            _save_masks(work / f"reference.{name}.{key}.npz", [
                (m["segmentation"], m["predicted_iou"], m["stability_score"]) for m in masks
            ], time.perf_counter() - started)


def _scipy_connected_components(mask: Any) -> tuple[Any, Any]:
    """``sam2.utils.misc.get_connected_components`` (8-connectivity labels and areas) with scipy."""
    import torch
    from scipy import ndimage

    array = mask.to(torch.uint8).cpu().numpy()
    labels = np.zeros(array.shape, dtype=np.int32)
    areas = np.zeros(array.shape, dtype=np.int32)
    for i in range(array.shape[0]):
        lab, count = ndimage.label(array[i, 0], structure=np.ones((3, 3), dtype=bool))
        if count:
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            labels[i, 0], areas[i, 0] = lab, sizes[lab]
    return torch.from_numpy(labels).to(mask.device), torch.from_numpy(areas).to(mask.device)


def _save_masks(path: Path, masks: list[tuple[np.ndarray, float, float]], seconds: float) -> None:
    stack = np.stack([m for m, _, _ in masks]).astype(bool) if masks else np.zeros((0, 1, 1), dtype=bool)
    np.savez_compressed(
        path, masks=np.packbits(stack, axis=-1), shape=np.array(stack.shape),
        iou=np.array([q for _, q, _ in masks], dtype=np.float64),
        stability=np.array([s for _, _, s in masks], dtype=np.float64), seconds=np.array(seconds),
    )


def _load_masks(path: Path) -> dict[str, np.ndarray]:
    data = np.load(path)
    shape = tuple(data["shape"])
    masks = np.unpackbits(data["masks"], axis=-1, count=shape[-1]).astype(bool).reshape(shape)
    return {"masks": masks, "iou": data["iou"], "stability": data["stability"], "seconds": float(data["seconds"])}


# -- our side ------------------------------------------------------------------------------------------
def hf_state_dict(reference: dict[str, Any]) -> dict[str, Any]:
    """SAM 2 checkpoint names -> transformers ``Sam2Model`` names (image encoder, prompt encoder, decoder)."""
    import re

    import torch

    out: dict[str, Any] = {}
    points: dict[int, Any] = {}
    for key, value in reference.items():
        match = re.fullmatch(r"sam_prompt_encoder\.point_embeddings\.(\d+)\.weight", key)
        if match:
            points[int(match.group(1))] = value
            continue
        new = _rename(key)
        out[new] = value
        if new == "prompt_encoder.shared_embedding.positional_embedding":
            out["shared_image_embedding.positional_embedding"] = value
    out["prompt_encoder.point_embed.weight"] = torch.cat([points[i] for i in sorted(points)], dim=0)
    return out


_PREFIXES = [
    ("image_encoder.trunk.patch_embed.proj.", "vision_encoder.backbone.patch_embed.projection."),
    ("image_encoder.trunk.", "vision_encoder.backbone."),
    ("image_encoder.neck.", "vision_encoder.neck."),
    ("sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "prompt_encoder.shared_embedding.positional_embedding"),
    ("sam_prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("sam_prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("sam_prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("sam_prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("sam_prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("sam_prompt_encoder.", "prompt_encoder."),
    ("sam_mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("sam_mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("sam_mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    ("sam_mask_decoder.", "mask_decoder."),
    ("no_mem_embed", "no_memory_embedding"),
]


def _rename(key: str) -> str:
    import re

    for old, new in _PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    key = re.sub(r"\.convs\.(\d+)\.conv\.", r".convs.\1.", key)
    key = re.sub(r"\.norm(\d)\.", r".layer_norm\1.", key)
    key = key.replace(".norm_final_attn.", ".layer_norm_final_attn.").replace(".out_proj.", ".o_proj.")
    three = r"(iou_prediction_head|pred_obj_score_head|output_hypernetworks_mlps\.\d+)\.layers\.(\d)\."
    match = re.search(three, key)
    if match:
        name = {"0": "proj_in", "1": "layers.0", "2": "proj_out"}[match.group(2)]
        return key[: match.start()] + f"{match.group(1)}.{name}." + key[match.end():]
    return re.sub(r"\.mlp\.layers\.0\.", ".mlp.proj_in.", re.sub(r"\.mlp\.layers\.1\.", ".mlp.proj_out.", key))


def load_ours(work: Path, resolution: int) -> Any:
    import torch
    from safetensors.torch import load_file
    from transformers import Sam2Config, Sam2Model
    from transformers.models.sam2.configuration_sam2 import (
        Sam2HieraDetConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    sizes = [[resolution // stride] * 2 for stride in (4, 8, 16)]
    vision = Sam2VisionConfig(
        backbone_config=Sam2HieraDetConfig(**HIERA_T, image_size=[resolution, resolution]),
        backbone_channel_list=HIERA_T["embed_dim_per_stage"][::-1],
        backbone_feature_sizes=sizes,
    )
    prompt = Sam2PromptEncoderConfig(image_size=resolution)
    model = Sam2Model(Sam2Config(vision_config=vision, prompt_encoder_config=prompt)).eval()
    state = hf_state_dict(load_file(str(work / "weights.safetensors")))
    missing, unexpected = model.load_state_dict(state, strict=False)
    unset = [k for k in missing if k.startswith(("vision_encoder.", "prompt_encoder.", "mask_decoder.", "shared_image"))]
    if unset or unexpected:
        raise RuntimeError(f"weights do not map: unset {unset[:5]}, unexpected {unexpected[:5]}")
    torch.set_grad_enabled(False)
    return model


def our_masks(model: Any, image: np.ndarray, settings: dict[str, Any]) -> tuple[list[tuple[np.ndarray, float, float]], float]:
    from PIL import Image

    from visa.agents.sam2 import Sam2Agent, Sam2Params

    agent = Sam2Agent.from_model(model, Sam2Params(
        **settings, device="cpu", reference_resize=False, points_per_batch=POINTS_PER_BATCH,
    ))
    started = time.perf_counter()
    records, (width, height) = agent.generate(Image.fromarray(image))
    out = []
    for r in records:
        full = np.zeros((height, width), dtype=bool)
        x0, y0, x1, y1 = r.box
        full[y0 : y1 + 1, x0 : x1 + 1] = r.pixels
        out.append((full, r.iou, r.stability))
    return out, time.perf_counter() - started


# -- comparison -----------------------------------------------------------------------------------------
def compare(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Mask sets as multisets of exact pixel sets: identical pairs, then each unpaired mask."""
    from collections import Counter

    a, b = ours["masks"], theirs["masks"]
    keys_a = [m.tobytes() for m in a]
    keys_b = [m.tobytes() for m in b]
    common = Counter(keys_a) & Counter(keys_b)
    only_ours = _unpaired(keys_a, common)
    only_theirs = _unpaired(keys_b, common)
    return {
        "ours": len(a), "reference": len(b), "distinct_ours": len(set(keys_a)),
        "identical": sum(common.values()),
        "only_ours": [_difference(a[i], b, ours, i) for i in only_ours],
        "only_reference": [_difference(b[j], a, theirs, j) for j in only_theirs],
        "seconds_ours": round(ours["seconds"], 2), "seconds_reference": round(theirs["seconds"], 2),
    }


def _unpaired(keys: list[bytes], common: Any) -> list[int]:
    left = dict(common)
    out = []
    for i, key in enumerate(keys):
        if left.get(key, 0) > 0:
            left[key] -= 1
        else:
            out.append(i)
    return out


def _difference(mask: np.ndarray, others: np.ndarray, own: dict[str, np.ndarray], index: int) -> dict[str, Any]:
    best = 0.0
    for other in others:
        union = np.logical_or(mask, other).sum()
        if union:
            best = max(best, float(np.logical_and(mask, other).sum() / union))
    return {
        "area": int(mask.sum()), "best_iou_with_other_side": round(best, 4),
        "predicted_iou": round(float(own["iou"][index]), 5), "stability": round(float(own["stability"][index]), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["driver", "reference"], default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "sam2_fidelity")
    parser.add_argument("--reference-python", type=Path, default=DEFAULT_REFERENCE_PYTHON)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--size", type=int, default=480, help="long side of the test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gain", type=float, default=1e5, help="scale of the decoder's hypernetwork outputs")
    parser.add_argument("--resolution", type=int, default=1024, help="model input size (SAM 2: 1024; less is faster)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.role == "reference":
        reference_role(args.work, args.seed, args.gain, args.resolution, args.settings)
        return
    sys.path.insert(0, str(ROOT / "src"))
    images = test_images(args.images, args.size)
    np.savez(args.work / "images.npz", **{f"image{i}": im for i, im in enumerate(images)})
    if not args.reference_python.exists():
        sys.exit(f"no reference environment at {args.reference_python}: see BENCHMARKS.md (SAM 2 fidelity)")
    started = time.perf_counter()
    subprocess.run(
        [str(args.reference_python), str(Path(__file__).resolve()), "--role", "reference", "--work", str(args.work),
         "--seed", str(args.seed), "--gain", str(args.gain), "--resolution", str(args.resolution),
         "--settings", *args.settings],
        check=True,
    )
    reference_seconds = time.perf_counter() - started
    model = load_ours(args.work, args.resolution)
    report: dict[str, Any] = {
        "seed": args.seed, "gain": args.gain, "size": args.size, "resolution": args.resolution, "results": {},
    }
    for name in args.settings:
        for i, image in enumerate(images):
            masks, seconds = our_masks(model, image, SETTINGS[name])
            ours = {
                "masks": np.stack([m for m, _, _ in masks]) if masks else np.zeros((0, *image.shape[:2]), dtype=bool),
                "iou": np.array([q for _, q, _ in masks]), "stability": np.array([s for _, _, s in masks]),
                "seconds": seconds,
            }
            report["results"][f"{name}/image{i}"] = compare(ours, _load_masks(args.work / f"reference.{name}.image{i}.npz"))
    results = report["results"].values()
    report["identical"] = all(not r["only_ours"] and not r["only_reference"] for r in results)
    report["masks_compared"] = sum(r["ours"] + r["reference"] for r in results)
    report["reference_run_seconds"] = round(reference_seconds, 1)
    (args.work / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
