"""Mistral: the Llama graph (sliding window lives in attention, a later issue); told apart by class."""

from graphtune.patterns import Family, register_family
from graphtune.patterns.llama import Llama


@register_family
class Mistral(Family):
    name = "mistral"
    architectures = ("MistralForCausalLM",)
    decoder_layer_class = "MistralDecoderLayer"
    structure = Llama.structure
    expected_counts = Llama.expected_counts
