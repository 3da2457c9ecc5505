"""Recipes: which agents measure which score, with which parameters.

A recipe is YAML validated against typed models; every agent's ``params`` is validated against that
agent's own ``Params`` model, so a typo fails when the recipe is loaded, not hours into a run. Bundled
recipes live in ``visa/recipes/<name>.yaml``; ``--recipe`` takes a bundled name or a path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from visa.agents.base import Agent
from visa.clusters import ClusterError, ClusterSpec, check_sources
from visa.families import NAME as SCORE_NAME
from visa.families import agent_column
from visa.images import ImageLimits
from visa.needs import NeedsError, order_by_needs
from visa.probes.options import ProbeOptions
from visa.registry import AGENTS, UnknownName, agent_class, did_you_mean, is_known
from visa.selection.options import SelectionOptions


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one clear line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class PoolSpec(_Strict):
    """How the Ray executor runs an agent (the local executor ignores it; it is not part of identity)."""

    size: int | tuple[int, int] | None = Field(None, description="actors: a count, or [min, max] to autoscale")
    cpus: float | None = Field(None, gt=0, description="CPUs per actor (default: the agent's declared resources)")
    gpus: float | None = Field(None, ge=0, description="GPUs per actor; fractions pack several pools on one GPU")
    memory_gb: float | None = Field(None, gt=0, description="host memory reserved per actor")
    group: str | None = Field(None, description="agents with the same group share one pool (one process)")

    @field_validator("size")
    @classmethod
    def _size(cls, value: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        if value is not None:
            low, high = (value, value) if isinstance(value, int) else value
            if not 1 <= low <= high:
                raise ValueError("pool size must be >= 1, or [min, max] with 1 <= min <= max")
        return value


class AgentSpec(_Strict):
    name: str
    type: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    pool: PoolSpec | None = None

    @property
    def agent_type(self) -> str:
        return self.type or self.name


class ScoreSpec(_Strict):
    agents: list[AgentSpec]


class ExecutionSpec(_Strict):
    shard_size: int = Field(256, ge=1, description="records per shard (the unit of resume)")
    hf_offline: bool = Field(True, description="set HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE for the run")
    threads: int | Literal["auto"] = Field(
        "auto",
        description="CPU threads of every model in each worker (torch, ONNX Runtime). 'auto': the CPUs "
        "this process may use (its affinity mask, not the load) divided among the workers, resolved "
        "once when the run starts and recorded in run.json as a number; a fixed count either way, so "
        "that two runs on the same machine give identical tables (see visa.threads)",
    )
    memory_budget_bytes: int = Field(
        1 << 30,
        ge=1 << 24,
        description="per worker: half for the image file bytes a shard keeps (beyond it they are read "
        "again when decoded), half for the decoded pixels held at once (a larger image is decoded alone)",
    )
    max_text_chars: int = Field(
        1_000_000,
        ge=1,
        description="a conversation with more characters is an error row (text_too_long) before any "
        "agent or tokenizer sees it",
    )


    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 256):
            return value
        raise ValueError(f"threads must be a whole number from 1 to 256, or 'auto'; not {value!r}")


class Recipe(_Strict):
    name: str
    description: str = ""
    images: ImageLimits = Field(default_factory=ImageLimits)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    scores: dict[str, ScoreSpec]
    selection: SelectionOptions | None = None
    clusters: ClusterSpec | None = Field(None, description="content clusters computed when the table is assembled")
    probes: ProbeOptions = Field(default_factory=ProbeOptions)

    @field_validator("scores")
    @classmethod
    def _score_names(cls, scores: dict[str, ScoreSpec]) -> dict[str, ScoreSpec]:
        for name, spec in scores.items():
            if not SCORE_NAME.match(name):
                raise ValueError(f"score name '{name}' must be lower-case letters, digits and '_'")
            seen: set[str] = set()
            for agent in spec.agents:
                if not SCORE_NAME.match(agent.name):
                    raise ValueError(f"agent name '{agent.name}' must be lower-case letters, digits and '_'")
                if agent.name in seen:
                    raise ValueError(f"agent '{agent.name}' appears twice in score '{name}'")
                seen.add(agent.name)
                if not is_known(agent.agent_type):
                    raise ValueError(
                        f"unknown agent type '{agent.agent_type}' in score '{name}'"
                        f"{did_you_mean(agent.agent_type, AGENTS)}"
                    )
        return scores

    def build_agents(self) -> list[BoundAgent]:
        """Instantiate every agent (cheap: no model loading) in the order they run: image agents
        first, each after the image agents it ``needs`` (:mod:`visa.needs`), then sample agents, in
        recipe order where the needs leave a choice. A need that cannot be met is a RecipeError."""
        bound: list[BoundAgent] = []
        for score, spec in self.scores.items():
            for agent_spec in spec.agents:
                cls = agent_class(agent_spec.agent_type)
                try:
                    params = cls.Params(**agent_spec.params)
                except ValidationError as err:
                    raise RecipeError(
                        f"recipe '{self.name}', agent {score}.{agent_spec.name}: "
                        + _first_error(err, cls.Params)
                    ) from None
                bound.append(BoundAgent(score, agent_spec.name, cls(params)))
        try:
            return order_by_needs(bound, self.name)
        except NeedsError as err:
            raise RecipeError(str(err)) from None


class BoundAgent:
    """An agent instance with its place in the recipe: column ``<score>.<name>``."""

    def __init__(self, score: str, name: str, agent: Agent):
        self.score, self.name, self.agent = score, name, agent

    @property
    def column(self) -> str:
        return agent_column(self.score, self.name)

    def column_of(self, field: str) -> str:
        return self.column if field == "score" else f"{self.column}.{field}"

    def __repr__(self) -> str:
        return f"BoundAgent({self.column}, {type(self.agent).__name__})"


def bundled_recipes() -> list[str]:
    folder = resources.files("visa") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a bundled recipe by name, or a YAML file by path. Raises RecipeError with one clear line."""
    text, label, default_name = _recipe_text(str(name_or_path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {label} is not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {label} must be a YAML mapping")
    data.setdefault("name", default_name)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"recipe {label}: {_first_error(err, Recipe)}") from None
    try:
        bound = recipe.build_agents()
    except UnknownName as err:
        raise RecipeError(f"recipe {label}: {err}") from None
    if recipe.clusters is not None:
        produced = [b.column_of(f) for b in bound for f in b.agent.all_outputs()]
        try:
            check_sources(recipe.clusters, produced)
        except ClusterError as err:
            raise RecipeError(f"recipe {label}: {err}") from None
    return recipe


def _recipe_text(name_or_path: str) -> tuple[str, str, str]:
    """The recipe's YAML text, a label for messages, and the name it gets when it names none."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        return path.read_text(encoding="utf-8"), str(path), path.stem
    names = bundled_recipes()
    if name_or_path not in names:
        raise RecipeError(
            f"unknown recipe '{name_or_path}'{did_you_mean(name_or_path, names)}; "
            f"bundled: {', '.join(names)} (or give a path to a .yaml file)"
        )
    resource = resources.files("visa") / "recipes" / f"{name_or_path}.yaml"
    return resource.read_text(encoding="utf-8"), f"'{name_or_path}'", name_or_path


def _first_error(err: ValidationError, model: type[BaseModel]) -> str:
    """One line for the most useful validation error, with a did-you-mean for unknown fields."""
    errors = err.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        known = _fields_at(model, first["loc"][:-1])
        return f"unknown field '{where}'{did_you_mean(str(first['loc'][-1]), known)}"
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model found by following ``loc`` through nested models, lists and dicts."""
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return []
            annotation = field.annotation
        else:
            args = get_args(annotation)
            annotation = args[-1] if args else None
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if args and type(None) in get_args(annotation) and len(args) == 1:
        return args[0]
    return annotation
