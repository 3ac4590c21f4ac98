"""Canonical, deterministic text of a captured graph: what golden files hold.

Why not ``gm.code``: placeholder names depend on how the model was reached (``l_self_...`` vs
``l_args_0_...``), ``nn_module_stack`` keys are object ids, and code objects carry
``<eval_with_key>.N`` file names. Here parameters are named by their FQN, nodes keep dynamo's
deterministic names, and each line is ``name = op target(args, kwargs)  # module``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphtune.passes.base import module_path

_SKIP_TARGETS = {"_log_api_usage_once"}


def _target_name(node: fx.Node) -> str:
    t = node.target
    if node.op in ("call_method", "get_attr", "placeholder", "output"):
        return str(t)
    if isinstance(t, torch._ops.OpOverloadPacket | torch._ops.OpOverload):
        return f"torch.ops.{t}"
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    if mod in ("_operator", "operator", "builtins"):
        return name
    if mod.startswith("torch"):
        mod = {"torch._C._nn": "torch.nn.functional", "torch._C._VariableFunctions": "torch"}.get(mod, mod)
        if mod.startswith("torch.nn.functional") or mod == "torch" or mod.startswith("torch."):
            return f"{mod}.{name}"
    return f"{mod}.{name}" if mod else name


def _fmt(value, names: dict[fx.Node, str]) -> str:
    if isinstance(value, fx.Node):
        return "%" + names[value]
    if isinstance(value, tuple):
        inner = ", ".join(_fmt(v, names) for v in value)
        return f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v, names) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v, names)}" for k, v in value.items()) + "}"
    if isinstance(value, slice):
        return f"{_fmt(value.start, names)}:{_fmt(value.stop, names)}" + (f":{_fmt(value.step, names)}" if value.step is not None else "")
    if value is Ellipsis:
        return "..."
    if isinstance(value, torch.device):
        return f"device({value.type})"
    if isinstance(value, float):
        return repr(value)
    return repr(value) if not isinstance(value, torch.dtype) else str(value)


def canonical_text(gm: fx.GraphModule, param_names: dict[str, str] | None = None) -> str:
    """Render ``gm`` deterministically; ``param_names`` maps placeholder names to FQNs."""
    param_names = param_names or {}
    names: dict[fx.Node, str] = {}
    lines = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            fqn = param_names.get(node.name)
            names[node] = f"param:{fqn}" if fqn else f"input:{node.name}"
            ex = node.meta.get("example_value")
            kind = "symint" if not isinstance(ex, torch.Tensor) else f"{str(ex.dtype).replace('torch.', '')}[{ex.dim()}d]"
            lines.append(f"{names[node]} : {kind}")
            continue
        names[node] = node.name
        if node.op == "call_function" and getattr(node.target, "__name__", "") in _SKIP_TARGETS:
            continue
        if node.op == "output":
            lines.append(f"return {_fmt(node.args[0], names)}")
            continue
        args = ", ".join([_fmt(a, names) for a in node.args] + [f"{k}={_fmt(v, names)}" for k, v in node.kwargs.items()])
        where = module_path(node)
        tag = f"  [{node.meta['graphtune_pass']}]" if "graphtune_pass" in node.meta else ""
        lines.append(f"{node.name} = {node.op} {_target_name(node)}({args}){'  # ' + where if where else ''}{tag}")
    return "\n".join(lines) + "\n"
