"""Llama (1/2/3): arch ``llama``. llama.cpp rotates adjacent pairs (LLAMA_ROPE_TYPE_NORM) where HF
rotates halves, so q/k rows are permuted per head (weights, biases and LoRA B alike). Llama-3's
rope scaling is a ``rope_freqs`` tensor of per-frequency divisors, not a metadata key."""

from __future__ import annotations

from collections.abc import Iterable

import torch

import gguf

from graphtune.export.families import ExtraTensor, GGUFFamily, permute_rows, register_gguf_family


def llama3_rope_freqs(spec) -> torch.Tensor | None:
    """Divisors llama.cpp applies to each rope frequency, from transformers' own rope functions."""
    rope = spec.rope_parameters()
    if (rope.get("rope_type") or rope.get("type")) != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](spec.config, "cpu")
    base = float(rope.get("rope_theta", 10000.0))
    dim = spec.n_rot
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (plain / scaled.float()).to(torch.float32)


@register_gguf_family("llama")
class Llama(GGUFFamily):
    arch = gguf.MODEL_ARCH.LLAMA
    allowed_bias_roles = frozenset({"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"})

    def transform(self, role, bid, part, t, offset=0.0):
        t = super().transform(role, bid, part, t, offset)
        if role == "attn_q" and part in ("weight", "bias", "lora_b"):
            return permute_rows(t, self.spec.n_head)
        if role == "attn_k" and part in ("weight", "bias", "lora_b"):
            return permute_rows(t, self.spec.n_head_kv)
        return t

    def transform_moves_only(self, role, bid, part, offset=0.0):
        return super().transform_moves_only(role, bid, part, offset)  # + row permutations: still moves only

    def extra_tensors(self) -> Iterable[ExtraTensor]:
        freqs = llama3_rope_freqs(self.spec)
        if freqs is not None:
            yield ExtraTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs)
