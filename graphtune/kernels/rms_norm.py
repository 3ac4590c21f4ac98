"""RMSNorm over the last dim as the custom op ``graphtune::rms_norm`` (Triton forward and backward).

Math (HF, two families):

* ``cast_before_weight=True`` (Llama, Mistral, Qwen, Phi3)::

      n = x.float() * rsqrt(mean(x.float()**2, -1) + eps)
      y = weight * n.to(x.dtype)            # dtype: promote_types(weight.dtype, x.dtype)

* ``cast_before_weight=False`` (Gemma, Gemma2, Gemma3; ``offset=1.0``)::

      y = (n * (offset + weight.float())).to(x.dtype)

Why a custom op: the pass that rewrites HF graphs needs one opaque node whose fake impl gives the
exact output strides (outputs are always contiguous), and whose backward recomputes ``rstd`` from
``x`` instead of saving it, and skips ``dweight`` for a frozen weight (LoRA).
"""

from __future__ import annotations

import functools

import torch

from graphtune.kernels._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["rms_norm", "reference_rms_norm", "MAX_FUSED_N"]

# Rows at most this wide stay in registers (one load of x); wider rows loop over column chunks.
# Module-level so tests can shrink it to exercise the chunked path on small shapes.
MAX_FUSED_N = 16384
# Elements a program aims to hold per tile: many short rows (q_norm over head_dim) share a program.
_TILE_ELEMS = 4096


# ----------------------------------------------------------------------------------------------
# Reference (exact HF math)
# ----------------------------------------------------------------------------------------------
def reference_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    cast_before_weight: bool = True,
) -> torch.Tensor:
    """HF RMSNorm verbatim: LlamaRMSNorm when ``cast_before_weight`` else Gemma3RMSNorm."""
    input_dtype = x.dtype
    xf = x.to(torch.float32)
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_weight:
        return weight * n.to(input_dtype)
    return (n * (offset + weight.float())).to(input_dtype)


def _check_args(x: torch.Tensor, weight: torch.Tensor, offset: float, cast_before_weight: bool) -> None:
    """Shared by the real and fake impls, so a bad rewrite fails at trace time, not in a kernel."""
    if weight.dim() != 1 or x.dim() == 0 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            "graphtune::rms_norm: weight must be 1-D with size x.shape[-1]; got weight "
            f"{tuple(weight.shape)} for x {tuple(x.shape)}"
        )
    if cast_before_weight and offset != 0.0:
        raise ValueError(
            "graphtune::rms_norm: offset must be 0 when cast_before_weight=True (the Llama form "
            f"has no (offset + w)); got offset={offset}"
        )
    if not x.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"graphtune::rms_norm: x and weight must be floating point, got {x.dtype}, {weight.dtype}")


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, cast_before_weight: bool) -> torch.dtype:
    return torch.promote_types(weight.dtype, x.dtype) if cast_before_weight else x.dtype


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _rms_norm_fwd_kernel(
        X, W, Y,
        M, N,
        stride_xm, stride_xn,
        eps, offset,
        CAST_BEFORE_WEIGHT: tl.constexpr,
        SINGLE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One program per tile of BLOCK_M rows; rstd in fp32, y stored in Y's dtype."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        x_rows = X + rows64[:, None] * stride_xm
        y_rows = Y + rows64[:, None] * N
        cols = tl.arange(0, BLOCK_N)
        if SINGLE:
            col_mask = cols < N
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_rows + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
            n = x * rstd[:, None]
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
            if CAST_BEFORE_WEIGHT:
                # HF rounds n to x.dtype before the weight multiply; emulate that rounding.
                y = n.to(X.dtype.element_ty).to(tl.float32) * w[None, :]
            else:
                y = n * (offset + w[None, :])
            tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        else:
            sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c < N)[None, :]
                x = tl.load(x_rows + c[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
                sumsq += tl.sum(x * x, axis=1)
            rstd = tl.rsqrt(sumsq / N + eps)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                col_mask = c < N
                mask = row_mask[:, None] & col_mask[None, :]
                x = tl.load(x_rows + c[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
                n = x * rstd[:, None]
                w = tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)
                if CAST_BEFORE_WEIGHT:
                    y = n.to(X.dtype.element_ty).to(tl.float32) * w[None, :]
                else:
                    y = n * (offset + w[None, :])
                tl.store(y_rows + c[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY, X, W, DX, DW_PART,
        M, N, tiles_per_prog,
        stride_dym, stride_dyn, stride_xm, stride_xn,
        eps, offset,
        CAST_BEFORE_WEIGHT: tl.constexpr,
        HAS_DW: tl.constexpr,
        SINGLE: tl.constexpr,
        ACC_2D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """dx = rstd * (g - n * mean(g * n)), g = dy * w_eff; rstd recomputed from x.

        Each program takes ``tiles_per_prog`` consecutive row tiles (1 when dW is not needed) and
        keeps a private fp32 partial of dW, written to DW_PART[pid] at the end and summed by the
        host side of the op: no atomics, deterministic. ACC_2D (short rows, many rows per tile)
        defers the sum over rows to the end instead of reducing across warps every tile.
        """
        pid = tl.program_id(0)
        row0 = pid.to(tl.int64) * tiles_per_prog * BLOCK_M
        cols = tl.arange(0, BLOCK_N)
        if SINGLE:
            col_mask = cols < N
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
            if CAST_BEFORE_WEIGHT:
                w_eff = w
            else:
                w_eff = offset + w
            if ACC_2D:
                dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            else:
                dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for i in range(0, tiles_per_prog):
                rows = row0 + i * BLOCK_M + tl.arange(0, BLOCK_M)
                mask = (rows < M)[:, None] & col_mask[None, :]
                x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
                x = x.to(tl.float32)
                dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0)
                dy = dy.to(tl.float32)
                rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
                n = x * rstd[:, None]
                g = dy * w_eff[None, :]
                c = tl.sum(g * n, axis=1) / N
                dx = rstd[:, None] * (g - n * c[:, None])
                tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_DW:
                    if CAST_BEFORE_WEIGHT:
                        n = n.to(X.dtype.element_ty).to(tl.float32)
                    if ACC_2D:
                        dw_acc += dy * n
                    else:
                        dw_acc += tl.sum(dy * n, axis=0)
            if HAS_DW:
                if ACC_2D:
                    tl.store(DW_PART + pid.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
                else:
                    tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw_acc, mask=col_mask)
        else:
            for i in range(0, tiles_per_prog):
                rows = row0 + i * BLOCK_M + tl.arange(0, BLOCK_M)
                row_mask = rows < M
                x_rows = X + rows[:, None] * stride_xm
                dy_rows = DY + rows[:, None] * stride_dym
                sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
                sum_gx = tl.zeros([BLOCK_M], dtype=tl.float32)
                for start in range(0, N, BLOCK_N):
                    c = start + cols
                    col_mask = c < N
                    mask = row_mask[:, None] & col_mask[None, :]
                    x = tl.load(x_rows + c[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(dy_rows + c[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
                    w = tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)
                    if CAST_BEFORE_WEIGHT:
                        g = dy * w[None, :]
                    else:
                        g = dy * (offset + w[None, :])
                    sumsq += tl.sum(x * x, axis=1)
                    sum_gx += tl.sum(g * x, axis=1)
                rstd = tl.rsqrt(sumsq / N + eps)
                # sum(g * n) = rstd * sum(g * x), so dx = rstd * g - x * rstd^3 * sum(g * x) / N
                coef = rstd * rstd * rstd * sum_gx / N
                for start in range(0, N, BLOCK_N):
                    c = start + cols
                    col_mask = c < N
                    mask = row_mask[:, None] & col_mask[None, :]
                    x = tl.load(x_rows + c[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(dy_rows + c[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
                    w = tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)
                    if CAST_BEFORE_WEIGHT:
                        g = dy * w[None, :]
                    else:
                        g = dy * (offset + w[None, :])
                    dx = rstd[:, None] * g - x * coef[:, None]
                    tl.store(DX + rows[:, None] * N + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
                    if HAS_DW:
                        n = x * rstd[:, None]
                        if CAST_BEFORE_WEIGHT:
                            n = n.to(X.dtype.element_ty).to(tl.float32)
                        part = DW_PART + pid.to(tl.int64) * N + c
                        # Each program owns its partial row: plain read-modify-write, no race.
                        tl.store(part, tl.load(part, mask=col_mask, other=0.0) + tl.sum(dy * n, axis=0), mask=col_mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _dw_programs(t: torch.Tensor) -> int:
    """Programs for the dx+dW backward: one per SM (measured best on H100, see _dw_config)."""
    if t.device.type == "cuda":
        return _num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 4  # CPU interpreter: a few programs, each looping over several tiles


def _dw_config(M: int, N: int, block_n: int) -> tuple[int, int, bool]:
    """(BLOCK_M, num_warps, ACC_2D) for the dx+dW backward.

    Measured on an H100 in bf16 (sweeps of tile rows, programs per SM, warps, stages): tiles of
    ~16K elements, one program per SM looping over consecutive tiles, 8 warps. Op-level, under a
    CUDA graph: 78% of copy bandwidth at [8192, 4096] (dx alone: 99%). Short rows (q_norm,
    N=128) do best with a 2-D accumulator and 16 warps (71%).
    """
    block_m = max(1, min(16384 // block_n, triton.next_power_of_2(M)))
    acc_2d = block_n < 1024 and block_m > 1
    num_warps = 16 if acc_2d and block_m * block_n >= 8192 else 8 if block_m * block_n >= 2048 else 4
    return block_m, num_warps, acc_2d


def _launch_config(M: int, N: int) -> tuple[bool, int, int, int]:
    """(single, BLOCK_M, BLOCK_N, num_warps): one block per row when it fits, rows packed when short."""
    max_n = triton.next_power_of_2(max(1, MAX_FUSED_N))
    block_n = triton.next_power_of_2(N)
    single = block_n <= max_n
    if not single:
        block_n = max_n
    block_m = 1
    if single:
        block_m = max(1, min(_TILE_ELEMS // block_n, triton.next_power_of_2(M)))
    elems = block_m * block_n
    num_warps = 4 if elems <= 2048 else 8 if elems <= 8192 else 16
    return single, block_m, block_n, num_warps


def _rows_2d(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., N] as a 2-D [M, N] view when the leading dims collapse (strides are passed, stride 0 too)."""
    return t.reshape(-1, n)


def _triton_forward(x, weight, eps, offset, cast_before_weight):
    N = x.shape[-1]
    x2 = _rows_2d(x, N)
    M = x2.shape[0]
    y = torch.empty(x.shape, dtype=_out_dtype(x, weight, cast_before_weight), device=x.device)
    if M == 0 or N == 0:
        return y
    single, block_m, block_n, num_warps = _launch_config(M, N)
    grid = (triton.cdiv(M, block_m),)
    _rms_norm_fwd_kernel[grid](
        x2, weight, y, M, N, x2.stride(0), x2.stride(1), eps, offset,
        CAST_BEFORE_WEIGHT=cast_before_weight, SINGLE=single, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y


def _triton_backward(dy, x, weight, eps, offset, cast_before_weight, need_weight_grad):
    N = x.shape[-1]
    x2 = _rows_2d(x, N)
    dy2 = _rows_2d(dy, N)
    M = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        dw = torch.zeros_like(weight) if need_weight_grad else weight.new_empty(0)
        return dx, dw
    single, block_m, block_n, num_warps = _launch_config(M, N)
    acc_2d = False
    if need_weight_grad and single:
        block_m, num_warps, acc_2d = _dw_config(M, N, block_n)
    n_tiles = triton.cdiv(M, block_m)
    tiles_per_prog = triton.cdiv(n_tiles, _dw_programs(x)) if need_weight_grad else 1
    n_prog = triton.cdiv(n_tiles, tiles_per_prog)
    if need_weight_grad:
        # The chunked path accumulates into its partial row in memory, so it must start at zero;
        # the single-block path writes every partial row once.
        alloc = torch.empty if single else torch.zeros
        part = alloc((n_prog, N), dtype=torch.float32, device=x.device)
    else:
        part = dx  # unused (HAS_DW=False); any pointer will do
    _rms_norm_bwd_kernel[(n_prog,)](
        dy2, x2, weight, dx, part, M, N, tiles_per_prog,
        dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), eps, offset,
        CAST_BEFORE_WEIGHT=cast_before_weight, HAS_DW=need_weight_grad, SINGLE=single, ACC_2D=acc_2d,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    dw = part.sum(0).to(weight.dtype) if need_weight_grad else weight.new_empty(0)
    return dx, dw


def _reference_backward(dy, x, weight, eps, offset, cast_before_weight, need_weight_grad):
    """HF's autograd through the reference, step by step (autograd cannot run inside an op body)."""
    xf = x.to(torch.float32)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * rstd
    if cast_before_weight:
        h = n.to(x.dtype)
        dn = (dy * weight).to(x.dtype).to(torch.float32)  # mul backward, cast to h's dtype, then to fp32
        dw_full = dy * h
    else:
        dyf = dy.to(torch.float32)
        dn = dyf * (offset + weight.float())
        dw_full = dyf * n
    # d/dx of x * rsqrt(mean(x^2) + eps): rstd * dn - x * rstd^3 * mean(dn * x)
    dx = (rstd * dn - xf * rstd.pow(3) * (dn * xf).mean(-1, keepdim=True)).to(x.dtype).contiguous()
    if not need_weight_grad:
        return dx, weight.new_empty(0)
    dw = dw_full.reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx, dw


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("graphtune::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, cast_before_weight: bool) -> torch.Tensor:
    _check_args(x, weight, offset, cast_before_weight)
    if use_triton(x):
        return _triton_forward(x, weight, eps, offset, cast_before_weight)
    return reference_rms_norm(x, weight, eps, offset, cast_before_weight).contiguous()


@_rms_norm_op.register_fake
def _rms_norm_fake(x, weight, eps, offset, cast_before_weight):
    _check_args(x, weight, offset, cast_before_weight)
    return torch.empty(x.shape, dtype=_out_dtype(x, weight, cast_before_weight), device=x.device)


@torch.library.custom_op("graphtune::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float,
    cast_before_weight: bool,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx in x.dtype, dweight in weight.dtype or an empty tensor when not needed)."""
    _check_args(x, weight, offset, cast_before_weight)
    if use_triton(x):
        return _triton_backward(dy, x, weight, eps, offset, cast_before_weight, need_weight_grad)
    return _reference_backward(dy, x, weight, eps, offset, cast_before_weight, need_weight_grad)


@_rms_norm_backward_op.register_fake
def _rms_norm_backward_fake(dy, x, weight, eps, offset, cast_before_weight, need_weight_grad):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty(weight.shape if need_weight_grad else (0,), dtype=weight.dtype, device=weight.device)
    return dx, dw


def _setup_context(ctx, inputs, output):
    x, weight, eps, offset, cast_before_weight = inputs
    ctx.save_for_backward(x, weight)  # no rstd: the backward recomputes it from x
    ctx.eps, ctx.offset, ctx.cast_before_weight = eps, offset, cast_before_weight


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[1]
    dx, dw = _rms_norm_backward_op(dy, x, weight, ctx.eps, ctx.offset, ctx.cast_before_weight, need_dw)
    return dx, (dw if need_dw else None), None, None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    cast_before_weight: bool = True,
) -> torch.Tensor:
    """RMSNorm over the last dim via ``graphtune::rms_norm`` (see the module docstring for the math)."""
    return torch.ops.graphtune.rms_norm(x, weight, float(eps), float(offset), bool(cast_before_weight))
