"""Instruction scores of the embedded recipe: misalignment AUROC and PT/IM throughput.

Run from the repository root (CPU; the first run converts SmolLM2 once, ~20 s)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/instruction_scores.py auroc --negatives 3
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/instruction_scores.py speed

``auroc``: the 19 example photos go through the embedded visual agents (tagger, OCR, Felzenszwalb,
image statistics) exactly as in a run; their outputs are the context of the sample agents. The
pool holds every ``clean`` conversation of ``examples/llava.json`` on its own photo (positives) and
the same conversation moved to ``--negatives`` other photos drawn with ``--seed`` (negatives). Each
IM agent, PT, and the Shapley fusion of the IM agents (:func:`visa.fusion.fuse_family`) are scored
by AUROC = P(a true pair scores higher than a moved one); the ten hand-written ``misaligned``
records are reported separately against the clean ones.

``speed``: PT + IM (``perplexity`` + ``mutual_information``) over every record of
``examples/llava.json`` twice, side by side: with a naive backend (one request at a time, full
logits, nothing shared) and with :class:`~visa.backends.embedded_lm.EmbeddedLMBackend` (batching,
prefix tree, answer-position head, memo shared by the two agents). Scores must agree. Reports wall
and CPU seconds (``resource.getrusage``) per arm and agent, torch's thread count and the 1-minute
load average, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
VISUAL_AGENTS = (("oa", "tagger", "tagger"), ("sc", "ocr_text", "ocr_text"), ("sc", "felzenszwalb", "felzenszwalb"),
                 ("image", "stats", "image_stats"))


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(positive > negative) + 0.5 P(tie), nulls dropped."""
    positive, negative = positive[~np.isnan(positive)], negative[~np.isnan(negative)]
    if not positive.size or not negative.size:
        return float("nan")
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def photo_contexts() -> dict[str, dict[str, Any]]:
    """Run the embedded visual agents on every example photo; context columns as a run names them."""
    from PIL import Image

    from visa.agents.base import ImageItem
    from visa.registry import agent_class

    photos = sorted(p for p in (EXAMPLES / "images").iterdir() if p.suffix in {".jpg", ".png"})
    items = [ImageItem(p.name, Image.open(p).convert("RGB")) for p in photos]
    contexts: dict[str, dict[str, Any]] = {p.name: {} for p in photos}
    for score, name, kind in VISUAL_AGENTS:
        cls = agent_class(kind)
        agent = cls(cls.Params())
        agent.setup()
        for item, result in zip(items, agent.score_batch(items), strict=True):
            if isinstance(result, Exception):
                print(f"  {score}.{name} failed on {item.key}: {result}", file=sys.stderr)
                continue
            for field, value in result.items():
                contexts[item.key][f"{score}.{name}" if field == "score" else f"{score}.{name}.{field}"] = value
        agent.teardown()
    return contexts


def load_records() -> list[dict[str, Any]]:
    return json.loads((EXAMPLES / "llava.json").read_text(encoding="utf-8"))


def turns_of(record: dict[str, Any]):
    from visa.samples import Turn

    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    return tuple(Turn(roles[t["from"]], t["value"]) for t in record["conversations"])


def first_photo(record: dict[str, Any]) -> str | None:
    image = record.get("image")
    if isinstance(image, list):
        image = image[0] if image else None
    return Path(image).name if image else None


def auroc_pool(negatives: int, seed: int, contexts: dict[str, dict[str, Any]]):
    from visa.agents.base import SampleItem

    rng = random.Random(seed)
    photos = sorted(contexts)
    items, labels, kinds = [], [], []
    for record in load_records():
        own = first_photo(record)
        if own is None or record["meta"]["kind"] not in ("clean", "misaligned"):
            continue
        if record["meta"]["kind"] == "misaligned":
            placements = [(own, "misaligned")]
        else:
            others = [p for p in photos if p != own]
            placements = [(own, "clean")] + [(p, "moved") for p in rng.sample(others, negatives)]
        for photo, kind in placements:
            key = f"{record['id']}@{photo}"
            items.append(SampleItem(key, record["id"], turns_of(record), image_keys=(photo,),
                                    context=dict(contexts[photo])))
            labels.append(kind == "clean")
            kinds.append(kind)
    return items, np.array(labels), np.array(kinds)


def run_agent(agent: Any, items: list, batch: int) -> list[dict[str, Any]]:
    import pyarrow as pa

    results: list[Any] = []
    for start in range(0, len(items), batch):
        results.extend(agent.score_batch(items[start : start + batch]))
    for result in results:
        if isinstance(result, Exception):
            raise result
    if agent.finalized_outputs:
        outputs = agent.outputs
        table = pa.table({"key": [i.key for i in items],
                          **{f: pa.array([r[f] for r in results], t) for f, t in outputs.items()}})
        table = agent.finalize(table)
        for name in agent.finalized_outputs:
            for result, value in zip(results, table.column(name).to_pylist(), strict=True):
                result[name] = value
    return results


def command_auroc(args: argparse.Namespace) -> dict[str, Any]:
    from visa.agents.answer_likelihood import (
        EvidenceLikelihoodAgent,
        MutualInformationAgent,
        PriorTokenPerplexityAgent,
    )
    from visa.agents.text_image_similarity import TextImageSimilarityAgent
    from visa.backends.embedded_lm import EmbeddedLMBackend
    from visa.fusion import fuse_family

    started = time.perf_counter()
    contexts = photo_contexts()
    items, labels, kinds = auroc_pool(args.negatives, args.seed, contexts)
    print(f"pool: {labels.sum()} true pairs, {(kinds == 'moved').sum()} moved, {(kinds == 'misaligned').sum()} "
          f"hand-written misaligned; visual agents {time.perf_counter() - started:.1f} s")
    backend = EmbeddedLMBackend()
    backend.setup()
    agents = {
        "im.lm": MutualInformationAgent(backend=backend),
        "im.evidence": EvidenceLikelihoodAgent(backend=backend),
        "im.similarity": TextImageSimilarityAgent(),
        "pt.lm": PriorTokenPerplexityAgent(backend=backend),
    }
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for column, agent in agents.items():
        agent.setup()
        t0 = time.perf_counter()
        results = run_agent(agent, items, args.batch)
        seconds[column] = time.perf_counter() - t0
        values = np.array([np.nan if r["score"] is None else r["score"] for r in results], dtype=np.float64)
        scores[column] = -values if column.startswith("pt.") else values  # low PT = clean
    im_columns = [c for c in scores if c.startswith("im.")]
    fused, report = fuse_family([scores[c] for c in im_columns], im_columns, np.arange(len(items)), seed=args.seed)
    scores["im (fused)"] = fused
    clean, moved, misaligned = kinds == "clean", kinds == "moved", kinds == "misaligned"
    summary: dict[str, Any] = {"pool": {"true": int(clean.sum()), "moved": int(moved.sum()),
                                        "misaligned": int(misaligned.sum())},
                               "weights": report.get("weights"), "seconds": seconds, "auroc": {}}
    print(f"{'signal':16s} {'true vs moved':>14s} {'true vs misaligned':>19s}")
    for column, values in scores.items():
        a = auroc(values[clean], values[moved])
        b = auroc(values[clean], values[misaligned])
        summary["auroc"][column] = {"moved": round(a, 3), "misaligned": round(b, 3)}
        label = f"-{column}" if column.startswith("pt.") else column
        print(f"{label:16s} {a:14.3f} {b:19.3f}")
    print("Shapley weights:", json.dumps(report.get("weights")))
    print("agent seconds:", {k: round(v, 1) for k, v in seconds.items()})
    return summary


class NaiveBackend:
    """One request at a time, full logits at every position, nothing shared: the baseline."""

    def __init__(self, model: Any, tokenizer: Any):
        from visa.backends.embedded_lm import EmbeddedLMBackend

        self.encoder = EmbeddedLMBackend(model=model, tokenizer=tokenizer)
        self.encoder.setup()

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def models(self) -> dict[str, str]:
        return {}

    def answer_logprobs(self, requests):
        import torch

        from visa.backends.base import AnswerLogprobsResult

        out = []
        for request in requests:
            try:
                ids, positions = self.encoder.encode(request)
            except ValueError as err:
                out.append(err)
                continue
            with torch.inference_mode():
                logits = self.encoder.model(input_ids=torch.tensor([ids])).logits[0]
                logp = torch.log_softmax(logits.float(), dim=-1)
            out.append(AnswerLogprobsResult(tuple(
                np.array([logp[p - 1, ids[p]].item() for p in turn], dtype=np.float64) for turn in positions)))
        return out


def cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def command_speed(args: argparse.Namespace) -> dict[str, Any]:
    import os

    import torch

    from visa.agents.answer_likelihood import MutualInformationAgent, PriorTokenPerplexityAgent
    from visa.agents.base import SampleItem
    from visa.backends.embedded_lm import EmbeddedLMBackend

    contexts = photo_contexts()
    items = []
    records = load_records()[: args.limit] if args.limit else load_records()
    for record in records * args.repeat:
        photo = first_photo(record)
        items.append(SampleItem(f"{record['id']}", record["id"], turns_of(record),
                                image_keys=(photo,) if photo else (), context=dict(contexts.get(photo, {}))))
    fast = EmbeddedLMBackend()
    fast.setup()
    naive = NaiveBackend(fast.model, fast.tokenizer)
    timings: dict[str, dict[str, float]] = {}
    values = {}
    load = {"before": round(os.getloadavg()[0], 2)}
    for name, backend in (("naive", naive), ("embedded_lm", fast)):
        fast._ready().memo.clear()
        pt = PriorTokenPerplexityAgent(backend=backend)  # type: ignore[arg-type]
        im = MutualInformationAgent(backend=backend)  # type: ignore[arg-type]
        t0, c0 = time.perf_counter(), cpu_seconds()
        pt_results = run_agent(pt, items, args.batch)
        t1, c1 = time.perf_counter(), cpu_seconds()
        im_results = run_agent(im, items, args.batch)
        t2, c2 = time.perf_counter(), cpu_seconds()
        timings[name] = {"wall": t2 - t0, "cpu": c2 - c0, "pt_wall": t1 - t0, "pt_cpu": c1 - c0,
                         "im_wall": t2 - t1, "im_cpu": c2 - c1}
        load[f"after_{name}"] = round(os.getloadavg()[0], 2)
        values[name] = np.array([[np.nan if r["score"] is None else r["score"] for r in res]
                                 for res in (pt_results, im_results)], dtype=np.float64)
    difference = float(np.nanmax(np.abs(values["naive"] - values["embedded_lm"])))
    samples = len(items)
    summary = {
        "samples": samples,
        "torch_threads": torch.get_num_threads(),
        "forward_threads": fast.forward_threads(),
        "cores": os.cpu_count(),
        "load_average_1min": load,
        "seconds": {k: {f: round(v, 2) for f, v in t.items()} for k, t in timings.items()},
        "samples_per_second": {k: round(samples / t["wall"], 2) for k, t in timings.items()},
        "samples_per_cpu_second": {k: round(samples / t["cpu"], 2) for k, t in timings.items()},
        "speedup_wall": round(timings["naive"]["wall"] / timings["embedded_lm"]["wall"], 2),
        "speedup_cpu": round(timings["naive"]["cpu"] / timings["embedded_lm"]["cpu"], 2),
        "max_abs_score_difference": difference,
    }
    print(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("auroc", help="misalignment AUROC of the IM/PT agents on examples/llava.json")
    a.add_argument("--negatives", type=int, default=3, help="other photos each clean conversation is moved to")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--batch", type=int, default=64)
    a.add_argument("--out", type=Path)
    s = sub.add_parser("speed", help="PT+IM throughput: naive loop vs the embedded backend")
    s.add_argument("--repeat", type=int, default=1, help="copies of the example set")
    s.add_argument("--limit", type=int, default=0, help="first N records only (0: all)")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--out", type=Path)
    args = parser.parse_args()
    summary = command_auroc(args) if args.command == "auroc" else command_speed(args)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
