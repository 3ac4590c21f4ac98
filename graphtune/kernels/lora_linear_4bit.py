"""QLoRA projection ``x W^T + b + s * (x_lora A^T) B^T`` over a bitsandbytes 4-bit ``W``: ``graphtune::lora_linear_4bit``.

Why one op: bitsandbytes' ``MatMul4Bit`` and peft's LoRA branch are separate autograd nodes, so
autograd keeps ``x`` for dA, the rank-r activation ``x_lora A^T`` for dB, and bitsandbytes allocates
a fresh dense ``W`` per projection in forward and again in backward. This op

* dequantizes ``W`` into the shared workspace of ``dequant_4bit`` (one buffer per device and dtype,
  grow-only), uses it for one matmul and is done with it; the output is a fresh tensor;
* saves only ``x_lora`` and the *packed* 4-bit weight with its quant-state tensors -- never the
  dense weight, never the workspace -- and re-dequantizes into the workspace in the backward.

Reusing one buffer across every layer is safe only because of that second point: nothing that
outlives one op call refers to the workspace. Under ``torch.compile`` the op is opaque (a custom op
whose fake allocates the output and never touches the workspace), so inductor cannot fuse, reorder
or alias around it.

Math of the backward, with ``g = dY * s`` (the frozen 4-bit weight gets no gradient)::

    dB = g^T h     dh = g B     dA = dh^T x_lora     (h = x_lora A^T, recomputed)
    dx = dY W      dx_lora = dh A      db = sum(dY)

``W`` is dequantized straight into the compute dtype (``x.dtype``), as ``bitsandbytes::gemm_4bit``
does in the forward; matmuls run in that dtype, as bitsandbytes' and peft's do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphtune.kernels.dequant_4bit import dequantize_4bit_workspace, reference_dequantize_4bit

__all__ = ["lora_linear_4bit", "reference_lora_linear_4bit"]

# bitsandbytes double-quantizes the absmax in blocks of 256 (``quantize_4bit(compress_statistics=True)``
# and ``bitsandbytes::gemm_4bit``'s nested path assume it)
NESTED_BLOCKSIZE = 256


def _quant(packed, absmax, absmax2, code2, offset, out_features: int, in_features: int, blocksize: int, quant_type: str):
    return dict(
        packed=packed, absmax=absmax, shape=(out_features, in_features), blocksize=blocksize, quant_type=quant_type,
        absmax2=absmax2, code2=code2, offset=offset, blocksize2=NESTED_BLOCKSIZE,
    )


def _dense(dtype, **q) -> torch.Tensor:
    """W (out_features x in_features) in ``dtype``, a view of the workspace: use it before the next call."""
    return dequantize_4bit_workspace(
        q["packed"], q["absmax"], q["shape"], q["blocksize"], q["quant_type"], dtype,
        absmax2=q["absmax2"], code2=q["code2"], offset=q["offset"], blocksize2=q["blocksize2"],
    )


def reference_lora_linear_4bit(
    x, x_lora, packed, absmax, absmax2, code2, offset, bias, lora_a, lora_b, scaling: float,
    out_features: int, in_features: int, blocksize: int, quant_type: str,
):
    """bitsandbytes ``Linear4bit`` + peft's LoRA branch, with a fresh dense W from the pure-torch dequant."""
    q = _quant(packed, absmax, absmax2, code2, offset, out_features, in_features, blocksize, quant_type)
    w = reference_dequantize_4bit(
        packed, absmax, q["shape"], blocksize, quant_type, x.dtype, absmax2=absmax2, code2=code2, offset=offset,
        blocksize2=NESTED_BLOCKSIZE,
    )
    return F.linear(x, w, bias) + (F.linear(F.linear(x_lora, lora_a), lora_b) * scaling).to(x.dtype)


def _check(x, x_lora, lora_a, lora_b, out_features, in_features, absmax2, code2, offset):
    if x.shape != x_lora.shape:
        raise ValueError(f"graphtune::lora_linear_4bit: x {tuple(x.shape)} and x_lora {tuple(x_lora.shape)} differ")
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError("graphtune::lora_linear_4bit: lora_a and lora_b must be 2-D")
    if x.shape[-1] != in_features or lora_a.shape[1] != in_features or lora_b.shape != (out_features, lora_a.shape[0]):
        raise ValueError(
            f"graphtune::lora_linear_4bit: shapes do not chain: x {tuple(x.shape)}, W ({out_features}, {in_features}), "
            f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}"
        )
    if not ((absmax2 is None) == (code2 is None) == (offset is None)):
        raise ValueError("graphtune::lora_linear_4bit: double quantization needs absmax2, code2 and offset together")


@torch.library.custom_op("graphtune::lora_linear_4bit", mutates_args=())
def _lora_linear_4bit_op(
    x: torch.Tensor,
    x_lora: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    out_features: int,
    in_features: int,
    blocksize: int,
    quant_type: str,
) -> torch.Tensor:
    _check(x, x_lora, lora_a, lora_b, out_features, in_features, absmax2, code2, offset)
    q = _quant(packed, absmax, absmax2, code2, offset, out_features, in_features, blocksize, quant_type)
    y = F.linear(x, _dense(x.dtype, **q), bias)  # a fresh tensor: never a view of the workspace
    # fp32 adapters on a half compute dtype (peft's default): peft casts the adapter output to the
    # compute dtype before the add; a no-op when everything shares one dtype
    y = y + (F.linear(F.linear(x_lora, lora_a), lora_b) * scaling).to(x.dtype)
    return y.contiguous()


@_lora_linear_4bit_op.register_fake
def _lora_linear_4bit_fake(
    x, x_lora, packed, absmax, absmax2, code2, offset, bias, lora_a, lora_b, scaling, out_features, in_features, blocksize, quant_type
):
    _check(x, x_lora, lora_a, lora_b, out_features, in_features, absmax2, code2, offset)
    return x.new_empty((*x.shape[:-1], out_features), dtype=x.dtype)


@torch.library.custom_op("graphtune::lora_linear_4bit_backward", mutates_args=())
def _lora_linear_4bit_backward_op(
    dy: torch.Tensor,
    x_lora: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    out_features: int,
    in_features: int,
    blocksize: int,
    quant_type: str,
    x_dtype: torch.dtype,
    need_dx: bool,
    need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx-or-empty, dx_lora, dA, dB, db-or-empty); W is re-dequantized, h recomputed."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    xl2 = x_lora.reshape(-1, x_lora.shape[-1])
    h = xl2 @ lora_a.t()
    g = dy2.to(lora_b.dtype) * scaling  # eager casts the grad back through the adapter output's cast
    d_b = g.t() @ h
    dh = g @ lora_b
    d_a = dh.t() @ xl2
    dx_lora = (dh @ lora_a).reshape(x_lora.shape)
    if need_dx:
        q = _quant(packed, absmax, absmax2, code2, offset, out_features, in_features, blocksize, quant_type)
        dx = (dy2.to(x_dtype) @ _dense(x_dtype, **q)).reshape(x_lora.shape)  # fresh: not the workspace
    else:
        dx = dy.new_empty(0, dtype=x_dtype)
    db = dy2.sum(0) if need_bias_grad else dy2.new_empty(0)
    return dx, dx_lora, d_a.to(lora_a.dtype), d_b.to(lora_b.dtype), db


@_lora_linear_4bit_backward_op.register_fake
def _lora_linear_4bit_backward_fake(
    dy, x_lora, packed, absmax, absmax2, code2, offset, lora_a, lora_b, scaling,
    out_features, in_features, blocksize, quant_type, x_dtype, need_dx, need_bias_grad,
):
    return (
        x_lora.new_empty(x_lora.shape if need_dx else (0,), dtype=x_dtype),
        x_lora.new_empty(x_lora.shape, dtype=torch.promote_types(dy.dtype, lora_a.dtype)),
        lora_a.new_empty(lora_a.shape),
        lora_b.new_empty(lora_b.shape),
        dy.new_empty((out_features,) if need_bias_grad else (0,)),
    )


def _setup_context(ctx, inputs, output):
    x, x_lora, packed, absmax, absmax2, code2, offset, bias, lora_a, lora_b, scaling, out_f, in_f, blocksize, quant_type = inputs
    # the packed weight and its quant state, never a dense W (nor the workspace); x itself is not needed
    ctx.nested = absmax2 is not None
    saved = [x_lora, packed, absmax, lora_a, lora_b] + ([absmax2, code2, offset] if ctx.nested else [])
    ctx.save_for_backward(*saved)
    ctx.meta = (scaling, out_f, in_f, blocksize, quant_type, x.dtype)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x_lora, packed, absmax, lora_a, lora_b, *nested = ctx.saved_tensors
    absmax2, code2, offset = nested if ctx.nested else (None, None, None)
    scaling, out_f, in_f, blocksize, quant_type, x_dtype = ctx.meta
    need_dx = ctx.needs_input_grad[0]
    need_db = ctx.has_bias and ctx.needs_input_grad[7]
    dx, dx_lora, d_a, d_b, db = _lora_linear_4bit_backward_op(
        dy, x_lora, packed, absmax, absmax2, code2, offset, lora_a, lora_b, scaling,
        out_f, in_f, blocksize, quant_type, x_dtype, need_dx, need_db,
    )
    return (
        dx if need_dx else None,
        dx_lora if ctx.needs_input_grad[1] else None,
        None, None, None, None, None,  # packed weight and quant state: frozen, integer or constant
        db if need_db else None,
        d_a if ctx.needs_input_grad[8] else None,
        d_b if ctx.needs_input_grad[9] else None,
        None, None, None, None, None,
    )


_lora_linear_4bit_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear_4bit(
    x, x_lora, packed, absmax, absmax2, code2, offset, bias, lora_a, lora_b, scaling: float,
    out_features: int, in_features: int, blocksize: int, quant_type: str,
) -> torch.Tensor:
    """One QLoRA projection via ``graphtune::lora_linear_4bit`` (see the module docstring).

    ``packed, absmax, absmax2, code2, offset`` are bitsandbytes' ``weight``, ``quant_state.absmax``
    and, when double-quantized, ``quant_state.state2.absmax``, ``quant_state.state2.code`` and
    ``quant_state.offset`` (else None).
    """
    return torch.ops.graphtune.lora_linear_4bit(
        x, x_lora, packed, absmax, absmax2, code2, offset, bias, lora_a, lora_b, float(scaling),
        int(out_features), int(in_features), int(blocksize), str(quant_type),
    )
