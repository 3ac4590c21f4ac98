"""Gemma-2: arch ``gemma2``. Gemma's +1 norms plus post-attention / post-FFN norms, attention and
final logit soft-capping, sliding window on the layers ``layer_types`` marks (written as an
explicit per-layer pattern). llama.cpp's q scale is 1/sqrt(head_dim) (1/sqrt(n_embd/n_head) for
the 46-layer 27B); HF's ``query_pre_attn_scalar**-0.5`` is folded into the q rows."""

from __future__ import annotations

import math

import gguf
from gguf import MODEL_TENSOR as T

from graphtune.export.families import register_gguf_family, sliding_pattern
from graphtune.export.families.gemma import Gemma

_UNCAPPED = 1e9  # tanh(x / c) * c == x in float32 for |x| << c: how "no soft-cap" is written


@register_gguf_family("gemma2")
class Gemma2(Gemma):
    arch = gguf.MODEL_ARCH.GEMMA2
    structure = {**Gemma.structure, "norms": 4}
    role_tensors = {"ffn_norm": T.FFN_PRE_NORM}
    big_model_layers = 46  # llama.cpp's LLM_TYPE_27B for gemma2

    def llama_cpp_attention_scale(self) -> float:
        sp = self.spec
        if sp.n_layers == self.big_model_layers:
            return 1.0 / math.sqrt(sp.n_embd / sp.n_head)
        return 1.0 / math.sqrt(sp.head_dim)

    def set_gguf_parameters(self, w):
        super().set_gguf_parameters(w)
        sp = self.spec
        for key, add in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                         ("final_logit_softcapping", w.add_final_logit_softcapping)):
            value = sp.cfg(key)
            if value is None:
                value = _UNCAPPED
                self.notes.append(f"{key} is None: written as {_UNCAPPED:g} (llama.cpp's {self.arch_name} always caps)")
            add(float(value))
        self.add_sliding_window(w)

    def add_sliding_window(self, w) -> None:
        window = self.spec.cfg("sliding_window")
        pattern = sliding_pattern(self.spec)
        if window:
            w.add_sliding_window(int(window))
            if pattern is not None:
                w.add_sliding_window_pattern(pattern)
