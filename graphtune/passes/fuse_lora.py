"""fuse_lora: peft's LoRA projection ``linear(x, W, b) + linear(linear(x_lora, A), B) * s`` -> ``graphtune::lora_linear``.

Matches the subgraph peft's ``lora.Linear.forward`` produces for one active adapter, with or without
lora_dropout (``x_lora`` is then peft's own dropout node, left in place so the mask is peft's), with
or without a base bias (Qwen-2's q/k/v), and for fused base projections (Phi-3's qkv_proj and
gate_up_proj are ordinary linears here). rsLoRA only changes the literal ``s``. The op saves only
``x_lora`` and recomputes the rank-r activation in its backward.

Never fires when: the base weight requires grad (the op gives it none); the scaling is not a literal
number; x, W, A and B differ in dtype -- except peft's default mixed precision on a half model
(``autocast_adapter_dtype``: x and W bf16/fp16, ``x_lora = x.to(float32)`` and A, B fp32), which the
op computes as eager does; or an intermediate escapes. DoRA, LoRA on embeddings and bitsandbytes bases
(``gemm_4bit`` / ``autograd_function_apply``) have other subgraphs, are not matched, and their modules
appear as unmatched in the report.
"""

from __future__ import annotations

import torch
from torch.nn.functional import linear

from graphtune.passes._guards import check_literal_number, check_tensor
from graphtune.passes.base import GraphContext, Match, Pass, Rewrite, module_path


def lora_pattern(x, weight, bias, lora_a, lora_b, scaling, dtype):
    result = linear(x, weight, bias)
    result = result + linear(linear(x, lora_a, None), lora_b, None) * scaling
    return result.to(dtype)


def lora_replacement(x, weight, bias, lora_a, lora_b, scaling, dtype):
    return torch.ops.graphtune.lora_linear(x, x, weight, bias, lora_a, lora_b, scaling).to(dtype)


# lora_dropout > 0: the adapter reads peft's dropout node (a graph node is matched by one wildcard only,
# so the shared-input case above is its own pattern)
def lora_dropout_pattern(x, x_lora, weight, bias, lora_a, lora_b, scaling, dtype):
    result = linear(x, weight, bias)
    result = result + linear(linear(x_lora, lora_a, None), lora_b, None) * scaling
    return result.to(dtype)


def lora_dropout_replacement(x, x_lora, weight, bias, lora_a, lora_b, scaling, dtype):
    return torch.ops.graphtune.lora_linear(x, x_lora, weight, bias, lora_a, lora_b, scaling).to(dtype)


LORA = Rewrite("peft_linear", lora_pattern, lora_replacement)
LORA_DROPOUT = Rewrite("peft_linear_dropout", lora_dropout_pattern, lora_dropout_replacement)


def can_fuse_lora(match: Match, ctx: GraphContext) -> str | None:
    inputs = match.inputs
    if reason := check_literal_number("scaling", inputs["scaling"]):
        return reason
    tensors = {name: ctx.example(inputs[name]) for name in ("x", "x_lora", "weight", "lora_a", "lora_b") if name in inputs}
    for name, t in tensors.items():
        if reason := check_tensor(name, t):
            return reason
    if ctx.requires_grad(inputs["weight"]):
        return "the base weight requires grad (full fine-tuning of a LoRA-wrapped layer); the op gives it no gradient"
    base = {tensors["x"].dtype, tensors["weight"].dtype}
    adapter = {t.dtype for k, t in tensors.items() if k in ("x_lora", "lora_a", "lora_b")}
    mixed = base == {torch.bfloat16} or base == {torch.float16}
    if len(base) != 1 or len(adapter) != 1 or (base != adapter and not (mixed and adapter == {torch.float32})):
        # one dtype throughout, or peft's autocast_adapter_dtype: half base, fp32 adapter path
        return "x, base weight and LoRA weights differ in dtype: " + ", ".join(f"{k}={v.dtype}" for k, v in tensors.items())
    if base != adapter and "x_lora" not in inputs:
        return "fp32 adapter weights read a half-precision x without peft's cast node"
    if inputs["bias"] is not None and ctx.example(inputs["bias"]) is None:
        return "bias is neither None nor a tensor"
    if tensors["weight"].dim() != 2 or tensors["lora_a"].dim() != 2 or tensors["lora_b"].dim() != 2:
        return "weights are not 2-D"
    return None


class FuseLoRA(Pass):
    name = "fuse_lora"
    rewrites = (LORA, LORA_DROPOUT)
    op_names = ("graphtune.lora_linear",)

    def guard(self, match: Match, ctx: GraphContext) -> str | None:
        return can_fuse_lora(match, ctx)

    def is_candidate_module(self, class_name: str, nodes) -> bool:
        # a peft LoRA layer: a Linear with lora_A/lora_B children, or an Embedding with lora_embedding_A/B
        # 4-bit bases belong to fuse_qlora (which reports its own refusals)
        from graphtune.passes.fuse_qlora import is_bnb_4bit_node

        return (
            class_name in ("Linear", "Linear8bitLt", "Embedding")
            and any(".lora_A" in module_path(n) or "lora_embedding" in n.name for n in nodes)
            and not any(is_bnb_4bit_node(n) for n in nodes)
        )
