"""graphtune's attention for transformers: one ``graphtune::attention`` node per layer.

Importing this module registers ``"graphtune"`` with transformers' ``AttentionInterface`` (the
attention function) and ``AttentionMaskInterface`` (the mask builder). A model whose
``config._attn_implementation`` is ``"graphtune"`` then

* builds **no** ``[B, 1, T, T]`` mask: the mask builder returns the 2-D key padding mask if the
  caller gave one, else ``None``; causality, the sliding window and packed-document boundaries
  travel as arguments of the attention node instead;
* runs every attention layer as ``torch.ops.graphtune.attention(q, k, v, seq_ids, kv_mask,
  cu_seqlens, scale, causal, window, softcap, "auto")`` when captured by dynamo, where the
  ``dispatch_attention`` pass settles ``"auto"`` per node; called eagerly, the function picks
  the same implementation itself (:func:`graphtune.kernels.attention.select_implementation`).

Per-layer features come from what the modeling code passes: ``scaling``, ``module.is_causal``,
``sliding_window`` (Mistral/Qwen2/Qwen3/Gemma-2/Gemma-3/Phi-3 per-layer pattern), ``softcap``
(Gemma-2's ``attn_logit_softcapping``). Packed batches (TRL padding-free, or
:mod:`graphtune.data.packing`) are recognised from ``position_ids`` that restart per example and
from ``cu_seq_lens_k`` when present; no token attends across examples.

Gemma-2 refuses ``attn_implementation="sdpa"`` but accepts a registered function: ``graphtune``
works for all eight families.

Usage without :func:`graphtune.optimize`::

    import graphtune.attention
    model.set_attn_implementation("graphtune")     # or graphtune.attention.enable(model)
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from graphtune.kernels import attention as ka

__all__ = [
    "NAME", "attention_forward", "attention_mask", "configs", "disable", "enable", "features_of", "implementation",
    "register", "run_implementation", "uses_graphtune",
]

NAME = "graphtune"


# ----------------------------------------------------------------------------------------------
# Mask builder (AttentionMaskInterface)
# ----------------------------------------------------------------------------------------------
def attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The 2-D bool key-padding mask ``[B, kv_length]`` (or None): never a 4-D mask.

    Causal/sliding/document structure is not encoded here; the attention node gets it as
    arguments. Eagerly, an all-ones mask is dropped (it masks nothing); under tracing it is kept,
    as its values are unknown.
    """
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:] if attention_mask.shape[-1] >= kv_length else attention_mask
    mask = mask.to(torch.bool)
    if not ka._tracing() and bool(mask.all()):
        return None
    return mask


# ----------------------------------------------------------------------------------------------
# Attention function (AttentionInterface)
# ----------------------------------------------------------------------------------------------
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _fallback(module, query, key, value, mask4d, dropout, scaling, softcap, **kwargs):
    """HF's eager attention (dropout, softcap) with an explicit additive ``[B, 1, T, S]`` mask."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    if mask4d.dtype == torch.bool:
        mask4d = torch.where(mask4d, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
    kwargs.pop("sliding_window", None)
    return eager_attention_forward(
        module, query, key, value, mask4d, dropout=dropout, scaling=scaling, softcap=softcap or None, **kwargs
    )


_EAGER_DOCS: dict[int, tuple[weakref.ref, int, torch.Tensor | None]] = {}


def _eager_document_ids(position_ids, cu_seqlens, batch, seq) -> torch.Tensor | None:
    """Eager mode: document ids, or None when every row is one document (one host sync per batch)."""
    source = cu_seqlens if cu_seqlens is not None else position_ids
    hit = _EAGER_DOCS.get(id(source))
    if hit is not None and hit[0]() is source and hit[1] == source._version:
        return hit[2]
    ids = ka.document_ids(position_ids, cu_seqlens, batch, seq)
    single = bool((ids == ids[:, :1]).all())
    result = None if single else ids
    if len(_EAGER_DOCS) > 32:
        _EAGER_DOCS.clear()
    _EAGER_DOCS[id(source)] = (weakref.ref(source), source._version, result)
    return result


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q ``[B, Hq, T, D]``, k/v ``[B, Hkv, S, D]`` -> ``[B, T, Hq, Dv]``."""
    if attention_mask is not None and attention_mask.dim() != 2:
        _warn_once("4d", "graphtune attention got a 4-D attention mask (built outside graphtune's mask "
                   "interface); those layers run HF's eager attention with it")
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, softcap, **kwargs)
    B, Hq, T, D = query.shape
    S = key.shape[2]
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    scale = float(D**-0.5 if scaling is None else scaling)
    window = int(sliding_window) if sliding_window else 0
    cap = float(softcap) if softcap else 0.0

    position_ids = kwargs.get("position_ids")
    if not (isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2):
        position_ids = None
    cu_seqlens = kwargs.get("cu_seq_lens_k", kwargs.get("cu_seq_lens_q"))
    if not (isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1):
        cu_seqlens = None
    packed = T == S and (position_ids is not None or cu_seqlens is not None)
    if not packed:
        cu_seqlens = None

    tracing = ka._tracing()
    if tracing:
        seq_ids = ka.document_ids(position_ids, cu_seqlens, B, T) if packed else None
    else:
        seq_ids = _eager_document_ids(position_ids, cu_seqlens, B, T) if packed else None
        if seq_ids is None:
            cu_seqlens = None
    if dropout and dropout > 0:
        _warn_once("dropout", f"graphtune attention has no attention dropout (p={dropout}); those layers run "
                   "HF's eager attention with an explicit mask. Set config.attention_dropout=0 to avoid it")
        allowed = ka.visible_keys(T, S, causal=causal, window=window, seq_ids=seq_ids, kv_mask=attention_mask, device=query.device)
        return _fallback(module, query, key, value, allowed[:, None], dropout, scaling, cap, **kwargs)
    if tracing:
        out = torch.ops.graphtune.attention(
            query, key, value, seq_ids, attention_mask, cu_seqlens, scale, causal, window, cap, "auto"
        )
        return out, None

    features = features_of(query, key, value, seq_ids=seq_ids, kv_mask=attention_mask, cu_seqlens=cu_seqlens,
                           causal=causal, window=window, softcap=cap, same_length=T == S)
    impl, _ = ka.select_implementation(features)
    if impl == "flex" and seq_ids is not None and cu_seqlens is None:
        # eagerly, one host sync per batch is acceptable: derive cu_seqlens for the varlen kernel
        if ka.select_implementation(dataclasses.replace(features, documents="cu_seqlens"))[0] == "flash":
            cu_seqlens, _ = ka.cu_seqlens_from_document_ids(seq_ids)
            impl = "flash"
    return run_implementation(impl, query, key, value, seq_ids, attention_mask, cu_seqlens, scale, causal, window, cap), None


def features_of(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    seq_ids: Any,
    kv_mask: Any,
    cu_seqlens: Any,
    causal: bool,
    window: int,
    softcap: float,
    same_length: bool,
) -> ka.AttentionFeatures:
    """:class:`AttentionFeatures` of one call (tensors may be fake: only metadata is read)."""
    device = query.device
    capability = None
    if device.type == "cuda" and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(device)
    documents = "none" if seq_ids is None else ("cu_seqlens" if cu_seqlens is not None else "positions")
    return ka.AttentionFeatures(
        device=device.type,
        capability=capability,
        dtype=query.dtype,
        head_dim=int(query.shape[-1]),
        v_head_dim=int(value.shape[-1]),
        num_heads=int(query.shape[1]),
        num_kv_heads=int(key.shape[1]),
        same_length=bool(same_length),
        causal=bool(causal),
        window=int(window),
        softcap=float(softcap),
        documents=documents,
        padding_mask=kv_mask is not None,
    )


def run_implementation(impl, q, k, v, seq_ids, kv_mask, cu_seqlens, scale, causal, window, softcap) -> torch.Tensor:
    """Run ``impl`` on live tensors (eager path; the pass emits the same calls into graphs)."""
    if impl == "reference":
        return torch.ops.graphtune.attention(q, k, v, seq_ids, kv_mask, cu_seqlens, scale, causal, window, softcap, "reference")
    if impl == "sdpa_masked":
        return ka.sdpa_masked_attention(q, k, v, seq_ids, kv_mask, scale, causal, window)
    if impl.startswith("sdpa"):
        return ka.sdpa_attention(q, k, v, scale, causal, impl[len("sdpa_"):] if impl.startswith("sdpa_") else "auto")
    if impl == "flash":
        return ka.flash_attention(q, k, v, cu_seqlens, q.shape[2], scale, causal, window)
    if impl == "flex":
        mask = ka.flex_block_mask(seq_ids, kv_mask, causal, window, q.shape[0], q.shape[2], k.shape[2], q.device)
        return ka.flex_attention(q, k, v, mask, scale, softcap)
    raise ValueError(f"unknown attention implementation {impl!r}")


# ----------------------------------------------------------------------------------------------
# Registration and switching a model over
# ----------------------------------------------------------------------------------------------
def register() -> None:
    """Register ``"graphtune"`` with transformers (idempotent; done on import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, attention_mask)


def configs(model: torch.nn.Module) -> list[Any]:
    """The distinct configs of the transformers models inside ``model`` whose attention goes through
    ``AttentionInterface`` (peft wrappers included); empty for anything else."""
    seen: dict[int, Any] = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        can_set = getattr(type(module), "_can_set_attn_implementation", None)
        if cfg is None or not hasattr(cfg, "_attn_implementation_internal") or can_set is None:
            continue
        try:
            if not can_set():
                continue
        except Exception:  # noqa: BLE001 - transformers' source inspection failed: leave it alone
            continue
        seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def uses_graphtune(model: torch.nn.Module) -> bool:
    cfgs = configs(model)
    return bool(cfgs) and all(c._attn_implementation_internal == NAME for c in cfgs)


def enable(model: torch.nn.Module) -> dict[int, Any]:
    """Switch every transformers config in ``model`` to graphtune attention; returns what to restore."""
    previous = {}
    for cfg in configs(model):
        previous[id(cfg)] = (cfg, cfg._attn_implementation_internal)
        cfg._attn_implementation_internal = NAME
    return previous


def disable(previous: dict[int, Any]) -> None:
    """Undo :func:`enable`."""
    for cfg, value in previous.values():
        cfg._attn_implementation_internal = value


@contextlib.contextmanager
def implementation(model: torch.nn.Module | Sequence[Any], name: str = NAME) -> Iterator[None]:
    """Run ``model`` with attention implementation ``name`` (default graphtune) inside the block.

    ``model`` may be the list :func:`configs` returned (cheaper per call). dynamo guards on the
    implementation string, so a graph captured inside the block is used only inside it.
    """
    cfgs = configs(model) if isinstance(model, torch.nn.Module) else list(model)
    previous = [(cfg, cfg._attn_implementation_internal) for cfg in cfgs]
    for cfg in cfgs:
        cfg._attn_implementation_internal = name
    try:
        yield
    finally:
        for cfg, value in previous:
            cfg._attn_implementation_internal = value


register()
