"""GeGLU activation ``gelu_tanh(gate) * up`` as the custom op ``graphtune::geglu`` (Triton fwd/bwd).

Gemma's MLP uses ``gelu_pytorch_tanh``: ``gelu(x) = 0.5 x (1 + tanh(u))``, ``u = k0 (x + 0.044715 x^3)``,
``k0 = sqrt(2/pi)``. The kernels use the identity ``0.5 (1 + tanh(u)) = sigmoid(2u)``, which has no
cancellation for negative x and needs no tanh intrinsic (the CPU interpreter has none)::

    gelu(x)  = x * sigmoid(2u)
    gelu'(x) = sigmoid(2u) + 2 x sigmoid(2u) (1 - sigmoid(2u)) k0 (1 + 3 * 0.044715 x^2)

The backward recomputes the activation from gate (the forward saves only gate and up). Same
layout, dtype and rounding rules as ``swiglu.py``, whose host helpers this file shares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphtune.kernels._dispatch import HAS_TRITON, use_triton
from graphtune.kernels.swiglu import (
    _check_glu_args,
    _glu_backward_fake,
    _glu_fake,
    _glu_setup_context,
    _launch_bwd,
    _launch_fwd,
    _reference_glu_backward,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from graphtune.kernels.swiglu import _glu_offsets

__all__ = ["geglu", "reference_geglu"]

# The kernels write the constants as literals (Triton rejects non-constexpr globals):
# 1.5957691216057308 = 2 * sqrt(2/pi), 0.134145 = 3 * 0.044715.


def reference_geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF GemmaMLP's middle: ``act_fn(gate) * up`` with ``act_fn = gelu_pytorch_tanh``."""
    return F.gelu(gate, approximate="tanh") * up


if HAS_TRITON:

    @triton.jit
    def _gelu_tanh_parts(g):
        """(gelu(g), sigmoid(2u)) in fp32."""
        u2 = 1.5957691216057308 * (g + 0.044715 * g * g * g)  # 2 * K0 * (...)
        s = tl.sigmoid(u2)
        return g * s, s

    @triton.jit
    def _geglu_fwd_kernel(
        G, U, H, n_cols, n_col_blocks,
        sgm, sgn, sum_, sun,
        BLOCK: tl.constexpr,
        USE_INT64: tl.constexpr,
    ):
        row, cols, mask = _glu_offsets(n_cols, n_col_blocks, BLOCK, USE_INT64)
        g = tl.load(G + row * sgm + cols * sgn, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * sum_ + cols * sun, mask=mask, other=0.0).to(tl.float32)
        act, _ = _gelu_tanh_parts(g)
        act = act.to(G.dtype.element_ty).to(tl.float32)  # HF: gelu(gate) in gate's dtype
        tl.store(H + row * n_cols + cols, (act * u).to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_bwd_kernel(
        DH, G, U, DG, DU, n_cols, n_col_blocks,
        sdm, sdn, sgm, sgn, sum_, sun,
        BLOCK: tl.constexpr,
        USE_INT64: tl.constexpr,
    ):
        row, cols, mask = _glu_offsets(n_cols, n_col_blocks, BLOCK, USE_INT64)
        dh = tl.load(DH + row * sdm + cols * sdn, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + row * sgm + cols * sgn, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * sum_ + cols * sun, mask=mask, other=0.0).to(tl.float32)
        act, s = _gelu_tanh_parts(g)
        act = act.to(G.dtype.element_ty).to(tl.float32)
        dact = (dh * u).to(DH.dtype.element_ty).to(tl.float32)  # HF: grad of gelu(gate) in dh's dtype
        dgelu = s + 1.5957691216057308 * g * s * (1.0 - s) * (1.0 + 0.134145 * g * g)
        out = row * n_cols + cols
        tl.store(DG + out, (dact * dgelu).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + out, (dh * act).to(DU.dtype.element_ty), mask=mask)


def _triton_forward(gate, up):
    return _launch_fwd(_geglu_fwd_kernel, gate, up)


def _triton_backward(dh, gate, up):
    return _launch_bwd(_geglu_bwd_kernel, dh, gate, up)


@torch.library.custom_op("graphtune::geglu", mutates_args=())
def _geglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check_glu_args("geglu", gate, up)
    if use_triton(gate):
        return _triton_forward(gate, up)
    return reference_geglu(gate, up).contiguous()


@_geglu_op.register_fake
def _geglu_fake(gate, up):
    _check_glu_args("geglu", gate, up)
    return _glu_fake(gate, up)


@torch.library.custom_op("graphtune::geglu_backward", mutates_args=())
def _geglu_backward_op(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate in gate.dtype, dup in up.dtype), recomputing gelu(gate) and its derivative."""
    _check_glu_args("geglu_backward", gate, up, dh)
    if use_triton(gate):
        return _triton_backward(dh, gate, up)
    return _reference_glu_backward(
        lambda g: F.gelu(g, approximate="tanh"),
        lambda d, g: torch.ops.aten.gelu_backward(d, g, approximate="tanh"),
        dh, gate, up,
    )


@_geglu_backward_op.register_fake
def _geglu_backward_fake(dh, gate, up):
    _check_glu_args("geglu_backward", gate, up, dh)
    return _glu_backward_fake(dh, gate, up)


def _geglu_backward(ctx, dh):
    gate, up = ctx.saved_tensors
    return _geglu_backward_op(dh, gate, up)


_geglu_op.register_autograd(_geglu_backward, setup_context=_glu_setup_context)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu(gate, approximate="tanh") * up`` via ``graphtune::geglu``; same-shape inputs."""
    return torch.ops.graphtune.geglu(gate, up)
