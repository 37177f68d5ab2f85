"""planlang: a declarative optimization-plan language for PyTorch models.

This package is the language (schema, readers, hardware model, validation, CLI) and never
imports torch; the runtime that applies plans to models is `planlang.runtime`.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .diagnostics import Diagnostic  # noqa: E402
from .loader import PlanError, load, load_with_source  # noqa: E402
from .plan import Plan  # noqa: E402


def lint(plan, target=None, *, source=None, catalog=None):
    """Diagnostics of a plan (a `Plan`, or a path) against `target` (default: the plan's)."""
    from .validate import validate
    if not isinstance(plan, Plan):
        loaded = load_with_source(plan)
        if loaded.plan is None:
            return loaded.diagnostics
        plan, source = loaded.plan, loaded.source
    return validate(plan, source, target=target, catalog=catalog)


__all__ = ["Plan", "PlanError", "Diagnostic", "load", "load_with_source", "lint", "__version__"]
