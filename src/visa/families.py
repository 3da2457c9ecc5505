"""Score families, defined once: what ``sc``, ``oa``, ``dp``, ``pt``, ``im`` and ``image`` are.

A *score family* is one thing the method measures (segmentation complexity, object alignment, ...),
measured by one or more agents. Its agents write columns named ``<family>.<agent>`` (one column-name
rule, :data:`NAME`, for both parts; recipes enforce it too) and fusion adds one column named after
the family. Everything that needs to know about families (fusion's default units and the columns it
fuses, the selection's visual / IM / PT stages, the report's titles and order, the noise benchmark's
directions) reads them from :data:`FAMILIES` and from the agents' units recorded in the run, so
adding a family is one :class:`FamilySpec` entry here.

A family that is not listed here (a recipe may name its scores freely) is a sample-level,
instruction-side score with no title, no hint and "higher is better".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Unit = Literal["image", "sample"]
Role = Literal["visual", "instruction", "descriptive"]

#: One name rule for score families and agents (``sc``, ``felzenszwalb``, ``ocr_text``).
NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: An agent's primary score column: ``<family>.<agent>``.
AGENT_COLUMN = re.compile(r"^([a-z][a-z0-9_]*)\.([a-z][a-z0-9_]*)$")
#: Column prefix of the records' flattened metadata (``meta.source``): never a score family.
META = "meta"
UNITS: tuple[Unit, ...] = ("image", "sample")


@dataclass(frozen=True)
class FamilySpec:
    """One score family.

    ``unit``: scored once per unique image or once per sample (the default when the run does not
    record its agents' units). ``role``: ``visual`` families feed the image stage of the selection,
    ``instruction`` families the instruction stage, ``descriptive`` ones are shown in the report
    but never fused, selected on or rated. ``direction``: +1 when a higher value means a better
    sample, -1 when lower is better (PT: the high tail is garbled text), 0 for descriptive values.
    """

    name: str
    unit: Unit
    role: Role
    direction: Literal[-1, 0, 1]
    title: str
    hint: str

    @property
    def is_score(self) -> bool:
        """Whether the family is a score (fused, selected on, rated), not a description."""
        return self.role != "descriptive"


#: The families of the method, in the order the method presents them.
FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            "sc", "image", "visual", 1, "SC · segmentation complexity",
            "how many distinct regions an image has (higher = more visual elements)",
        ),
        FamilySpec(
            "oa", "image", "visual", 1, "OA · object alignment",
            "how many and how rare the recognised objects are",
        ),
        FamilySpec(
            "dp", "image", "visual", 1, "DP · diversity perspective",
            "a judge's rating of information richness",
        ),
        FamilySpec(
            "pt", "sample", "instruction", -1, "PT · prior token perplexity",
            "perplexity of the first answer tokens (the high tail is garbled text)",
        ),
        FamilySpec(
            "im", "sample", "instruction", 1, "IM · image-text mutual information",
            "how much the image helps predict the answer (<= 0: the image is not needed)",
        ),
        FamilySpec(
            "image", "image", "descriptive", 0, "Image statistics",
            "entropy of the grey levels (bits); not a selection score",
        ),
    )
}

#: The family whose raw value the ``im_min`` filter applies to and that ranks the instruction stage.
IM = "im"
#: The family whose high tail the ``pt_tail`` filter drops.
PT = "pt"
#: Families that are scores, in the method's order (fused, selected on, rated by the benchmarks).
SCORE_FAMILIES: tuple[str, ...] = tuple(name for name, spec in FAMILIES.items() if spec.is_score)
#: The default visual families of the image stage (equal weights).
VISUAL_FAMILIES: tuple[str, ...] = tuple(name for name, spec in FAMILIES.items() if spec.role == "visual")


def spec(name: str) -> FamilySpec:
    """The family's spec; an unlisted family is a sample-level instruction score, higher = better."""
    found = FAMILIES.get(name)
    if found is not None:
        return found
    return FamilySpec(name, "sample", "instruction", 1, name, "")


def is_score(name: str) -> bool:
    """Whether columns ``<name>.<agent>`` are scores (not metadata, not a descriptive family)."""
    return name != META and spec(name).is_score


def default_unit(name: str) -> Unit:
    """The unit of a family whose agents' units the run does not record."""
    return spec(name).unit


def agent_column(family: str, agent: str) -> str:
    """The primary score column of ``agent`` in ``family``."""
    return f"{family}.{agent}"


def split_agent_column(column: str) -> tuple[str, str] | None:
    """``"sc.felzenszwalb"`` -> ``("sc", "felzenszwalb")``; None for any other column name."""
    match = AGENT_COLUMN.match(column)
    return (match.group(1), match.group(2)) if match else None


def order_key(name: str) -> tuple[int, str]:
    """Sort key: the method's families in their order, then the others by name."""
    position = list(FAMILIES).index(name) if name in FAMILIES else len(FAMILIES)
    return position, name


def families_from_columns(
    columns: Iterable[tuple[str, bool]], *, scores_only: bool = True
) -> dict[str, list[str]]:
    """``{family: [agent columns]}`` from ``(column name, is numeric)`` pairs, in column order.

    Only numeric ``<family>.<agent>`` columns count; ``meta.*`` never does, and descriptive
    families are left out unless ``scores_only`` is False.
    """
    families: dict[str, list[str]] = {}
    for name, numeric in columns:
        parts = split_agent_column(name)
        if parts is None or not numeric or parts[0] == META:
            continue
        if scores_only and not is_score(parts[0]):
            continue
        families.setdefault(parts[0], []).append(name)
    return families


def families_from_agents(
    agents: Iterable[Mapping[str, Any]], numeric: Mapping[str, bool], *, scores_only: bool = True
) -> tuple[dict[str, list[str]], dict[str, Unit]]:
    """Families and their units from a run's agent records (``column``, ``score``, ``unit``).

    An agent counts when its column is in ``numeric`` with a True value (present and numeric); a
    family's unit is the first unit its agents record (whether or not their columns are present).
    """
    families: dict[str, list[str]] = {}
    units: dict[str, Unit] = {}
    for agent in agents:
        column, family = agent.get("column"), agent.get("score")
        if not isinstance(column, str) or not isinstance(family, str) or family == META:
            continue
        if scores_only and not is_score(family):
            continue
        if numeric.get(column):
            members = families.setdefault(family, [])
            if column not in members:
                members.append(column)
        unit = agent.get("unit")
        if unit in UNITS:
            units.setdefault(family, unit)
    return families, units
