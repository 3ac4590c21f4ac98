"""Gemma: ``(norm(x) * (1 + w)).type_as(x)`` RMSNorm computed in fp32, tanh-GELU gated MLP.

Contributes the Gemma RMSNorm variant to ``fuse_rms_norm``; Gemma-2 and Gemma-3 reuse it.
"""

import torch

from graphtune.passes.base import Rewrite
from graphtune.patterns import Family, register_family


def gemma_rms_norm_pattern(x, weight, eps, offset):
    hidden = x.float()
    out = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    out = out * (offset + weight.float())
    return out.type_as(x)


def gemma_rms_norm_replacement(x, weight, eps, offset):
    return torch.ops.graphtune.rms_norm(x, weight, eps, offset, False)


GEMMA_RMS_NORM = Rewrite("gemma", gemma_rms_norm_pattern, gemma_rms_norm_replacement)


@register_family
class Gemma(Family):
    name = "gemma"
    architectures = ("GemmaForCausalLM",)
    decoder_layer_class = "GemmaDecoderLayer"
    structure = dict(norm_style="gemma", norms_per_layer=2, qk_norm=False, activation="geglu", fused_qkv=False, qkv_bias=False)
    rewrites = {"fuse_rms_norm": (GEMMA_RMS_NORM,)}

    @classmethod
    def expected_counts(cls, layers: int) -> dict[str, int]:
        return {"fuse_rms_norm": 2 * layers + 1, "fuse_rope": layers, "fuse_swiglu": 0, "fuse_geglu": layers}
