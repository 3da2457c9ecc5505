"""Lazy registry of agents: names map to ``"module:Class"`` strings, so listing or validating a recipe
imports no model code. Add one line per agent here."""

from __future__ import annotations

import difflib
import importlib

from visa.agents.base import Agent

AGENTS: dict[str, str] = {
    "image_stats": "visa.agents.image_stats:ImageStatsAgent",
    "felzenszwalb": "visa.agents.felzenszwalb:FelzenszwalbAgent",
    "ocr_text": "visa.agents.ocr_text:OcrTextAgent",
    "tagger": "visa.agents.tagger:TaggerAgent",
    "label_entropy": "visa.agents.label_entropy:LabelEntropyAgent",
    "jpeg_bits": "visa.agents.jpeg_bits:JpegBitsAgent",
    "pixel_correlation": "visa.agents.pixel_correlation:PixelCorrelationAgent",
    "block_grid": "visa.agents.block_grid:BlockGridAgent",
    "detail_scale": "visa.agents.detail_scale:DetailScaleAgent",
    "perplexity": "visa.agents.answer_likelihood:PriorTokenPerplexityAgent",
    "mutual_information": "visa.agents.answer_likelihood:MutualInformationAgent",
    "evidence_likelihood": "visa.agents.answer_likelihood:EvidenceLikelihoodAgent",
    "text_image_similarity": "visa.agents.text_image_similarity:TextImageSimilarityAgent",
    "judge": "visa.agents.judge:JudgeAgent",
    "grounding_dino": "visa.agents.grounding_dino:GroundingDinoAgent",
    "owlv2": "visa.agents.owlv2:Owlv2Agent",
    "sam2": "visa.agents.sam2:Sam2Agent",
}


class UnknownName(LookupError):
    pass


def did_you_mean(name: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def is_known(name: str) -> bool:
    """A registered name, or a ``"package.module:Class"`` path to a user's own agent class."""
    return name in AGENTS or ":" in name


def agent_class(name: str) -> type[Agent]:
    """Import and return the agent class registered under ``name`` (or at ``"module:Class"``)."""
    if name in AGENTS:
        target = AGENTS[name]
    elif ":" in name:
        target = name
    else:
        raise UnknownName(
            f"unknown agent type '{name}'{did_you_mean(name, AGENTS)}; known: {', '.join(sorted(AGENTS))}"
        )
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise UnknownName(f"agent type '{name}' cannot be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise UnknownName(f"agent type '{name}' is not a visa Agent class")
    return cls
