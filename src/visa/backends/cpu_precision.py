"""bfloat16 matrix products for small models on the CPU, everything else in float32.

A 135M-parameter language model on the CPU spends most of its time in the ``Linear`` layers of its
transformer body. On CPUs with native bfloat16 instructions (x86 ``avx512_bf16`` or AMX) those products
run about 3x faster in bfloat16 than in float32 (oneDNN accumulates in float32). :func:`bf16_linears`
swaps every ``Linear`` of a module for :class:`Bf16Linear`, which keeps its weight in bfloat16, rounds
its input to bfloat16 and returns float32. Embeddings, normalisation, attention scores, softmax and the
residual stream stay in float32 (a model cast to bfloat16 as a whole carries its residual stream in
bfloat16 too, and drifts about twice as far from the float32 results).

Without native support bfloat16 products are emulated and slower than float32: :func:`native_bf16`
says which case holds, and ``precision: auto`` of the embedded backend picks float32 there. Import
this module only where torch is wanted (it imports torch).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 matrices natively (x86 avx512_bf16 or AMX-BF16)."""
    cpu = getattr(torch._C, "_cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        if check is not None:
            try:
                if check():
                    return True
            except RuntimeError:
                continue
    return _cpuinfo_flags() & set(CPU_FLAGS) != set()


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bfloat16`` where the CPU does it natively, else ``float32``; others unchanged."""
    if precision != "auto":
        return precision
    return "bfloat16" if native_bf16() else "float32"


def bf16_linears(module: torch.nn.Module) -> int:
    """Replace every ``torch.nn.Linear`` inside ``module`` by a :class:`Bf16Linear`; returns how many."""
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, Bf16Linear(child))
            replaced += 1
        else:
            replaced += bf16_linears(child)
    return replaced


#: Logits of each row that :func:`bf16_head_logprobs` recomputes in float32 (the largest ones).
EXACT_TOP = 32
#: Rows per step of :func:`bf16_head_logprobs` (bounds the vocabulary-wide temporaries).
HEAD_ROWS = 256


def bf16_head_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, weight_bf16: torch.Tensor, tokens: torch.Tensor,
    exact_top: int = EXACT_TOP,
) -> torch.Tensor:
    """log p(``tokens``) under an LM head without bias: ``hidden`` (n x d, float32) times ``weight``
    (vocabulary x d, float32; ``weight_bf16`` its bfloat16 copy), softmax over the vocabulary.

    The vocabulary-wide product runs in bfloat16 (about 3x faster than float32 where native); then
    every row's target logit and its ``exact_top`` largest logits are recomputed in float32, so only
    the tail of the softmax normaliser keeps bfloat16 rounding. Against the float32 head: a few
    thousandths of a nat per token on average, a few hundredths at most (a flat distribution).
    """
    out = torch.empty(hidden.shape[0], dtype=torch.float32)
    for start in range(0, hidden.shape[0], HEAD_ROWS):
        rows = hidden[start : start + HEAD_ROWS].float()
        wanted = tokens[start : start + HEAD_ROWS].unsqueeze(1)
        logits = F.linear(rows.to(torch.bfloat16), weight_bf16).float()
        top = logits.topk(min(exact_top, logits.shape[1]), dim=1).indices
        index = torch.cat([top, wanted], dim=1)
        exact = torch.einsum("nd,nkd->nk", rows, weight[index].float())
        logits.scatter_(1, index, exact)
        out[start : start + HEAD_ROWS] = exact[:, -1] - torch.logsumexp(logits, dim=1)
    return out


class Bf16Linear(torch.nn.Module):
    """``Linear`` with a bfloat16 weight: float32 in, bfloat16 product (float32 accumulation), float32 out."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)
