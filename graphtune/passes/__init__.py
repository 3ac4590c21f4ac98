"""Rewrite passes and the pipeline that runs them.

A pipeline is a list of passes run in order over one captured graph; each returns a
:class:`~graphtune.report.PassResult`. ``default_passes()`` builds the standard list with every
registered family's pattern variants attached. Invariants every pass keeps (checked in tests):

* the rewritten graph computes the same values and gradients as the original (fp32: ≤1e-5 relative);
* no new aliasing: kernels return fresh, contiguous tensors;
* a site whose guard cannot be proven keeps its original nodes, and the refusal is reported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx

from graphtune.passes.base import GraphContext, Match, Pass, Rewrite
from graphtune.passes.dispatch_attention import DispatchAttention
from graphtune.passes.fuse_geglu import FuseGeGLU
from graphtune.passes.fuse_linear_cross_entropy import FuseLinearCrossEntropy
from graphtune.passes.fuse_lora import FuseLoRA
from graphtune.passes.fuse_qlora import FuseQLoRA
from graphtune.passes.fuse_lora_mlp import FuseLoRAMLP
from graphtune.passes.fuse_rms_norm import FuseRMSNorm
from graphtune.passes.fuse_rope import FuseRoPE
from graphtune.passes.fuse_swiglu import FuseSwiGLU
from graphtune.passes.group_lora import GroupLoRA
from graphtune.report import PassResult

# dispatch_attention runs last: it lowers attention nodes to kernel calls other passes do not match
PASS_CLASSES: tuple[type[Pass], ...] = (
    FuseLoRA, FuseQLoRA, FuseRMSNorm, FuseRoPE, FuseSwiGLU, FuseGeGLU, FuseLoRAMLP, GroupLoRA, FuseLinearCrossEntropy, DispatchAttention,
)

__all__ = ["GraphContext", "Match", "Pass", "Rewrite", "PASS_CLASSES", "default_passes", "run_pipeline", "pass_by_name"]


def default_passes(device: str | None = None) -> list[Pass]:
    """The standard pipeline, each pass carrying the pattern variants families contribute.

    On ``device="cuda"``, ``fuse_lora`` and ``fuse_qlora`` leave peft's mixed-precision projections
    (fp32 adapters on a half base, peft's default) to inductor, which was measured faster than the fp32
    CUDA-core GEMMs the op would run; the refusal names the reason in the report. The exception is
    ``fuse_lora`` where the op's split-bf16 path serves the site (bf16 base, no dropout,
    ``GRAPHTUNE_LORA_SPLIT=auto`` or ``1``; off by default: measured slower on an H100). Elsewhere they are fused.
    """
    from graphtune.patterns import family_rewrites

    passes = []
    for cls in PASS_CLASSES:
        kw = {"fuse_mixed_precision": False} if cls in (FuseLoRA, FuseQLoRA) and device == "cuda" else {}
        passes.append(cls(extra_rewrites=family_rewrites(cls.name), **kw))
    return passes


def pass_by_name(name: str) -> Pass:
    for p in default_passes():
        if p.name == name:
            return p
    raise KeyError(f"no pass named {name!r}; known: {', '.join(c.name for c in PASS_CLASSES)}")


def run_pipeline(gm: fx.GraphModule, passes: Sequence[Pass], ctx: GraphContext | None = None) -> list[PassResult]:
    """Run ``passes`` in order over ``gm`` (in place) and return one result per pass."""
    ctx = ctx or GraphContext()
    return [p(gm, ctx) for p in passes]
