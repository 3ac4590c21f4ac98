"""Llama (and Llama-2/3): Llama-style RMSNorm, full RoPE, SwiGLU, separate q/k/v without bias."""

from graphtune.patterns import Family, register_family


@register_family
class Llama(Family):
    name = "llama"
    architectures = ("LlamaForCausalLM",)
    decoder_layer_class = "LlamaDecoderLayer"
    structure = dict(norm_style="llama", norms_per_layer=2, qk_norm=False, activation="swiglu", fused_qkv=False, qkv_bias=False)

    @classmethod
    def expected_counts(cls, layers: int) -> dict[str, int]:
        return {"fuse_rms_norm": 2 * layers + 1, "fuse_rope": layers, "fuse_swiglu": layers, "fuse_geglu": 0}
