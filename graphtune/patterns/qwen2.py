"""Qwen2: the Llama graph plus biases on the q/k/v projections."""

from graphtune.patterns import Family, register_family
from graphtune.patterns.llama import Llama


@register_family
class Qwen2(Family):
    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    decoder_layer_class = "Qwen2DecoderLayer"
    structure = {**Llama.structure, "qkv_bias": True}
    expected_counts = Llama.expected_counts
