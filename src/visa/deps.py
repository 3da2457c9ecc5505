"""Optional dependencies: one error type and one check, used by agents, backends and executors alike.

Heavy libraries (torch, transformers, vLLM, Ray, ...) are optional extras of the package. Code that
needs one imports it where it is used (``setup()``, a run's start) and raises
:class:`MissingDependency` naming the extra that installs it; :func:`missing` tells, without importing
anything, which of a component's modules are absent (``visa doctor`` and the pre-run check use it).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping


class MissingDependency(RuntimeError):
    """An optional dependency is not installed; the message names the ``pip install`` that fixes it."""

    def __init__(self, package: str, extra: str, what: str):
        self.package, self.extra = package, extra
        super().__init__(f"{what} needs the '{package}' package: pip install 'visa[{extra}]'")


def install_hint(module: str, extra: str) -> str:
    """``module (pip install 'visa[extra]')``."""
    return f"{module} (pip install 'visa[{extra}]')"


def available(module: str) -> bool:
    """Whether ``module`` can be imported here (found on the path; nothing is imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def missing(requires: Mapping[str, str]) -> list[str]:
    """Install hints for the modules of ``requires`` (module -> extra) that cannot be imported here."""
    return [install_hint(module, extra) for module, extra in requires.items() if not available(module)]
