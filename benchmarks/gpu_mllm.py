"""PT/IM (and DP) throughput of the transformers backend on a Qwen2-VL-2B-shaped model.

No model hub is reachable on the project's machines, so the model is the published Qwen2-VL-2B
architecture (28 layers, hidden 1536, 151,936-word head, 675M-parameter vision tower) at random
initialisation, built directly on the device; speed does not depend on the weights. The tokenizer is
byte-level (one token per UTF-8 byte), so text lengths below are given in tokens.

Workload: ``--samples`` synthetic samples, each an image of a LLaVA-OneVision-like size (640x480 to
1280x720) and a 1-3 turn conversation (questions 20-60 tokens, answers 40-250 tokens). A sample is
scored twice, as PT/IM need: with its image and without. For every batch size the script times the
CPU-side preparation (template, spans, tokenisation), the with-image pass and the text-only pass,
and reports samples/s = samples / (with-image time + text-only time). ``--generate`` DP-style
requests (a long rubric prompt + one image, ``--max-new-tokens`` greedy tokens; random weights never
stop early) measure generation. Prints one JSON object.

    # one H200 (well under 8 minutes):
    PYTHONPATH=src python3 benchmarks/gpu_mllm.py --out /tmp/gpu_mllm.json
    # scaled-down correctness run on a CPU:
    PYTHONPATH=src .venv/bin/python benchmarks/gpu_mllm.py --size tiny --device cpu --samples 12 \\
        --batch-sizes 2 4 --generate 4 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visa.backends.base import AnswerLogprobsRequest, AnswerLogprobsResult, GenerateRequest, Message
from visa.backends.transformers_vlm import TransformersVLMBackend
from visa.samples import Turn
from visa.testing import random_checkpoint

IMAGE_SIZES = [(640, 480), (800, 600), (1024, 768), (512, 512), (480, 640), (1280, 720)]
WORDS = ["the", "a", "red", "blue", "small", "large", "cat", "dog", "table", "chart", "shows", "value"]
WORDS += ["of", "two", "three", "people", "street", "sign", "car", "on", "with", "near", "bright", "old"]


def _text(rng: np.random.Generator, tokens: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < tokens:
        words.append(str(rng.choice(WORDS)))
    return " ".join(words)[:tokens]


def synthetic_samples(n: int, seed: int) -> list[tuple[Image.Image, tuple[Turn, ...]]]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        width, height = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
        # Smooth random colour fields: cheap to make, not constant (the processor normalises anyway).
        small = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
        turns: list[Turn] = []
        for k in range(int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))):
            question = _text(rng, int(rng.integers(20, 61)))
            turns.append(Turn("user", ("<image>\n" if k == 0 else "") + question))
            turns.append(Turn("assistant", _text(rng, int(rng.integers(40, 251)))))
        samples.append((image, tuple(turns)))
    return samples


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, function, *args):
    _sync(device)
    start = time.perf_counter()
    result = function(*args)
    _sync(device)
    return result, time.perf_counter() - start


def _prepare_all(backend: TransformersVLMBackend, requests: list[AnswerLogprobsRequest]) -> list:
    """The CPU-side work before batching: template rendering, answer spans, tokenisation."""
    return [backend._prepare_logprobs(i, r) for i, r in enumerate(requests)]


def _workload_tokens(backend: TransformersVLMBackend, processor: Any, with_image: list, samples: list) -> dict:
    """Token counts of the workload (byte tokenizer: answer tokens = answer bytes)."""
    prepared = [backend._prepare_logprobs(0, r) for r in with_image[:16]]
    encoded = processor(
        text=[p.text for p in prepared],
        images=[p.images for p in prepared],
        padding=True,
        return_tensors="pt",
        add_special_tokens=False,
    )
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    answer_bytes = [sum(len(t.text.encode()) for t in turns if t.role == "assistant") for _, turns in samples]
    return {
        "mean_tokens_with_image": round(float(encoded["attention_mask"].sum(1).float().mean()), 1),
        "mean_image_tokens": round(float((encoded["input_ids"] == image_token).sum(1).float().mean()), 1),
        "mean_answer_tokens": round(float(np.mean(answer_bytes)), 1),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="qwen2-vl-2b", choices=["qwen2-vl-2b", "tiny"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument(
        "--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)"
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=TransformersVLMBackend.Params.model_fields["max_image_pixels"].default,
    )
    parser.add_argument("--generate", type=int, default=32, help="DP-style generation requests (0: skip)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="stop starting new measurements after this"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)

    import torch

    begin = time.perf_counter()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    model, processor = random_checkpoint(
        "qwen2_vl", size=args.size, seed=args.seed, device=device, dtype=dtype, attn_implementation=args.attn
    )
    build_s = time.perf_counter() - begin
    parameters = sum(p.numel() for p in model.parameters())
    samples = synthetic_samples(args.samples, args.seed)
    with_image = [AnswerLogprobsRequest(turns, (image,)) for image, turns in samples]
    text_only = [AnswerLogprobsRequest(turns) for _, turns in samples]

    report: dict = {
        "benchmark": "gpu_mllm",
        "model": f"Qwen2-VL ({args.size}) at random init",
        "parameters": parameters,
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else platform.processor() or "cpu",
        "dtype": dtype,
        "attn": args.attn,
        "torch": torch.__version__,
        "samples": args.samples,
        "max_image_pixels": args.max_image_pixels,
        "build_s": round(build_s, 2),
        "runs": [],
    }
    backend = TransformersVLMBackend.from_loaded(model, processor, max_image_pixels=args.max_image_pixels)
    report.update(_workload_tokens(backend, processor, with_image, samples))

    for batch_size in args.batch_sizes:
        if time.perf_counter() - begin > args.budget_s:
            report["runs"].append({"batch_size": batch_size, "skipped": "time budget"})
            continue
        backend = TransformersVLMBackend.from_loaded(
            model, processor, batch_size=batch_size, max_image_pixels=args.max_image_pixels
        )
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        backend.answer_logprobs(with_image[:batch_size] + text_only[:batch_size])  # warm-up
        _, prepare_s = _timed("cpu", _prepare_all, backend, with_image)
        image_results, image_s = _timed(device, backend.answer_logprobs, with_image)
        text_results, text_s = _timed(device, backend.answer_logprobs, text_only)
        failures = [r for r in image_results + text_results if not isinstance(r, AnswerLogprobsResult)]
        run = {
            "batch_size": batch_size,
            "with_image_s": round(image_s, 3),
            "text_only_s": round(text_s, 3),
            "prepare_with_image_s": round(prepare_s, 3),
            "samples_per_s": round(args.samples / (image_s + text_s), 2),
            "with_image_requests_per_s": round(args.samples / image_s, 2),
            "text_only_requests_per_s": round(args.samples / text_s, 2),
            "failures": len(failures),
        }
        if failures:
            run["first_failure"] = repr(failures[0])[:300]
        if device.startswith("cuda"):
            run["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        report["runs"].append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)

    if args.generate and time.perf_counter() - begin <= args.budget_s:
        rubric = _text(np.random.default_rng(args.seed + 1), 1500)
        requests = [
            GenerateRequest(
                (
                    Message("system", rubric),
                    Message("user", "Rate this image.", (samples[i % len(samples)][0],)),
                ),
                max_new_tokens=args.max_new_tokens,
            )
            for i in range(args.generate)
        ]
        batch_size = max(args.batch_sizes)
        backend = TransformersVLMBackend.from_loaded(
            model, processor, batch_size=batch_size, max_image_pixels=args.max_image_pixels
        )
        backend.generate(requests[: min(batch_size, len(requests))])  # warm-up
        results, generate_s = _timed(device, backend.generate, requests)
        report["generate"] = {
            "requests": len(requests),
            "batch_size": batch_size,
            "prompt_text_tokens": 1500,
            "max_new_tokens": args.max_new_tokens,
            "seconds": round(generate_s, 3),
            "requests_per_s": round(len(requests) / generate_s, 3),
            "failures": sum(1 for r in results if isinstance(r, Exception)),
        }
    best = max(
        (r for r in report["runs"] if "samples_per_s" in r), key=lambda r: r["samples_per_s"], default=None
    )
    report["best_samples_per_s"] = best["samples_per_s"] if best else None
    report["total_s"] = round(time.perf_counter() - begin, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
