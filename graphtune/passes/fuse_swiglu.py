"""fuse_swiglu: ``silu(gate) * up`` -> ``graphtune::swiglu``, whose backward recomputes silu.

The gated-MLP product of Llama, Mistral, Qwen2/3 (``act(gate_proj(x)) * up_proj(x)``); family files
add other spellings (Phi-3 writes ``up * act(gate)`` after a ``chunk``). Saves ``h = silu(gate)*up``'s
activation memory: the backward keeps gate and up and recomputes the sigmoid.

Never fires when gate and up cannot be proven to have the same shape (no broadcasting), differ in
dtype, or when ``silu(gate)`` is used outside the product.
"""

from __future__ import annotations

import torch
from torch.nn.functional import silu

from graphtune.passes._guards import check_same_shape, check_tensor
from graphtune.passes.base import GraphContext, Match, Pass, Rewrite


def swiglu_pattern(gate, up):
    return silu(gate) * up


def swiglu_replacement(gate, up):
    return torch.ops.graphtune.swiglu(gate, up)


SWIGLU = Rewrite("act_gate_times_up", swiglu_pattern, swiglu_replacement)


def can_fuse_gated(match: Match, ctx: GraphContext) -> str | None:
    """Shared by the SwiGLU and GeGLU passes: elementwise, same shape, same supported dtype."""
    gate, up = ctx.example(match.inputs["gate"]), ctx.example(match.inputs["up"])
    for name, t in (("gate", gate), ("up", up)):
        if reason := check_tensor(name, t):
            return reason
    if gate.dtype != up.dtype:
        return f"gate {gate.dtype} and up {up.dtype} differ in dtype"
    return check_same_shape(("gate", "up"), gate, up)


class FuseSwiGLU(Pass):
    name = "fuse_swiglu"
    rewrites = (SWIGLU,)
    op_names = ("graphtune.swiglu",)

    def guard(self, match: Match, ctx: GraphContext) -> str | None:
        return can_fuse_gated(match, ctx)

    def is_candidate_module(self, class_name: str, nodes) -> bool:
        return class_name.endswith("MLP") and any(n.target is silu for n in nodes)
