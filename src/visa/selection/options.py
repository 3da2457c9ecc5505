"""Every knob of the selection (:class:`SelectionOptions`), the budget rule and the one error type.

This is the only part of :mod:`visa.selection` a recipe imports (a recipe's ``selection:`` section
has the shape of :class:`SelectionOptions`), so it stays free of Arrow, NumPy and fusion.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from visa.families import VISUAL_FAMILIES

#: Monte Carlo permutations of Shapley fusion beyond 12 agents (fusion's default too).
DEFAULT_PERMUTATIONS = 2000

#: Strings that switch an optional setting off (``--budget all``, ``--im-min off``).
OFF = frozenset({"off", "none", "all"})


class SelectionError(ValueError):
    """Selection cannot run on this run folder or with these options; the message is one clear line."""


def parse_weights(text: str) -> dict[str, float]:
    """``"sc=1,oa=1,dp=2"`` -> ``{"sc": 1.0, "oa": 1.0, "dp": 2.0}`` (a ValueError names the bad part)."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, number = part.partition("=")
        name = name.strip()
        try:
            if not sep or not name:
                raise ValueError
            weights[name] = float(number)
        except ValueError:
            raise ValueError(
                f"visual weights must look like 'sc=1,oa=1,dp=2', not {part.strip()!r}"
            ) from None
    return weights


def parse_budget(value: Any) -> int | str | None:
    """A budget as a count (``80000``), a normalised percentage (``"2.5%"``) or None (keep all).

    Accepts ints, digit strings, ``"p%"`` with 0 < p <= 100, and the :data:`OFF` words; a
    ValueError says what a budget looks like (a zero budget selects nothing and is refused).
    """
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        if isinstance(value, int) and value < 0:
            raise ValueError("budget must be a non-negative count or a percentage like '2.5%'")
        return value if value is None else _nonzero(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in OFF:
            return None
        if text.endswith("%"):
            try:
                pct = Decimal(text[:-1].strip())
            except InvalidOperation:
                raise ValueError(f"budget '{value}' is not a percentage like '2.5%'") from None
            if not pct.is_finite() or pct < 0 or pct > 100:
                raise ValueError(f"budget '{value}' must be between 0% and 100%")
            return _nonzero(f"{pct.normalize():f}%" if pct else 0)
        if text.isdigit():
            return _nonzero(int(text))
    raise ValueError(f"budget must be a count (80000) or a percentage ('2.5%'), not {value!r}")


def _nonzero(budget: int | str) -> int | str:
    if budget == 0:
        raise ValueError("budget 0 selects nothing; give a count or a percentage above 0, or 'all'")
    return budget


def budget_rows(budget: int | str | None, pool: int) -> int | None:
    """A parsed budget as a row count for a pool of ``pool`` records (percentages round half up)."""
    if budget is None:
        return None
    if isinstance(budget, int):
        return budget
    pct = Decimal(budget[:-1])
    return int((pct * pool / 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


_DEFAULT_WEIGHTS = {family: 1.0 for family in VISUAL_FAMILIES}


class SelectionOptions(BaseModel):
    """Every knob of the selection; also the shape of a recipe's ``selection:`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    budget: int | str | None = Field(
        None,
        description="samples to keep: a count (80000) or a percentage of all input records ('2.5%'); "
        "None keeps every sample that passes the filters",
    )
    value: Literal["probes", "consensus"] = Field(
        "probes",
        description="Shapley value function: agreement with the run's probes, or the paper's consensus",
    )
    image_keep: float | Literal["probes"] = Field(
        "probes",
        description="stage 1: 'probes' cuts where the image probes say images look degraded (never "
        "below what the budget needs), or a fraction of unique images to keep",
    )
    visual_weights: dict[str, float] | None = Field(
        None,
        description="weights of the fused image-level families in the visual score; families not named "
        "keep their default weight 1 (sc, oa, dp)",
    )
    text_only: Literal["keep", "drop"] = Field(
        "keep", description="text-only samples bypass the image stage ('keep') or are dropped"
    )
    im_min: float | Literal["probes"] | None = Field(
        "probes",
        description="'probes': drop samples whose fused IM is below the cut calibrated on the IM probes; "
        "a number: drop samples with raw IM <= it; None disables",
    )
    pt_tail: float = Field(0.02, ge=0, lt=1, description="drop this top fraction of PT (garbled text)")
    pt_blend: float = Field(0.0, ge=0, le=1, description="weight of PT's percentile in the instruction score")
    quota_field: str | None = Field(
        None, description="column whose values share the budget, e.g. meta.source"
    )
    quota_mode: Literal["proportional", "capped"] = Field(
        "proportional",
        description="proportional: each value gets its share of the pool; capped: none exceeds quota_max_share",
    )
    quota_min: int = Field(
        1, ge=0, description="every value keeps at least this many samples (when it has them)"
    )
    quota_max_share: float = Field(
        0.5, gt=0, le=1, description="capped mode: max share of the budget per value"
    )
    clusters: str = Field(
        "auto",
        description="'auto': rank images within, and spread the budget over, the score table's content "
        "clusters when it has them; 'off'; or a column (e.g. meta.task) whose values are the clusters",
    )
    cluster_balance: float = Field(
        0.0, ge=0, le=1, description="budget spread over clusters: 0 proportional to their pools, 1 equal"
    )
    cluster_im_floor: float = Field(
        0.5, ge=0, le=1, description="with clusters, the IM rule spares each cluster's best fraction by IM"
    )
    cluster_atypical: float = Field(
        0.2, ge=0, lt=1,
        description="with clusters, each cluster drops this fraction of its rows least typical of it",
    )
    image_gate: dict[str, float] | None = Field(
        None,
        description="score-table columns and their minimum: a row whose image is below any of them is "
        "dropped first (reason image_gate); see visa.selection.gate",
    )
    dedupe: bool = Field(
        True, description="drop samples whose image set and conversation repeat a better one"
    )
    max_per_image: int | None = Field(None, ge=1, description="keep at most this many samples per image")
    calibration_size: int = Field(
        1000, ge=2, description="Shapley calibration rows (unique images for image scores)"
    )
    seed: int = Field(0, description="seed of the calibration sample and of Monte Carlo Shapley")
    permutations: int = Field(
        DEFAULT_PERMUTATIONS, ge=2, description="Monte Carlo permutations beyond 12 agents"
    )

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> int | str | None:
        return parse_budget(value)

    @field_validator("clusters", mode="before")
    @classmethod
    def _clusters(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("off", "none", "auto"):
            return "off" if value.strip().lower() != "auto" else "auto"
        if isinstance(value, str) and not value.strip():
            raise ValueError("clusters must be 'auto', 'off' or a column name")
        return value

    @field_validator("im_min", "max_per_image", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in OFF else value

    @field_validator("image_keep")
    @classmethod
    def _keep(cls, value: float | str) -> float | str:
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError("image_keep must be 'probes' or a fraction in (0, 1]")
        return value

    @field_validator("visual_weights", mode="before")
    @classmethod
    def _weights_text(cls, value: Any) -> Any:
        return parse_weights(value) if isinstance(value, str) else value

    @field_validator("visual_weights")
    @classmethod
    def _weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if not value:
            raise ValueError(
                f"visual_weights is empty; omit it for equal {'/'.join(VISUAL_FAMILIES)} weights"
            )
        for name, weight in value.items():
            if not (weight >= 0 and math.isfinite(weight)):
                raise ValueError(f"visual weight of '{name}' must be a finite number >= 0")
        if not any(w > 0 for w in {**_DEFAULT_WEIGHTS, **value}.values()):
            raise ValueError("at least one visual weight must be > 0")
        return dict(value)

    @model_validator(mode="after")
    def _quota_needs_budget(self) -> SelectionOptions:
        if self.quota_field is not None and self.budget is None:
            raise ValueError("quota_field needs a budget: quotas share a budget between groups")
        return self

    def budget_rows(self, pool: int) -> int | None:
        """The budget as a row count for a pool of ``pool`` records (percentages round half up)."""
        return budget_rows(self.budget, pool)

    def cluster_columns(self) -> list[str]:
        """The score-table columns the cluster option reads (none when it is off)."""
        from visa.clusters import CLUSTER_COLUMN, DISTANCE_COLUMN, TYPICALITY_COLUMN

        if self.clusters == "off":
            return []
        if self.clusters == "auto":
            return [CLUSTER_COLUMN, DISTANCE_COLUMN, TYPICALITY_COLUMN]
        return [self.clusters]

    def weights(self) -> dict[str, float]:
        """The visual weights: weight 1 for each default visual family, overridden or extended by
        ``visual_weights`` (``dp=2`` keeps sc and oa at 1)."""
        return {**_DEFAULT_WEIGHTS, **(self.visual_weights or {})}


def resolve_options(run: Any, overrides: Mapping[str, Any] | None = None) -> SelectionOptions:
    """Options from the run's recipe ``selection:`` section (if any), with ``overrides`` on top.

    ``run`` is a :class:`~visa.run_folder.RunRecord` or a run.json mapping. Overrides whose value
    is None are ignored, so CLI options that were not given keep the recipe's (or the default)
    value. Raises SelectionError with one line for invalid options.
    """
    recipe = run.get("recipe") if isinstance(run, Mapping) else getattr(run, "recipe", None)
    recipe = recipe if isinstance(recipe, Mapping) else {}
    base = recipe.get("selection") or {}
    if not isinstance(base, Mapping):
        raise SelectionError("the recipe's 'selection' section must be a mapping")
    merged = {**base, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    try:
        return SelectionOptions.model_validate(merged)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise SelectionError(f"selection option {where}: {message}" if where else message) from None
