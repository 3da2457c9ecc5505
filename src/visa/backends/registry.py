"""Backend specs in recipes, and the lazy mapping from backend type to class."""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from visa.backends.base import Backend, Capabilities
from visa.deps import available, install_hint
from visa.samples import stable_hash

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
    module, extra = BACKEND_REQUIRES.get(kind, (None, None))
    if module is None or extra is None or available(module):
        return None
    return install_hint(module, extra)


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

    def validated_params(self) -> BackendParams:
        """The backend's ``Params``, defaults filled in."""
        return backend_class(self.type).Params(**self.params)  # type: ignore[attr-defined]

    def capabilities(self) -> Capabilities:
        """What the backend this spec names can do (sees images, GPUs per engine); loads nothing."""
        return backend_class(self.type).capabilities(self.validated_params())

    def engine_key(self) -> str:
        """Identity of the engine this spec loads: type and every parameter, defaults filled in.

        Two specs with the same key share one engine in a process (:mod:`visa.backends.shared`).
        """
        return f"{self.type}:" + stable_hash(self.validated_params().model_dump(mode="json"))


def backend_class(kind: str) -> type[Backend]:
    module, _, cls = BACKENDS[kind].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_backend(spec: BackendSpec) -> Backend:
    """Instantiate (cheaply: no model loading) the backend a spec names; params are validated here."""
    return backend_class(spec.type)(spec.validated_params())  # type: ignore[call-arg]
