"""Where a kernel runs: Triton on CUDA, Triton's CPU interpreter when asked, else the torch reference.

Why one place: every kernel file asks the same question, and tests must be able to force the
Triton path on a CPU (``TRITON_INTERPRET=1``, read by Triton when a kernel is decorated, so it must
be set before ``graphtune`` is imported) or the reference path (``GRAPHTUNE_KERNELS=reference``).
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional on CPU machines; the reference path needs only torch.
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the installation
    HAS_TRITON = False

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_mode() -> str:
    """``"auto"`` (default), ``"triton"`` or ``"reference"``, from ``GRAPHTUNE_KERNELS``."""
    mode = os.environ.get("GRAPHTUNE_KERNELS", "auto").lower()
    if mode not in ("auto", "triton", "reference"):
        raise ValueError(f"GRAPHTUNE_KERNELS must be auto, triton or reference, not {mode!r}")
    return mode


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton kernel should run for a tensor on ``t.device``."""
    mode = kernel_mode()
    if mode == "reference" or not HAS_TRITON:
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and TRITON_INTERPRET
