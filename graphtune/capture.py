"""Capture: a torch._dynamo backend that receives the torch-level FX graph of a whole model forward.

Why dynamo (see shared notes/capture.md): transformers 5.x has no fx tracer, ``symbolic_trace``
fails on every model, and strict ``torch.export`` silently drops QLoRA gradients. A dynamo backend
with ``fullgraph=True`` sees one graph with torch-level ops (``linear``, ``rsqrt``, ``.to``),
literal scalars (eps, scale) and ``nn_module_stack`` metadata; we rewrite it there, then hand it to
``aot_autograd`` (inductor or ``aot_eager``) so the forward *and* backward are compiled.

Batch and sequence dims are marked dynamic per call (``maybe_mark_dynamic``), not ``dynamic=True``,
which would turn float attributes (eps, LoRA scaling) into tensor inputs and hide them from patterns.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from graphtune.canonical import canonical_text
from graphtune.passes import Pass, run_pipeline
from graphtune.passes.base import GraphContext, module_stack
from graphtune.report import PassResult, Report, Unmatched

COMPILERS = ("inductor", "aot_eager", "eager")


@dataclasses.dataclass
class CapturedGraph:
    """One graph dynamo handed to the backend, after the rewrite passes ran."""

    gm: fx.GraphModule
    ctx: GraphContext
    report: Report


def build_context(gm: fx.GraphModule, example_inputs: Sequence[Any], module: torch.nn.Module) -> GraphContext:
    """Map graph placeholders back to the module's parameter/buffer FQNs (by tensor identity)."""
    by_id: dict[int, str] = {}
    trainable: set[str] = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), name)
        if p.requires_grad:
            trainable.add(name)
    for name, b in module.named_buffers(remove_duplicate=False):
        by_id.setdefault(id(b), name)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names: dict[str, str] = {}
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, torch.Tensor) and id(value) in by_id:
            names[node.name] = by_id[id(value)]
    return GraphContext(param_names=names, trainable=trainable)


def audit(gm: fx.GraphModule, passes: Sequence[Pass], results: Sequence[PassResult]) -> list[Unmatched]:
    """Modules that look like something a pass handles but were not rewritten (never silently skipped)."""
    groups: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        for path, cls in module_stack(node):
            groups.setdefault(path, (cls, []))[1].append(node)
    unmatched = []
    for p, res in zip(passes, results):
        refusals = {r.site: r.reason for r in res.refused}
        for path, (cls, nodes) in groups.items():
            if not p.is_candidate_module(cls, nodes):
                continue
            if any(n.meta.get("graphtune_pass") == p.name for n in nodes):
                continue
            reason = refusals.get(path, "no pattern variant of this pass matched the module's subgraph")
            unmatched.append(Unmatched(module=path, module_class=cls, expected_pass=p.name, reason=reason))
    return unmatched


def analyze(gm: fx.GraphModule, ctx: GraphContext, passes: Sequence[Pass], results: Sequence[PassResult]) -> Report:
    """Family detection, expected-count check and unmatched audit for a rewritten graph."""
    from graphtune.patterns import detect_family, extract_features

    counts = {r.name: dict(r.by_rewrite) for r in results}
    features = extract_features(gm.graph, counts)
    family, reason = (None, "nothing was rewritten") if not any(r.count for r in results) else detect_family(features)
    report = Report(
        family=family.name if family else None,
        family_reason=reason,
        passes=list(results),
        unmatched=audit(gm, passes, results),
        graph_text=canonical_text(gm, ctx.param_names),
    )
    if family is not None and features.layers:
        expected = family.expected_counts(features.layers)
        names = {r.name for r in results}
        report.expected_counts = {k: v for k, v in expected.items() if k in names}
        for r in results:
            exp = report.expected_counts.get(r.name)
            if exp is not None and exp != r.count:
                report.warnings.append(f"{r.name}: rewrote {r.count} sites, {family.name} with {features.layers} layers expects {exp}")
    return report


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], compiler: str | Callable) -> Callable:
    """Hand the rewritten graph to aot_autograd (inductor / aot_eager) or run it as is (eager)."""
    if callable(compiler):
        return compiler(gm, example_inputs)
    if compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, list(example_inputs))
    if compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    if compiler == "eager":
        return gm.forward
    raise ValueError(f"compiler must be one of {', '.join(COMPILERS)} or a dynamo backend callable, not {compiler!r}")


def make_backend(
    module: torch.nn.Module,
    passes: Sequence[Pass],
    compiler: str | Callable,
    on_capture: Callable[[CapturedGraph], None],
) -> Callable:
    """A dynamo backend: rewrite the graph with ``passes``, report it, then compile it."""

    def graphtune_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        ctx = build_context(gm, example_inputs, module)
        results = run_pipeline(gm, passes, ctx)
        report = analyze(gm, ctx, passes, results)
        on_capture(CapturedGraph(gm=gm, ctx=ctx, report=report))
        return compile_graph(gm, example_inputs, compiler)

    return graphtune_backend


_entry_counter = 0


def fresh_entry(fn: Callable) -> Callable:
    """A wrapper of ``fn`` with its own code object.

    Dynamo keeps its compiled-code cache (and recompile limit) per code object; every optimized model
    gets its own entry so that one model's recompiles never evict or block another's.
    """
    global _entry_counter
    _entry_counter += 1

    def graphtune_entry(*args, **kwargs):
        return fn(*args, **kwargs)

    code = graphtune_entry.__code__.replace(co_name=f"graphtune_entry_{_entry_counter}")
    return types.FunctionType(code, graphtune_entry.__globals__, code.co_name, None, graphtune_entry.__closure__)


def mark_dynamic_inputs(args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """Batch and sequence dims of every input tensor may vary without a recompile."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            for dim in range(min(value.dim(), 2)):
                torch._dynamo.maybe_mark_dynamic(value, dim)


def capture(
    module: torch.nn.Module,
    forward: Callable,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    passes: Sequence[Pass],
) -> tuple[CapturedGraph, Any]:
    """Capture ``forward(*args, **kwargs)`` once, run ``passes``, execute the rewritten graph eagerly.

    Returns the captured graph and the forward's outputs. Used by :func:`graphtune.explain`.
    """
    captured: list[CapturedGraph] = []
    backend = make_backend(module, passes, "eager", captured.append)
    compiled = torch.compile(fresh_entry(forward), backend=backend, fullgraph=True)
    mark_dynamic_inputs(args, kwargs)
    out = compiled(*args, **kwargs)
    if not captured:
        raise RuntimeError("dynamo produced no graph for this forward")
    return captured[-1], out
