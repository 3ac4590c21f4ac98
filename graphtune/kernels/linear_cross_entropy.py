"""lm_head projection + cross-entropy as one custom op, ``graphtune::linear_cross_entropy``: the
``[N x V]`` logits are never materialized.

Math (HF ``ForCausalLMLoss`` after ``logits = lm_head(hidden)``, Gemma-2's final softcap optional)::

    z    = hidden @ W^T + b                     # [N, V], computed chunk by chunk, in hidden's dtype
    z    = cap * tanh(z / cap)                  # only when softcap > 0
    loss = sum_{i: t_i != ignore} (logsumexp(z_i) - z_i[t_i]) / divisor
    divisor = number of non-ignored targets     # reduction="mean" (HF without num_items_in_batch)
            = num_items_in_batch                # reduction="sum" with a divisor tensor (HF with it)
            = 1                                 # reduction="sum" without one

Per chunk of rows: one GEMM gives the chunk's logits (input dtype, fp32 accumulation), a Triton
kernel (online softmax over V in blocks, any V) writes the row losses and overwrites the logits *in
place* with ``dz = (softmax(z) - onehot(t)) * dcap / divisor`` (zero for ignored rows), then
``dH_chunk = dz @ W`` and, only when the weight is trained (tied embeddings, full fine-tuning),
``dW += dz^T @ h_chunk`` (fp32 accumulator) and ``db += sum(dz)``. Rows per chunk come from N and V
so that a chunk of fp32 logits stays under :data:`CHUNK_BYTES` (``CHUNK_ROWS`` overrides).

Why the gradients are computed in the forward (not recomputed in the backward): the lm_head GEMM is
the largest single matmul of a small model's step (V is 128-256k). Recomputing the logits in the
backward costs one more ``N x V x H`` GEMM (4 instead of 3 with dW, 3 instead of 2 without), while
storing ``dH`` costs the same ``[N, H]`` tensor a recomputing op would save anyway (``hidden``). The
stored gradients are for a unit upstream gradient; the backward multiplies them by ``grad_output``
(a scalar), so ``loss * k`` or ``loss / accumulation_steps`` stay exact. The price: the op must know
in the forward which gradients are wanted (the ``need_*`` flags; the pass sets them from the graph's
``requires_grad``), and a forward whose loss is never backpropagated wastes the gradient GEMMs --
the pass therefore refuses graphs in which no gradient flows.

dtypes: hidden, weight and bias share one dtype (fp32, bf16 or fp16); the loss is fp32 (HF upcasts
the logits with ``.float()``); ``dz`` is rounded to the input dtype before the gradient GEMMs, as HF's
autograd through ``.float()`` does. Semantics follow ``F.cross_entropy``: all targets ignored with
reduction "mean" gives a nan loss and zero gradients. A target outside ``[0, V)`` that is not
``ignore_index`` raises on the torch path and makes the loss nan on the Triton path (no host sync).
"""

from __future__ import annotations

import math

import torch

from graphtune.kernels._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["linear_cross_entropy", "reference_linear_cross_entropy", "chunk_rows", "CHUNK_BYTES", "CHUNK_ROWS", "BLOCK_V"]

# Budget for one chunk of logits counted as fp32 (the buffer itself is in the input dtype).
CHUNK_BYTES = 256 << 20
# Rows per chunk, overriding the budget (tests set it small to cross chunk boundaries).
CHUNK_ROWS: int | None = None
# Fewest rows per chunk worth a GEMM launch, even when V is so large that the budget says fewer.
MIN_CHUNK_ROWS = 128
# Columns a Triton program handles per step of its loop over V (None: chosen from V).
BLOCK_V: int | None = None
_MAX_BLOCK_V = 4096

_REDUCTIONS = ("mean", "sum")


# ----------------------------------------------------------------------------------------------
# Reference (exact HF math, materializes the logits)
# ----------------------------------------------------------------------------------------------
def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int = -100,
    softcap: float = 0.0,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """HF verbatim: ``lm_head``, Gemma-2's softcap, ``ForCausalLMLoss`` on already shifted targets."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float().view(-1, weight.shape[0])
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = torch.nn.functional.cross_entropy(logits, target.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# ----------------------------------------------------------------------------------------------
# Chunking
# ----------------------------------------------------------------------------------------------
def chunk_rows(n: int, v: int, h: int) -> int:
    """Rows per chunk: the most whose fp32 logits fit :data:`CHUNK_BYTES`, balanced so the last
    chunk is not a sliver, and never below ``MIN_CHUNK_ROWS`` (a GEMM needs rows to be efficient).

    ``h`` does not change the answer: the ``[rows, H]`` slices of hidden and dH are small next to the
    ``[rows, V]`` logits (it is an argument so that a future budget may count them)."""
    if n <= 0:
        return 1
    if CHUNK_ROWS is not None:
        return max(1, min(int(CHUNK_ROWS), n))
    cap = max(CHUNK_BYTES // (4 * max(v, 1)), MIN_CHUNK_ROWS)
    chunks = math.ceil(n / cap)
    rows = math.ceil(n / chunks)
    rows = min(cap, (rows + 7) // 8 * 8)  # multiples of 8 rows keep the GEMM tiles aligned
    return max(1, min(rows, n))


# ----------------------------------------------------------------------------------------------
# Per-chunk loss and in-place logits gradient: Triton kernel and torch reference
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    _NEG = tl.constexpr(-3.0e38)  # below any finite logit, still finite in fp32

    @triton.jit
    def _capped(z, softcap, HAS_SOFTCAP: tl.constexpr):
        """(cap * tanh(z / cap), tanh(z / cap)); tanh via exp, exact at the saturated ends."""
        if HAS_SOFTCAP:
            e = tl.exp(-2.0 * tl.abs(z / softcap))
            th = (1.0 - e) / (1.0 + e)
            th = tl.where(z < 0, -th, th)
            return softcap * th, th
        else:
            return z, z

    @triton.jit
    def _ce_chunk_kernel(
        Z, stride_z,
        TARGET, LOSS, SCALE,
        n_cols, ignore_index, softcap,
        HAS_SOFTCAP: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One program per row: pass 1 online logsumexp over V, pass 2 dz in place (WRITE_GRAD)."""
        row = tl.program_id(0).to(tl.int64)
        z_row = Z + row * stride_z
        t = tl.load(TARGET + row).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        if t == ignore_index:
            tl.store(LOSS + row, 0.0)
            if WRITE_GRAD:
                for start in range(0, n_cols, BLOCK):
                    c = start + cols
                    tl.store(z_row + c, tl.zeros([BLOCK], dtype=tl.float32).to(Z.dtype.element_ty), mask=c < n_cols)
        else:
            # (no early return and no reused throw-away names: compiled Triton types every loop-carried name)
            in_range = (t >= 0) & (t < n_cols)
            zt_raw = tl.load(z_row + t, mask=in_range, other=float("nan")).to(tl.float32)
            zt, zt_th = _capped(zt_raw, softcap, HAS_SOFTCAP)

            # per-lane running max and sum; masked lanes hold a finite floor (not -inf) so that no
            # inf - inf appears, and contribute exp(.) = 0 through the where
            m = tl.full([BLOCK], _NEG, dtype=tl.float32)
            d = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                c = start + cols
                mask = c < n_cols
                z_raw = tl.load(z_row + c, mask=mask, other=0.0).to(tl.float32)
                z1, th1 = _capped(z_raw, softcap, HAS_SOFTCAP)
                z1 = tl.where(mask, z1, _NEG)
                m_new = tl.maximum(m, z1)
                d = d * tl.exp(m - m_new) + tl.where(mask, tl.exp(z1 - m_new), 0.0)
                m = m_new
            m_row = tl.max(m, axis=0)
            d_row = tl.sum(d * tl.exp(m - m_row), axis=0)
            lse = m_row + tl.log(d_row)
            tl.store(LOSS + row, lse - zt)

            if WRITE_GRAD:
                scale = tl.load(SCALE).to(tl.float32)
                for start in range(0, n_cols, BLOCK):
                    c = start + cols
                    mask = c < n_cols
                    z_raw2 = tl.load(z_row + c, mask=mask, other=0.0).to(tl.float32)
                    z2, th2 = _capped(z_raw2, softcap, HAS_SOFTCAP)
                    g = tl.exp(z2 - lse)
                    g = tl.where(c == t, g - 1.0, g) * scale
                    if HAS_SOFTCAP:
                        g = g * (1.0 - th2 * th2)
                    tl.store(z_row + c, g.to(Z.dtype.element_ty), mask=mask)


def _block_v(v: int) -> int:
    if BLOCK_V is not None:
        return triton.next_power_of_2(max(1, int(BLOCK_V)))
    return min(_MAX_BLOCK_V, triton.next_power_of_2(max(v, 1)))


def _triton_chunk(z, target, row_loss, scale, ignore_index, softcap, write_grad):
    rows, v = z.shape
    if rows == 0:
        return
    block = _block_v(v)
    _ce_chunk_kernel[(rows,)](
        z, z.stride(0), target, row_loss, scale, v, ignore_index, float(softcap),
        HAS_SOFTCAP=softcap != 0.0, WRITE_GRAD=write_grad, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )


def _torch_chunk(z, target, row_loss, scale, ignore_index, softcap, write_grad):
    """Same contract as the kernel: row losses into ``row_loss``, ``dz`` over ``z`` in place."""
    v = z.shape[1]
    valid = target != ignore_index
    if bool((valid & ((target < 0) | (target >= v))).any()):
        bad = target[valid & ((target < 0) | (target >= v))][0].item()
        raise IndexError(f"graphtune::linear_cross_entropy: target {bad} is out of bounds for {v} classes")
    zf = z.float()
    th = None
    if softcap:
        th = torch.tanh(zf / softcap)
        zf = th * softcap
    lse = torch.logsumexp(zf, dim=-1)
    safe_t = torch.where(valid, target, 0).unsqueeze(1)
    zt = zf.gather(1, safe_t).squeeze(1)
    row_loss.copy_(torch.where(valid, lse - zt, 0.0))
    if write_grad:
        g = torch.exp(zf - lse.unsqueeze(1))
        g.scatter_add_(1, safe_t, torch.full_like(zt, -1.0).unsqueeze(1))
        g = g * scale
        if th is not None:
            g = g * (1.0 - th * th)
        z.copy_(torch.where(valid.unsqueeze(1), g, 0.0))


# ----------------------------------------------------------------------------------------------
# The chunked forward (loss and, when asked, the gradients for a unit upstream gradient)
# ----------------------------------------------------------------------------------------------
def _check_args(hidden, weight, bias, target, reduction, divisor) -> None:
    if weight.dim() != 2 or hidden.dim() == 0 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"graphtune::linear_cross_entropy: weight must be [V, H] with H = hidden.shape[-1]; got weight "
            f"{tuple(weight.shape)} for hidden {tuple(hidden.shape)}"
        )
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            "graphtune::linear_cross_entropy: hidden, weight and bias must share one dtype; got "
            f"{hidden.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}"
        )
    if not hidden.is_floating_point():
        raise ValueError(f"graphtune::linear_cross_entropy: hidden must be floating point, got {hidden.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"graphtune::linear_cross_entropy: bias must be [V]; got {tuple(bias.shape)} for V={weight.shape[0]}")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"graphtune::linear_cross_entropy: target must hold class indices, got {target.dtype}")
    rows = hidden.numel() // hidden.shape[-1] if hidden.shape[-1] != 0 else 0
    torch._check(target.numel() == rows, lambda: f"graphtune::linear_cross_entropy: {target.numel()} targets for {rows} rows of hidden")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"graphtune::linear_cross_entropy: reduction must be 'mean' or 'sum', not {reduction!r}")
    if divisor is not None and (reduction != "sum" or divisor.numel() != 1):
        raise ValueError("graphtune::linear_cross_entropy: a divisor goes with reduction='sum' and must hold one value")


def _forward(hidden, weight, bias, target, ignore_index, softcap, reduction, divisor, need_h, need_w, need_b):
    h_dim, v = hidden.shape[-1], weight.shape[0]
    h2 = hidden.reshape(-1, h_dim)
    t = target.reshape(-1).to(device=hidden.device).contiguous()  # the kernel reads it with stride 1
    n = h2.shape[0]
    f32 = torch.float32
    if reduction == "mean":
        denom = (t != ignore_index).sum().to(f32)
    elif divisor is not None:
        denom = divisor.reshape(()).to(device=hidden.device, dtype=f32)
    else:
        denom = torch.ones((), dtype=f32, device=hidden.device)
    scale = torch.reciprocal(denom).reshape(1)  # a device tensor: no host sync
    write_grad = need_h or need_w or need_b
    chunk_fn = _triton_chunk if use_triton(hidden) else _torch_chunk

    row_loss = torch.empty(n, dtype=f32, device=hidden.device)
    dh = torch.empty((n, h_dim), dtype=hidden.dtype, device=hidden.device) if need_h else hidden.new_empty(0)
    rows = chunk_rows(n, v, h_dim)
    single = rows >= n
    dw_acc = None
    if need_w and not single:
        dw_acc = torch.zeros(weight.shape, dtype=f32, device=weight.device)
    dw = weight.new_empty(0)
    db_acc = torch.zeros(v, dtype=f32, device=hidden.device) if need_b else None
    buf = torch.empty((min(rows, n), v), dtype=hidden.dtype, device=hidden.device)
    w_t = weight.t()
    for start in range(0, n, rows):
        end = min(n, start + rows)
        hc, z = h2[start:end], buf[: end - start]
        if bias is None:
            torch.mm(hc, w_t, out=z)
        else:
            torch.addmm(bias, hc, w_t, out=z)
        chunk_fn(z, t[start:end], row_loss[start:end], scale, ignore_index, softcap, write_grad)
        if need_h:
            torch.mm(z, weight, out=dh[start:end])
        if need_w:
            if single:
                dw = torch.mm(z.t(), hc)
            elif dw_acc.dtype == z.dtype:
                dw_acc.addmm_(z.t(), hc)
            else:  # half-precision GEMM per chunk, summed across chunks in fp32
                dw_acc.add_(torch.mm(z.t(), hc))
        if need_b:
            db_acc.add_(z.sum(0, dtype=f32))
    if dw_acc is not None:
        dw = dw_acc.to(weight.dtype)
    elif need_w and n == 0:
        dw = torch.zeros_like(weight)
    loss = row_loss.sum() / denom
    dh = dh.reshape(hidden.shape) if need_h else dh
    db = db_acc.to(weight.dtype) if need_b else weight.new_empty(0)
    return loss, dh, dw, db


# ----------------------------------------------------------------------------------------------
# Custom op
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("graphtune::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    softcap: float,
    reduction: str,
    divisor: torch.Tensor | None,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dhidden, dweight, dbias) -- the gradients for a unit upstream gradient, each an empty
    tensor unless its ``need_*`` flag is set. Callers use the loss; autograd uses the rest."""
    _check_args(hidden, weight, bias, target, reduction, divisor)
    if need_bias_grad and bias is None:
        raise ValueError("graphtune::linear_cross_entropy: need_bias_grad without a bias")
    return _forward(hidden, weight, bias, target, ignore_index, softcap, reduction, divisor,
                    need_hidden_grad, need_weight_grad, need_bias_grad)


@_linear_cross_entropy_op.register_fake
def _linear_cross_entropy_fake(hidden, weight, bias, target, ignore_index, softcap, reduction, divisor,
                               need_hidden_grad, need_weight_grad, need_bias_grad):
    _check_args(hidden, weight, bias, target, reduction, divisor)
    loss = hidden.new_empty((), dtype=torch.float32)
    dh = hidden.new_empty(hidden.shape if need_hidden_grad else (0,))
    dw = weight.new_empty(weight.shape if need_weight_grad else (0,))
    db = weight.new_empty((weight.shape[0],) if need_bias_grad else (0,))
    return loss, dh, dw, db


def _setup_context(ctx, inputs, output):
    need = inputs[8:11]
    _, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)
    ctx.save_for_backward(dh, dw, db)
    ctx.need = need


def _backward(ctx, d_loss, *_unused):
    dh, dw, db = ctx.saved_tensors
    grads = []
    for i, (name, stored) in enumerate(zip(("hidden", "weight", "bias"), (dh, dw, db))):
        if not ctx.needs_input_grad[i]:
            grads.append(None)
            continue
        if not ctx.need[i]:
            raise RuntimeError(
                f"graphtune::linear_cross_entropy: {name} requires grad but the op was called with "
                f"need_{name}_grad=False, so its gradient was not computed in the forward"
            )
        grads.append(stored * d_loss.to(torch.float32))
    # a scaled half-precision gradient stays in its dtype (0-d fp32 scalars do not promote)
    return (grads[0], grads[1], grads[2], None, None, None, None, None, None, None, None)


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float = 0.0,
    num_items_in_batch: torch.Tensor | int | float | None = None,
) -> torch.Tensor:
    """``cross_entropy(softcap(hidden @ weight^T + bias), target)`` without the ``[N, V]`` logits.

    ``target`` is already shifted (one class index per row of hidden). Without ``num_items_in_batch``
    the loss is the mean over non-ignored targets; with it, the sum divided by it (HF's gradient
    accumulation convention), whether it is a tensor or a Python number. The gradient flags come
    from ``requires_grad`` and the grad mode.
    """
    grad = torch.is_grad_enabled()
    need = (
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    )
    divisor = num_items_in_batch if isinstance(num_items_in_batch, torch.Tensor) else None
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = torch.ops.graphtune.linear_cross_entropy(
        hidden, weight, bias, target, int(ignore_index), float(softcap), reduction, divisor, *need
    )[0]
    if num_items_in_batch is not None and divisor is None:
        loss = loss / num_items_in_batch
    return loss
