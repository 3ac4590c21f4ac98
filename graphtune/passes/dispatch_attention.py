"""dispatch_attention: settle each ``graphtune::attention(..., "auto")`` node on one implementation.

The nodes come from graphtune's ``AttentionInterface`` function (:mod:`graphtune.attention`), one
per layer, carrying scale, causality, sliding window, softcap, the packed-document ids
(``graphtune::document_ids``), the 2-D padding mask and ``cu_seqlens``. Per node the pass reads
device, dtype, head dims, head counts, whether T == S is provable (no KV cache) and those
features, and picks (rules in :func:`graphtune.kernels.attention.select_implementation`):

* CPU (any non-CUDA device): ``reference`` -- the node stays, its ``impl`` argument becomes
  ``"reference"`` (exact math, chunked, backward recomputes P);
* plain causal on CUDA: ``sdpa`` (PyTorch's own backend priority, GQA in the call; ``sdpa_flash`` /
  ``sdpa_cudnn`` / ``sdpa_efficient`` pin one backend when forced) -- lowered to
  :func:`~graphtune.kernels.attention.sdpa_attention`;
* a 2-D padding mask without softcap: ``sdpa_masked`` (dense bool mask, memory-efficient SDPA);
* sliding window and/or documents with ``cu_seqlens``: ``flash`` (FlashAttention-2 with window
  and varlen) -- :func:`~graphtune.kernels.attention.flash_attention`;
* softcap (Gemma-2) or documents known only from position ids: ``flex`` --
  one :func:`~graphtune.kernels.attention.flex_block_mask` node shared by every layer with the same
  mask, and :func:`~graphtune.kernels.attention.flex_attention` per layer; aot_autograd traces these
  into FlexAttention's HOPs and inductor compiles them (forward and backward).

Before choosing, the pass simplifies the graph: identical ``document_ids`` nodes are merged (one
per graph instead of one per layer), and documents are dropped when the position ids provably
come from ``arange`` inside the model (the caller passed none: one document per row), so an
ordinary batch gets plain causal attention. ``GRAPHTUNE_ATTENTION=<impl>`` forces an
implementation wherever it applies.

The chosen implementation is visible three ways: the lowered call (or the ``'reference'``
argument) in the graph text, ``node.meta["graphtune_attention"]`` (impl and reason), and the
report's per-variant counts (``dispatch_attention  2 rewritten  [flash=1, sdpa_flash=1]``).

Never changes a node whose scale/causal/window/softcap are not literals, or whose q/k/v have no
recorded metadata (refused, reason reported; such a node keeps ``"auto"``, which runs the
reference). Numerics: every implementation computes the same attention; the reference matches
HF's eager attention to fp32 rounding.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from graphtune.kernels import attention as ka
from graphtune.passes._guards import known_eq
from graphtune.passes.base import GraphContext, Pass, Rewrite, module_path, module_stack
from graphtune.report import PassResult, Refusal

# dynamo records the op packet (``torch.ops.graphtune.attention``), aot graphs the overload
ATTENTION_TARGETS = (torch.ops.graphtune.attention, torch.ops.graphtune.attention.default)
DOCUMENT_IDS_TARGETS = (torch.ops.graphtune.document_ids, torch.ops.graphtune.document_ids.default)


def _is(node: Any, targets: tuple) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets

# argument positions of graphtune::attention
Q, K, V, SEQ_IDS, KV_MASK, CU_SEQLENS, SCALE, CAUSAL, WINDOW, SOFTCAP, IMPL = range(11)

_OTHER_ATTENTION = (torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.softmax)

# ops that keep "positions are arange along the last dim" true
_POSITION_PRESERVING_METHODS = {"unsqueeze", "expand", "to", "long", "int", "contiguous", "clone"}


def _value(node: Any) -> Any:
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def positions_are_arange(node: Any, depth: int = 0) -> bool:
    """True when ``node`` is ``arange(n) (+ scalar)`` broadcast over rows: one document per row."""
    if not isinstance(node, fx.Node) or depth > 16 or node.op not in ("call_function", "call_method"):
        return False
    target = node.target
    if node.op == "call_function" and target is torch.arange:
        step = node.kwargs.get("step", node.args[2] if len(node.args) > 2 else 1)
        return step == 1
    if node.op == "call_method" and target in _POSITION_PRESERVING_METHODS:
        return positions_are_arange(node.args[0], depth + 1)
    if node.op == "call_function" and target is torch.unsqueeze:
        return positions_are_arange(node.args[0], depth + 1)
    if node.op == "call_function" and target in (operator.add, torch.add, operator.sub, torch.sub):
        a, b = node.args[0], node.args[1]
        for x, y in ((a, b), (b, a)) if target in (operator.add, torch.add) else ((a, b),):
            other = _value(y)
            scalar = not isinstance(other, torch.Tensor) or other.dim() == 0
            if scalar and positions_are_arange(x, depth + 1):
                return True
    return False


def _attention_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if _is(n, ATTENTION_TARGETS)]


def _merge_document_ids(graph: fx.Graph) -> int:
    """One ``document_ids`` node per distinct argument tuple; returns how many were merged away."""
    first: dict[tuple, fx.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if not _is(node, DOCUMENT_IDS_TARGETS):
            continue
        key = tuple(node.args) + tuple(sorted(node.kwargs.items()))
        try:
            hash(key)
        except TypeError:
            continue
        if key in first:
            node.replace_all_uses_with(first[key])
            graph.erase_node(node)
            merged += 1
        else:
            first[key] = node
    return merged


def _drop_single_documents(graph: fx.Graph) -> int:
    """Remove documents that are provably one per row (positions from ``arange``, no cu_seqlens)."""
    dropped = 0
    for node in list(graph.nodes):
        if not _is(node, DOCUMENT_IDS_TARGETS):
            continue
        position_ids, cu_seqlens = node.args[0], node.args[1]
        if cu_seqlens is None and positions_are_arange(position_ids):
            for user in list(node.users):
                if _is(user, ATTENTION_TARGETS) and user.args[SEQ_IDS] is node:
                    args = list(user.args)
                    args[SEQ_IDS] = None
                    user.args = tuple(args)
            if not node.users:
                graph.erase_node(node)
                dropped += 1
    return dropped


def node_features(node: fx.Node, ctx: GraphContext) -> tuple[ka.AttentionFeatures | None, str | None]:
    """Features of one attention node, or a reason they cannot be read."""
    from graphtune.attention import features_of

    q, k, v = (ctx.example(node.args[i]) for i in (Q, K, V))
    if q is None or k is None or v is None:
        return None, "q/k/v have no recorded tensor metadata"
    scale, causal, window, softcap = (node.args[i] for i in (SCALE, CAUSAL, WINDOW, SOFTCAP))
    if not isinstance(scale, float) or isinstance(causal, fx.Node) or not isinstance(window, int) or not isinstance(softcap, float):
        return None, "scale/causal/window/softcap are not literals in the graph"
    return features_of(
        q, k, v,
        seq_ids=node.args[SEQ_IDS],
        kv_mask=node.args[KV_MASK],
        cu_seqlens=node.args[CU_SEQLENS],
        causal=bool(causal),
        window=window,
        softcap=softcap,
        same_length=known_eq(q.shape[2], k.shape[2]),
    ), None


def _copy_meta(src: fx.Node, dst: fx.Node, pass_name: str, record: dict[str, Any] | None = None) -> None:
    for key in ("nn_module_stack", "source_fn_stack", "stack_trace", "example_value"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    dst.meta["graphtune_pass"] = pass_name
    if record is not None:
        dst.meta["graphtune_attention"] = record


class DispatchAttention(Pass):
    name = "dispatch_attention"
    rewrites: Sequence[Rewrite] = ()
    op_names = ("graphtune.attention",)

    def __init__(
        self,
        extra_rewrites: Sequence[Rewrite] = (),
        force: str | None = None,
        choose: Callable[[ka.AttentionFeatures], tuple[str, str]] | None = None,
    ) -> None:
        """``force``: an implementation to use wherever it applies (as ``GRAPHTUNE_ATTENTION``);
        ``choose``: replaces the selection rules entirely (tests lower GPU paths on a CPU with it)."""
        super().__init__(extra_rewrites)
        self.force = force
        self.choose = choose

    def is_candidate_module(self, class_name: str, nodes: list[fx.Node]) -> bool:
        # an attention module computing attention some other way (SDPA / eager softmax): the model
        # does not run graphtune's attention interface
        return class_name.endswith("Attention") and any(n.op == "call_function" and n.target in _OTHER_ATTENTION for n in nodes)

    def __call__(self, gm: fx.GraphModule, ctx: GraphContext | None = None) -> PassResult:
        ctx = ctx or GraphContext()
        graph = gm.graph
        result = PassResult(name=self.name)
        nodes = _attention_nodes(graph)
        self._refuse_other_attention(graph, nodes, result)
        if not nodes:
            return result
        _merge_document_ids(graph)
        _drop_single_documents(graph)
        block_masks: dict[tuple, fx.Node] = {}
        for node in nodes:
            site = module_path(node) or node.name
            features, problem = node_features(node, ctx)
            if features is None:
                result.refused.append(Refusal(site=site, rewrite="auto", reason=problem))
                continue
            if self.choose is not None:
                impl, reason = self.choose(features)
            else:
                impl, reason = ka.select_implementation(features, force=self.force)
            record = {"impl": impl, "reason": reason}
            self._lower(graph, node, impl, record, block_masks)
            result.count += 1
            result.sites.append(site)
            result.by_rewrite[impl] = result.by_rewrite.get(impl, 0) + 1
        graph.lint()
        gm.recompile()
        return result

    def _refuse_other_attention(self, graph: fx.Graph, nodes: list[fx.Node], result: PassResult) -> None:
        """Attention modules that compute attention without graphtune's node: say why, once each."""
        done = {module_path(n) for n in nodes}
        for node in graph.nodes:
            if node.op != "call_function" or node.target not in _OTHER_ATTENTION:
                continue
            site = next((p for p, cls in reversed(module_stack(node)) if cls.endswith("Attention")), None)
            if site is None or site in done:
                continue
            done.add(site)
            result.refused.append(Refusal(
                site=site,
                rewrite="attention_interface",
                reason="attention runs through the model's own implementation (SDPA / eager softmax), not "
                "graphtune's AttentionInterface: switch the model with graphtune.attention.enable(model)",
            ))

    def _lower(self, graph: fx.Graph, node: fx.Node, impl: str, record: dict[str, Any], block_masks: dict[tuple, fx.Node]) -> None:
        a = node.args
        if impl == "reference":
            node.args = a[:IMPL] + ("reference",)
            node.meta["graphtune_pass"] = self.name
            node.meta["graphtune_attention"] = record
            return
        with graph.inserting_before(node):
            if impl == "sdpa_masked":
                new = graph.call_function(
                    ka.sdpa_masked_attention, (a[Q], a[K], a[V], a[SEQ_IDS], a[KV_MASK], a[SCALE], a[CAUSAL], a[WINDOW])
                )
            elif impl.startswith("sdpa"):
                backend = impl[len("sdpa_"):] if impl.startswith("sdpa_") else "auto"
                new = graph.call_function(ka.sdpa_attention, (a[Q], a[K], a[V], a[SCALE], a[CAUSAL], backend))
            elif impl == "flash":
                cu = a[CU_SEQLENS] if a[SEQ_IDS] is not None else None
                new = graph.call_function(ka.flash_attention, (a[Q], a[K], a[V], cu, None, a[SCALE], a[CAUSAL], a[WINDOW]))
            elif impl == "flex":
                key = (a[SEQ_IDS], a[KV_MASK], a[CAUSAL], a[WINDOW])
                mask = block_masks.get(key)
                if mask is None:
                    mask = graph.call_function(
                        ka.flex_block_mask_for, (a[Q], a[K], a[SEQ_IDS], a[KV_MASK], a[CAUSAL], a[WINDOW])
                    )
                    _copy_meta(node, mask, self.name)
                    mask.meta.pop("example_value", None)
                    block_masks[key] = mask
                new = graph.call_function(ka.flex_attention, (a[Q], a[K], a[V], mask, a[SCALE], a[SOFTCAP]))
            else:
                raise ValueError(f"unknown attention implementation {impl!r}")
        _copy_meta(node, new, self.name, record)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def attention_choices(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """``[{"site", "impl", "reason"}]`` for every dispatched attention node of a rewritten graph."""
    out = []
    for node in gm.graph.nodes:
        rec = node.meta.get("graphtune_attention")
        if rec is not None:
            out.append({"site": module_path(node) or node.name, **rec})
    return out
