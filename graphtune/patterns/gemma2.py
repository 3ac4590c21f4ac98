"""Gemma-2: Gemma norms, plus pre/post feed-forward norms (4 per layer); softcaps live in attention/loss."""

from graphtune.patterns import Family, register_family
from graphtune.patterns.gemma import GEMMA_RMS_NORM, Gemma


@register_family
class Gemma2(Family):
    name = "gemma2"
    architectures = ("Gemma2ForCausalLM",)
    decoder_layer_class = "Gemma2DecoderLayer"
    structure = {**Gemma.structure, "norms_per_layer": 4}
    rewrites = {"fuse_rms_norm": (GEMMA_RMS_NORM,)}

    @classmethod
    def expected_counts(cls, layers: int) -> dict[str, int]:
        return {**Gemma.expected_counts(layers), "fuse_rms_norm": 4 * layers + 1}
