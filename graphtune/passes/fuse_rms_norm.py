"""fuse_rms_norm: ``w * norm(x.float()).to(dtype)`` -> ``graphtune::rms_norm`` (one Triton kernel each way).

Matches the Llama form (Llama, Mistral, Qwen2/3 incl. q/k norms, Phi-3); family files add others
(Gemma's ``(norm(x) * (1 + w)).type_as(x)``). Preserves the exact math, including Llama's rounding of
the normalised value to the input dtype *before* the weight multiply. The backward recomputes the
inverse RMS from x instead of saving it, and produces dW only when the weight requires grad.

Never fires when: eps is not a literal; the weight is not 1-D of size ``x.shape[-1]``; the output
dtype is not the input dtype (the kernel rounds to x.dtype); x is not fp32/bf16/fp16; or an
intermediate (e.g. the fp32 copy of x) is used outside the norm.
"""

from __future__ import annotations

import torch

from graphtune.passes._guards import check_literal_number, check_tensor, known_eq
from graphtune.passes.base import GraphContext, Match, Pass, Rewrite


def llama_rms_norm_pattern(x, weight, eps, dtype):
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(dtype)


def llama_rms_norm_replacement(x, weight, eps, dtype):
    return torch.ops.graphtune.rms_norm(x, weight, eps, 0.0, True)


LLAMA_RMS_NORM = Rewrite("llama", llama_rms_norm_pattern, llama_rms_norm_replacement)


def can_fuse_rms_norm(match: Match, ctx: GraphContext) -> str | None:
    """Safety only: the kernel computes exactly what the matched subgraph computes."""
    x, weight = ctx.example(match.inputs["x"]), ctx.example(match.inputs["weight"])
    if reason := check_literal_number("eps", match.inputs["eps"]):
        return reason
    if "offset" in match.inputs and (reason := check_literal_number("offset", match.inputs["offset"])):
        return reason
    if reason := check_tensor("x", x):
        return reason
    if reason := check_tensor("weight", weight):
        return reason
    if weight.dim() != 1 or not known_eq(weight.shape[0], x.shape[-1]):
        return f"weight shape {tuple(weight.shape)} is not ({x.shape[-1]},)"
    if "dtype" in match.inputs and match.inputs["dtype"] != x.dtype:
        return f"normalised value is cast to {match.inputs['dtype']}, not to the input dtype {x.dtype}"
    return None


class FuseRMSNorm(Pass):
    name = "fuse_rms_norm"
    rewrites = (LLAMA_RMS_NORM,)
    op_names = ("graphtune.rms_norm",)

    def guard(self, match: Match, ctx: GraphContext) -> str | None:
        return can_fuse_rms_norm(match, ctx)

    def is_candidate_module(self, class_name: str, nodes) -> bool:
        return class_name.endswith("RMSNorm")
