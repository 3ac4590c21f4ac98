"""SwiGLU activation ``silu(gate) * up`` as the custom op ``graphtune::swiglu`` (Triton fwd/bwd).

HF's MLP is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``; this op is the elementwise middle.
The backward recomputes ``sigmoid(gate)`` instead of saving ``h`` or ``silu(gate)`` (the forward
saves only gate and up)::

    dgate = dh * up * sig * (1 + gate * (1 - sig))
    dup   = dh * silu(gate)

Math is fp32 inside the kernel; HF's eager roundings in low precision are reproduced where they
happen (``silu(gate)`` is rounded to gate's dtype before the product; ``dh * up`` to the grad's
dtype before the silu derivative), so bf16 results match HF's eager ones almost bit for bit.
Outputs are contiguous; the output dtype is ``promote_types(gate.dtype, up.dtype)``.

The host helpers here (:func:`_glu_views`, :func:`_glu_grid`) are shared with ``geglu.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphtune.kernels._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["swiglu", "reference_swiglu"]

# Elements per program in the elementwise kernels: large enough for 16-byte vector accesses and
# few programs, small enough to keep the tail of a row cheap.
ELEM_BLOCK = 2048
ELEM_NUM_WARPS = 8


# ----------------------------------------------------------------------------------------------
# Reference (exact HF math)
# ----------------------------------------------------------------------------------------------
def reference_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF LlamaMLP's middle: ``act_fn(gate) * up`` with ``act_fn = silu``."""
    return F.silu(gate) * up


def _check_glu_args(name: str, gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor | None = None) -> None:
    """Shared by real and fake impls (and geglu), so a bad rewrite fails at trace time."""
    if dh is not None and dh.shape != gate.shape:
        raise ValueError(f"graphtune::{name}: dh {tuple(dh.shape)} must have gate's shape {tuple(gate.shape)}")
    if gate.shape != up.shape:
        raise ValueError(
            f"graphtune::{name}: gate and up must have the same shape (no broadcasting); got "
            f"{tuple(gate.shape)} and {tuple(up.shape)}"
        )
    if not gate.is_floating_point() or not up.is_floating_point():
        raise ValueError(f"graphtune::{name}: gate and up must be floating point, got {gate.dtype}, {up.dtype}")


# ----------------------------------------------------------------------------------------------
# Host helpers shared by the GLU kernels
# ----------------------------------------------------------------------------------------------
def _glu_views(*ts: torch.Tensor) -> tuple[list[torch.Tensor], int, int]:
    """2-D views ``[rows, cols]`` of same-shape tensors, plus (rows, cols), avoiding copies.

    All contiguous: one flat row of numel elements (the fast, fully vectorized case). Otherwise rows
    of the last dim with each tensor's own strides (a chunked fused gate_up slice, an expanded
    grad with stride 0); a tensor whose leading dims do not collapse is copied by ``reshape``.
    """
    shape = ts[0].shape
    numel = ts[0].numel()
    if all(t.is_contiguous() for t in ts):
        return [t.reshape(1, numel) for t in ts], 1, numel
    cols = shape[-1] if len(shape) else 1
    views = [t.reshape(-1, cols) for t in ts]
    return views, views[0].shape[0], cols


def _glu_grid(rows: int, cols: int, views: list[torch.Tensor]) -> tuple[tuple[int], int, bool]:
    """(grid, n_col_blocks, use_int64) for a 1-D grid over rows x column blocks."""
    n_col_blocks = triton.cdiv(cols, ELEM_BLOCK)
    reach = max(
        [rows * cols]
        + [(rows - 1) * abs(v.stride(0)) + (cols - 1) * abs(v.stride(1)) + ELEM_BLOCK for v in views]
    )
    return (rows * n_col_blocks,), n_col_blocks, reach >= 2**31 - 1


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _glu_offsets(n_cols, n_col_blocks, BLOCK: tl.constexpr, USE_INT64: tl.constexpr):
        """(row, cols, mask) of this program; int64 when offsets can pass 2**31."""
        pid = tl.program_id(0)
        row = pid // n_col_blocks
        cb = pid - row * n_col_blocks
        row = row.to(tl.int64)
        if USE_INT64:
            cb = cb.to(tl.int64)
        cols = cb * BLOCK + tl.arange(0, BLOCK)
        return row, cols, cols < n_cols

    @triton.jit
    def _swiglu_fwd_kernel(
        G, U, H, n_cols, n_col_blocks,
        sgm, sgn, sum_, sun,
        BLOCK: tl.constexpr,
        USE_INT64: tl.constexpr,
    ):
        row, cols, mask = _glu_offsets(n_cols, n_col_blocks, BLOCK, USE_INT64)
        g = tl.load(G + row * sgm + cols * sgn, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * sum_ + cols * sun, mask=mask, other=0.0).to(tl.float32)
        act = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)  # HF: silu(gate) in gate's dtype
        tl.store(H + row * n_cols + cols, (act * u).to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
        DH, G, U, DG, DU, n_cols, n_col_blocks,
        sdm, sdn, sgm, sgn, sum_, sun,
        BLOCK: tl.constexpr,
        USE_INT64: tl.constexpr,
    ):
        row, cols, mask = _glu_offsets(n_cols, n_col_blocks, BLOCK, USE_INT64)
        dh = tl.load(DH + row * sdm + cols * sdn, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + row * sgm + cols * sgn, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * sum_ + cols * sun, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        act = (g * sig).to(G.dtype.element_ty).to(tl.float32)
        dact = (dh * u).to(DH.dtype.element_ty).to(tl.float32)  # HF: grad of silu(gate) in dh's dtype
        dg = dact * sig * (1.0 + g * (1.0 - sig))
        du = dh * act
        out = row * n_cols + cols
        tl.store(DG + out, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + out, du.to(DU.dtype.element_ty), mask=mask)


def _launch_fwd(kernel, gate, up):
    """Shared by swiglu/geglu: h contiguous in promote(gate, up)."""
    h = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if h.numel() == 0:
        return h
    (g2, u2), rows, cols = _glu_views(gate, up)
    grid, n_col_blocks, use_int64 = _glu_grid(rows, cols, [g2, u2])
    kernel[grid](
        g2, u2, h, cols, n_col_blocks, g2.stride(0), g2.stride(1), u2.stride(0), u2.stride(1),
        BLOCK=ELEM_BLOCK, USE_INT64=use_int64, num_warps=ELEM_NUM_WARPS,
    )
    return h


def _launch_bwd(kernel, dh, gate, up):
    """Shared by swiglu/geglu: (dgate in gate.dtype, dup in up.dtype), contiguous."""
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if dg.numel() == 0:
        return dg, du
    (d2, g2, u2), rows, cols = _glu_views(dh, gate, up)
    grid, n_col_blocks, use_int64 = _glu_grid(rows, cols, [d2, g2, u2])
    kernel[grid](
        d2, g2, u2, dg, du, cols, n_col_blocks,
        d2.stride(0), d2.stride(1), g2.stride(0), g2.stride(1), u2.stride(0), u2.stride(1),
        BLOCK=ELEM_BLOCK, USE_INT64=use_int64, num_warps=ELEM_NUM_WARPS,
    )
    return dg, du


def _reference_glu_backward(act_fn, act_backward, dh, gate, up):
    """HF's autograd for ``act_fn(gate) * up``, step by step (autograd cannot run inside an op body)."""
    dact = (dh * up).to(gate.dtype)  # mul backward, cast to the activation's dtype
    dgate = act_backward(dact, gate).to(gate.dtype)
    dup = (dh * act_fn(gate)).to(up.dtype)
    return dgate.contiguous(), dup.contiguous()


def _glu_fake(gate, up):
    return torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)


def _glu_backward_fake(dh, gate, up):
    return (
        torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
        torch.empty(up.shape, dtype=up.dtype, device=up.device),
    )


def _glu_setup_context(ctx, inputs, output):
    gate, up = inputs
    ctx.save_for_backward(gate, up)  # never h: the backward recomputes the activation


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
def _triton_forward(gate, up):
    return _launch_fwd(_swiglu_fwd_kernel, gate, up)


def _triton_backward(dh, gate, up):
    return _launch_bwd(_swiglu_bwd_kernel, dh, gate, up)


@torch.library.custom_op("graphtune::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check_glu_args("swiglu", gate, up)
    if use_triton(gate):
        return _triton_forward(gate, up)
    return reference_swiglu(gate, up).contiguous()


@_swiglu_op.register_fake
def _swiglu_fake(gate, up):
    _check_glu_args("swiglu", gate, up)
    return _glu_fake(gate, up)


@torch.library.custom_op("graphtune::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate in gate.dtype, dup in up.dtype), recomputing sigmoid(gate)."""
    _check_glu_args("swiglu_backward", gate, up, dh)
    if use_triton(gate):
        return _triton_backward(dh, gate, up)
    return _reference_glu_backward(F.silu, torch.ops.aten.silu_backward, dh, gate, up)


@_swiglu_backward_op.register_fake
def _swiglu_backward_fake(dh, gate, up):
    _check_glu_args("swiglu_backward", gate, up, dh)
    return _glu_backward_fake(dh, gate, up)


def _swiglu_backward(ctx, dh):
    gate, up = ctx.saved_tensors
    return _swiglu_backward_op(dh, gate, up)


_swiglu_op.register_autograd(_swiglu_backward, setup_context=_glu_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` via ``graphtune::swiglu``; gate and up must have the same shape."""
    return torch.ops.graphtune.swiglu(gate, up)
