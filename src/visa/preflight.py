"""Before a run: are the recipe's model weights here (or reachable) and do its endpoints answer?

A recipe that names hub models or OpenAI-compatible endpoints can only run where those exist. These
checks run in seconds, before any work (``visa score``) and for every bundled recipe (``visa doctor``),
so that a missing model or a server that is down is one clear line, not a traceback after the first
shard or a run stuck in connection retries:

* **weights**: a local directory, or the model's ``config.json`` in the Hugging Face cache at the
  recipe's revision (no network needed); when it is not cached and the network is allowed (the
  recipe does not set ``hf_offline`` and ``HF_HUB_OFFLINE`` is not set), one request to the hub asks
  whether the model and revision exist;
* **endpoints**: ``GET {base_url}/models`` answers, and lists the model the recipe asks for.

Every request has a short timeout and is made once (no retries). Which models and endpoints a
recipe uses comes from its agents (:meth:`visa.agents.base.Agent.hub_models`) and their backends
(:meth:`visa.backends.base.Backend.hub_models` / ``endpoints``).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from visa.recipe import Recipe

#: Seconds one check may wait for a server.
TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True)
class Probe:
    """One thing a recipe needs from outside the package: a model's weights or an endpoint."""

    column: str
    kind: str  # "weights" or "endpoint"
    target: str  # repo id / local path, or base URL
    detail: str | None = None  # revision, or the served model name


def probes(recipe: Recipe) -> list[Probe]:
    """The weights and endpoints each agent of ``recipe`` needs (no duplicates, recipe order)."""
    from visa.backends.registry import BackendSpec, backend_class

    found: list[Probe] = []
    for bound in recipe.build_agents():
        agent = bound.agent
        for repo, revision in agent.hub_models():
            found.append(Probe(bound.column, "weights", repo, revision))
        spec = getattr(agent.params, "backend", None)
        if isinstance(spec, BackendSpec):
            cls, params = backend_class(spec.type), spec.validated_params()
            for repo, revision in cls.hub_models(params):
                found.append(Probe(bound.column, "weights", repo, revision))
            for base_url, model in cls.endpoints(params):
                found.append(Probe(bound.column, "endpoint", base_url, model))
    seen: set[tuple[str, str, str | None]] = set()
    unique = []
    for probe in found:
        if (probe.kind, probe.target, probe.detail) not in seen:
            seen.add((probe.kind, probe.target, probe.detail))
            unique.append(probe)
    return unique


def network_allowed(recipe: Recipe) -> bool:
    """Whether a run of ``recipe`` may reach the model hub."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return not (recipe.execution.hf_offline or offline)


def check_weights(repo: str, revision: str | None, *, network: bool) -> str | None:
    """None when the weights are here (or on a reachable hub), else why not."""
    if Path(repo).expanduser().is_dir():
        return None
    if repo.startswith((".", "/", "~")):
        return f"model folder {repo} does not exist"
    where = f"{repo}@{revision}" if revision else repo
    if _cached(repo, revision):
        return None
    if not network:
        return f"weights of {where} are not in the local Hugging Face cache and the network is not allowed"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/models/{repo}/revision/{revision or 'main'}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=TIMEOUT_S):
            return None
    except urllib.error.HTTPError as error:
        return f"weights of {where} are not cached and the hub answers HTTP {error.code} for them"
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return f"weights of {where} are not in the local cache and the hub is not reachable ({reason})"


def _cached(repo: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(repo, "config.json", revision=revision)
    except ValueError:  # not a valid repo id
        return False
    return isinstance(found, str)


def check_endpoint(base_url: str, model: str | None) -> str | None:
    """None when ``{base_url}/models`` answers (and lists ``model``), else why not."""
    url = f"{base_url.rstrip('/')}/models"
    headers = {"Accept": "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as response:
            payload = response.read(1 << 20)
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            return None  # it answers; the key is the run's business (sent from the environment)
        return f"endpoint {base_url} answers HTTP {error.code} to GET /models"
    except (urllib.error.URLError, OSError) as error:
        return f"endpoint {base_url} does not answer ({getattr(error, 'reason', error)})"
    try:
        served = [m.get("id") for m in json.loads(payload).get("data", []) if isinstance(m, dict)]
    except (ValueError, AttributeError):
        return None  # answers, but not with a model list: the run will tell
    if model and served and model not in served:
        return f"endpoint {base_url} serves {', '.join(map(str, served[:3]))}, not {model}"
    return None


def problems(recipe: Recipe) -> list[str]:
    """One line per missing model or silent endpoint (``column: why``), checked concurrently."""
    network = network_allowed(recipe)
    found = probes(recipe)

    def run(probe: Probe) -> str | None:
        if probe.kind == "weights":
            why = check_weights(probe.target, probe.detail, network=network)
        else:
            why = check_endpoint(probe.target, probe.detail)
        return f"{probe.column}: {why}" if why else None

    if not found:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(found))) as pool:
        return [line for line in pool.map(run, found) if line]
