"""Mistral (HF ``MistralForCausalLM``): llama.cpp loads it as arch ``llama`` (same permutation).
A sliding window is not represented by that arch: outputs differ past ``sliding_window`` tokens."""

from __future__ import annotations

from graphtune.export.families import register_gguf_family
from graphtune.export.families.llama import Llama


@register_gguf_family("mistral")
class Mistral(Llama):
    def set_gguf_parameters(self, w):
        super().set_gguf_parameters(w)
        window = self.spec.cfg("sliding_window")
        if window and window < self.spec.n_ctx:
            self.notes.append(f"sliding_window={window} is not represented by GGUF arch 'llama': "
                              f"llama.cpp attends to the full context beyond {window} tokens")
