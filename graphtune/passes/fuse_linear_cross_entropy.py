"""fuse_linear_cross_entropy: ``lm_head`` -> (softcap) -> HF ``ForCausalLMLoss`` -> ``graphtune::linear_cross_entropy``.

Matches what a causal LM's ``forward(..., labels=...)`` leaves in the graph (transformers 5.x)::

    logits = linear(hidden, W, b)                        # lm_head
    logits = tanh(logits / cap) * cap                    # Gemma-2 final_logit_softcapping (optional)
    flat   = logits.float().view(-1, V)
    loss   = cross_entropy(flat, target, ignore_index=i, reduction="mean")       # or:
    loss   = cross_entropy(flat, target, ignore_index=i, reduction="sum") / n    # num_items_in_batch

``target`` is whatever feeds the loss (HF's label pad/shift/view chain, or the caller's
``shift_labels``); that integer chain stays in the graph. ``n`` is a tensor (HF moves it with
``.to(device)``; the op then divides by it) or a Python number / symbolic int (the division stays a
graph node after the op's summed loss). The op computes the loss and the gradients chunk by chunk
(see :mod:`graphtune.kernels.linear_cross_entropy`), so neither the ``[N, V]`` logits nor their fp32
copy nor their gradient is ever allocated.

**The logits output.** The logits are also a graph output (``outputs.logits``). When the pass fires
it returns an empty tensor of shape ``[*hidden.shape[:-1], 0]`` (logits' dtype) there instead: no
``[N, V]`` allocation, and code that reads the logits fails loudly instead of seeing stale numbers.
Real logits: call the model without labels, or under ``torch.no_grad()`` (evaluation: HF's
Trainer does both), which captures a separate graph that this pass leaves alone; or leave the pass
out (``graphtune.optimize(model, passes=[...])`` without ``"fuse_linear_cross_entropy"``).

Never fires when: no gradient reaches the loss (eval / no_grad graphs keep their logits); the logits
(or any intermediate) feed anything besides the loss and the graph output; hidden, weight, bias and
logits differ in dtype (autocast); the target is not an integer tensor (soft labels); the view's
width is not the weight's row count; ``ignore_index``/softcap are not literals; or the divisor tensor
holds more than one value or requires grad.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.nn.functional import cross_entropy, linear

import graphtune.kernels.linear_cross_entropy  # noqa: F401  (registers graphtune::linear_cross_entropy)
from graphtune.passes._guards import check_literal_number, check_tensor, known_eq
from graphtune.passes.base import GraphContext, Match, Pass, Rewrite, module_path, trace_pattern
from graphtune.report import PassResult

_OP = torch.ops.graphtune.linear_cross_entropy
# argument positions of graphtune::linear_cross_entropy
HIDDEN, WEIGHT, BIAS, TARGET, IGNORE, SOFTCAP, REDUCTION, DIVISOR, NEED_H, NEED_W, NEED_B = range(11)


# ----------------------------------------------------------------------------------------------
# Patterns: pieces shared by the six variants ({mean, sum / tensor, sum / number} x {softcap, none})
# ----------------------------------------------------------------------------------------------
def _capped(logits, cap):
    return torch.tanh(logits / cap) * cap  # Gemma2ForCausalLM: / cap, tanh, * cap


def _hf_loss(logits, target, vocab, ignore_index, reduction):
    return cross_entropy(logits.float().view(-1, vocab), target, ignore_index=ignore_index, reduction=reduction)


def mean_pattern(hidden, weight, bias, target, vocab, ignore_index):
    logits = linear(hidden, weight, bias)
    return _hf_loss(logits, target, vocab, ignore_index, "mean"), logits


def mean_softcap_pattern(hidden, weight, bias, target, vocab, ignore_index, cap):
    logits = _capped(linear(hidden, weight, bias), cap)
    return _hf_loss(logits, target, vocab, ignore_index, "mean"), logits


def sum_tensor_pattern(hidden, weight, bias, target, vocab, ignore_index, num_items, device):
    logits = linear(hidden, weight, bias)
    return _hf_loss(logits, target, vocab, ignore_index, "sum") / num_items.to(device), logits


def sum_tensor_softcap_pattern(hidden, weight, bias, target, vocab, ignore_index, cap, num_items, device):
    logits = _capped(linear(hidden, weight, bias), cap)
    return _hf_loss(logits, target, vocab, ignore_index, "sum") / num_items.to(device), logits


def sum_number_pattern(hidden, weight, bias, target, vocab, ignore_index, num_items):
    logits = linear(hidden, weight, bias)
    return _hf_loss(logits, target, vocab, ignore_index, "sum") / num_items, logits


def sum_number_softcap_pattern(hidden, weight, bias, target, vocab, ignore_index, cap, num_items):
    logits = _capped(linear(hidden, weight, bias), cap)
    return _hf_loss(logits, target, vocab, ignore_index, "sum") / num_items, logits


# ----------------------------------------------------------------------------------------------
# Replacements: the op's loss, and an empty tensor where the logits were returned
# ----------------------------------------------------------------------------------------------
def _fused(hidden, weight, bias, target, ignore_index, cap, reduction, divisor):
    # the three need_* flags are placeholders here; FuseLinearCrossEntropy sets them per site
    return _OP(hidden, weight, bias, target, ignore_index, cap, reduction, divisor, True, True, True)[0]


def _no_logits(hidden):
    return torch.empty_like(hidden[..., :0])  # [*hidden.shape[:-1], 0]: a new tensor, no view


def mean_replacement(hidden, weight, bias, target, vocab, ignore_index):
    return _fused(hidden, weight, bias, target, ignore_index, 0.0, "mean", None), _no_logits(hidden)


def mean_softcap_replacement(hidden, weight, bias, target, vocab, ignore_index, cap):
    return _fused(hidden, weight, bias, target, ignore_index, cap, "mean", None), _no_logits(hidden)


def sum_tensor_replacement(hidden, weight, bias, target, vocab, ignore_index, num_items, device):
    return _fused(hidden, weight, bias, target, ignore_index, 0.0, "sum", num_items.to(device)), _no_logits(hidden)


def sum_tensor_softcap_replacement(hidden, weight, bias, target, vocab, ignore_index, cap, num_items, device):
    return _fused(hidden, weight, bias, target, ignore_index, cap, "sum", num_items.to(device)), _no_logits(hidden)


def sum_number_replacement(hidden, weight, bias, target, vocab, ignore_index, num_items):
    return _fused(hidden, weight, bias, target, ignore_index, 0.0, "sum", None) / num_items, _no_logits(hidden)


def sum_number_softcap_replacement(hidden, weight, bias, target, vocab, ignore_index, cap, num_items):
    return _fused(hidden, weight, bias, target, ignore_index, cap, "sum", None) / num_items, _no_logits(hidden)


# fx's tracer spells out cross_entropy's defaults; dynamo records only what HF passed
_CE_DEFAULTS = {"weight": None, "size_average": None, "reduce": None, "label_smoothing": 0.0}


class LossRewrite(Rewrite):
    """A Rewrite whose traced pattern drops ``cross_entropy``'s default kwargs (see ``trace_pattern``)."""

    def instances(self, graph: fx.Graph) -> list[tuple[dict, fx.GraphModule]]:
        gm = trace_pattern(self.pattern)
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is cross_entropy:
                node.kwargs = {k: v for k, v in node.kwargs.items() if not (k in _CE_DEFAULTS and _CE_DEFAULTS[k] == v)}
        gm.recompile()
        return [({}, gm)]


# the tensor-divisor variants come before the number ones, which would also match them (n = the .to node)
REWRITES = (
    LossRewrite("hf_mean", mean_pattern, mean_replacement),
    LossRewrite("hf_mean_softcap", mean_softcap_pattern, mean_softcap_replacement),
    LossRewrite("hf_sum_over_tensor", sum_tensor_pattern, sum_tensor_replacement),
    LossRewrite("hf_sum_over_tensor_softcap", sum_tensor_softcap_pattern, sum_tensor_softcap_replacement),
    LossRewrite("hf_sum_over_number", sum_number_pattern, sum_number_replacement),
    LossRewrite("hf_sum_over_number_softcap", sum_number_softcap_pattern, sum_number_softcap_replacement),
)


# ----------------------------------------------------------------------------------------------
# Guard
# ----------------------------------------------------------------------------------------------
def _find(match: Match, target) -> fx.Node | None:
    return next((n for n in match.nodes if n.op == "call_function" and n.target is target), None)


def _logits_output(match: Match) -> fx.Node:
    loss = _loss_output(match)
    return next(o for o in match.outputs if o is not loss)


def _loss_output(match: Match) -> fx.Node:
    ce = _find(match, cross_entropy)
    return next(o for o in match.outputs if o is ce or (o.op == "call_function" and o.args and o.args[0] is ce))


def can_fuse_linear_cross_entropy(match: Match, ctx: GraphContext) -> str | None:
    inputs = match.inputs
    lin = _find(match, linear)
    logits_out = _logits_output(match)
    loss = _loss_output(match)
    tensors = {
        "hidden": ctx.example(inputs["hidden"]),
        "weight": ctx.example(inputs["weight"]),
        "logits": ctx.example(lin),
    }
    for name, t in tensors.items():
        if reason := check_tensor(name, t):
            return reason
    bias = inputs["bias"]
    if bias is not None:
        if (b := ctx.example(bias)) is None:
            return "bias is neither None nor a tensor"
        tensors["bias"] = b
    if len({t.dtype for t in tensors.values()}) != 1:
        return "hidden, weight, bias and logits differ in dtype (autocast?): " + ", ".join(f"{k}={v.dtype}" for k, v in tensors.items())
    weight = tensors["weight"]
    if weight.dim() != 2:
        return f"lm_head weight is not 2-D ({tuple(weight.shape)})"
    if tensors["hidden"].device != weight.device:
        return f"hidden on {tensors['hidden'].device}, lm_head weight on {weight.device}"
    if isinstance(inputs["ignore_index"], bool) or not isinstance(inputs["ignore_index"], int):
        return f"ignore_index is not a literal int ({inputs['ignore_index']!r})"
    if "cap" in inputs:
        if reason := check_literal_number("softcap", inputs["cap"]):
            return reason
        if not inputs["cap"] > 0:
            return f"softcap {inputs['cap']} is not positive"
    vocab = inputs["vocab"]
    if isinstance(vocab, fx.Node) or not known_eq(vocab, weight.shape[0]):
        return f"logits are viewed as [-1, {vocab}] but lm_head has {weight.shape[0]} rows"
    target = ctx.example(inputs["target"])
    if target is None:
        return "target has no recorded tensor metadata"
    if target.is_floating_point() or target.dtype == torch.bool or target.dim() != 1:
        return f"target is not a 1-D tensor of class indices ({target.dtype}, {target.dim()}-D): soft labels are not fused"
    if "device" in inputs:
        divisor = ctx.example(inputs["num_items"])
        if divisor is None:
            return "num_items_in_batch has no recorded tensor metadata"
        if divisor.numel() != 1 or divisor.dim() != 0:
            return f"num_items_in_batch has shape {tuple(divisor.shape)}; the op divides by a 0-d tensor"
        if divisor.requires_grad:
            return "num_items_in_batch requires grad; the op gives it none"
    loss_ex = ctx.example(loss)
    if loss_ex is None or not loss_ex.requires_grad:
        return "no gradient flows to the loss (an eval / no_grad graph): the logits are kept for the caller"
    matched = set(match.nodes)
    others = [u for u in logits_out.users if u not in matched and u.op != "output"]
    if others:
        return "the logits are used by " + ", ".join(u.name for u in others) + " besides the loss and the model output"
    return None


class FuseLinearCrossEntropy(Pass):
    name = "fuse_linear_cross_entropy"
    rewrites = REWRITES
    op_names = ("graphtune.linear_cross_entropy",)

    def __init__(self, extra_rewrites=()) -> None:
        super().__init__(extra_rewrites)
        self._sites: dict[str, str] = {}  # match.site -> the lm_head's module path, per call

    def guard(self, match: Match, ctx: GraphContext) -> str | None:
        lin = _find(match, linear)
        # report the site under the lm_head's module path, where the unmatched audit looks
        self._sites[match.site] = (module_path(lin) if lin is not None else "") or match.site
        return can_fuse_linear_cross_entropy(match, ctx)

    def __call__(self, gm: fx.GraphModule, ctx: GraphContext | None = None) -> PassResult:
        ctx = ctx or GraphContext()
        self._sites = {}
        result = super().__call__(gm, ctx)
        result.sites = [self._sites.get(s, s) for s in result.sites]
        for r in result.refused:
            r.site = self._sites.get(r.site, r.site)
        if result.count:
            self._settle(gm, ctx)
        return result

    def _settle(self, gm: fx.GraphModule, ctx: GraphContext) -> None:
        """Set each new op's gradient flags from the graph, and give the empty logits their true metadata."""
        for node in gm.graph.nodes:
            if node.meta.get("graphtune_pass") != self.name:
                continue
            if node.op == "call_function" and node.target is _OP:
                args = list(node.args)
                args[NEED_H] = ctx.requires_grad(args[HIDDEN])
                args[NEED_W] = ctx.requires_grad(args[WEIGHT])
                args[NEED_B] = args[BIAS] is not None and ctx.requires_grad(args[BIAS])
                node.args = tuple(args)
            elif node.op == "call_function" and node.target is torch.empty_like:
                hidden = ctx.example(node.args[0].args[0])  # empty_like(hidden[..., :0])
                if hidden is not None:
                    node.meta["example_value"] = hidden.new_empty((*hidden.shape[:-1], 0))
        gm.recompile()

    def is_candidate_module(self, class_name: str, nodes: list[fx.Node]) -> bool:
        # an lm_head Linear whose logits reach a cross_entropy (a training or evaluation loss)
        if class_name != "Linear" or not nodes or not module_path(nodes[0]).split(".")[-1] == "lm_head":
            return False
        return any(_reaches_cross_entropy(n) for n in nodes)


def _reaches_cross_entropy(node: fx.Node, depth: int = 8) -> bool:
    """True if ``cross_entropy`` consumes ``node`` within ``depth`` steps (softcap, float, view)."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.op == "call_function" and u.target is cross_entropy:
                    return True
                nxt.append(u)
        frontier = nxt
    return False
