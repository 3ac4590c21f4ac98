"""Gemma-3 (text): arch ``gemma3``. Gemma-2's four +1 norms plus q/k norms, local (sliding) layers
with their own rope base (``rope.freq_base_swa``), the per-layer sliding pattern written
explicitly (llama.cpp would otherwise assume every 6th layer global), optional final soft-cap.
The graph's attention scale (``query_pre_attn_scalar``) is folded into ``attn_q_norm``: q is
RMS-normalized, so scaling q's projection would be undone."""

from __future__ import annotations

import gguf

from graphtune.export.families import GGUFFamily, register_gguf_family
from graphtune.export.families.gemma2 import Gemma2


@register_gguf_family("gemma3")
class Gemma3(Gemma2):
    arch = gguf.MODEL_ARCH.GEMMA3
    structure = {**Gemma2.structure, "qk_norms": 2}
    big_model_layers = 62  # llama.cpp's LLM_TYPE_27B for gemma3

    def q_fold(self) -> float:
        return 1.0

    def transform(self, role, bid, part, t, offset=0.0):
        t = super().transform(role, bid, part, t, offset)
        fold = self.attention_scale_fold()
        if fold != 1.0 and role == "attn_q_norm" and part == "weight":
            t = t * fold
        return t

    def transform_moves_only(self, role, bid, part, offset=0.0):
        if self.attention_scale_fold() != 1.0 and role == "attn_q_norm" and part == "weight":
            return False
        return super().transform_moves_only(role, bid, part, offset)

    def rope(self):
        return self.spec.rope_parameters("full_attention")

    def set_gguf_parameters(self, w):
        sp = self.spec
        local_rope = sp.rope_parameters("sliding_attention")
        GGUFFamily.set_gguf_parameters(self, w)  # head counts, eps, global rope (base + scaling)
        if sp.cfg("sliding_window"):
            w.add_rope_freq_base_swa(float(local_rope.get("rope_theta", 10_000.0)))
            local_kind = local_rope.get("rope_type", "default")
            if local_kind not in (None, "default"):
                self.notes.append(f"sliding-layer rope scaling {local_kind!r} is not represented")
        if sp.cfg("final_logit_softcapping") is not None:
            w.add_final_logit_softcapping(float(sp.cfg("final_logit_softcapping")))
        if sp.cfg("attn_logit_softcapping") is not None:
            self.notes.append("attn_logit_softcapping is not applied by llama.cpp's gemma3")
        self.add_sliding_window(w)
