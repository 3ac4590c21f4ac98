"""graphtune: capture a Hugging Face causal LM as an FX graph, rewrite it with Triton kernels, train it.

    model = graphtune.optimize(model)            # same object, optimized forward
    report = graphtune.explain(model, **batch)   # what the passes did, and the graph text

The public names are loaded on first use (module ``__getattr__``): ``import graphtune`` imports
neither torch nor the kernels, so ``graphtune export`` and ``graphtune data`` start without the
training stack. The ``graphtune::`` kernel ops are registered by ``graphtune.kernels``, which
whatever emits or runs them imports (``optimize``/``explain``, the passes, ``graphtune.attention``);
reading ``graphtune.kernels`` (or another submodule the package used to import eagerly) imports it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["optimize", "explain", "restore", "last_report", "Report", "GraphtuneError", "CaptureError", "VerificationError", "__version__"]

# public name -> module that defines it (imported on first access)
_LAZY = {
    "optimize": "graphtune.api",
    "explain": "graphtune.api",
    "restore": "graphtune.api",
    "last_report": "graphtune.api",
    "Report": "graphtune.report",
    "GraphtuneError": "graphtune.errors",
    "CaptureError": "graphtune.errors",
    "VerificationError": "graphtune.errors",
}

# submodules the eager ``__init__`` used to import (``graphtune.kernels`` registers the custom ops)
_SUBMODULES = frozenset({"api", "canonical", "capture", "errors", "kernels", "memory", "passes", "report"})

if TYPE_CHECKING:  # static analysers see the eager imports
    from graphtune.api import explain, last_report, optimize, restore
    from graphtune.errors import CaptureError, GraphtuneError, VerificationError
    from graphtune.report import Report


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is not None:
        value = getattr(importlib.import_module(mod), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    if name in _SUBMODULES:  # ``graphtune.kernels`` etc. without importing them first, as before
        return importlib.import_module(f"graphtune.{name}")
    raise AttributeError(f"module 'graphtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
