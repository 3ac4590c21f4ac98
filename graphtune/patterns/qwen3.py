"""Qwen3: Llama-style graph with per-head RMSNorms on q and k (before RoPE), no qkv bias."""

from graphtune.patterns import Family, register_family
from graphtune.patterns.llama import Llama


@register_family
class Qwen3(Family):
    name = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    decoder_layer_class = "Qwen3DecoderLayer"
    structure = {**Llama.structure, "qk_norm": True}

    @classmethod
    def expected_counts(cls, layers: int) -> dict[str, int]:
        return {**Llama.expected_counts(layers), "fuse_rms_norm": 4 * layers + 1}
