"""graphtune: capture a Hugging Face causal LM as an FX graph, rewrite it with Triton kernels, train it.

    model = graphtune.optimize(model)            # same object, optimized forward
    report = graphtune.explain(model, **batch)   # what the passes did, and the graph text
"""

from graphtune import kernels as _kernels  # noqa: F401  (registers the graphtune:: custom ops)
from graphtune.api import explain, last_report, optimize, restore
from graphtune.errors import CaptureError, GraphtuneError, VerificationError
from graphtune.report import Report

__version__ = "0.1.0"

__all__ = ["optimize", "explain", "restore", "last_report", "Report", "GraphtuneError", "CaptureError", "VerificationError", "__version__"]
