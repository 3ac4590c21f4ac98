"""Qwen-3: arch ``qwen3``, NEOX rope, per-head q/k RMSNorm (``attn_q_norm``/``attn_k_norm``)."""

from __future__ import annotations

import gguf

from graphtune.export.families import GGUFFamily, register_gguf_family


@register_gguf_family("qwen3")
class Qwen3(GGUFFamily):
    arch = gguf.MODEL_ARCH.QWEN3
    structure = {**GGUFFamily.structure, "qk_norms": 2}
