"""fuse_qlora: peft LoRA over a bitsandbytes ``Linear4bit`` base -> ``graphtune::lora_linear_4bit``.

What dynamo records for one QLoRA projection (bitsandbytes 0.50, peft 0.21, torch 2.13)::

    x  = x_in.to(compute_dtype)                       # bnb Linear4bit.forward
    B  = weight.view(-1, 1)
    base = autograd_function_apply(fwd_body, bwd_body, *sym_sizes, x, B, *quant_state_tensors)[0]
         | bitsandbytes.gemm_4bit(x, B, shape, absmax, blocksize, quant_type, bias=..., absmax_8bit=...)
    peft's bnb.Linear4bit:  base.to(dt).clone() + (B(A(x_lora)) * s).to(dt)
    peft's lora.Linear:     (base.to(dt) + B(A(x_lora)) * s).to(dt)

``autograd_function_apply`` is bitsandbytes' ``MatMul4Bit`` (the input needs a gradient), whose
forward body holds the ``gemm_4bit``; the bare ``gemm_4bit`` appears where the input needs none (the
first layer's q/k/v when embeddings are frozen). Its operands vary in number with the dynamic sizes,
double quantization (``absmax_8bit``/``absmax_code``/``absmax_offset``) and bias, so the patterns
match the base as a wildcard ``base`` and the guard *resolves* it: it reads the ``gemm_4bit`` call
(bitsandbytes < 0.50: ``linear(x, dequantize_4bit(...))``, with ``dequantize_blockwise(...) + offset``
for a double-quantized absmax), through the autograd body when there is one, checks it, and binds
its operands -- ``x``, the packed weight, the quant-state tensors, bias and the literal
shape/blocksize/quant_type -- as extra inputs of the replacement; the resolved base nodes join the
matched nodes so they are erased with it.
``x_lora`` is ``x_in`` or peft's own dropout node (its mask is peft's).

The op computes the same values (``W`` dequantized exactly as bitsandbytes does, into the compute
dtype) and gradients for x, the LoRA weights and a base bias; the packed weight gets none, as in
bitsandbytes. Never fires when: the base is not a recognised 4-bit call; quant type, blocksize or
shape are not literals it supports; the quant-state tensors have unexpected dtypes; the packed
weight requires grad; compute dtype, x_lora and the LoRA weights differ in dtype (peft or bnb would
then insert casts this op does not reproduce); the scaling is not a literal; or an intermediate
escapes. Refused and unmatched projections keep their original nodes and appear in the report.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.utils._pytree as pytree
import torch.fx as fx
from torch.nn.functional import linear

from graphtune.passes._guards import check_literal_number, check_same_shape, check_tensor, known_eq
from graphtune.passes.base import GraphContext, Match, Pass, Rewrite, module_path

__all__ = ["Bnb4bitCall", "FuseQLoRA", "is_bnb_4bit_node", "resolve_bnb_4bit"]

GEMM_4BIT = "bitsandbytes.gemm_4bit.default"
DEQUANT_4BIT = "bitsandbytes.dequantize_4bit.default"
DEQUANT_BLOCKWISE = "bitsandbytes.dequantize_blockwise.default"
LORA_LINEAR_4BIT = "graphtune.lora_linear_4bit.default"
_GEMM_PARAMS = ("A", "B", "shapeB", "absmax", "blocksize", "quant_type", "bias", "absmax_8bit", "absmax_code", "absmax_offset")
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' own set


# ----------------------------------------------------------------------------------------------
# Patterns (the base projection is a wildcard; see the module docstring)
# ----------------------------------------------------------------------------------------------
def qlora_peft_bnb_pattern(base, x_lora, lora_a, lora_b, scaling, dtype, lora_dtype):
    result = base.to(dtype).clone()
    output = (linear(linear(x_lora, lora_a, None), lora_b, None) * scaling).to(lora_dtype)
    return result + output


def qlora_peft_linear_pattern(base, x_lora, lora_a, lora_b, scaling, dtype, lora_dtype):
    result = base.to(dtype)
    result = result + linear(linear(x_lora, lora_a, None), lora_b, None) * scaling
    return result.to(lora_dtype)


def qlora_replacement(
    base, x_lora, lora_a, lora_b, scaling, dtype, lora_dtype,
    x, packed, absmax, absmax2, code2, offset, bias, out_features, in_features, blocksize, quant_type,
):
    return torch.ops.graphtune.lora_linear_4bit(
        x, x_lora, packed, absmax, absmax2, code2, offset, bias, lora_a, lora_b, scaling,
        out_features, in_features, blocksize, quant_type,
    )


QLORA_PEFT_BNB = Rewrite("peft_bnb_linear4bit", qlora_peft_bnb_pattern, qlora_replacement)
QLORA_PEFT_LINEAR = Rewrite("peft_linear_over_linear4bit", qlora_peft_linear_pattern, qlora_replacement)


# ----------------------------------------------------------------------------------------------
# Resolving the bitsandbytes base
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Bnb4bitCall:
    """A bitsandbytes 4-bit linear in the graph, with its operands as nodes of the outer graph."""

    nodes: list[fx.Node]  # what produces the base output (erased once it is replaced, if then unused)
    x: fx.Node
    packed: fx.Node
    absmax: fx.Node
    absmax2: fx.Node | None
    code2: fx.Node | None
    offset: fx.Node | None
    bias: fx.Node | None
    out_features: int
    in_features: int
    blocksize: int
    quant_type: str
    dequant_dtype: torch.dtype | None  # bitsandbytes < 0.50 dequantizes to this dtype first (None: to x's)


def _is_afa(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "autograd_function_apply"


def _call(node: Any, target: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and str(node.target) == target


def _named_args(node: fx.Node, params: tuple[str, ...]) -> dict[str, Any]:
    args = dict(zip(params, node.args))
    args.update(node.kwargs)
    return args


def _strip(node: Any, methods: tuple[str, ...], seen: list[fx.Node]) -> Any:
    """Follow ``node`` back through the given methods (views of the packed bytes, a device move)."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in methods:
        if node.target == "to" and any(isinstance(a, torch.dtype) for a in (*node.args[1:], *node.kwargs.values())):
            break  # a dtype cast changes values
        seen.append(node)
        node = node.args[0]
    return node


_PACKED_VIEWS = ("view", "reshape", "t", "contiguous")
_DEVICE_MOVES = ("to", "contiguous")


def _parse_base(out: fx.Node, source) -> dict[str, Any] | str:
    """The 4-bit linear producing ``out``, in either bitsandbytes spelling, with tensors mapped by ``source``.

    bitsandbytes >= 0.50: ``gemm_4bit(A, B, shape, absmax, blocksize, quant_type, bias, absmax_8bit, code, offset)``.
    bitsandbytes < 0.50: ``linear(A, dequantize_4bit(B, absmax', blocksize, quant_type, shape, dtype)[.t().to().t()], bias)``
    with ``absmax' = dequantize_blockwise(absmax_8bit, absmax2, code2, 256) + offset`` when double-quantized.
    ``source(node)`` maps a node to the outer graph (None: computed where it cannot be reached).
    """
    seen: list[fx.Node] = [out]
    fields: dict[str, Any] = {}
    if _call(out, GEMM_4BIT):
        a = _named_args(out, _GEMM_PARAMS)
        nested = a.get("absmax_8bit") is not None
        fields.update(
            x=a["A"], packed=a["B"], shape=a.get("shapeB"), blocksize=a.get("blocksize"), quant_type=a.get("quant_type"),
            bias=a.get("bias"), dequant_dtype=None,
            absmax=a.get("absmax_8bit") if nested else a.get("absmax"),
            absmax2=a.get("absmax") if nested else None,
            code2=a.get("absmax_code") if nested else None,
            offset=a.get("absmax_offset") if nested else None,
        )
        if nested and (fields["code2"] is None or fields["offset"] is None):
            return "double-quantized absmax without its code or offset"
    elif isinstance(out, fx.Node) and out.op == "call_function" and getattr(out.target, "__name__", "") == "linear":
        a = _named_args(out, ("input", "weight", "bias"))
        w, transposes, casts = a.get("weight"), 0, set()
        while isinstance(w, fx.Node) and w.op == "call_method" and w.target in ("t", "to", "contiguous"):
            if w.target == "t":
                transposes += 1
            elif w.target == "to":
                casts.update(x for x in (*w.args[1:], *w.kwargs.values()) if isinstance(x, torch.dtype))
            seen.append(w)
            w = w.args[0]
        if not _call(w, DEQUANT_4BIT):
            return f"the base projection is a linear whose weight is not a bitsandbytes 4-bit dequantization ({getattr(w, 'target', w)})"
        if transposes % 2:
            return "the dequantized 4-bit weight is used transposed"
        seen.append(w)
        d = _named_args(w, ("A", "absmax", "blocksize", "quant_type", "shape", "dtype"))
        if casts - {d.get("dtype")}:
            return f"bitsandbytes dequantizes to {d.get('dtype')} and then casts to {sorted(map(str, casts))} (two roundings)"
        fields.update(
            x=a["input"], packed=d["A"], shape=d.get("shape"), blocksize=d.get("blocksize"), quant_type=d.get("quant_type"),
            bias=a.get("bias"), dequant_dtype=d.get("dtype"), absmax=d.get("absmax"), absmax2=None, code2=None, offset=None,
        )
        am = fields["absmax"]
        if isinstance(am, fx.Node) and am.op == "call_function" and am.target in (operator.iadd, operator.add):
            blockwise, offset = am.args
            if not _call(blockwise, DEQUANT_BLOCKWISE):
                return "the 4-bit absmax is computed by something other than bitsandbytes' double-quant dequantization"
            b = _named_args(blockwise, ("A", "absmax", "code", "blocksize", "dtype"))
            if b.get("blocksize") != 256 or b.get("dtype") != torch.float32:
                return f"double-quantized absmax with blocksize {b.get('blocksize')} / {b.get('dtype')} (supported: 256, float32)"
            seen += [am, blockwise]
            fields.update(absmax=b["A"], absmax2=b["absmax"], code2=_strip(b["code"], _DEVICE_MOVES, seen), offset=offset)
    else:
        return f"the base projection is {getattr(out, 'target', out)}, not a bitsandbytes 4-bit linear"
    fields["packed"] = _strip(fields["packed"], _PACKED_VIEWS, seen)
    for name in ("x", "packed", "absmax", "absmax2", "code2", "offset", "bias"):
        value = fields[name]
        if value is None and name in ("absmax2", "code2", "offset", "bias"):
            continue
        if not isinstance(value, fx.Node):
            return f"the 4-bit linear's {name} is not a tensor in the graph"
        mapped = source(value)
        if mapped is None:
            return f"the 4-bit linear's {name} is computed inside bitsandbytes' autograd function"
        fields[name] = _strip(mapped, _PACKED_VIEWS if name == "packed" else _DEVICE_MOVES if name == "code2" else (), seen)
    fields["seen"] = seen
    return fields


# nodes of a MatMul4Bit body that do not feed the result may only be side-effect free (bitsandbytes'
# empty-input check, size reads) or switch grad mode
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def _mutates(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    in_place = name.endswith("_") and not name.startswith("_")
    return in_place or node.target in _INPLACE_OPERATORS or "out" in node.kwargs


def _from_body(afa: fx.Node) -> dict[str, Any] | str:
    """The 4-bit linear inside a MatMul4Bit autograd body, mapped to the afa's outer operands."""
    gm = afa.graph.owning_module
    fwd = afa.args[0]
    if gm is None or not isinstance(fwd, fx.Node) or fwd.op != "get_attr":
        return "autograd_function_apply without a readable forward body"
    body = getattr(gm, fwd.target)
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    operands = afa.args[2:]
    if len(placeholders) != len(operands):
        return "autograd_function_apply body and operands differ in number"
    outer = dict(zip(placeholders, operands))
    result = next(n for n in body.graph.nodes if n.op == "output").args[0]
    # the body returns its output first, then what it saves; the nesting differs between torch releases
    # (((out,), saved) in 2.13), so the output is the first leaf -- _parse_base then proves it is the 4-bit call
    leaves = pytree.tree_leaves(result)
    first = leaves[0] if leaves else None
    if not isinstance(first, fx.Node):
        return "the autograd function does not return one tensor"
    fields = _parse_base(first, outer.get)
    if isinstance(fields, str):
        return fields
    live = set(fields["seen"])
    for n in body.graph.nodes:
        if n.op in ("call_function", "call_method") and n not in live and n.target is not torch._C._set_grad_enabled:
            if _mutates(n):
                return f"the autograd function's body also runs {n.target} (not bitsandbytes' MatMul4Bit)"
    return fields


def resolve_bnb_4bit(node: Any) -> Bnb4bitCall | str:
    """The bitsandbytes 4-bit linear producing ``node``, or the reason it is not one we can replace."""
    if not isinstance(node, fx.Node):
        return "the base projection is not a graph node"
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) and _is_afa(node.args[0]):
        afa = node.args[0]
        if node.args[1] != 0 or len(afa.users) != 1:
            return "the autograd function's output is used other than as the projection result"
        fields = _from_body(afa)
        if isinstance(fields, str):
            return fields
        body_nodes = [a for a in afa.args[:2] if isinstance(a, fx.Node) and len(a.users) == 1]
        # body nodes are not ours to erase; the outer views stripped off the operands are
        nodes = [node, afa] + body_nodes + [n for n in fields["seen"] if n.graph is node.graph]
    else:
        fields = _parse_base(node, lambda n: n)
        if isinstance(fields, str):
            return fields
        nodes = fields["seen"]
    shape, blocksize, quant_type = fields["shape"], fields["blocksize"], fields["quant_type"]
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2 and all(isinstance(s, int) for s in shape)):
        return f"the 4-bit weight shape is not a literal [out, in] ({shape!r})"
    if quant_type not in QUANT_TYPES:
        return f"quant_type {quant_type!r} is not supported (nf4, fp4)"
    if blocksize not in BLOCKSIZES:
        return f"blocksize {blocksize!r} is not supported ({', '.join(map(str, BLOCKSIZES))})"
    return Bnb4bitCall(
        nodes=nodes, x=fields["x"], packed=fields["packed"], absmax=fields["absmax"], absmax2=fields["absmax2"],
        code2=fields["code2"], offset=fields["offset"], bias=fields["bias"], out_features=shape[0],
        in_features=shape[1], blocksize=blocksize, quant_type=quant_type, dequant_dtype=fields["dequant_dtype"],
    )


def is_bnb_4bit_node(node: fx.Node) -> bool:
    """True for a bitsandbytes 4-bit linear (gemm_4bit, MatMul4Bit's autograd node, a linear over
    ``dequantize_4bit``) or the fused op."""
    if node.op != "call_function":
        return False
    if str(node.target) in (GEMM_4BIT, LORA_LINEAR_4BIT):
        return True
    if _is_afa(node):
        return not isinstance(resolve_bnb_4bit(next(iter(node.users), None)), str)
    if getattr(node.target, "__name__", "") == "linear":
        return not isinstance(_parse_base(node, lambda n: n), str)
    return False


# ----------------------------------------------------------------------------------------------
# Guard
# ----------------------------------------------------------------------------------------------
def _check_quant_state(ctx: GraphContext, call: Bnb4bitCall) -> str | None:
    want = {"absmax": torch.uint8 if call.absmax2 is not None else torch.float32}
    if call.absmax2 is not None:
        want.update(absmax2=torch.float32, code2=torch.float32, offset=torch.float32)
    for name, dtype in want.items():
        t = ctx.example(getattr(call, name))
        if t is None:
            return f"quant state {name} has no recorded tensor metadata"
        if t.dtype != dtype:
            return f"quant state {name} is {t.dtype}, expected {dtype}"
    code2 = ctx.example(call.code2)
    if code2 is not None and not (code2.dim() == 1 and known_eq(code2.shape[0], 256)):
        return f"double-quantization code has shape {tuple(code2.shape)}, expected (256,)"
    packed = ctx.example(call.packed)
    if packed is None:
        return "the packed 4-bit weight has no recorded tensor metadata"
    n_bytes = packed.numel() * packed.element_size()
    if not known_eq(n_bytes, (call.out_features * call.in_features + 1) // 2):
        need = (call.out_features * call.in_features + 1) // 2
        return f"the packed weight holds {n_bytes} bytes, a {call.out_features}x{call.in_features} 4-bit weight needs {need}"
    return None


def can_fuse_qlora(match: Match, ctx: GraphContext) -> str | None:
    """Refusal reason, or None -- and then the base's operands are bound into ``match`` (see above)."""
    inputs = match.inputs
    if reason := check_literal_number("scaling", inputs["scaling"]):
        return reason
    call = resolve_bnb_4bit(inputs["base"])
    if isinstance(call, str):
        return call
    if reason := _check_quant_state(ctx, call):
        return reason
    if ctx.requires_grad(call.packed):
        return "the 4-bit base weight requires grad; the op (like bitsandbytes) gives it no gradient"
    tensors = {"x": ctx.example(call.x), **{k: ctx.example(inputs[k]) for k in ("x_lora", "lora_a", "lora_b")}}
    if call.bias is not None:
        tensors["bias"] = ctx.example(call.bias)
    for name, t in tensors.items():
        if reason := check_tensor(name, t):
            return reason
    base_dtypes = {t.dtype for k, t in tensors.items() if k in ("x", "bias")}
    adapter_dtypes = {t.dtype for k, t in tensors.items() if k in ("x_lora", "lora_a", "lora_b")}
    mixed = (
        # peft's default on a bf16/fp16 compute dtype: fp32 adapters, x cast to fp32 for them, and the
        # adapter output cast back to the compute dtype *before* the add -- the op does exactly that
        match.rewrite is QLORA_PEFT_BNB
        and base_dtypes in ({torch.bfloat16}, {torch.float16})
        and adapter_dtypes == {torch.float32}
        and {inputs["dtype"], inputs["lora_dtype"]} == base_dtypes
    )
    if len(base_dtypes) != 1 or len(adapter_dtypes) != 1 or (base_dtypes != adapter_dtypes and not mixed):
        return "compute dtype (x), x_lora and LoRA weights differ in dtype: " + ", ".join(f"{k}={v.dtype}" for k, v in tensors.items())
    (dtype,) = base_dtypes
    if call.dequant_dtype is not None and call.dequant_dtype != dtype:
        return f"bitsandbytes dequantizes the weight to {call.dequant_dtype}, not the compute dtype {dtype}"
    if inputs["dtype"] != dtype or inputs["lora_dtype"] != dtype:
        return f"peft/bitsandbytes cast the result to {inputs['dtype']}/{inputs['lora_dtype']}, not the compute dtype {dtype}"
    if reason := check_same_shape(("x", "x_lora"), tensors["x"], tensors["x_lora"]):
        return reason
    a, b = tensors["lora_a"], tensors["lora_b"]
    if a.dim() != 2 or b.dim() != 2 or not (
        known_eq(tensors["x"].shape[-1], call.in_features) and known_eq(a.shape[1], call.in_features)
        and known_eq(b.shape[0], call.out_features) and known_eq(b.shape[1], a.shape[0])
    ):
        return (
            f"shapes do not chain: x {tuple(tensors['x'].shape)}, W ({call.out_features}, {call.in_features}), "
            f"lora_a {tuple(a.shape)}, lora_b {tuple(b.shape)}"
        )
    # proven: bind the base's operands for the replacement and erase the base with the match
    inputs.update(
        x=call.x, packed=call.packed, absmax=call.absmax, absmax2=call.absmax2, code2=call.code2, offset=call.offset,
        bias=call.bias, out_features=call.out_features, in_features=call.in_features, blocksize=call.blocksize,
        quant_type=call.quant_type,
    )
    match.nodes.extend(call.nodes)
    return None


MIXED_PRECISION_LEFT_TO_COMPILER = (
    "peft's mixed-precision QLoRA projection (half compute dtype, fp32 adapters) is left to bitsandbytes and the "
    "compiler on CUDA, as fuse_lora leaves the LoRA case (the op was measured slower there); pass "
    "FuseQLoRA(fuse_mixed_precision=True) to fuse it anyway"
)


class FuseQLoRA(Pass):
    """``fuse_mixed_precision=False`` (``default_passes("cuda")``) refuses peft's fp32 adapters on a half
    compute dtype, for the reason :data:`MIXED_PRECISION_LEFT_TO_COMPILER` gives."""

    name = "fuse_qlora"
    rewrites = (QLORA_PEFT_BNB, QLORA_PEFT_LINEAR)
    op_names = ("graphtune.lora_linear_4bit",)

    def __init__(self, extra_rewrites=(), fuse_mixed_precision: bool = True) -> None:
        super().__init__(extra_rewrites)
        self.fuse_mixed_precision = fuse_mixed_precision

    def guard(self, match: Match, ctx: GraphContext) -> str | None:
        if reason := can_fuse_qlora(match, ctx):
            return reason
        x, lora_a = ctx.example(match.inputs["x"]), ctx.example(match.inputs["lora_a"])
        if not self.fuse_mixed_precision and x is not None and lora_a is not None and x.dtype != lora_a.dtype:
            return MIXED_PRECISION_LEFT_TO_COMPILER
        return None

    def __call__(self, gm: fx.GraphModule, ctx: GraphContext | None = None):
        result = super().__call__(gm, ctx)
        if result.count:  # the replaced MatMul4Bit bodies
            gm.delete_all_unused_submodules()
        return result

    def is_candidate_module(self, class_name: str, nodes) -> bool:
        # a peft LoRA layer (peft's bnb.Linear4bit, or lora.Linear) over a bitsandbytes 4-bit base
        return class_name in ("Linear", "Linear4bit") and any(".lora_A" in module_path(n) for n in nodes) and any(
            is_bnb_4bit_node(n) for n in nodes
        )
