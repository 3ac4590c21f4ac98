"""Phi-3: arch ``phi3``. Fused ``qkv_proj`` (``attn_qkv``: q, k, v rows in that order) and
``gate_up_proj`` (``ffn_up`` with the gate half first), NEOX rope over the partial rotary width the
graph's cos/sin show, long-rope factors as ``rope_factors_long/short`` tensors."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

import gguf
from gguf import MODEL_TENSOR as T

from graphtune.export.families import ExtraTensor, GGUFFamily, register_gguf_family


@register_gguf_family("phi3")
class Phi3(GGUFFamily):
    arch = gguf.MODEL_ARCH.PHI3

    def check(self, roles):
        problems = super().check(roles)
        sp = self.spec
        want = (0, sp.n_head * sp.head_dim)
        for r in roles.params.values():
            if r.role == "attn_qkv" and r.part == "weight" and r.slices and tuple(r.slices) != want:
                problems.append(f"{r.fqn}: q/k start at rows {r.slices}, llama.cpp's phi3 expects {want}")
        return problems

    def set_gguf_parameters(self, w):
        super().set_gguf_parameters(w)
        sp = self.spec
        orig = sp.cfg("original_max_position_embeddings")
        if orig:
            w.add_rope_scaling_orig_ctx_len(int(orig))
        window = sp.cfg("sliding_window")
        w.add_sliding_window(int(window or 0))
        if window and window < sp.n_ctx:
            self.notes.append(f"sliding_window={window}: llama.cpp's phi3 disables SWA (full attention)")

    def add_rope_scaling(self, w, rope):
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind != "longrope":
            return super().add_rope_scaling(w, rope)
        sp = self.spec
        orig = sp.cfg("original_max_position_embeddings") or sp.n_ctx
        factor = sp.n_ctx / orig
        attn = rope.get("attention_factor") or (1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig)))
        w.add_rope_scaling_attn_factors(float(attn))

    def extra_tensors(self) -> Iterable[ExtraTensor]:
        rope = self.spec.rope_parameters()
        if (rope.get("rope_type") or rope.get("type")) != "longrope":
            return
        for key, kind in (("long_factor", T.ROPE_FACTORS_LONG), ("short_factor", T.ROPE_FACTORS_SHORT)):
            factors = torch.tensor(rope[key], dtype=torch.float32)
            if factors.numel() != self.spec.n_rot // 2:
                raise ValueError(f"{key} has {factors.numel()} entries, expected n_rot/2 = {self.spec.n_rot // 2}")
            yield ExtraTensor(gguf.TENSOR_NAMES[kind] + ".weight", factors)
