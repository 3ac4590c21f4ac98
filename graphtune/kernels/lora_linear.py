"""LoRA projection ``x W^T + b + s * (x_lora A^T) B^T`` as one custom op, ``graphtune::lora_linear``.

Why one op: peft's eager graph saves both ``x`` (for dA) and the rank-r activation ``h = x_lora A^T``
(for dB) per projection, and autograd would also keep the scaled intermediates. This op saves only
``x_lora`` (the same tensor object as ``x`` without dropout, so projections sharing an input share
it) and recomputes ``h`` in the backward -- an (N x r) matmul. The frozen base weight never gets a
gradient; the guard in ``fuse_lora`` refuses a trainable base weight.

``x_lora`` is ``dropout(x)`` when lora_dropout > 0 (the graph keeps peft's dropout node, so the
mask and the RNG stream are peft's own) and ``x`` itself otherwise.

Math of the backward, with ``g = dY * s``::

    dB = g^T h          dh = g B          dA = dh^T x_lora
    dx = dY W           dx_lora = dh A    db = sum(dY)

Matmuls run in the input dtype, as peft's do; the op is device-agnostic torch (cuBLAS on GPU).

Mixed precision (peft's default ``autocast_adapter_dtype=True`` on a bf16/fp16 model): x and W are
half and A, B are fp32. ``x_lora`` is either peft's fp32 cast node (with dropout) or ``x`` itself, which
the op casts to fp32 inside (no fp32 copy of x is materialized or saved). The output is then fp32 (the
half base output promoted, as in peft's eager sum) and the backward mirrors eager autograd: the base
path gets ``dY`` cast to W's dtype (``dx = dY.half() W``), the adapter path stays in fp32 and its
``dx_lora`` is cast back to x_lora's dtype, as the backward of eager's ``x.to(float32)`` does.
``out_dtype`` (set by fuse_lora's autocast rewrite) folds peft's final ``.to(half)`` into the op: the
fp32 sum never leaves it, and dY arrives in half precision -- which is exactly the gradient eager's
cast hands the fp32 sum, so the backward is unchanged.

With ``GRAPHTUNE_LORA_SPLIT=auto`` (CUDA) or ``=1`` (any device; off by default: on an H100 the
1B LoRA step ran at 0.64x the default pipeline's speed with it, see README) the bf16 case of that
(x, W and the output bf16, A and B fp32, no dropout so ``x_lora`` is ``x``) runs its adapter
products as split-bf16 GEMMs (:mod:`graphtune.kernels.split_bf16`): tensor cores instead of fp32
CUDA-core GEMMs, within ~1e-5 relative of the fp32 products, no fp32 copy of x.
The forward's sum is one ``addmm`` into the bf16 base output (``base + s * [h_hi|h_hi|h_lo] [B_hi|B_lo|B_hi]^T``,
rounded once), the backward returns the same five gradients in the same dtypes as the fp32 path.
Unset or ``GRAPHTUNE_LORA_SPLIT=0`` keeps the fp32 path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphtune.kernels.split_bf16 import fold_halves, mm_f32, split_blocks, split_enabled

__all__ = ["lora_linear", "reference_lora_linear"]


def reference_lora_linear(x, x_lora, weight, bias, lora_a, lora_b, scaling: float):
    """peft's ``Linear.forward`` for one active adapter: base + B(A(x_lora)) * scaling.

    ``x_lora`` is cast to the adapter dtype first (a no-op unless peft's fp32 adapters read a half x)."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x_lora.to(lora_a.dtype), lora_a), lora_b) * scaling


def _check(x, x_lora, weight, lora_a, lora_b):
    if x.shape != x_lora.shape:
        raise ValueError(f"graphtune::lora_linear: x {tuple(x.shape)} and x_lora {tuple(x_lora.shape)} differ")
    if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError("graphtune::lora_linear: weight, lora_a and lora_b must be 2-D")
    if lora_a.shape[1] != x.shape[-1] or weight.shape[1] != x.shape[-1] or lora_b.shape[1] != lora_a.shape[0] or lora_b.shape[0] != weight.shape[0]:
        raise ValueError(
            f"graphtune::lora_linear: shapes do not chain: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}"
        )


def split_path_applies(x, x_lora, weight, lora_a, lora_b, out_dtype) -> bool:
    """peft's bf16 mixed precision without dropout, where :mod:`split_bf16` serves the adapter products."""
    bf16, f32 = torch.bfloat16, torch.float32
    return (out_dtype == bf16 and x.dtype == bf16 and x_lora.dtype == bf16 and weight.dtype == bf16
            and lora_a.dtype == f32 and lora_b.dtype == f32 and split_enabled(x.device))


def _split_forward(x, weight, bias, lora_a, lora_b, scaling: float) -> torch.Tensor:
    """``bf16(base + s * (x A^T) B^T)`` with the adapter products on bf16 tensor cores (split fp32)."""
    x2 = x.reshape(-1, x.shape[-1])
    base = F.linear(x2, weight, bias)
    h2 = mm_f32(x2, split_blocks(lora_a.t(), "HL"))  # [M, 2r]: x A_hi^T | x A_lo^T
    out = torch.addmm(base, split_blocks(h2, "HHL", n_sum=2), split_blocks(lora_b, "HLH").t(), alpha=scaling)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _split_backward(dy, x_lora, weight, lora_a, lora_b, scaling: float, need_bias_grad: bool):
    """:func:`_lora_linear_backward_op`'s five results for the split path (x_lora is x, bf16)."""
    r = lora_a.shape[0]
    dy2 = dy.reshape(-1, dy.shape[-1]).to(weight.dtype)
    x2 = x_lora.reshape(-1, x_lora.shape[-1])
    a3 = split_blocks(lora_a.t(), "HLH")  # [K, 3r]: A_hi^T | A_lo^T | A_hi^T
    h_split = split_blocks(mm_f32(x2, a3[:, : 2 * r]), "HL", n_sum=2)  # h = x A^T recomputed: [h_hi | h_lo]
    dh_split = split_blocks(mm_f32(dy2, split_blocks(lora_b, "HL")), "HHL", n_sum=2, scale=scaling)  # dh = s dy B
    d_b = fold_halves(mm_f32(dy2.t(), h_split), dim=1, scale=scaling)  # s dy^T h
    d_a = fold_halves(mm_f32(dh_split[:, r:].t(), x2), dim=0)  # dh^T x
    dx = (dy2 @ weight).reshape(x_lora.shape)
    dx_lora = (dh_split @ a3.t()).reshape(x_lora.shape)  # dh A, rounded to bf16 once (eager: x.to(fp32)'s backward)
    db = dy2.sum(0) if need_bias_grad else dy2.new_empty(0)
    return dx, dx_lora, d_a, d_b, db


@torch.library.custom_op("graphtune::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    x_lora: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    _check(x, x_lora, weight, lora_a, lora_b)
    if out_dtype is None:
        return reference_lora_linear(x, x_lora, weight, bias, lora_a, lora_b, scaling).contiguous()
    if split_path_applies(x, x_lora, weight, lora_a, lora_b, out_dtype):
        return _split_forward(x, weight, bias, lora_a, lora_b, scaling)
    # peft's mixed precision ends in ``.to(out_dtype)``: the sum is formed in the promoted dtype by one
    # addmm (base + s * h B^T) and cast once, so no promoted [N, out] tensor leaves the op
    base = F.linear(x, weight, bias)
    h = F.linear(x_lora.to(lora_a.dtype), lora_a)
    acc = torch.promote_types(base.dtype, lora_b.dtype)
    out = torch.addmm(base.reshape(-1, base.shape[-1]).to(acc), h.reshape(-1, h.shape[-1]), lora_b.t(), alpha=scaling)
    return out.to(out_dtype).reshape(base.shape)


@_lora_linear_op.register_fake
def _lora_linear_fake(x, x_lora, weight, bias, lora_a, lora_b, scaling, out_dtype=None):
    _check(x, x_lora, weight, lora_a, lora_b)
    dtype = out_dtype or torch.promote_types(torch.promote_types(x.dtype, weight.dtype), lora_b.dtype)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype)


@torch.library.custom_op("graphtune::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    dy: torch.Tensor,
    x_lora: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dx_lora, dA, dB, db-or-empty); h = x_lora A^T is recomputed here."""
    if split_path_applies(x_lora, x_lora, weight, lora_a, lora_b, dy.dtype):  # dy is bf16 there
        return _split_backward(dy, x_lora, weight, lora_a, lora_b, scaling, need_bias_grad)
    dy2 = dy.reshape(-1, dy.shape[-1])
    xl2 = x_lora.reshape(-1, x_lora.shape[-1]).to(lora_a.dtype)
    h = xl2 @ lora_a.t()
    g = dy2.to(lora_b.dtype) * scaling
    d_b = g.t() @ h
    dh = g @ lora_b
    d_a = dh.t() @ xl2
    dy_base = dy2.to(weight.dtype)  # eager autograd casts the grad to the base output's dtype at the add
    dx = (dy_base @ weight).reshape(x_lora.shape)
    dx_lora = (dh @ lora_a).reshape(x_lora.shape).to(x_lora.dtype)  # eager: back through x.to(fp32)
    db = dy_base.sum(0) if need_bias_grad else dy2.new_empty(0)
    return dx, dx_lora, d_a.to(lora_a.dtype), d_b.to(lora_b.dtype), db


@_lora_linear_backward_op.register_fake
def _lora_linear_backward_fake(dy, x_lora, weight, lora_a, lora_b, scaling, need_bias_grad):
    n_out = weight.shape[0]
    return (
        x_lora.new_empty(x_lora.shape, dtype=weight.dtype),
        x_lora.new_empty(x_lora.shape),
        lora_a.new_empty(lora_a.shape),
        lora_b.new_empty(lora_b.shape),
        dy.new_empty((n_out,) if need_bias_grad else (0,), dtype=weight.dtype if need_bias_grad else dy.dtype),
    )


def _setup_context(ctx, inputs, output):
    x, x_lora, weight, bias, lora_a, lora_b, scaling, _out_dtype = inputs
    ctx.save_for_backward(x_lora, weight, lora_a, lora_b)  # never h, never x separately
    ctx.scaling = scaling
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x_lora, weight, lora_a, lora_b = ctx.saved_tensors
    need_db = ctx.has_bias and ctx.needs_input_grad[3]
    dx, dx_lora, d_a, d_b, db = _lora_linear_backward_op(dy, x_lora, weight, lora_a, lora_b, ctx.scaling, need_db)
    return (
        dx if ctx.needs_input_grad[0] else None,
        dx_lora if ctx.needs_input_grad[1] else None,
        None,  # the frozen base weight: the pass refuses a trainable one
        db if need_db else None,
        d_a if ctx.needs_input_grad[4] else None,
        d_b if ctx.needs_input_grad[5] else None,
        None,
        None,
    )


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(x, x_lora, weight, bias, lora_a, lora_b, scaling: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One LoRA projection via ``graphtune::lora_linear`` (see the module docstring)."""
    if out_dtype is None:
        return torch.ops.graphtune.lora_linear(x, x_lora, weight, bias, lora_a, lora_b, float(scaling))
    return torch.ops.graphtune.lora_linear(x, x_lora, weight, bias, lora_a, lora_b, float(scaling), out_dtype)
