"""Rotary position embedding on q and k as the custom op ``graphtune::rope`` (one Triton launch).

Math (HF ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``; Phi3's partial-rotary form, which equals
Llama's when R == D): q ``[B, Hq, T, D]``, k ``[B, Hk, T, D]``, cos/sin ``[B or 1, T, R]``, R even,
R <= D. With x1 = x[..., :R/2], x2 = x[..., R/2:R] and c1, c2, s1, s2 the halves of cos/sin::

    out1 = x1 * c1 - x2 * s1          # x * cos + rotate_half(x) * sin
    out2 = x2 * c2 + x1 * s2
    out[..., R:] = x[..., R:]         # pass-through features (partial rotary)

cos/sin are per-token rows, so any position ids work (packed sequences that restart positions).
The backward is the exact transpose for general cos/sin (no c1 == c2 assumption)::

    din1 = d1 * c1 + d2 * s2
    din2 = d2 * c2 - d1 * s1

No gradient flows to cos/sin: the rewrite pass must only fire when they do not require grad (in HF
they come from the rotary-embedding buffer, under no_grad). Outputs are contiguous ``[B, H, T, D]``
in ``promote_types(x.dtype, cos.dtype, sin.dtype)``, as HF's eager math gives.
"""

from __future__ import annotations

import torch

from graphtune.kernels._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["rope", "reference_rope"]

# Elements (heads x head_dim) one program aims to hold.
_TILE_ELEMS = 2048


# ----------------------------------------------------------------------------------------------
# Reference (exact HF math)
# ----------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def reference_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Phi3 ``apply_rotary_pos_emb`` (Llama's when R == D), unsqueeze_dim=1."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = torch.cat([(q_rot * cos) + (_rotate_half(q_rot) * sin), q_pass], dim=-1)
    k_embed = torch.cat([(k_rot * cos) + (_rotate_half(k_rot) * sin), k_pass], dim=-1)
    return q_embed, k_embed


def _check_args(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Shared by the real and fake impls: shape errors surface at trace time with a clear message."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"graphtune::rope: q and k must be [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"graphtune::rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ in B, T or D")
    if cos.shape != sin.shape or cos.dim() != 3:
        raise ValueError(f"graphtune::rope: cos/sin must both be [B or 1, T, R]; got {tuple(cos.shape)}, {tuple(sin.shape)}")
    R = cos.shape[2]
    if cos.shape[0] not in (1, B) or cos.shape[1] != T or R % 2 or R == 0 or R > D:
        raise ValueError(
            f"graphtune::rope: cos/sin {tuple(cos.shape)} do not fit q {tuple(q.shape)}: need "
            f"[1 or {B}, {T}, R] with R even and 0 < R <= {D}"
        )


def _out_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _rope_tile(
        X, O, b, t, h0, H, T,
        sxb, sxh, sxt, sxd,
        c1, c2, a, bb,
        D: tl.constexpr,
        HALF: tl.constexpr,
        R: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        BLOCK_PASS: tl.constexpr,
    ):
        """Rotate heads [h0, h0 + BLOCK_H) of one token: o1 = x1*c1 + x2*a, o2 = x2*c2 + x1*bb."""
        h = h0 + tl.arange(0, BLOCK_H)
        h64 = h.to(tl.int64)
        j = tl.arange(0, BLOCK_HALF)
        if BLOCK_HALF == HALF:  # the usual case: only the head axis needs a mask
            mask = (h < H)[:, None]
        else:
            mask = (h < H)[:, None] & (j < HALF)[None, :]
        x_rows = X + (b * sxb + t * sxt) + h64[:, None] * sxh
        o_rows = O + ((b * H + h64[:, None]) * T + t) * D
        x1 = tl.load(x_rows + j[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_rows + (j[None, :] + HALF) * sxd, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c1[None, :] + x2 * a[None, :]
        o2 = x2 * c2[None, :] + x1 * bb[None, :]
        tl.store(o_rows + j[None, :], o1.to(O.dtype.element_ty), mask=mask)
        tl.store(o_rows + (j[None, :] + HALF), o2.to(O.dtype.element_ty), mask=mask)
        if BLOCK_PASS > 0:
            p = R + tl.arange(0, BLOCK_PASS)
            p_mask = (h < H)[:, None] & (p < D)[None, :]
            xp = tl.load(x_rows + p[None, :] * sxd, mask=p_mask, other=0.0)
            tl.store(o_rows + p[None, :], xp.to(O.dtype.element_ty), mask=p_mask)

    @triton.jit
    def _rope_kernel(
        Q, K, OQ, OK, COS, SIN,
        T, Hq, Hk, n_q_groups,
        sqb, sqh, sqt, sqd,
        skb, skh, skt, skd,
        scb, sct, scr,
        ssb, sst, ssr,
        D: tl.constexpr,
        HALF: tl.constexpr,
        R: tl.constexpr,
        BACKWARD: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        BLOCK_PASS: tl.constexpr,
    ):
        """Grid (B*T, q head groups + k head groups): cos/sin of a token are loaded once per program.

        Head dims are compile-time constants (a model has one or two): H100 measured ~3% faster
        than runtime sizes, from mask-free, fully known address arithmetic.
        """
        tok = tl.program_id(0)
        grp = tl.program_id(1)
        b = (tok // T).to(tl.int64)
        t = (tok % T).to(tl.int64)
        j = tl.arange(0, BLOCK_HALF)
        jm = j < HALF
        cos_row = COS + b * scb + t * sct
        sin_row = SIN + b * ssb + t * sst
        c1 = tl.load(cos_row + j * scr, mask=jm, other=0.0).to(tl.float32)
        c2 = tl.load(cos_row + (j + HALF) * scr, mask=jm, other=0.0).to(tl.float32)
        s1 = tl.load(sin_row + j * ssr, mask=jm, other=0.0).to(tl.float32)
        s2 = tl.load(sin_row + (j + HALF) * ssr, mask=jm, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of [[c1, -s1], [s2, c2]]
            a = s2
            bb = -s1
        else:
            a = -s1
            bb = s2
        if grp < n_q_groups:
            _rope_tile(Q, OQ, b, t, grp * BLOCK_HQ, Hq, T, sqb, sqh, sqt, sqd,
                       c1, c2, a, bb, D, HALF, R, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS)
        else:
            _rope_tile(K, OK, b, t, (grp - n_q_groups) * BLOCK_HK, Hk, T, skb, skh, skt, skd,
                       c1, c2, a, bb, D, HALF, R, BLOCK_HK, BLOCK_HALF, BLOCK_PASS)


def _triton_rope(q, k, cos, sin, backward: bool, q_dtype: torch.dtype, k_dtype: torch.dtype):
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    R = cos.shape[2]
    half = R // 2
    oq = torch.empty(q.shape, dtype=q_dtype, device=q.device)
    ok = torch.empty(k.shape, dtype=k_dtype, device=k.device)
    if B * T == 0 or D == 0 or (Hq == 0 and Hk == 0):
        return oq, ok
    block_half = triton.next_power_of_2(half)
    block_pass = triton.next_power_of_2(D - R) if D > R else 0
    block_d = 2 * block_half + block_pass
    cap = max(1, _TILE_ELEMS // block_d)
    block_hq = min(triton.next_power_of_2(max(Hq, 1)), cap)
    block_hk = min(triton.next_power_of_2(max(Hk, 1)), cap)
    n_q_groups = triton.cdiv(Hq, block_hq)
    n_k_groups = triton.cdiv(Hk, block_hk)
    # A size-1 batch dim of cos/sin broadcasts: stride 0 reads the same rows for every b.
    scb = cos.stride(0) if cos.shape[0] > 1 else 0
    ssb = sin.stride(0) if sin.shape[0] > 1 else 0
    num_warps = 4 if max(block_hq, block_hk) * block_d <= 2048 else 8
    grid = (B * T, n_q_groups + n_k_groups)
    _rope_kernel[grid](
        q, k, oq, ok, cos, sin,
        T, Hq, Hk, n_q_groups,
        *q.stride(), *k.stride(),
        scb, cos.stride(1), cos.stride(2),
        ssb, sin.stride(1), sin.stride(2),
        D=D, HALF=half, R=R, BACKWARD=backward, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        BLOCK_HALF=block_half, BLOCK_PASS=block_pass, num_warps=num_warps,
    )
    return oq, ok


def _reference_rope_backward(dq, dk, cos, sin):
    """The transpose in torch, fp32 math (HF's autograd gives the same up to rounding)."""
    R = cos.shape[-1]
    half = R // 2
    c = cos.unsqueeze(1).float()
    s = sin.unsqueeze(1).float()
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]

    def one(d):
        df = d[..., :R].float()
        d1, d2 = df[..., :half], df[..., half:]
        rot = torch.cat([d1 * c1 + d2 * s2, d2 * c2 - d1 * s1], dim=-1).to(d.dtype)
        return torch.cat([rot, d[..., R:]], dim=-1).contiguous()

    return one(dq), one(dk)


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("graphtune::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_args(q, k, cos, sin)
    if use_triton(q):
        return _triton_rope(q, k, cos, sin, False, _out_dtype(q, cos, sin), _out_dtype(k, cos, sin))
    oq, ok = reference_rope(q, k, cos, sin)
    return oq.contiguous(), ok.contiguous()


@_rope_op.register_fake
def _rope_fake(q, k, cos, sin):
    _check_args(q, k, cos, sin)
    return (
        torch.empty(q.shape, dtype=_out_dtype(q, cos, sin), device=q.device),
        torch.empty(k.shape, dtype=_out_dtype(k, cos, sin), device=k.device),
    )


@torch.library.custom_op("graphtune::rope_backward", mutates_args=())
def _rope_backward_op(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grads of q and k (in dq's and dk's dtypes), contiguous [B, H, T, D]."""
    _check_args(dq, dk, cos, sin)
    if use_triton(dq):
        return _triton_rope(dq, dk, cos, sin, True, dq.dtype, dk.dtype)
    return _reference_rope_backward(dq, dk, cos, sin)


@_rope_backward_op.register_fake
def _rope_backward_fake(dq, dk, cos, sin):
    _check_args(dq, dk, cos, sin)
    return (
        torch.empty(dq.shape, dtype=dq.dtype, device=dq.device),
        torch.empty(dk.shape, dtype=dk.dtype, device=dk.device),
    )


def _setup_context(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.q_dtype, ctx.k_dtype = q.dtype, k.dtype


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq_in, dk_in = _rope_backward_op(dq, dk, cos, sin)
    # Only differs when cos/sin promoted the output dtype (HF would cast the grad back too).
    if dq_in.dtype != ctx.q_dtype:
        dq_in = dq_in.to(ctx.q_dtype)
    if dk_in.dtype != ctx.k_dtype:
        dk_in = dk_in.to(ctx.k_dtype)
    return dq_in, dk_in, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q [B, Hq, T, D] and k [B, Hk, T, D] with cos/sin [B or 1, T, R] (``graphtune::rope``)."""
    return torch.ops.graphtune.rope(q, k, cos, sin)
