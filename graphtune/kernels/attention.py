"""Attention as one graph node, ``graphtune::attention``, and the implementations it dispatches to.

Every supported family reaches attention through transformers' ``AttentionInterface`` (see
:mod:`graphtune.attention`), which emits one node per layer::

    out = torch.ops.graphtune.attention(q, k, v, seq_ids, kv_mask, cu_seqlens,
                                        scale, causal, window, softcap, impl)

* q ``[B, Hq, T, D]``, k ``[B, Hkv, S, D]``, v ``[B, Hkv, S, Dv]`` in HF's layout (any strides);
  ``Hq % Hkv == 0`` (GQA/MQA: k/v heads are *never* repeated here, the groups are folded into the
  query rows instead); the output is ``[B, T, Hq, Dv]``, contiguous, what HF's attention
  functions return.
* Which key ``s`` query ``t`` sees (queries are aligned to the *end* of the keys, as with a KV
  cache, so ``p = t + S - T`` is the query's position among the keys)::

      causal:   s <= p
      window W: p - s < W          (HF's sliding window: the query and the W-1 keys before it;
                                    |p - s| < W when not causal)
      seq_ids:  seq_ids[b, t] == seq_ids[b, s]      (packed documents; only when T == S)
      kv_mask:  kv_mask[b, s]                       (2-D key padding mask)

  scores are ``x = (q @ k^T) * scale``, then ``softcap * tanh(x / softcap)`` when ``softcap > 0``
  (Gemma-2), then softmax over visible keys; a query that sees no key gets a zero output.
* ``cu_seqlens`` (int32 ``[n + 1]`` over the flattened ``B*T`` tokens, what TRL's padding-free
  collator and :mod:`graphtune.data.packing` emit) carries the same boundaries as ``seq_ids`` in
  the form the varlen flash kernel takes, with no device-to-host sync.
* ``impl`` is ``"auto"`` when the node is created and is settled per node by the
  ``dispatch_attention`` pass: ``"reference"`` stays this op (exact math, any device); the GPU
  choices are *lowered* to PyTorch's own kernels, whose autograd PyTorch provides --
  :func:`sdpa_attention` (flash / cuDNN / memory-efficient SDPA for plain causal attention),
  :func:`flash_attention` (FlashAttention-2 with a sliding window and/or varlen documents) and
  :func:`flex_attention` with :func:`flex_block_mask` (softcap, padding masks, documents known only
  from position ids). :func:`select_implementation` holds the rules.

The reference backward (``graphtune::attention_backward``) recomputes the probabilities per query
chunk instead of saving them, so the op never keeps a ``[B, H, T, S]`` tensor alive between
forward and backward; GQA gradients of k/v are summed over the group by the same grouped matmul.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import weakref
from typing import Any

import torch

__all__ = [
    "AttentionFeatures",
    "IMPLEMENTATIONS",
    "attention",
    "cu_seqlens_from_document_ids",
    "document_ids",
    "flash_attention",
    "flex_attention",
    "flex_block_mask",
    "flex_block_mask_for",
    "reference_attention",
    "sdpa_attention",
    "select_implementation",
    "visible_keys",
]

IMPLEMENTATIONS = ("reference", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_masked", "flash", "flex")
# Order tried for plain causal attention on a GPU (first that applies wins); GRAPHTUNE_ATTENTION
# forces one implementation wherever it can serve the node. ``sdpa`` leaves the backend to PyTorch's
# own SDPA priority list: on an H200 (torch 2.11, bf16, GQA, T=32k) it ran fwd+bwd in 36 ms where
# the pinned flash backend took 53 ms, so pinning is only a GRAPHTUNE_ATTENTION choice.
PLAIN_CAUSAL_ORDER = ("sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
# Score elements one reference chunk may hold: bounds the reference's memory at long contexts.
_CHUNK_ELEMS = 1 << 25


# ----------------------------------------------------------------------------------------------
# Masks and document ids
# ----------------------------------------------------------------------------------------------
def visible_keys(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    window: int,
    seq_ids: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    rows: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool ``[B or 1, rows, S]``: which keys each query (of ``rows``, default all) may attend."""
    t0, t1 = rows if rows is not None else (0, q_len)
    pos = torch.arange(t0, t1, device=device)[:, None] + (kv_len - q_len)
    key = torch.arange(kv_len, device=device)[None, :]
    allowed = torch.ones(t1 - t0, kv_len, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (key <= pos)
        if window > 0:
            allowed = allowed & (pos - key < window)
    elif window > 0:
        allowed = allowed & ((pos - key).abs() < window)
    allowed = allowed[None]
    if seq_ids is not None:
        allowed = allowed & (seq_ids[:, t0:t1, None] == seq_ids[:, None, :])
    if kv_mask is not None:
        allowed = allowed & kv_mask[:, None, :].to(torch.bool)
    return allowed


def _document_ids(position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
    if cu_seqlens is not None:
        device = cu_seqlens.device
        tokens = torch.arange(batch * seq, device=device, dtype=torch.int64)
        ids = torch.searchsorted(cu_seqlens.to(torch.int64), tokens, right=True) - 1
        return ids.view(batch, seq).to(torch.int32)
    pos = position_ids.expand(batch, seq)
    start = torch.ones(batch, 1, dtype=torch.bool, device=pos.device)
    # a document starts wherever the position does not continue the previous one by +1
    new_doc = torch.cat([start, pos[:, 1:] != pos[:, :-1] + 1], dim=1)
    return (new_doc.to(torch.int32).cumsum(-1, dtype=torch.int32) - 1).contiguous()


@torch.library.custom_op("graphtune::document_ids", mutates_args=())
def _document_ids_op(position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
    """int32 ``[batch, seq]``: the document each token belongs to (row-local ids from positions,
    global ids from ``cu_seqlens``, which wins when both are given)."""
    if position_ids is None and cu_seqlens is None:
        raise ValueError("graphtune::document_ids needs position_ids or cu_seqlens")
    return _document_ids(position_ids, cu_seqlens, batch, seq)


@_document_ids_op.register_fake
def _document_ids_fake(position_ids, cu_seqlens, batch, seq):
    device = (cu_seqlens if cu_seqlens is not None else position_ids).device
    return torch.empty(batch, seq, dtype=torch.int32, device=device)


def document_ids(position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
    """Per-token document ids from position ids that restart per example, or from ``cu_seqlens``."""
    return torch.ops.graphtune.document_ids(position_ids, cu_seqlens, batch, seq)


_CU_CACHE: dict[int, tuple[weakref.ref, int, tuple[torch.Tensor, int]]] = {}


def cu_seqlens_from_document_ids(seq_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens int32 [n+1], max_len)`` over the flattened tokens; one device-to-host sync,
    cached per ``seq_ids`` tensor so all layers of one forward share it."""
    key = id(seq_ids)
    hit = _CU_CACHE.get(key)
    if hit is not None and hit[0]() is seq_ids and hit[1] == seq_ids._version:
        return hit[2]
    flat = seq_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    row_start = torch.zeros(n, dtype=torch.bool, device=flat.device)
    row_start[:: seq_ids.shape[-1]] = True
    change = torch.ones_like(row_start)
    change[1:] = flat[1:] != flat[:-1]
    starts = torch.nonzero(change | row_start).flatten()
    cu = torch.cat([starts, starts.new_tensor([n])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max().item())
    if len(_CU_CACHE) > 32:
        _CU_CACHE.clear()
    _CU_CACHE[key] = (weakref.ref(seq_ids), seq_ids._version, (cu, max_len))
    return cu, max_len


# ----------------------------------------------------------------------------------------------
# Reference (exact math, chunked over queries)
# ----------------------------------------------------------------------------------------------
def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"graphtune::attention expects 4-D q/k/v [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"graphtune::attention: incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"graphtune::attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Softmax / backward accumulation dtype: fp32 (as HF's eager softmax), fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_rows(B: int, Hq: int, T: int, S: int) -> int:
    return max(1, min(T, _CHUNK_ELEMS // max(1, B * Hq * S)))


def _scores(qc, k, scale, softcap):
    """Raw scores and softcapped scores for a grouped query chunk ``[B, Hkv, G*Tc, D]``."""
    x = torch.matmul(qc, k.transpose(-1, -2)) * scale
    if softcap > 0:
        return x, torch.tanh(x / softcap) * softcap
    return x, x


def _reference_forward(q, k, v, seq_ids, kv_mask, scale, causal, window, softcap):
    B, Hq, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    if seq_ids is not None and S != T:
        seq_ids = None  # documents only apply without a KV cache
    out = torch.empty(B, T, Hq, Dv, dtype=q.dtype, device=q.device)
    step = _chunk_rows(B, Hq, T, S)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        Tc = t1 - t0
        qc = q[:, :, t0:t1].reshape(B, Hkv, G * Tc, D)
        _, s = _scores(qc, k, scale, softcap)
        allowed = visible_keys(T, S, causal=causal, window=window, seq_ids=seq_ids, kv_mask=kv_mask, rows=(t0, t1), device=q.device)
        allowed = allowed[:, None, None]  # [B|1, 1, 1, Tc, S]
        s = s.view(B, Hkv, G, Tc, S).masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=_acc(q.dtype))
        p = torch.where(allowed.any(-1, keepdim=True), p, 0.0).to(q.dtype)
        o = torch.matmul(p.view(B, Hkv, G * Tc, S), v)  # [B, Hkv, G*Tc, Dv]
        out[:, t0:t1] = o.view(B, Hq, Tc, Dv).transpose(1, 2)
    return out


def _reference_backward(dout, q, k, v, seq_ids, kv_mask, scale, causal, window, softcap):
    """Gradients of :func:`_reference_forward`, in fp32 (fp64 for fp64) per query chunk, P recomputed."""
    B, Hq, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    if seq_ids is not None and S != T:
        seq_ids = None
    acc = _acc(q.dtype)
    kf, vf = k.to(acc), v.to(acc)
    dq = torch.empty(B, Hq, T, D, dtype=acc, device=q.device)
    dk = torch.zeros(B, Hkv, S, D, dtype=acc, device=q.device)
    dv = torch.zeros(B, Hkv, S, Dv, dtype=acc, device=q.device)
    step = _chunk_rows(B, Hq, T, S)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        Tc = t1 - t0
        qc = q[:, :, t0:t1].to(acc).reshape(B, Hkv, G * Tc, D)
        doc = dout[:, t0:t1].to(acc).transpose(1, 2).reshape(B, Hkv, G * Tc, Dv)
        x, s = _scores(qc, kf, scale, softcap)
        allowed = visible_keys(T, S, causal=causal, window=window, seq_ids=seq_ids, kv_mask=kv_mask, rows=(t0, t1), device=q.device)
        allowed = allowed[:, None, None]
        s = s.view(B, Hkv, G, Tc, S).masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1)
        p = torch.where(allowed.any(-1, keepdim=True), p, 0.0).view(B, Hkv, G * Tc, S)
        dv += torch.matmul(p.transpose(-1, -2), doc)
        dp = torch.matmul(doc, vf.transpose(-1, -2))
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        if softcap > 0:
            ds = ds * (1 - torch.tanh(x / softcap) ** 2)
        dq[:, :, t0:t1] = (torch.matmul(ds, kf) * scale).view(B, Hq, Tc, D)
        dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    window: int = 0,
    softcap: float = 0.0,
    seq_ids: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-autograd attention with the op's semantics (tests' ground truth), ``[B, T, Hq, Dv]``.

    Materializes ``[B, Hq, T, S]``: test sizes only. k/v heads are repeated (clarity over memory).
    """
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    T, S = q.shape[2], k.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    allowed = visible_keys(T, S, causal=causal, window=window, seq_ids=seq_ids if S == T else None, kv_mask=kv_mask, device=q.device)[:, None]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1, dtype=_acc(q.dtype))
    p = torch.where(allowed.any(-1, keepdim=True), p, 0.0).to(q.dtype)
    return torch.matmul(p, v).transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# The custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("graphtune::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_ids: torch.Tensor | None,
    kv_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
    softcap: float,
    impl: str,
) -> torch.Tensor:
    _check_shapes(q, k, v)
    if impl not in ("auto", "reference"):
        raise ValueError(
            f"graphtune::attention runs impl='reference' (or 'auto'); {impl!r} is lowered to its own "
            "kernel call by the dispatch_attention pass, never run through this op"
        )
    return _reference_forward(q, k, v, seq_ids, kv_mask, scale, causal, window, softcap)


@_attention_op.register_fake
def _attention_fake(q, k, v, seq_ids, kv_mask, cu_seqlens, scale, causal, window, softcap, impl):
    _check_shapes(q, k, v)
    return torch.empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)


@torch.library.custom_op("graphtune::attention_backward", mutates_args=())
def _attention_backward_op(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_ids: torch.Tensor | None,
    kv_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, in q/k/v's shapes and dtypes."""
    return _reference_backward(grad, q, k, v, seq_ids, kv_mask, scale, causal, window, softcap)


@_attention_backward_op.register_fake
def _attention_backward_fake(grad, q, k, v, seq_ids, kv_mask, scale, causal, window, softcap):
    return (
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
        torch.empty(k.shape, dtype=k.dtype, device=k.device),
        torch.empty(v.shape, dtype=v.dtype, device=v.device),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, seq_ids, kv_mask, cu_seqlens, scale, causal, window, softcap, impl = inputs
    ctx.save_for_backward(q, k, v, seq_ids, kv_mask)
    ctx.args = (scale, causal, window, softcap)


def _backward(ctx, grad):
    q, k, v, seq_ids, kv_mask = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad, q, k, v, seq_ids, kv_mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    window: int = 0,
    softcap: float = 0.0,
    seq_ids: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``graphtune::attention`` with defaults; returns ``[B, T, Hq, Dv]``."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.graphtune.attention(q, k, v, seq_ids, kv_mask, cu_seqlens, scale, bool(causal), int(window), float(softcap), impl)


# ----------------------------------------------------------------------------------------------
# GPU implementations (lowering targets; PyTorch provides their autograd)
# ----------------------------------------------------------------------------------------------
def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, backend: str) -> torch.Tensor:
    """Plain (causal or full) attention through SDPA, pinned to ``backend`` (flash/cudnn/efficient/math).

    Flash and math take GQA natively (``enable_gqa``); cuDNN and memory-efficient get k/v heads
    repeated (the dispatcher only picks them for MHA or fp32). Requires ``T == S``. ``[B, T, Hq, Dv]``.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    groups = q.shape[1] // k.shape[1]
    if backend == "auto":  # PyTorch's own priority list (cuDNN / flash / efficient), GQA in the call
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=groups > 1)
        return out.transpose(1, 2)
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    gqa = groups > 1 and backend in ("flash", "math")
    if not gqa:
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    with sdpa_kernel([backends[backend]]):
        if gqa:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def sdpa_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_ids: torch.Tensor | None,
    kv_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
) -> torch.Tensor:
    """SDPA (memory-efficient kernel) with a dense ``[B, 1, T, S]`` bool mask built from
    :func:`visible_keys`: the GPU path for 2-D padding masks, which FlexAttention's inductor lowering
    cannot compile with a dynamic batch size (torch 2.11: ``CantSplit`` on the block-mask view).
    A query row with no visible key gives zeros (as the reference), not SDPA's NaN. ``[B, T, Hq, Dv]``.
    """
    T, S = q.shape[2], k.shape[2]
    allowed = visible_keys(T, S, causal=causal, window=window, seq_ids=seq_ids if T == S else None, kv_mask=kv_mask, device=q.device)
    has_key = allowed.any(-1)  # [B|1, T]
    allowed = allowed | ~has_key[..., None]  # empty rows attend everywhere (finite), zeroed below
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)
    out = out * has_key[:, None, :, None].to(out.dtype)
    return out.transpose(1, 2)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    scale: float,
    causal: bool,
    window: int,
) -> torch.Tensor:
    """FlashAttention-2 (``aten::_flash_attention_forward``): GQA native, sliding window, and varlen
    documents when ``cu_seqlens`` is given (over the flattened ``B*T`` tokens; ``max_seqlen`` may be
    an upper bound; None means T). Causal alignment is bottom-right (KV-cache decode works). fp16/bf16,
    head dim <= 256 and a multiple of 8. ``[B, T, Hq, Dv]``.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    left = window - 1 if window > 0 else -1
    right = 0 if causal else left
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, T, H, D], views
    kwargs = dict(scale=scale)
    if window > 0:
        kwargs.update(window_size_left=left, window_size_right=right)
    if cu_seqlens is None:
        out = torch.ops.aten._flash_attention_forward(qt, kt, vt, None, None, T, S, 0.0, causal, False, **kwargs)[0]
        return out
    cu = cu_seqlens.to(torch.int32)
    max_seqlen = T if max_seqlen is None else max_seqlen
    out = torch.ops.aten._flash_attention_forward(
        qt.reshape(B * T, Hq, D), kt.reshape(B * S, Hkv, D), vt.reshape(B * S, Hkv, vt.shape[-1]),
        cu, cu, max_seqlen, max_seqlen, 0.0, causal, False, **kwargs,
    )[0]
    return out.view(B, T, Hq, out.shape[-1])


def flex_block_mask(
    seq_ids: torch.Tensor | None,
    kv_mask: torch.Tensor | None,
    causal: bool,
    window: int,
    batch: int,
    q_len: int,
    kv_len: int,
    device: torch.device,
):
    """FlexAttention ``BlockMask`` for :func:`visible_keys`' rule (None when every key is visible).

    One per distinct (documents, mask, causal, window) in a graph: the dispatch pass shares it
    across the layers that use it.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if not causal and window <= 0 and seq_ids is None and kv_mask is None:
        return None
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    # Only tensors (and Python bools) are closed over: an int the mask_mod reads may be traced as a
    # symbolic "other buffer", which inductor's flex lowering cannot realize (torch 2.11).
    same = statically_known_true(kv_len == q_len) if not (isinstance(q_len, int) and isinstance(kv_len, int)) else q_len == kv_len
    offset = None if same else torch.as_tensor(kv_len - q_len, device=device)
    win = torch.full((), int(window), dtype=torch.int64, device=device) if window > 0 else None
    docs = seq_ids if (seq_ids is not None and same) else None

    def mask_mod(b, h, q_idx, kv_idx):
        p = q_idx if offset is None else q_idx + offset
        if causal:
            m = kv_idx <= p
            if win is not None:
                m = m & (p - kv_idx < win)
        elif win is not None:
            m = (p - kv_idx).abs() < win
        else:
            m = kv_idx >= 0
        if docs is not None:
            m = m & (docs[b, q_idx] == docs[b, kv_idx])
        if kv_mask is not None:
            m = m & kv_mask[b, kv_idx]
        return m

    per_batch = docs is not None or kv_mask is not None
    build = create_block_mask
    if not _tracing() and torch.device(device).type == "cuda":
        build = _compiled_create_block_mask()  # eagerly: never materialize [B, T, S]
    return build(mask_mod, batch if per_batch else None, None, q_len, kv_len, device=device)


def flex_block_mask_for(q: torch.Tensor, k: torch.Tensor, seq_ids, kv_mask, causal: bool, window: int):
    """:func:`flex_block_mask` sized from q ``[B, H, T, D]`` and k ``[B, H, S, D]`` (graph-friendly)."""
    return flex_block_mask(seq_ids, kv_mask, causal, window, q.shape[0], q.shape[2], k.shape[2], q.device)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, scale: float, softcap: float) -> torch.Tensor:
    """FlexAttention with the softcap as a ``score_mod``; GQA native. ``[B, T, Hq, Dv]``.

    Inside a graphtune graph this is traced by aot_autograd into the flex HOPs, which inductor
    compiles (forward and backward) into fused kernels; called eagerly on CUDA it uses a compiled
    wrapper (on a CPU, FlexAttention's unfused math: forward only, tests use it for semantics).
    """
    from torch.nn.attention.flex_attention import flex_attention as _flex

    compiled = not _tracing() and _compile_eager_flex(q)
    # Under the eager wrapper's torch.compile, a Python float the score_mod closes over becomes a
    # CPU float64 "other buffer" that inductor's flex lowering cannot realize (unbacked
    # _local_scalar_dense, measured on torch 2.11 CUDA and 2.13 CPU): there the cap is a 0-d tensor
    # on q's device. Traced inside a graphtune graph the float is a constant and stays one.
    cap = torch.full((), float(softcap), dtype=torch.float32, device=q.device) if compiled else softcap

    def softcapped(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    score_mod = softcapped if softcap > 0 else None
    fn = _compiled_flex() if compiled else _flex
    out = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


def _compile_eager_flex(q: torch.Tensor) -> bool:
    """Eager calls on CUDA go through a compiled FlexAttention (fused kernels, forward and backward);
    elsewhere its unfused math is used."""
    return q.device.type == "cuda"


def _tracing() -> bool:
    from torch._guards import TracingContext

    return torch.compiler.is_compiling() or TracingContext.try_get() is not None


@functools.lru_cache(maxsize=None)
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask, dynamic=True)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as _flex

    return torch.compile(_flex)


# ----------------------------------------------------------------------------------------------
# Which implementation serves a node
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttentionFeatures:
    """What the choice of implementation depends on (read off a graph node or live tensors)."""

    device: str  # "cpu", "cuda", ...
    capability: tuple[int, int] | None  # CUDA compute capability
    dtype: torch.dtype
    head_dim: int
    v_head_dim: int
    num_heads: int
    num_kv_heads: int
    same_length: bool  # T == S for every shape the graph serves (no KV cache)
    causal: bool
    window: int
    softcap: float
    documents: str  # "none" | "cu_seqlens" | "positions"
    padding_mask: bool

    @property
    def plain(self) -> bool:
        return self.documents == "none" and self.window <= 0 and self.softcap <= 0 and not self.padding_mask and self.same_length


def forced_implementation() -> str | None:
    """``GRAPHTUNE_ATTENTION`` (``auto`` or one of :data:`IMPLEMENTATIONS`)."""
    value = os.environ.get("GRAPHTUNE_ATTENTION", "auto").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"GRAPHTUNE_ATTENTION must be auto or one of {', '.join(IMPLEMENTATIONS)}, not {value!r}")
    return value


def _half(f: AttentionFeatures) -> bool:
    return f.dtype in (torch.float16, torch.bfloat16)


def cannot_serve(impl: str, f: AttentionFeatures) -> str | None:
    """None when ``impl`` computes this node exactly, else why not."""
    if impl == "reference":
        return None
    if f.device != "cuda":
        return f"{impl} needs a CUDA device (got {f.device})"
    cap = f.capability or (0, 0)
    if impl == "flex":
        return None if cap >= (8, 0) or f.dtype == torch.float32 else "FlexAttention's fp16/bf16 kernels need sm80+"
    if f.softcap > 0:
        return "logit softcap needs a score_mod (FlexAttention)"
    if impl == "sdpa_masked":
        return None if f.dtype != torch.float64 else "SDPA's fused kernels do not take float64"
    if f.padding_mask:
        return "a 2-D padding mask needs a block mask (FlexAttention)"
    if impl == "flash":
        if f.documents == "positions":
            return "documents known only from position ids (no cu_seqlens) would cost a device sync per step"
        if not _half(f):
            return f"FlashAttention takes fp16/bf16, not {f.dtype}"
        if cap < (8, 0):
            return "FlashAttention-2 needs sm80+"
        if f.head_dim != f.v_head_dim or f.head_dim % 8 or f.head_dim > 256:
            return f"FlashAttention-2 needs equal q/v head dims, a multiple of 8, <= 256 (got {f.head_dim}/{f.v_head_dim})"
        return None
    # SDPA: plain attention only
    if f.documents != "none":
        return "SDPA has no document (varlen) masks"
    if f.window > 0:
        return "SDPA has no sliding window"
    if not f.same_length:
        return "SDPA's is_causal is top-left aligned; with a KV cache (T != S) it would be wrong"
    if impl == "sdpa":
        return None if f.dtype != torch.float64 else "SDPA's fused kernels do not take float64"
    if impl == "sdpa_flash":
        if not _half(f) or cap < (8, 0):
            return "SDPA flash needs fp16/bf16 on sm80+"
        if f.head_dim != f.v_head_dim or f.head_dim % 8 or f.head_dim > 256:
            return f"SDPA flash needs equal head dims, a multiple of 8, <= 256 (got {f.head_dim}/{f.v_head_dim})"
        return None
    if impl == "sdpa_cudnn":
        if not _half(f) or cap < (9, 0):
            return "cuDNN attention is used for fp16/bf16 on sm90+ only"
        if f.num_heads != f.num_kv_heads:
            return "cuDNN attention would need k/v heads repeated (GQA)"
        if f.head_dim != f.v_head_dim or f.head_dim % 8 or f.head_dim > 128:
            return f"cuDNN attention needs equal head dims, a multiple of 8, <= 128 (got {f.head_dim})"
        return None
    if impl == "sdpa_efficient":
        if f.head_dim % 8 or f.v_head_dim % 8:
            return "memory-efficient SDPA needs head dims that are multiples of 8"
        return None
    raise ValueError(f"unknown attention implementation {impl!r}")


def select_implementation(f: AttentionFeatures, force: str | None = None) -> tuple[str, str]:
    """``(impl, reason)`` for one attention node; ``force`` (or ``GRAPHTUNE_ATTENTION``) wins where it can."""
    force = forced_implementation() if force is None else (None if force == "auto" else force)
    if force is not None:
        why_not = cannot_serve(force, f)
        if why_not is None:
            return force, f"forced by GRAPHTUNE_ATTENTION={force}"
        impl, reason = select_implementation(f, force="auto")
        return impl, f"{reason} (GRAPHTUNE_ATTENTION={force} refused: {why_not})"
    if f.device != "cuda":
        return "reference", f"exact reference on {f.device}"
    parts = [
        name for name, on in (
            ("softcap", f.softcap > 0), ("padding mask", f.padding_mask), ("sliding window", f.window > 0),
            (f"documents from {f.documents}", f.documents != "none"), ("KV cache", not f.same_length),
        ) if on
    ]
    features = ", ".join(parts) or ("plain causal" if f.causal else "full attention")
    if f.plain:
        for impl in PLAIN_CAUSAL_ORDER:
            if cannot_serve(impl, f) is None:
                return impl, f"{features}, {f.dtype}, head dim {f.head_dim}"
    if cannot_serve("flash", f) is None:
        return "flash", f"{features}: FlashAttention-2 (window / varlen) with GQA in the kernel"
    if f.padding_mask and cannot_serve("sdpa_masked", f) is None:
        return "sdpa_masked", f"{features}: SDPA with a dense [B, 1, T, S] mask (Flex cannot compile a dynamic-batch padding mask)"
    if cannot_serve("flex", f) is None:
        return "flex", f"{features}: FlexAttention block mask" + (" + softcap score_mod" if f.softcap > 0 else "")
    return "reference", f"{features}: no fused kernel applies on this device"
