"""Backend specs in recipes, and the lazy mapping from backend type to class."""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from visa.backends.base import Backend

BACKENDS: dict[str, str] = {
    "transformers": "visa.backends.transformers_vlm:TransformersVLMBackend",
    "vllm": "visa.backends.vllm_engine:VLLMBackend",
    "openai": "visa.backends.openai_api:OpenAIBackend",
    "embedded_lm": "visa.backends.embedded_lm:EmbeddedLMBackend",
}


#: Backend type -> (module that must be importable, the extra that installs it).
BACKEND_REQUIRES: dict[str, tuple[str, str]] = {
    "transformers": ("transformers", "transformers"),
    "vllm": ("vllm", "vllm"),
    "embedded_lm": ("transformers", "embedded"),
}


def missing_backend(kind: str) -> str | None:
    """An install hint when the backend's library is not importable here, else None."""
    import importlib.util

    module, extra = BACKEND_REQUIRES.get(kind, (None, None))
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    return f"{module} (pip install 'visa[{extra}]')"


class BackendParams(BaseModel):
    """Base of every backend's parameters (each backend class has a ``Params`` subclass)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class BackendSpec(BaseModel):
    """``{type: transformers, params: {...}}`` inside an agent's params."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> BackendSpec:
        """Unknown backends and unknown or invalid backend parameters fail when the recipe loads."""
        if self.type not in BACKENDS:
            from visa.registry import did_you_mean

            raise ValueError(
                f"unknown backend '{self.type}'{did_you_mean(self.type, BACKENDS)}; known: {', '.join(BACKENDS)}"
            )
        backend_class(self.type).Params(**self.params)  # type: ignore[attr-defined]
        return self


def backend_class(kind: str) -> type[Backend]:
    module, _, cls = BACKENDS[kind].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_backend(spec: BackendSpec) -> Backend:
    """Instantiate (cheaply: no model loading) the backend a spec names; params are validated here."""
    cls = backend_class(spec.type)
    return cls(cls.Params(**spec.params))  # type: ignore[attr-defined]
