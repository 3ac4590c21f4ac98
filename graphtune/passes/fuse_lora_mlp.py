"""fuse_lora_mlp: LoRA gate/up -> ``graphtune::swiglu`` / ``graphtune::geglu`` -> LoRA down as one ``graphtune::lora_mlp``.

Runs after fuse_lora and fuse_swiglu / fuse_geglu, on the nodes they produced::

    gate = lora_linear(x, x, Wg, bg, Ag, Bg, sg).to(dt)      # Phi-3: gate_up = lora_linear(...).to(dt)
    up   = lora_linear(x, x, Wu, bu, Au, Bu, su).to(dt)      #        gate, up = gate_up.chunk(2, dim=-1)
    p    = swiglu(gate, up)          (or geglu)
    y    = lora_linear(p, p, Wd, bd, Ad, Bd, sd).to(dt)
      ->  y = lora_mlp(x, [Wg, Wu, Wd], ..., activation, recompute_gate_up)[0].to(dt)

The fused op's backward recomputes the activation product ``p`` instead of saving it (and, with
``FuseLoRAMLP(recompute_gate_up=True)``, gate and up too, saving only x); see
:mod:`graphtune.kernels.lora_mlp` for the bytes saved per layer. The ``.to(dt)`` casts inside the
block must be no-ops (they are: fuse_lora requires x and the weights to share one dtype).

Never fires when: any of the three projections has no LoRA (it is then not a ``lora_linear``);
lora_dropout > 0 (the down projection's LoRA reads peft's ``dropout(p)``, which needs ``p``
materialised -- refused with that reason, the block keeps its lora_linear/GLU nodes and q/k/v are
still grouped by group_lora); the projections are peft's mixed-precision form (fp32 adapters on a
half base: ``lora_linear`` with ``out_dtype``, refused with that reason); a scaling is not a literal;
dtypes differ or a cast is not a no-op;
a base weight requires grad; weight shapes do not chain; or an intermediate (gate, up, p) is used
outside the block.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch.nn.functional import dropout

import graphtune.kernels.lora_mlp  # noqa: F401  (registers graphtune::lora_mlp)
from graphtune.passes._guards import check_literal_number, check_tensor, known_eq
from graphtune.passes.base import GraphContext, Match, Pass, Rewrite, module_path, module_stack
from graphtune.passes.group_lora import is_lora_linear, is_mixed_precision_lora_linear, mixed_precision_reason
from graphtune.report import PassResult, Refusal

LL = torch.ops.graphtune.lora_linear
LORA_MLP_TARGETS = (torch.ops.graphtune.lora_mlp, torch.ops.graphtune.lora_mlp.default)
ACTIVATION_OPS = {"swiglu": torch.ops.graphtune.swiglu, "geglu": torch.ops.graphtune.geglu}
ACTIVATION_TARGETS = {torch.ops.graphtune.swiglu, torch.ops.graphtune.swiglu.default, torch.ops.graphtune.geglu, torch.ops.graphtune.geglu.default}


# -- patterns: one per activation x (separate gate/up | Phi-3's fused gate_up) ----------------------
def _dropout(t, p, training, inplace):
    """``F.dropout`` as dynamo records it, positionally (fx's tracer would record keywords)."""
    return t.tracer.create_proxy("call_function", dropout, (t, p, training, inplace), {})


def _patterns(act):
    def lora_mlp_pattern(x, w_gate, b_gate, a_gate, l_gate, s_gate, w_up, b_up, a_up, l_up, s_up,
                         w_down, b_down, a_down, l_down, s_down, dt_gate, dt_up, dt_down):
        gate = LL(x, x, w_gate, b_gate, a_gate, l_gate, s_gate).to(dt_gate)
        up = LL(x, x, w_up, b_up, a_up, l_up, s_up).to(dt_up)
        p = act(gate, up)
        return LL(p, p, w_down, b_down, a_down, l_down, s_down).to(dt_down)

    def lora_mlp_gate_up_pattern(x, w_gate_up, b_gate_up, a_gate_up, l_gate_up, s_gate_up,
                                 w_down, b_down, a_down, l_down, s_down, dt_gate_up, dt_down):
        chunks = LL(x, x, w_gate_up, b_gate_up, a_gate_up, l_gate_up, s_gate_up).to(dt_gate_up).chunk(2, dim=-1)
        p = act(chunks[0], chunks[1])
        return LL(p, p, w_down, b_down, a_down, l_down, s_down).to(dt_down)

    # lora_dropout > 0: matched only to be refused with the reason (each projection has its own mask)
    def lora_mlp_dropout_pattern(x, xl_gate, xl_up, w_gate, b_gate, a_gate, l_gate, s_gate, w_up, b_up, a_up, l_up, s_up,
                                 w_down, b_down, a_down, l_down, s_down, dt_gate, dt_up, dt_down, p_drop, training, inplace):
        gate = LL(x, xl_gate, w_gate, b_gate, a_gate, l_gate, s_gate).to(dt_gate)
        up = LL(x, xl_up, w_up, b_up, a_up, l_up, s_up).to(dt_up)
        p = act(gate, up)
        return LL(p, _dropout(p, p_drop, training, inplace), w_down, b_down, a_down, l_down, s_down).to(dt_down)

    def lora_mlp_gate_up_dropout_pattern(x, xl_gate_up, w_gate_up, b_gate_up, a_gate_up, l_gate_up, s_gate_up,
                                         w_down, b_down, a_down, l_down, s_down, dt_gate_up, dt_down, p_drop, training, inplace):
        chunks = LL(x, xl_gate_up, w_gate_up, b_gate_up, a_gate_up, l_gate_up, s_gate_up).to(dt_gate_up).chunk(2, dim=-1)
        p = act(chunks[0], chunks[1])
        return LL(p, _dropout(p, p_drop, training, inplace), w_down, b_down, a_down, l_down, s_down).to(dt_down)

    return lora_mlp_pattern, lora_mlp_gate_up_pattern, lora_mlp_dropout_pattern, lora_mlp_gate_up_dropout_pattern


def _replacements(activation: str, recompute_gate_up: bool):
    """Replacements carry the activation and the recompute flag as literals. ``biases`` is emitted one
    per projection (a pattern argument cannot tell None from a node at trace time); the pass then
    rewrites it to the op's (present biases, has_bias) form, see :meth:`FuseLoRAMLP._finish`."""

    def lora_mlp_replacement(x, w_gate, b_gate, a_gate, l_gate, s_gate, w_up, b_up, a_up, l_up, s_up,
                             w_down, b_down, a_down, l_down, s_down, dt_gate, dt_up, dt_down):
        return torch.ops.graphtune.lora_mlp(
            x, [w_gate, w_up, w_down], [b_gate, b_up, b_down], [], [a_gate, a_up, a_down], [l_gate, l_up, l_down],
            [s_gate, s_up, s_down], activation, recompute_gate_up,
        )[0].to(dt_down)

    def lora_mlp_gate_up_replacement(x, w_gate_up, b_gate_up, a_gate_up, l_gate_up, s_gate_up,
                                     w_down, b_down, a_down, l_down, s_down, dt_gate_up, dt_down):
        return torch.ops.graphtune.lora_mlp(
            x, [w_gate_up, w_down], [b_gate_up, b_down], [], [a_gate_up, a_down], [l_gate_up, l_down],
            [s_gate_up, s_down], activation, recompute_gate_up,
        )[0].to(dt_down)

    return lora_mlp_replacement, lora_mlp_gate_up_replacement


def make_rewrites(recompute_gate_up: bool = False) -> tuple[Rewrite, ...]:
    out = []
    for activation, act in ACTIVATION_OPS.items():
        plain, gate_up, plain_dropout, gate_up_dropout = _patterns(act)
        plain_repl, gate_up_repl = _replacements(activation, recompute_gate_up)
        out += [
            Rewrite(activation, plain, plain_repl),
            Rewrite(f"{activation}_gate_up", gate_up, gate_up_repl),
            # refused by the guard, never replaced: the replacement is the pattern itself
            Rewrite(f"{activation}_dropout", plain_dropout, plain_dropout),
            Rewrite(f"{activation}_gate_up_dropout", gate_up_dropout, gate_up_dropout),
        ]
    return tuple(out)


def _projections(match: Match) -> list[str]:
    return ["gate_up", "down"] if "w_gate_up" in match.inputs else ["gate", "up", "down"]


def can_fuse_lora_mlp(match: Match, ctx: GraphContext) -> str | None:
    inputs = match.inputs
    if match.rewrite.name.endswith("_dropout"):
        return (
            "lora_dropout > 0: down_proj's LoRA reads peft's dropout of the activation product, which the fused "
            "op would have to materialise (and the mask must stay peft's); the block keeps its unfused nodes"
        )
    names = _projections(match)
    x = ctx.example(inputs["x"])
    if reason := check_tensor("x", x):
        return reason
    for proj in names:
        if reason := check_literal_number(f"{proj} scaling", inputs[f"s_{proj}"]):
            return reason
        for kind in ("w", "a", "l"):
            t = ctx.example(inputs[f"{kind}_{proj}"])
            if reason := check_tensor(f"{proj} {kind}", t):
                return reason
            if t.dtype != x.dtype:
                return f"{proj} weights ({t.dtype}) and x ({x.dtype}) differ in dtype"
            if t.dim() != 2:
                return f"{proj} weights are not 2-D"
        if ctx.requires_grad(inputs[f"w_{proj}"]):
            return f"{proj}: the base weight requires grad; the fused op gives it no gradient"
        bias = inputs[f"b_{proj}"]
        if bias is not None and ctx.example(bias) is None:
            return f"{proj}: bias is neither None nor a tensor with recorded metadata"
        cast = inputs[f"dt_{proj}"]
        if cast != x.dtype:
            return f"{proj}: the cast to {cast} after the projection is not a no-op on {x.dtype}"
    w = {p: ctx.example(inputs[f"w_{p}"]) for p in names}
    ffn = w["down"].shape[1]
    gate_rows = [2 * ffn] if "gate_up" in w else [ffn, ffn]
    for proj, rows in zip(names[:-1], gate_rows):
        if not (known_eq(w[proj].shape[0], rows) and known_eq(w[proj].shape[1], x.shape[-1])):
            return f"{proj} weight {tuple(w[proj].shape)} does not chain with x {tuple(x.shape)} and down weight {tuple(w['down'].shape)}"
    return None


def _mlp_stack(node: fx.Node) -> dict | None:
    """``node``'s module stack cut after the innermost ``*MLP`` module (None: no MLP module in it)."""
    stack = node.meta.get("nn_module_stack") or {}
    items = list(stack.items())
    for i in range(len(items) - 1, -1, -1):
        cls = items[i][1][1]
        name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        if name.endswith("MLP"):
            return dict(items[: i + 1])
    return None


class FuseLoRAMLP(Pass):
    name = "fuse_lora_mlp"
    op_names = ("graphtune.lora_mlp",)

    def __init__(self, extra_rewrites: Sequence[Rewrite] = (), *, recompute_gate_up: bool = False) -> None:
        self.recompute_gate_up = recompute_gate_up
        self.rewrites = make_rewrites(recompute_gate_up)
        self._mlp_sites: dict[str, str] = {}
        super().__init__(extra_rewrites)

    def guard(self, match: Match, ctx: GraphContext) -> str | None:
        stack = module_stack(match.outputs[0])
        mlp = [path for path, cls in stack if cls.endswith("MLP")]
        if mlp:
            self._mlp_sites[match.site] = mlp[-1]
        return can_fuse_lora_mlp(match, ctx)

    def __call__(self, gm: fx.GraphModule, ctx: GraphContext | None = None) -> PassResult:
        ctx = ctx or GraphContext()
        self._mlp_sites = {}
        result = super().__call__(gm, ctx)
        if result.count:
            self._finish(gm)
        for node in gm.graph.nodes:  # blocks of peft's mixed-precision form: said, never silently skipped
            if node.op == "call_function" and node.target in ACTIVATION_TARGETS and _reads_and_feeds(node, is_mixed_precision_lora_linear):
                down = next(u for u in node.users if is_mixed_precision_lora_linear(u))
                result.refused.append(Refusal(site=module_path(node) or node.name, rewrite="lora_mlp",
                                              reason=mixed_precision_reason(down, ctx, "lora_mlp")))
        result.sites = [self._mlp_sites.get(s, s) for s in result.sites]
        for r in result.refused:
            r.site = self._mlp_sites.get(r.site, r.site)
        return result

    def _finish(self, gm: fx.GraphModule) -> None:
        """Compact the bias lists to the op's form and put the new nodes on the MLP module."""
        for node in gm.graph.nodes:
            if node.meta.get("graphtune_pass") != self.name:
                continue
            stack = _mlp_stack(node)
            if stack is not None:
                node.meta["nn_module_stack"] = stack
            if node.op == "call_function" and node.target in LORA_MLP_TARGETS and node.args[3] == []:
                args = list(node.args)
                biases = list(args[2])
                args[2] = [b for b in biases if b is not None]
                args[3] = [b is not None for b in biases]
                node.args = tuple(args)
        gm.graph.lint()
        gm.recompile()

    def is_candidate_module(self, class_name: str, nodes: list[fx.Node]) -> bool:
        """An MLP whose gated activation reads a LoRA projection and feeds one (maybe via dropout), in
        either form of ``lora_linear`` (peft's mixed precision is refused with its reason)."""
        if not class_name.endswith("MLP"):
            return False
        for n in nodes:
            if n.op == "call_function" and n.target in ACTIVATION_TARGETS:
                feeds_lora = any(
                    is_lora_linear(u) or (u.target is dropout and any(is_lora_linear(v) for v in u.users)) for u in n.users
                )
                if (feeds_lora and any(is_lora_linear(m) for m in nodes)) or _reads_and_feeds(n, is_mixed_precision_lora_linear):
                    return True
        return False


def _reads_and_feeds(activation: fx.Node, is_projection) -> bool:
    """The gated activation reads a projection of that kind (directly or via Phi-3's chunk) and feeds one."""
    def source(a):  # Phi-3: getitem(gate_up.chunk(2)) -> gate_up
        if isinstance(a, fx.Node) and a.target is operator.getitem:
            a = a.args[0]
        if isinstance(a, fx.Node) and a.op == "call_method" and a.target == "chunk":
            a = a.args[0]
        return a

    reads = any(is_projection(source(a)) for a in activation.args if isinstance(a, fx.Node))
    return reads and any(is_projection(u) for u in activation.users)


__all__ = ["FuseLoRAMLP", "can_fuse_lora_mlp", "make_rewrites"]
