"""group_lora: ``graphtune::lora_linear`` nodes reading the same input -> one ``graphtune::lora_linear_group``.

Runs after fuse_lora (and after fuse_lora_mlp, which takes an MLP's gate/up first), so what it
groups in a decoder layer is q/k/v (gate/up too when the MLP block was not fused). Members must read
the *same graph nodes* as ``x`` and ``x_lora``: without lora_dropout that is ``lora_linear(x, x, ...)``
for every member; with lora_dropout each peft projection has its own dropout node, hence its own mask
and RNG draw, and members are never merged across masks (the site is refused, the reason reported).
Per-member scalings, ranks, output sizes and biases (Qwen-2's q/k/v) are allowed. What the group op
saves in memory and work is in :mod:`graphtune.kernels.lora_group`.

Why a scan and not a pattern: a group is "every lora_linear with this input", of any size, not a
fixed subgraph; ``SubgraphMatcher`` patterns would need one pattern per member count and order.

Never fires when: fewer than two members share ``x`` and ``x_lora``; the members are peft's
mixed-precision form (``lora_linear`` with ``out_dtype``: refused with that reason); a scaling is not a literal
number; x, x_lora, base and LoRA weights differ in dtype or are unsupported; a base weight requires
grad; a member input is defined after the first member (no insertion point keeps the graph in order).

Graph shape after the pass: one op node per group (module path: the members' common parent, e.g.
``self_attn``) and one ``getitem`` per member carrying that member's module path and metadata, so
the per-projection ``.to(dtype)`` nodes fuse_lora left stay where they were.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

import graphtune.kernels.lora_group  # noqa: F401  (registers graphtune::lora_linear_group)
from graphtune.passes._guards import check_literal_number, check_tensor
from graphtune.passes.base import GraphContext, Pass, _clean_path, module_path
from graphtune.report import PassResult, Refusal

LORA_LINEAR_TARGETS = (torch.ops.graphtune.lora_linear, torch.ops.graphtune.lora_linear.default)
# argument positions of graphtune::lora_linear
X, X_LORA, WEIGHT, BIAS, LORA_A, LORA_B, SCALING = range(7)
_META_KEYS = ("nn_module_stack", "source_fn_stack", "stack_trace", "example_value")


def is_lora_linear(node: Any) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target in LORA_LINEAR_TARGETS
        and len(node.args) == 7
        and not node.kwargs
    )


GROUP_TARGETS = (torch.ops.graphtune.lora_linear_group, torch.ops.graphtune.lora_linear_group.default)


def is_mixed_precision_lora_linear(node: Any) -> bool:
    """A ``lora_linear`` in peft's mixed-precision form (fp32 adapters on a half base): ``out_dtype``
    given, the fp32 cast of x inside the op. The block ops (``lora_linear_group``, ``lora_mlp``)
    take one dtype for x, weights and adapters, so they leave these projections fused one by one."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target in LORA_LINEAR_TARGETS
        and (len(node.args) == 8 or "out_dtype" in node.kwargs)
    )


def mixed_precision_reason(node: fx.Node, ctx: GraphContext, op: str) -> str:
    base, adapter = ctx.example(node.args[WEIGHT]), ctx.example(node.args[LORA_A])
    dtypes = (f"{str(adapter.dtype).removeprefix('torch.')} adapters on a {str(base.dtype).removeprefix('torch.')} base"
              if base is not None and adapter is not None else "adapters in another dtype than the base")
    return (f"peft's mixed-precision projections ({dtypes}, lora_linear with out_dtype) stay fused one by one: "
            f"{op} takes one dtype for x, base weights and adapters")


def grouped_member_bias(node: Any) -> tuple[bool, Any]:
    """``(True, bias node or None)`` when ``node`` is one member's output (a ``getitem``) of a
    ``lora_linear_group``, else ``(False, None)``. Family detection reads projections through this:
    the members keep their module paths on these nodes."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return False, None
    group, index = node.args[0], node.args[1]
    if not (isinstance(group, fx.Node) and group.op == "call_function" and group.target in GROUP_TARGETS):
        return False, None
    biases, has_bias = group.args[3], group.args[4]
    return True, (biases[sum(has_bias[:index])] if has_bias[index] else None)


def can_group_lora(members: list[fx.Node], ctx: GraphContext) -> str | None:
    """Safety of merging ``members`` (same x and x_lora nodes) into one group op."""
    dtypes = set()
    for node in members:
        name = module_path(node) or node.name
        if reason := check_literal_number(f"{name}: scaling", node.args[SCALING]):
            return reason
        for label, idx in (("x", X), ("x_lora", X_LORA), ("weight", WEIGHT), ("lora_a", LORA_A), ("lora_b", LORA_B)):
            t = ctx.example(node.args[idx])
            if reason := check_tensor(f"{name}: {label}", t):
                return reason
            dtypes.add(t.dtype)
        if ctx.requires_grad(node.args[WEIGHT]):
            return f"{name}: the base weight requires grad; the group op gives it no gradient"
        bias = node.args[BIAS]
        if bias is not None and ctx.example(bias) is None:
            return f"{name}: bias is neither None nor a tensor with recorded metadata"
    if len(dtypes) != 1:
        return "members differ in dtype: " + ", ".join(sorted(str(d) for d in dtypes))
    return None


def _common_stack(nodes: list[fx.Node]) -> dict:
    """The longest ``nn_module_stack`` prefix all ``nodes`` share (their common parent module)."""
    stacks = [list((n.meta.get("nn_module_stack") or {}).items()) for n in nodes]
    common = []
    for entries in zip(*stacks):
        if any(e != entries[0] for e in entries[1:]):
            break
        common.append(entries[0])
    return dict(common)


def _site(members: list[fx.Node]) -> str:
    stack = _common_stack(members)
    if stack:
        return _clean_path(list(stack.values())[-1][0])
    return members[0].name


class GroupLoRA(Pass):
    name = "group_lora"
    op_names = ("graphtune.lora_linear_group",)

    def __call__(self, gm: fx.GraphModule, ctx: GraphContext | None = None) -> PassResult:
        ctx = ctx or GraphContext()
        result = PassResult(name=self.name)
        graph = gm.graph
        by_x: dict[fx.Node, list[fx.Node]] = {}
        mixed: dict[fx.Node, list[fx.Node]] = {}
        for node in graph.nodes:
            if is_lora_linear(node) and isinstance(node.args[X], fx.Node):
                by_x.setdefault(node.args[X], []).append(node)
            elif is_mixed_precision_lora_linear(node) and isinstance(node.args[X], fx.Node):
                mixed.setdefault(node.args[X], []).append(node)
        for x, readers in mixed.items():
            if len(readers) >= 2:
                result.refused.append(Refusal(site=_site(readers), rewrite="same_input",
                                              reason=mixed_precision_reason(readers[0], ctx, "lora_linear_group")))
        for x, readers in by_x.items():
            if len(readers) < 2:
                continue
            by_lora_input: dict[fx.Node, list[fx.Node]] = {}
            for node in readers:
                by_lora_input.setdefault(node.args[X_LORA], []).append(node)
            alone = [ms[0] for ms in by_lora_input.values() if len(ms) == 1]
            if len(alone) == len(readers):
                result.refused.append(Refusal(
                    site=_site(readers), rewrite="same_input",
                    reason=f"{len(readers)} LoRA projections read this input through different LoRA inputs "
                    "(lora_dropout > 0: one dropout mask per projection); merging them would change the masks",
                ))
                continue
            for x_lora, members in by_lora_input.items():
                if len(members) < 2:
                    continue
                rewrite = "same_input" if x_lora is x else "same_dropout_input"
                reason = can_group_lora(members, ctx) or self._order_problem(graph, members)
                if reason is not None:
                    result.refused.append(Refusal(site=_site(members), rewrite=rewrite, reason=reason))
                    continue
                self._replace(graph, x, x_lora, members)
                result.count += 1
                result.sites.append(_site(members))
                result.by_rewrite[rewrite] = result.by_rewrite.get(rewrite, 0) + 1
        if result.count:
            graph.lint()
            gm.recompile()
        return result

    @staticmethod
    def _order_problem(graph: fx.Graph, members: list[fx.Node]) -> str | None:
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min(order[m] for m in members)
        for m in members:
            for arg in m.args:
                if isinstance(arg, fx.Node) and order[arg] >= first:
                    return f"{arg.name} is computed after the first member; no insertion point keeps the graph in order"
        return None

    def _replace(self, graph: fx.Graph, x: fx.Node, x_lora: fx.Node, members: list[fx.Node]) -> None:
        order = {n: i for i, n in enumerate(graph.nodes)}
        members = sorted(members, key=order.__getitem__)
        biases = [m.args[BIAS] for m in members]
        args = (
            x,
            None if x_lora is x else x_lora,  # None: the LoRA input is x, so dx is one buffer
            [m.args[WEIGHT] for m in members],
            [b for b in biases if b is not None],
            [b is not None for b in biases],
            [m.args[LORA_A] for m in members],
            [m.args[LORA_B] for m in members],
            [float(m.args[SCALING]) for m in members],
        )
        with graph.inserting_before(members[0]):
            group = graph.call_function(torch.ops.graphtune.lora_linear_group, args)
            outs = [graph.call_function(operator.getitem, (group, i)) for i in range(len(members))]
        stack = _common_stack(members)
        if stack:
            group.meta["nn_module_stack"] = stack
        group.meta["graphtune_pass"] = self.name
        values = [m.meta.get("example_value") for m in members]
        if all(v is not None for v in values):
            group.meta["example_value"] = values
        for member, out in zip(members, outs):
            for key in _META_KEYS:
                if key in member.meta:
                    out.meta[key] = member.meta[key]
            out.meta["graphtune_pass"] = self.name
            member.replace_all_uses_with(out)
            graph.erase_node(member)
