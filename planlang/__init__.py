"""planlang: a declarative optimization-plan language for PyTorch models.

This package is the language (schema, readers, hardware model, validation, CLI) and never
imports torch; the runtime that applies plans to models is `planlang.runtime`.

The public names below load on first use (PEP 562), so `import planlang.hardware` or the
command line pays only for the modules it needs (pydantic, PyYAML and the plan model load
with the first of them).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "Plan": "plan",
    "PlanError": "loader",
    "load": "loader",
    "load_with_source": "loader",
    "Diagnostic": "diagnostics",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .diagnostics import Diagnostic
    from .loader import PlanError, load, load_with_source
    from .plan import Plan


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'planlang' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def lint(plan, target=None, *, source=None, catalog=None):
    """Diagnostics of a plan (a `Plan`, or a path) against `target` (default: the plan's)."""
    from .loader import load_with_source
    from .plan import Plan
    from .validate import validate
    if not isinstance(plan, Plan):
        loaded = load_with_source(plan)
        if loaded.plan is None:
            return loaded.diagnostics
        plan, source = loaded.plan, loaded.source
    return validate(plan, source, target=target, catalog=catalog)


__all__ = ["Plan", "PlanError", "Diagnostic", "load", "load_with_source", "lint", "__version__"]
