"""Tensor roles read off a captured, rewritten graph: which parameter is the token embedding, the
q/k/v/o projections, the gate/up/down projections, the norms before/after attention and MLP.

Roles come from the graph's dataflow, not from parameter names:

* q and k are the projections that feed the ``graphtune::rope`` node (through views, transposes,
  slices of a fused projection, and a q/k ``rms_norm`` which becomes ``attn_q_norm``/``attn_k_norm``);
  both coming from one projection means a fused ``attn_qkv``;
* ``attn_output`` is the attention projection whose input descends from the rope output; the other
  one is ``attn_v``;
* gate and up are the projections feeding ``graphtune::swiglu``/``geglu`` (one projection for both:
  fused ``ffn_up``, gate rows first); ``ffn_down`` is the MLP projection after the activation;
* a norm whose output feeds q/k/v is ``attn_norm``, one that feeds gate/up is ``ffn_norm``, one
  applied to the attention / MLP output (Gemma-2/3) is ``attn_post_norm`` / ``ffn_post_norm``;
* the norm outside the decoder layers is ``output_norm``, the projection after it ``output``, the
  ``embedding`` op's weight ``token_embd``.

peft LoRA branches (``lora_A``/``lora_B`` projections and the add that joins them, or a fused
``graphtune::lora_linear``) are transparent: the role belongs to the base projection. Each ``rms_norm`` keeps its ``eps`` and ``offset`` literals
(offset 1.0 is Gemma's ``x * (1 + w)``), each rope node the rotary width of its cos/sin.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Iterable

import torch
import torch.fx as fx


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """``graphtune.passes.base.module_stack``, imported on first use: the roles of a cached analysis
    (``graphtune.export.cache``) are rebuilt without loading the passes and their kernels."""
    from graphtune.passes.base import module_stack as stack

    return stack(node)


_LORA = re.compile(r"\.lora_(A|B|embedding_A|embedding_B)\.")
# ops that move data without mixing tensors: followed when tracing a projection to its consumer
_TRANSPARENT_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "to", "type", "float", "half",
                        "bfloat16", "unsqueeze", "squeeze", "flatten", "chunk", "split", "expand", "clone", "type_as"}
_TRANSPARENT_FUNCS = {operator.getitem, torch.reshape, torch.transpose, torch.flatten, torch.chunk, torch.split,
                      torch.nn.functional.dropout}


class GraphRoleError(ValueError):
    """The captured graph does not have the structure the export expects; the message says where."""


@dataclasses.dataclass
class ParamRole:
    """The role of one parameter (a weight or a bias) in the exported architecture."""

    fqn: str
    role: str  # "attn_q", "ffn_norm", ... (see ROLES)
    bid: int | None  # decoder layer index, None for token_embd/output_norm/output
    part: str = "weight"  # "weight" | "bias"
    offset: float = 0.0  # rms_norm offset from the graph (1.0: Gemma's 1 + w)
    eps: float | None = None
    slices: tuple[int, ...] = ()  # for fused projections: start rows of the q/k/v or gate/up parts


ROLES = (
    "token_embd", "output_norm", "output",
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "attn_q_norm", "attn_k_norm",
    "attn_post_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_gate_up", "ffn_down", "ffn_post_norm",
)


@dataclasses.dataclass
class LayerStructure:
    """What one decoder layer of the graph contains (checked against the GGUF family's expectations)."""

    path: str
    cls: str
    norms: int = 0  # rms_norm nodes outside the attention module
    qk_norms: int = 0
    ropes: int = 0
    rotary_dims: list[int] = dataclasses.field(default_factory=list)
    activation: str | None = None
    norm_offsets: set[float] = dataclasses.field(default_factory=set)
    attention_scale: float | None = None  # literal multiplied into q.k^T (eager attention), if seen
    q_heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None


@dataclasses.dataclass
class GraphRoles:
    params: dict[str, ParamRole]  # fqn -> role
    layers: list[LayerStructure]
    embed_fqn: str
    output_fqn: str | None  # None or == embed_fqn when tied
    eps: set[float]
    norm_offsets: set[float]

    @property
    def tied(self) -> bool:
        return self.output_fqn is None or self.output_fqn == self.embed_fqn

    def by_layer(self, bid: int) -> list[ParamRole]:
        return [r for r in self.params.values() if r.bid == bid]


def _op(node: fx.Node) -> str:
    """A short, stable name for a node's operation: 'linear', 'graphtune::rms_norm', 'view', ..."""
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return node.op
    t = node.target
    name = getattr(t, "_qualified_op_name", None) or getattr(getattr(t, "_overloadpacket", None), "_qualified_op_name", None)
    if name:
        return name
    return getattr(t, "__name__", str(t))


def _is_lora_fqn(fqn: str | None) -> bool:
    return bool(fqn and _LORA.search(fqn))


def _layer_of(node: fx.Node) -> str | None:
    for path, cls in module_stack(node):
        if cls.endswith("DecoderLayer"):
            return path
    return None


def _scope(node: fx.Node, suffix: str) -> str | None:
    """Path of the innermost enclosing module whose class name ends with ``suffix``."""
    found = None
    for path, cls in module_stack(node):
        if cls.endswith(suffix):
            found = path
    return found


class _Analyzer:
    def __init__(self, gm: fx.GraphModule, param_names: dict[str, str]):
        self.gm = gm
        self.param_names = param_names
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}

    # -- node predicates ------------------------------------------------------------------------
    def param(self, value) -> str | None:
        if isinstance(value, fx.Node) and value.op == "placeholder":
            return self.param_names.get(value.name)
        return None

    def projection_weight(self, node: fx.Node) -> str | None:
        """FQN of the weight a projection node multiplies by (linear, or any op taking a 2-D param)."""
        if node.op != "call_function" or _op(node) in ("graphtune::rms_norm", "embedding"):
            return None
        for a in list(node.args) + list(node.kwargs.values()):
            # the weight itself, or a view of it (bitsandbytes' gemm_4bit takes ``weight.view(-1, 1)``)
            for _ in range(3):
                if isinstance(a, fx.Node) and a.op == "call_method" and a.target in ("view", "t", "reshape", "to", "contiguous"):
                    a = a.args[0]
            fqn = self.param(a)
            if fqn and fqn.endswith("weight"):
                ex = a.meta.get("example_value", a.meta.get("val"))
                if ex is None or getattr(ex, "dim", lambda: 2)() == 2:
                    return fqn
        return None

    def is_base_projection(self, node: fx.Node) -> bool:
        w = self.projection_weight(node)
        return w is not None and not _is_lora_fqn(w)

    def is_lora_projection(self, node: fx.Node) -> bool:
        return _is_lora_fqn(self.projection_weight(node))

    def bias_of(self, node: fx.Node) -> str | None:
        for a in list(node.args) + list(node.kwargs.values()):
            fqn = self.param(a)
            if fqn and fqn.endswith("bias") and not _is_lora_fqn(fqn):
                return fqn
        return None

    def is_lora_branch(self, node) -> bool:
        """``lora_B(...)`` or ``lora_B(...) * scaling``: what peft adds to a base projection's output."""
        if not isinstance(node, fx.Node):
            return False
        if node.op == "call_function" and node.target in (operator.mul, torch.mul) and len(node.args) == 2:
            a, b = node.args
            node = a if isinstance(a, fx.Node) and not isinstance(b, fx.Node) else b if isinstance(b, fx.Node) and not isinstance(a, fx.Node) else node
        return self.is_lora_projection(node)

    def transparent(self, node: fx.Node) -> fx.Node | None:
        """The data input of a node that only moves/casts data (or joins a LoRA branch), else None."""
        if node.op == "call_method" and node.target in _TRANSPARENT_METHODS:
            return node.args[0] if isinstance(node.args[0], fx.Node) else None
        if node.op == "call_function":
            if node.target in _TRANSPARENT_FUNCS:
                return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if node.target in (operator.add, torch.add) and len(node.args) == 2:
                a, b = node.args
                # peft: base(x) + lora_B(lora_A(dropout(x))) * scaling
                if self.is_lora_branch(b) and not self.is_lora_branch(a):
                    return a
                if self.is_lora_branch(a) and not self.is_lora_branch(b):
                    return b
            if node.target in (operator.mul, torch.mul) and len(node.args) == 2:
                # a scalar (LoRA scaling, dropout keep factor) does not change which tensor this is
                a, b = node.args
                if isinstance(a, fx.Node) and not isinstance(b, fx.Node):
                    return a
        return None

    def resolve_back(self, node: fx.Node) -> fx.Node:
        """Follow transparent ops backwards to the node that produced the data."""
        seen = set()
        while node not in seen:
            seen.add(node)
            nxt = self.transparent(node)
            if nxt is None:
                return node
            node = nxt
        return node

    def path_back(self, node: fx.Node, stop_scope: str | None) -> tuple[list[fx.Node], list[fx.Node], list[int]]:
        """From ``node`` back to base projections inside ``stop_scope``: (projections, rms_norms passed, slice starts)."""
        projections, norms, starts = [], [], []
        todo, seen = [node], set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if self.is_base_projection(n):
                projections.append(n)
                continue
            if n.op != "call_function" and n.op != "call_method":
                continue
            if stop_scope is not None and not any(p == stop_scope or p.startswith(stop_scope + ".") for p, _ in module_stack(n)):
                continue
            if _op(n) == "graphtune::rms_norm":
                norms.append(n)
                todo.append(n.args[0])
                continue
            if n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2:
                starts.extend(_slice_starts(n.args[1]))
            if self.is_lora_projection(n):
                continue
            todo.extend(a for a in n.all_input_nodes if not self.param(a))
        return projections, norms, starts

    def users_forward(self, node: fx.Node) -> list[fx.Node]:
        """Consumers of ``node``'s data after transparent ops."""
        out, todo, seen = [], [node], set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            for u in n.users:
                if self.transparent(u) is n:
                    todo.append(u)
                else:
                    out.append(u)
        return out

    def descendants(self, node: fx.Node, scope: str) -> set[fx.Node]:
        out, todo = set(), [node]
        while todo:
            n = todo.pop()
            for u in n.users:
                if u in out:
                    continue
                if any(p == scope or p.startswith(scope + ".") for p, _ in module_stack(u)):
                    out.add(u)
                    todo.append(u)
        return out


def _slice_starts(index) -> list[int]:
    items = index if isinstance(index, tuple) else (index,)
    return [int(s.start or 0) for s in items if isinstance(s, slice) and (s.start is not None or s.stop is not None)]


def _shape(node) -> tuple[int, ...] | None:
    ex = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in ex.shape) if isinstance(ex, torch.Tensor) else None


def analyze_roles(gm: fx.GraphModule, param_names: dict[str, str]) -> GraphRoles:
    """Assign a role to every parameter the exported model needs; raise GraphRoleError on surprises."""
    an = _Analyzer(gm, param_names)
    params: dict[str, ParamRole] = {}
    problems: list[str] = []

    def assign(fqn: str, role: str, bid: int | None, **kw) -> None:
        prev = params.get(fqn)
        if prev is not None and (prev.role, prev.bid) != (role, bid):
            problems.append(f"{fqn} plays two roles: {prev.role} and {role}")
            return
        params[fqn] = ParamRole(fqn=fqn, role=role, bid=bid, **kw)

    # decoder layers in graph order
    layer_paths: list[str] = []
    layer_cls: dict[str, str] = {}
    for n in an.nodes:
        for path, cls in module_stack(n):
            if cls.endswith("DecoderLayer") and path not in layer_cls:
                layer_cls[path] = cls
                layer_paths.append(path)
    bid_of = {p: i for i, p in enumerate(layer_paths)}
    layers = [LayerStructure(path=p, cls=layer_cls[p]) for p in layer_paths]

    by_layer: dict[str, list[fx.Node]] = {p: [] for p in layer_paths}
    outside: list[fx.Node] = []
    for n in an.nodes:
        lp = _layer_of(n)
        (by_layer[lp] if lp in by_layer else outside).append(n)

    for path, nodes in by_layer.items():
        bid = bid_of[path]
        ls = layers[bid]
        proj_role: dict[fx.Node, str] = {}
        ropes = [n for n in nodes if _op(n) == "graphtune::rope"]
        ls.ropes = len(ropes)
        attn_scope = next((s for n in ropes if (s := _scope(n, "Attention"))), None)
        if not ropes or attn_scope is None:
            problems.append(f"layer {path}: no rotary embedding (graphtune::rope) inside an attention module")
            continue
        rope = ropes[0]
        q_proj, q_norms, q_starts = an.path_back(rope.args[0], attn_scope)
        k_proj, k_norms, k_starts = an.path_back(rope.args[1], attn_scope)
        cos_shape = _shape(rope.args[2])
        if cos_shape:
            ls.rotary_dims.append(cos_shape[-1])
        qs, ks = _shape(rope.args[0]), _shape(rope.args[1])
        if qs and ks and len(qs) == 4 and len(ks) == 4:
            ls.q_heads, ls.kv_heads, ls.head_dim = qs[1], ks[1], qs[3]
        if len(q_proj) != 1 or len(k_proj) != 1:
            problems.append(f"layer {path}: rope q/k come from {len(q_proj)}/{len(k_proj)} projections, expected one each")
            continue
        for norms, role in ((q_norms, "attn_q_norm"), (k_norms, "attn_k_norm")):
            for nn_ in norms:
                w = an.param(nn_.args[1])
                ls.qk_norms += 1
                if w:
                    assign(w, role, bid, offset=float(nn_.args[3]), eps=float(nn_.args[2]))
        attn_projs = [n for n in nodes if an.is_base_projection(n) and _scope(n, "Attention") == attn_scope]
        fused = q_proj[0] is k_proj[0]
        if fused:
            proj_role[q_proj[0]] = "attn_qkv"
            starts = (min(q_starts, default=0), min((s for s in k_starts if s), default=0))
            params_slices = starts
        else:
            proj_role[q_proj[0]] = "attn_q"
            proj_role[k_proj[0]] = "attn_k"
            params_slices = ()
        after_rope = an.descendants(rope, attn_scope)
        rest = [p for p in attn_projs if p not in proj_role]
        outs = [p for p in rest if p.args and p.args[0] in after_rope]
        vs = [p for p in rest if p not in outs]
        if len(outs) != 1 or len(vs) != (0 if fused else 1):
            problems.append(f"layer {path}: expected one output projection and {0 if fused else 1} value projection "
                            f"in {attn_scope}, found {len(outs)} and {len(vs)}")
            continue
        proj_role[outs[0]] = "attn_output"
        if vs:
            proj_role[vs[0]] = "attn_v"
        for n in after_rope:  # eager attention: q @ k^T * scale (a literal)
            if n.op == "call_function" and n.target in (operator.mul, torch.mul) and isinstance(n.args[1], float):
                src = n.args[0]
                if isinstance(src, fx.Node) and getattr(src.target, "__name__", "") == "matmul":
                    ls.attention_scale = float(n.args[1])
                    break
        for n in after_rope:
            if n.op == "call_function" and getattr(n.target, "__name__", "") == "scaled_dot_product_attention":
                scale = n.kwargs.get("scale")
                if isinstance(scale, float):
                    ls.attention_scale = scale
            elif _op(n) == "graphtune::attention" and len(n.args) > 6 and isinstance(n.args[6], float):
                ls.attention_scale = float(n.args[6])  # (q, k, v, seq_ids, kv_mask, cu_seqlens, scale, ...)

        acts = [n for n in nodes if _op(n) in ("graphtune::swiglu", "graphtune::geglu")]
        if len(acts) != 1:
            problems.append(f"layer {path}: {len(acts)} gated activations (graphtune::swiglu/geglu), expected 1")
            continue
        act = acts[0]
        ls.activation = _op(act).split("::")[1]
        mlp_scope = _scope(act, "MLP") or path
        gate_p, _, gate_starts = an.path_back(act.args[0], mlp_scope)
        up_p, _, up_starts = an.path_back(act.args[1], mlp_scope)
        if len(gate_p) != 1 or len(up_p) != 1:
            problems.append(f"layer {path}: gate/up come from {len(gate_p)}/{len(up_p)} projections, expected one each")
            continue
        mlp_projs = [n for n in nodes if an.is_base_projection(n) and (_scope(n, "MLP") or path) == mlp_scope]
        if gate_p[0] is up_p[0]:
            proj_role[gate_p[0]] = "ffn_gate_up"
            # chunk(2) -> getitem 0 is the gate: record which chunk the activated input is
            gate_first = _chunk_index(act.args[0]) == 0
            if not gate_first:
                problems.append(f"layer {path}: the fused gate_up projection puts the gate second; llama.cpp expects it first")
        else:
            proj_role[gate_p[0]] = "ffn_gate"
            proj_role[up_p[0]] = "ffn_up"
        after_act = an.descendants(act, mlp_scope)
        downs = [p for p in mlp_projs if p not in proj_role and p.args and p.args[0] in after_act | {act}]
        if len(downs) != 1:
            problems.append(f"layer {path}: {len(downs)} down projections after the activation, expected 1")
            continue
        proj_role[downs[0]] = "ffn_down"
        for p, role in proj_role.items():
            slices = params_slices if role == "attn_qkv" else ()
            assign(an.projection_weight(p), role, bid, slices=slices)
            b = an.bias_of(p)
            if b:
                assign(b, role, bid, part="bias", slices=slices)

        # norms outside the attention module
        for n in nodes:
            if _op(n) != "graphtune::rms_norm" or (attn_scope and _scope(n, "Attention") == attn_scope):
                continue
            ls.norms += 1
            ls.norm_offsets.add(float(n.args[3]))
            w = an.param(n.args[1])
            consumers = {proj_role.get(u) for u in an.users_forward(n) if an.is_base_projection(u)}
            src = an.resolve_back(n.args[0])
            if consumers & {"attn_q", "attn_k", "attn_v", "attn_qkv"}:
                role = "attn_norm"
            elif consumers & {"ffn_gate", "ffn_up", "ffn_gate_up"}:
                role = "ffn_norm"
            elif proj_role.get(src) == "attn_output":
                role = "attn_post_norm"
            elif proj_role.get(src) == "ffn_down":
                role = "ffn_post_norm"
            else:
                problems.append(f"layer {path}: cannot tell what the norm {w or n.name} normalizes")
                continue
            if w:
                assign(w, role, bid, offset=float(n.args[3]), eps=float(n.args[2]))

    # outside the layers: embedding, final norm, lm_head
    embeds = [n for n in outside if _op(n) == "embedding"]
    embed_fqn = an.param(embeds[0].args[1]) if embeds else None
    if not embed_fqn:
        problems.append("no token embedding (an embedding op on a parameter) outside the decoder layers")
    else:
        assign(embed_fqn, "token_embd", None)
    final_norms = [n for n in outside if _op(n) == "graphtune::rms_norm"]
    output_fqn = None
    if len(final_norms) != 1:
        problems.append(f"{len(final_norms)} rms_norm nodes outside the decoder layers, expected 1 (the final norm)")
    else:
        fn = final_norms[0]
        w = an.param(fn.args[1])
        if w:
            assign(w, "output_norm", None, offset=float(fn.args[3]), eps=float(fn.args[2]))
        heads = [u for u in an.users_forward(fn) if an.is_base_projection(u)]
        if len(heads) != 1:
            problems.append(f"{len(heads)} projections after the final norm, expected 1 (lm_head)")
        else:
            output_fqn = an.projection_weight(heads[0])
            if output_fqn != embed_fqn:
                assign(output_fqn, "output", None)
    if problems:
        raise GraphRoleError("the captured graph does not have the expected decoder structure:\n  " + "\n  ".join(problems))
    eps = {r.eps for r in params.values() if r.eps is not None}
    offsets = {r.offset for r in params.values() if r.role.endswith("norm")}
    return GraphRoles(params=params, layers=layers, embed_fqn=embed_fqn, output_fqn=output_fqn, eps=eps, norm_offsets=offsets)


def _chunk_index(node: fx.Node) -> int | None:
    """For ``getitem(chunk(x), i)`` (through casts) return i."""
    seen = set()
    while isinstance(node, fx.Node) and node not in seen:
        seen.add(node)
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
            return node.args[1]
        if node.op == "call_method" and node.target in ("to", "type", "float", "contiguous"):
            node = node.args[0]
            continue
        return None
    return None


def iter_lora_fqns(fqns: Iterable[str]) -> Iterable[str]:
    return (f for f in fqns if _is_lora_fqn(f))
