"""Probes made from the user's own pool: copies that carry less information than their source.

No labels are needed: whatever the pool holds, a copy of an image with most of its content removed
carries less visual information than the image, and an answer on the wrong picture depends less on
the picture than on the right one. Each *ladder* below is built from one source; its rows have a
*tier* (0 = the source, higher = less information) and a *chain*: two rows are compared only on the
same chain, or when either has the empty chain (the source and the bottom of the ladder compare
with every row). :func:`visa.probes.value.ladder_pairs` turns this into ordered pairs.

Image ladder (for the image scores SC, OA, DP and any other image-level family):

==================  ====  =====  ==================================================================
kind                tier  chain  what it is
==================  ====  =====  ==================================================================
``original``        0            the pool image (decoded, RGB)
``crop_half``       1     crop   the central crop with half the area, at its own resolution
``crop_quarter``    2     crop   the central crop with a quarter of the area
``downscale``       1     scale  long side shrunk to 1/4 (at least 48 px), scaled back up (bicubic)
``downscale_tiny``  2     scale  long side shrunk to 20 px, scaled back up (bicubic)
``blur``            2     blur   Gaussian blur, radius 1/25 of the long side
``jpeg``            2     jpeg   re-encoded as JPEG at quality 4
``flat``            3            one colour: the image's mean colour
``noise``           3            uniform random pixels (seeded by the image key)
==================  ====  =====  ==================================================================

The strengths differ on purpose from the degradations of ``visa bench noise`` (32-px thumbnails,
radius 1/20, quality 2), so the probes are not the benchmark's answer key.

Sample ladder for IM (``own`` 0; ``other`` 1, chain ``other``; ``flat`` 1, chain ``flat``): the
sample's conversation on its own image, on another image of the pool (a different image key, drawn
with a fixed seed) and on a flat grey image. Only ``own`` is compared with the two others. The IM
agents' weights are played on the ``other`` chain alone (:data:`WEIGHT_CHAINS`): IM is how much an
answer depends on *its* image, which the same conversation on another real image tests directly; a
flat image tests whether any image is there at all, which an agent passes by reading that the
image holds nothing (the evidence likelihood does, perfectly) and which the image stage already
judges. The IM cut (:func:`visa.probes.calibrate.calibrate_im`) uses both wrong-image rungs.

Sample ladder for PT (``answer`` 0; ``shuffled`` 1; ``replaced`` 1, own chains): the conversation as
it is, with the words of every answer shuffled, and with every answer word replaced by a word drawn
from the other answers of the probe set. The text is lower-perplexity when it is intact, so PT (a
perplexity, higher = noisier) is negated before the probes value it.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from visa.samples import Turn

#: per probe target, the chains whose rows play the agents' weight game (targets not listed: all)
WEIGHT_CHAINS: dict[str, tuple[str, ...]] = {"placement": ("other",)}


@dataclass(frozen=True)
class Rung:
    """One kind of probe row: its name, tier (0 = most information) and chain (see module doc)."""

    kind: str
    tier: int
    chain: str = ""


IMAGE_LADDER: tuple[Rung, ...] = (
    Rung("original", 0),
    Rung("crop_half", 1, "crop"),
    Rung("crop_quarter", 2, "crop"),
    Rung("downscale", 1, "scale"),
    Rung("downscale_tiny", 2, "scale"),
    Rung("blur", 2, "blur"),
    Rung("jpeg", 2, "jpeg"),
    Rung("flat", 3),
    Rung("noise", 3),
)
#: Image rungs that are degraded copies of their source (every rung but the crops, which are
#: ordinary images with less in them): the stage-1 family game also compares these with the sources
#: of other images (:func:`visa.probes.calibrate.calibrate_visual`).
DEGRADED_KINDS: tuple[str, ...] = tuple(r.kind for r in IMAGE_LADDER if r.tier > 0 and r.chain != "crop")
IM_LADDER: tuple[Rung, ...] = (Rung("own", 0), Rung("other", 1, "other"), Rung("flat", 1, "flat"))
PT_LADDER: tuple[Rung, ...] = (Rung("answer", 0), Rung("shuffled", 1, "shuffled"), Rung("replaced", 1, "replaced"))

FLAT_GREY = (128, 128, 128)
JPEG_QUALITY = 4
TINY_SIDE = 20
MIN_DOWNSCALE_SIDE = 48
BLUR_FRACTION = 1 / 25


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def _central_crop(image: Image.Image, area: float) -> Image.Image:
    side = area**0.5
    w, h = image.size
    cw, ch = max(1, round(w * side)), max(1, round(h * side))
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def _down_up(image: Image.Image, long_side: int) -> Image.Image:
    w, h = image.size
    scale = long_side / max(w, h)
    if scale >= 1:
        return image.copy()
    small = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    return small.resize((w, h), Image.Resampling.BICUBIC)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def degrade(image: Image.Image, kind: str, key: str = "") -> Image.Image:
    """The ``kind`` rung of the image ladder for ``image`` (RGB); ``key`` seeds the noise rung."""
    image = image.convert("RGB")
    w, h = image.size
    if kind == "original":
        return image.copy()
    if kind == "crop_half":
        return _central_crop(image, 0.5)
    if kind == "crop_quarter":
        return _central_crop(image, 0.25)
    if kind == "downscale":
        return _down_up(image, max(MIN_DOWNSCALE_SIDE, max(w, h) // 4))
    if kind == "downscale_tiny":
        return _down_up(image, TINY_SIDE)
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(max(1.0, max(w, h) * BLUR_FRACTION)))
    if kind == "jpeg":
        return _jpeg(image, JPEG_QUALITY)
    if kind == "flat":
        mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)
        return Image.new("RGB", (w, h), tuple(int(round(c)) for c in mean))
    if kind == "noise":
        rng = np.random.default_rng(_seed(key))
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    raise ValueError(f"unknown image probe kind '{kind}'")


def flat_image(size: tuple[int, int] = (336, 336)) -> Image.Image:
    """The flat grey image that the IM ladder's ``flat`` rung puts a conversation on."""
    return Image.new("RGB", size, FLAT_GREY)


def _answer_words(turns: Sequence[Turn]) -> list[str]:
    return [w for t in turns if t.role == "assistant" for w in t.text.split()]


def shuffle_answers(turns: Sequence[Turn], seed: int) -> tuple[Turn, ...]:
    """The conversation with the words of every assistant turn shuffled (user turns unchanged)."""
    rng = random.Random(seed)
    out = []
    for turn in turns:
        if turn.role == "assistant":
            words = turn.text.split()
            rng.shuffle(words)
            out.append(Turn(turn.role, " ".join(words)))
        else:
            out.append(turn)
    return tuple(out)


def replace_answers(turns: Sequence[Turn], vocabulary: Sequence[str], seed: int) -> tuple[Turn, ...]:
    """The conversation with every assistant word replaced by one drawn from ``vocabulary``."""
    rng = random.Random(seed)
    words = list(vocabulary) or ["the"]
    out = []
    for turn in turns:
        if turn.role == "assistant":
            out.append(Turn(turn.role, " ".join(rng.choice(words) for _ in turn.text.split())))
        else:
            out.append(turn)
    return tuple(out)


def answer_vocabulary(conversations: Sequence[Sequence[Turn]]) -> list[str]:
    """Sorted distinct answer words of ``conversations`` (what :func:`replace_answers` draws from)."""
    return sorted({w for turns in conversations for w in _answer_words(turns)})


def other_indices(position: int, keys: Sequence[str], seed: int, count: int) -> list[int]:
    """Up to ``count`` positions whose image keys differ from ``keys[position]`` and from each other,
    drawn with a seed per position (the first is the same whatever ``count``, so a larger
    ``probes.others`` keeps every earlier probe row)."""
    rng = random.Random(seed * 1_000_003 + position)
    used = {keys[position]}
    out: list[int] = []
    while len(out) < count:
        candidates = [i for i, k in enumerate(keys) if k not in used]
        if not candidates:
            break
        out.append(rng.choice(candidates))
        used.add(keys[out[-1]])
    return out


def other_rung(i: int) -> Rung:
    """The IM ladder's rung for the ``i``-th other image (0-based): ``other``, ``other2``, ... (one chain)."""
    return IM_LADDER[1] if i == 0 else Rung(f"other{i + 1}", 1, "other")
