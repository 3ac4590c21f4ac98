"""Gemma-3 (text): Gemma-2's four norms per layer plus q/k norms applied to transposed (non-contiguous)
q/k -- the rms_norm kernel must accept strided inputs and return contiguous outputs."""

from graphtune.patterns import Family, register_family
from graphtune.patterns.gemma import GEMMA_RMS_NORM, Gemma


@register_family
class Gemma3(Family):
    name = "gemma3"
    architectures = ("Gemma3ForCausalLM",)
    decoder_layer_class = "Gemma3DecoderLayer"
    structure = {**Gemma.structure, "norms_per_layer": 4, "qk_norm": True}
    rewrites = {"fuse_rms_norm": (GEMMA_RMS_NORM,)}

    @classmethod
    def expected_counts(cls, layers: int) -> dict[str, int]:
        return {**Gemma.expected_counts(layers), "fuse_rms_norm": 6 * layers + 1}
