"""Gemma: arch ``gemma``. Norms are ``x * (1 + w)`` in the graph (rms_norm offset 1.0), so +1 is
folded into every norm weight; GeGLU (tanh); the output matrix is always the token embedding.
llama.cpp scales q by 1/sqrt(head_dim): any other graph scale is folded into the q rows."""

from __future__ import annotations

import gguf

from graphtune.export.families import GGUFFamily, register_gguf_family


@register_gguf_family("gemma")
class Gemma(GGUFFamily):
    arch = gguf.MODEL_ARCH.GEMMA
    structure = {**GGUFFamily.structure, "activation": "geglu", "norm_offset": 1.0}

    def transform(self, role, bid, part, t, offset=0.0):
        t = super().transform(role, bid, part, t, offset)
        fold = self.q_fold()
        if fold != 1.0 and role == "attn_q" and part in ("weight", "bias", "lora_b"):
            t = t * fold
        return t

    def transform_moves_only(self, role, bid, part, offset=0.0):
        if self.q_fold() != 1.0 and role == "attn_q" and part in ("weight", "bias", "lora_b"):
            return False
        return super().transform_moves_only(role, bid, part, offset)

    def q_fold(self) -> float:
        """Scale folded into q's projection rows (no q norm in this arch)."""
        return self.attention_scale_fold()
