"""fuse_geglu: ``gelu(gate, approximate="tanh") * up`` -> ``graphtune::geglu`` (Gemma's gated MLP).

Same structure and guard as fuse_swiglu; the backward recomputes the tanh-GELU and its derivative
instead of saving the activation. Exact (erf) GELU is a different function and is not matched.
"""

from __future__ import annotations

import torch
from torch.nn.functional import gelu

from graphtune.passes.base import GraphContext, Match, Pass, Rewrite
from graphtune.passes.fuse_swiglu import can_fuse_gated


def geglu_pattern(gate, up):
    return gelu(gate, approximate="tanh") * up


def geglu_replacement(gate, up):
    return torch.ops.graphtune.geglu(gate, up)


GEGLU = Rewrite("act_gate_times_up", geglu_pattern, geglu_replacement)


class FuseGeGLU(Pass):
    name = "fuse_geglu"
    rewrites = (GEGLU,)
    op_names = ("graphtune.geglu",)

    def guard(self, match: Match, ctx: GraphContext) -> str | None:
        return can_fuse_gated(match, ctx)

    def is_candidate_module(self, class_name: str, nodes) -> bool:
        return class_name.endswith("MLP") and any(
            n.target is gelu and n.kwargs.get("approximate") == "tanh" for n in nodes
        )
