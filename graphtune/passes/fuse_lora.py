"""fuse_lora: peft's LoRA projection ``linear(x, W, b) + linear(linear(x_lora, A), B) * s`` -> ``graphtune::lora_linear``.

Matches the subgraph peft's ``lora.Linear.forward`` produces for one active adapter, with or without
lora_dropout (``x_lora`` is then peft's own dropout node, left in place so the mask is peft's), with
or without a base bias (Qwen-2's q/k/v), and for fused base projections (Phi-3's qkv_proj and
gate_up_proj are ordinary linears here). rsLoRA only changes the literal ``s``. The op saves only
``x_lora`` and recomputes the rank-r activation in its backward.

Never fires when: the base weight requires grad (the op gives it none); the scaling is not a literal
number; x, W, A and B differ in dtype -- except peft's default mixed precision on a half model
(``autocast_adapter_dtype``: x and W bf16/fp16, ``x_lora = x.to(float32)`` and A, B fp32), which the
op computes as eager does (without dropout the cast moves inside the op: ``peft_linear_autocast``);
or an intermediate escapes. DoRA, LoRA on embeddings and bitsandbytes bases
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


# peft's default mixed precision (autocast_adapter_dtype) without dropout: every projection casts x to
# the fp32 adapter dtype itself. The op does that cast inside (x_lora = x), so the graph neither
# materializes nor saves an fp32 copy of x per projection, and q/k/v save one shared half-precision x.
def lora_autocast_pattern(x, weight, bias, lora_a, lora_b, scaling, dtype, adapter_dtype):
    result = linear(x, weight, bias)
    x_lora = x.to(dtype=adapter_dtype)  # peft spells its cast with the keyword
    result = result + linear(linear(x_lora, lora_a, None), lora_b, None) * scaling
    return result.to(dtype)


def lora_autocast_replacement(x, weight, bias, lora_a, lora_b, scaling, dtype, adapter_dtype):
    # peft's final cast joins the op too (out_dtype): the fp32 sum never leaves it
    return torch.ops.graphtune.lora_linear(x, x, weight, bias, lora_a, lora_b, scaling, dtype)


LORA = Rewrite("peft_linear", lora_pattern, lora_replacement)
LORA_AUTOCAST = Rewrite("peft_linear_autocast", lora_autocast_pattern, lora_autocast_replacement)
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
    if "adapter_dtype" in inputs and not isinstance(inputs["dtype"], torch.dtype):
        return f"the output cast's dtype is not a literal ({inputs['dtype']!r})"
    if "adapter_dtype" in inputs and inputs["adapter_dtype"] not in adapter:
        return f"x is cast to {inputs['adapter_dtype']}, not to the LoRA weights' dtype {adapter.pop()}"
    if base != adapter and "x_lora" not in inputs and "adapter_dtype" not in inputs:
        return "fp32 adapter weights read a half-precision x without peft's cast node"
    if inputs["bias"] is not None and ctx.example(inputs["bias"]) is None:
        return "bias is neither None nor a tensor"
    if tensors["weight"].dim() != 2 or tensors["lora_a"].dim() != 2 or tensors["lora_b"].dim() != 2:
        return "weights are not 2-D"
    return None


MIXED_PRECISION_LEFT_TO_COMPILER = (
    "peft's mixed-precision projection (half base, fp32 adapters) is left to the compiler on CUDA (with "
    "GRAPHTUNE_LORA_SPLIT=auto the bf16 case without dropout is fused: split-bf16 tensor-core products, 0.64x the "
    "speed on an H100): inductor "
    "fuses its casts and adds into neighbouring kernels, measured faster than the op (H200, Llama-3.2-1B LoRA "
    "2x2048: 39.5k vs 32.7-35.4k tok/s; with memory_budget='checkpoint' 29.0k at 3.31 GiB vs 22.4-24.8k at "
    "3.45-3.60 GiB); pass FuseLoRA(fuse_mixed_precision=True) to fuse it anyway"
)


def is_mixed_precision(match: Match, ctx: GraphContext) -> bool:
    """True for peft's autocast_adapter_dtype case: the LoRA weights' dtype differs from the base weight's."""
    weight, lora_a = ctx.example(match.inputs["weight"]), ctx.example(match.inputs["lora_a"])
    return weight is not None and lora_a is not None and weight.dtype != lora_a.dtype


def split_path_serves(match: Match, ctx: GraphContext) -> bool:
    """True where ``graphtune::lora_linear`` computes the adapter products as split-bf16 GEMMs
    (:mod:`graphtune.kernels.split_bf16`): peft's autocast rewrite (no dropout) on a bf16 base with
    fp32 adapters and a bf16 output cast, on a device where the split path is on."""
    from graphtune.kernels.lora_linear import split_path_applies

    if match.rewrite.name != LORA_AUTOCAST.name or match.inputs.get("dtype") is not torch.bfloat16:
        return False
    x, weight = ctx.example(match.inputs["x"]), ctx.example(match.inputs["weight"])
    lora_a, lora_b = ctx.example(match.inputs["lora_a"]), ctx.example(match.inputs["lora_b"])
    if any(t is None for t in (x, weight, lora_a, lora_b)):
        return False
    return split_path_applies(x, x, weight, lora_a, lora_b, torch.bfloat16)


class FuseLoRA(Pass):
    """``fuse_mixed_precision=False`` refuses peft's fp32-adapter-on-half-base case (see
    :data:`MIXED_PRECISION_LEFT_TO_COMPILER`) except where the op's split-bf16 path serves it
    (:func:`split_path_serves`); ``default_passes`` sets it for CUDA."""

    name = "fuse_lora"
    rewrites = (LORA, LORA_AUTOCAST, LORA_DROPOUT)
    op_names = ("graphtune.lora_linear",)

    def __init__(self, extra_rewrites=(), fuse_mixed_precision: bool = True) -> None:
        super().__init__(extra_rewrites)
        self.fuse_mixed_precision = fuse_mixed_precision

    def guard(self, match: Match, ctx: GraphContext) -> str | None:
        if reason := can_fuse_lora(match, ctx):
            return reason
        if not self.fuse_mixed_precision and is_mixed_precision(match, ctx) and not split_path_serves(match, ctx):
            return MIXED_PRECISION_LEFT_TO_COMPILER
        return None

    def is_candidate_module(self, class_name: str, nodes) -> bool:
        # a peft LoRA layer: a Linear with lora_A/lora_B children, or an Embedding with lora_embedding_A/B
        # 4-bit bases belong to fuse_qlora (which reports its own refusals)
        from graphtune.passes.fuse_qlora import is_bnb_4bit_node

        return (
            class_name in ("Linear", "Linear8bitLt", "Embedding")
            and any(".lora_A" in module_path(n) or "lora_embedding" in n.name for n in nodes)
            and not any(is_bnb_4bit_node(n) for n in nodes)
        )
