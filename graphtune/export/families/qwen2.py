"""Qwen-2: arch ``qwen2``, NEOX rope (no permutation), biases on q/k/v."""

from __future__ import annotations

import gguf

from graphtune.export.families import GGUFFamily, register_gguf_family


@register_gguf_family("qwen2")
class Qwen2(GGUFFamily):
    arch = gguf.MODEL_ARCH.QWEN2
    allowed_bias_roles = frozenset({"attn_q", "attn_k", "attn_v"})

    def set_gguf_parameters(self, w):
        super().set_gguf_parameters(w)
        if self.spec.cfg("use_sliding_window") and self.spec.cfg("sliding_window"):
            self.notes.append("use_sliding_window is not represented by GGUF arch 'qwen2'")
