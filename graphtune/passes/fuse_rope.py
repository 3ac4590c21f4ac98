"""fuse_rope: HF ``apply_rotary_pos_emb`` on q and k -> ``graphtune::rope`` (q and k in one launch).

``q*cos + rotate_half(q)*sin`` (and the same for k) with cos/sin ``[B|1, T, R]`` unsqueezed at dim 1.
cos/sin carry one row per token, so any position ids -- including packed sequences whose positions
restart per example -- are handled. The slice bound ``R//2`` is a literal in the graph, so the pattern
is instantiated per half-width found in the graph. Family files add variants (Phi-3's partial rotary
with a pass-through tail).

Never fires when: cos/sin require grad (the kernel gives them none); q, k, cos, sin differ in dtype;
cos/sin are not 3-D with batch 1 or q's batch; the rotated width is not cos's last dim; or an
intermediate escapes.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
import torch.fx as fx

from graphtune.passes._guards import check_tensor, known_eq
from graphtune.passes.base import GraphContext, Match, Pass, Rewrite


def slice_bounds(graph: fx.Graph) -> set[int]:
    """Every ``h`` in ``x[..., :h]`` in the graph: candidate rotary half-widths and rotary dims."""
    found = set()
    for node in graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
            idx = node.args[1]
            if (
                isinstance(idx, tuple) and len(idx) == 2 and idx[0] is Ellipsis and isinstance(idx[1], slice)
                and idx[1].start is None and idx[1].step is None and isinstance(idx[1].stop, int) and idx[1].stop > 0
            ):
                found.add(idx[1].stop)
    return found


def half_widths(graph: fx.Graph) -> Iterator[dict[str, int]]:
    for half in sorted(slice_bounds(graph)):
        yield {"half": half}


def make_rope_pattern(half: int):
    def rope_pattern(q, k, cos, sin):
        cos = cos.unsqueeze(1)
        sin = sin.unsqueeze(1)
        q_embed = (q * cos) + (torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin)
        k_embed = (k * cos) + (torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin)
        return q_embed, k_embed

    return rope_pattern


def rope_replacement(q, k, cos, sin):
    out = torch.ops.graphtune.rope(q, k, cos, sin)
    return out[0], out[1]


def make_rope_replacement(**_literals):
    return rope_replacement


ROPE = Rewrite("rotate_half", make_rope_pattern, make_rope_replacement, literals=half_widths)


def can_fuse_rope(match: Match, ctx: GraphContext) -> str | None:
    q, k = ctx.example(match.inputs["q"]), ctx.example(match.inputs["k"])
    cos, sin = ctx.example(match.inputs["cos"]), ctx.example(match.inputs["sin"])
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if reason := check_tensor(name, t):
            return reason
    if ctx.requires_grad(match.inputs["cos"]) or ctx.requires_grad(match.inputs["sin"]):
        return "cos/sin require grad; the fused kernel does not differentiate through them"
    if len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1:
        return f"mixed dtypes q={q.dtype} k={k.dtype} cos={cos.dtype} sin={sin.dtype}"
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        return "expected q/k [B, H, T, D] and cos/sin [B, T, R]"
    rotary = match.literals.get("rotary", 2 * match.literals["half"])
    if not (known_eq(cos.shape[-1], rotary) and known_eq(sin.shape[-1], rotary)):
        return f"cos/sin width {cos.shape[-1]} is not the rotated width {rotary}"
    if "rotary" not in match.literals and not (known_eq(q.shape[-1], rotary) and known_eq(k.shape[-1], rotary)):
        return f"head dim {q.shape[-1]} is not the rotated width {rotary}"
    for t in (cos, sin):
        if not (known_eq(t.shape[0], 1) or known_eq(t.shape[0], q.shape[0])):
            return "cannot prove cos/sin batch is 1 or q's batch"
        if not known_eq(t.shape[1], q.shape[2]):
            return "cannot prove cos/sin sequence length equals q's"
    if not (known_eq(q.shape[0], k.shape[0]) and known_eq(q.shape[2], k.shape[2]) and known_eq(q.shape[3], k.shape[3])):
        return "q and k differ in batch, sequence or head dim"
    return None


class FuseRoPE(Pass):
    name = "fuse_rope"
    rewrites = (ROPE,)
    op_names = ("graphtune.rope",)

    def guard(self, match: Match, ctx: GraphContext) -> str | None:
        return can_fuse_rope(match, ctx)

    def is_candidate_module(self, class_name: str, nodes) -> bool:
        # an attention module that rotates half of something (a ``neg`` feeding a ``cat``) uses RoPE
        return class_name.endswith("Attention") and any(
            n.op == "call_function" and n.target is torch.cat and any(
                isinstance(a, fx.Node) and a.target is operator.neg for a in n.args[0]
            )
            for n in nodes
            if n.args and isinstance(n.args[0], (list, tuple))
        )
