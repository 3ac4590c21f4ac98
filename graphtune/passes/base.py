"""The pass framework: a pass is patterns + replacements + an explicit guard, applied to a torch-level FX graph.

How a pass works (inductor's pattern matcher, simplified to what graphtune needs):

* a **pattern** is a plain Python function traced with ``torch.fx`` into a small graph; its arguments
  are wildcards that match graph nodes *or* literals (so ``eps`` or ``offset`` match whatever constant
  the model used). Literals that shape the graph itself (a slice bound such as ``head_dim // 2``) are
  bound by a ``literals`` function that reads candidate values off the graph, one pattern per value.
* the **replacement** is a plain function over the same arguments, traced the same way and copied
  into the graph in place of the matched nodes.
* the **guard** (``Pass.guard``) decides whether a structurally matched site is safe to rewrite; it
  returns ``None`` or a human-readable reason. A refused site keeps its original nodes and its reason
  lands in the report: a rewrite that cannot prove its guard leaves the graph unchanged.
* ``Pass.candidates`` names the modules that *look like* they should have been rewritten; anything
  among them that no rewrite touched is reported as unmatched, never silently skipped.

A pass is called as ``result = my_pass(gm, ctx)`` and mutates ``gm`` in place (the pipeline owns the
copy); ``result.count`` is the number of rewritten sites.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from graphtune.report import PassResult, Refusal

__all__ = ["GraphContext", "Match", "Pass", "Rewrite", "module_path", "module_stack", "trace_pattern"]

# fx's tracer records functional ops with their default kwargs spelled out (``silu(x, inplace=False)``)
# while dynamo records them exactly as the model called them (``silu(x)``): drop those defaults.
_DEFAULT_KWARGS: dict[Callable, dict[str, Any]] = {
    torch.nn.functional.silu: {"inplace": False},
    torch.nn.functional.gelu: {"approximate": "none"},
}


def trace_pattern(fn: Callable) -> fx.GraphModule:
    """Trace a pattern or replacement function into a graph whose node forms match dynamo's."""
    gm = fx.symbolic_trace(fn)
    for node in gm.graph.nodes:
        defaults = _DEFAULT_KWARGS.get(node.target) if node.op == "call_function" else None
        if defaults:
            node.kwargs = {k: v for k, v in node.kwargs.items() if not (k in defaults and defaults[k] == v)}
    gm.recompile()
    return gm


_DYNAMO_PREFIX = re.compile(r"^L\['[^']+'\](\[\d+\])?")
_DICT_MODULES = re.compile(r"\.__dict__\['_modules'\]\['([^']+)'\]|\._modules\['([^']+)'\]")


def _clean_path(path: str) -> str:
    """``L['self'].__dict__['_modules']['base_model'].model.layers.0`` -> ``base_model.model.layers.0``."""
    path = _DYNAMO_PREFIX.sub("", path)
    path = _DICT_MODULES.sub(lambda m: "." + (m.group(1) or m.group(2)), path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = path.lstrip(".")
    while path.startswith("__self__"):  # reached through a bound method (graphtune's entry)
        path = path[len("__self__"):].lstrip(".")
    return path


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """The node's module nesting as ``[(clean path, class name), ...]``, outermost first.

    Only the model's own submodules: a module reached through a global (transformers 5.25 wraps
    functions such as ``apply_rotary_pos_emb`` in hub-kernel modules, which dynamo records as
    ``G['__import_transformers_...'].apply_rotary_pos_emb``) is not part of the model's tree and
    would otherwise hide the attention layer the node belongs to."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        clean = _clean_path(path)
        if clean.startswith("G["):
            continue
        name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        out.append((clean, name.rsplit(".", 1)[-1]))
    return out


def module_path(node: fx.Node) -> str:
    """Clean path of the innermost module that produced ``node`` ("" at top level)."""
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


@dataclasses.dataclass
class GraphContext:
    """What passes may know about the captured graph besides the graph itself.

    ``param_names`` maps placeholder names to parameter/buffer FQNs of the captured module; a guard
    uses it with ``requires_grad`` to tell a frozen weight from a trainable one.
    """

    param_names: dict[str, str] = dataclasses.field(default_factory=dict)
    trainable: set[str] = dataclasses.field(default_factory=set)

    def example(self, value: Any) -> torch.Tensor | None:
        """The fake tensor dynamo recorded for a node, or None for literals/unknown nodes."""
        if isinstance(value, fx.Node):
            ex = value.meta.get("example_value", value.meta.get("val"))
            return ex if isinstance(ex, torch.Tensor) else None
        return None

    def param_name(self, value: Any) -> str | None:
        if isinstance(value, fx.Node) and value.op == "placeholder":
            return self.param_names.get(value.name)
        return None

    def requires_grad(self, value: Any) -> bool:
        ex = self.example(value)
        if ex is not None:
            return bool(ex.requires_grad)
        name = self.param_name(value)
        return name in self.trainable if name else False


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One pattern -> replacement pair of a pass.

    ``pattern`` is a function, or, when ``literals`` is given, a factory ``pattern(**literal_values)``
    returning the function; ``literals(graph)`` yields the literal bindings worth trying.
    """

    name: str
    pattern: Callable
    replacement: Callable
    literals: Callable[[fx.Graph], Iterable[dict[str, Any]]] | None = None

    def instances(self, graph: fx.Graph) -> list[tuple[dict[str, Any], fx.GraphModule]]:
        if self.literals is None:
            return [({}, trace_pattern(self.pattern))]
        return [(binding, trace_pattern(self.pattern(**binding))) for binding in self.literals(graph)]


@dataclasses.dataclass
class Match:
    """A structurally matched site, handed to the guard before anything changes."""

    rewrite: Rewrite
    inputs: dict[str, Any]  # pattern argument name -> graph node or literal
    outputs: list[fx.Node]
    nodes: list[fx.Node]  # matched interior nodes (not inputs)
    literals: dict[str, Any]

    @property
    def site(self) -> str:
        return module_path(self.outputs[0]) or self.outputs[0].name


class Pass:
    """Base class of a rewrite pass; subclasses set ``name``, ``rewrites`` and override ``guard``.

    ``op_names`` are the custom ops the pass inserts (used to tell which modules were rewritten) and
    ``candidate_modules`` a predicate over module class names for the unmatched-module audit.
    """

    name: str = "pass"
    rewrites: Sequence[Rewrite] = ()
    op_names: tuple[str, ...] = ()

    def __init__(self, extra_rewrites: Sequence[Rewrite] = ()) -> None:
        # family variants are the more specific patterns (Phi-3's partial rotary contains the plain
        # rotate-half), so they are tried first
        self.all_rewrites: list[Rewrite] = list(extra_rewrites) + list(self.rewrites)

    # -- hooks -------------------------------------------------------------------------------
    def guard(self, match: Match, ctx: GraphContext) -> str | None:
        """Return None when the rewrite is provably safe, else the reason it is refused."""
        return None

    def is_candidate_module(self, class_name: str, nodes: list[fx.Node]) -> bool:
        """True for modules this pass is expected to rewrite (the unmatched audit)."""
        return False

    # -- driver ------------------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, ctx: GraphContext | None = None) -> PassResult:
        ctx = ctx or GraphContext()
        result = PassResult(name=self.name)
        graph = gm.graph
        for rewrite in self.all_rewrites:
            for binding, pattern_gm in rewrite.instances(graph):
                matcher = SubgraphMatcher(
                    pattern_gm.graph,
                    match_output=False,
                    match_placeholder=False,
                    remove_overlapping_matches=True,
                    ignore_literals=False,
                )
                for im in matcher.match(graph):
                    if any(n.graph is not graph or _erased(n) for n in im.nodes_map.values() if isinstance(n, fx.Node)):
                        continue  # overlapped an earlier rewrite of this pass
                    match = _to_match(rewrite, pattern_gm, im, binding)
                    reason = self.guard(match, ctx)
                    if reason is not None:
                        result.refused.append(Refusal(site=match.site, rewrite=rewrite.name, reason=reason))
                        continue
                    anchor = _insertion_point(graph, match)
                    if anchor is None:
                        result.refused.append(Refusal(site=match.site, rewrite=rewrite.name, reason="no insertion point keeps the graph in topological order"))
                        continue
                    _replace(gm, match, rewrite, binding, self.name, anchor)
                    result.count += 1
                    result.sites.append(match.site)
                    result.by_rewrite[rewrite.name] = result.by_rewrite.get(rewrite.name, 0) + 1
        if result.count:
            graph.lint()
            gm.recompile()
        return result


def _erased(node: fx.Node) -> bool:
    return getattr(node, "_erased", False)


def _to_match(rewrite: Rewrite, pattern_gm: fx.GraphModule, im: InternalMatch, binding: dict[str, Any]) -> Match:
    inputs: dict[str, Any] = {}
    interior: list[fx.Node] = []
    for pn, gn in im.nodes_map.items():
        if pn.op == "placeholder":
            inputs[pn.target] = gn
        elif pn.op != "output":
            interior.append(gn)
    return Match(rewrite=rewrite, inputs=inputs, outputs=list(im.returning_nodes), nodes=interior, literals=binding)


def _insertion_point(graph: fx.Graph, match: Match) -> fx.Node | None:
    """Where the replacement goes: before the first output if every input is defined by then, else
    before the last output if no output is used before it; None if neither keeps topological order.

    (The graph is never re-sorted: dynamo's placeholders carry attributes a graph copy would lose.)
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs = [v for v in match.inputs.values() if isinstance(v, fx.Node)]
    matched = set(match.nodes)
    outs = sorted(match.outputs, key=order.__getitem__)
    for anchor in (outs[0], outs[-1]):
        pos = order[anchor]
        if all(order[i] < pos for i in inputs) and all(
            order[u] > pos for o in outs for u in o.users if u not in matched
        ):
            return anchor
    return None


def _replace(gm: fx.GraphModule, match: Match, rewrite: Rewrite, binding: dict[str, Any], pass_name: str, anchor: fx.Node) -> None:
    graph = gm.graph
    repl_fn = rewrite.replacement(**binding) if rewrite.literals is not None and binding else rewrite.replacement
    repl = trace_pattern(repl_fn)
    order = {n: i for i, n in enumerate(graph.nodes)}
    template = match.outputs[0]
    val_map: dict[fx.Node, Any] = {}
    new_outputs: list[Any] = []
    new_nodes: list[fx.Node] = []
    with graph.inserting_before(anchor):
        for rn in repl.graph.nodes:
            if rn.op == "placeholder":
                val_map[rn] = match.inputs[rn.target]
            elif rn.op == "output":
                out = rn.args[0]
                new_outputs = list(out) if isinstance(out, (tuple, list)) else [out]
                new_outputs = [fx.map_arg(o, lambda n: val_map[n]) if isinstance(o, fx.Node) else o for o in new_outputs]
            else:
                node = graph.node_copy(rn, lambda n: val_map[n])
                val_map[rn] = node
                new_nodes.append(node)
    if len(new_outputs) != len(match.outputs):
        raise RuntimeError(
            f"{pass_name}/{rewrite.name}: replacement returns {len(new_outputs)} values, pattern returns {len(match.outputs)}"
        )
    for node in new_nodes:
        for key in ("nn_module_stack", "source_fn_stack", "stack_trace"):
            if key in template.meta:
                node.meta[key] = template.meta[key]
        node.meta["graphtune_pass"] = pass_name
    for old, new in zip(match.outputs, new_outputs):
        if isinstance(new, fx.Node) and "example_value" in old.meta:
            new.meta["example_value"] = old.meta["example_value"]
    for node in new_nodes:  # a multi-output op feeding getitems: its value is the tuple of theirs
        if "example_value" not in node.meta and node.users and all(
            u.target is operator.getitem for u in node.users
        ):
            vals = {u.args[1]: u.meta.get("example_value") for u in node.users}
            if all(v is not None for v in vals.values()) and sorted(vals) == list(range(len(vals))):
                node.meta["example_value"] = tuple(vals[i] for i in range(len(vals)))
    for old, new in zip(match.outputs, new_outputs):
        old.replace_all_uses_with(new)
    for node in sorted(match.nodes, key=order.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)
