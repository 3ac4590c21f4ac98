"""Activation memory from a budget: each saved activation is kept, recomputed or offloaded to host.

Why a custom partition function: graphtune compiles the whole model as *one* autograd function, so
``saved_tensors_hooks`` would unpack every saved tensor at the start of the backward and offloading
through them cannot lower the peak. The decision has to live inside the partitioned forward and
backward graphs, which is where AOTAutograd's min-cut partitioner decides what to save.
:class:`MemoryPolicy` wraps ``min_cut_rematerialization_partition``:

* **recompute** a decoder layer: its forward nodes in the joint graph are tagged
  ``PREFER_RECOMPUTE`` with one ``ac_graph_id`` per layer (what ``torch.utils.checkpoint`` does under
  compile), so the partitioner saves the layer's input and rebuilds the rest just before that
  layer's backward;
* **offload** a saved activation: after partitioning, ``graphtune::offload`` copies it to pinned host
  memory on a side CUDA stream as soon as it is produced, ``graphtune::offload_wait`` (after the next
  offload) makes the compute stream wait for the copy and ends the device tensor's life; in the
  backward ``graphtune::prefetch`` starts the copy back ``lookahead`` offloaded tensors before its first
  use and ``graphtune::prefetch_wait`` sits right before that use. The extra tensor arguments of the
  wait ops are ordering edges, so no scheduler can move a copy past the point that frees its memory;
* **keep** everything else, as the partitioner decided.

The plan is picked from a ladder ordered by extra cost: the partitioner's default; then each kept
layer's GLU product and RMSNorm outputs recomputed (their inputs are saved anyway, so this costs a
few memory-bound kernels); then, on top of that, the first 1, 2, ... L decoder layers recomputed;
then (all layers recomputed) the saved activations offloaded one by one in forward order -- PCIe
is ~50x slower than HBM, so offloading comes after recomputing,
and at the end of the ladder it is unsloth's offloaded checkpointing (layer inputs on the host,
layers recomputed). Each candidate is partitioned for real and its activation peak is estimated by
walking both graphs in execution order (:func:`estimate_peak`); the first plan whose peak fits the
budget wins.

HF's ``gradient_checkpointing_enable()`` wraps layers in ``torch.utils.checkpoint``, which hides them
from graphtune's passes (and its logger calls break ``fullgraph`` capture). :func:`hf_checkpointing_off`
switches it off inside the captured call only and the policy recomputes the same layers itself.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import operator
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx

__all__ = [
    "MemoryBudget",
    "MemoryDecision",
    "MemoryPolicy",
    "PeakEstimate",
    "estimate_peak",
    "hf_checkpointing_off",
    "parse_budget",
]

# Offloading a CPU tensor "to the host" saves nothing; tests set this to exercise the ops on CPU.
OFFLOAD_CPU_TENSORS = False
# Tensors smaller than this are never offloaded (a transfer has fixed cost; tests lower it).
OFFLOAD_MIN_BYTES = 1 << 20

MEMORY_COMPILERS = ("inductor", "aot_eager")

# ---------------------------------------------------------------------------------------------
# Budget parsing
# ---------------------------------------------------------------------------------------------

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)\s*$", re.IGNORECASE)
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")


NAMED_PLANS = ("checkpoint", "offload")


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """A parsed ``memory_budget``: a fraction of free device memory, a byte count, or a named plan.

    ``fraction`` is relative to the memory free on the graph's device when the graph is compiled
    (:func:`free_device_memory`: on CUDA what the driver reports free plus PyTorch's cached but
    unused blocks; weights are already resident then). ``nbytes`` is absolute. Both bound the
    activation peak (everything but weights, gradients and optimizer state) at the shape of the
    batch the graph was captured on. ``plan`` skips the search: ``"checkpoint"`` recomputes every
    decoder layer from its input (HF gradient checkpointing), ``"offload"`` does that and also keeps
    every layer input in host memory (unsloth's offloaded gradient checkpointing).
    """

    fraction: float | None = None
    nbytes: int | None = None
    plan: str | None = None
    text: str = ""

    def target(self, free_bytes: int) -> int | None:
        if self.plan is not None:
            return None
        if self.nbytes is not None:
            return self.nbytes
        return int(math.floor(self.fraction * free_bytes))


# optimize()'s default: keep what the partitioner keeps while it fits in this fraction of the free
# device memory, recompute / offload only when it does not (CUDA only: elsewhere nothing is bounded)
AUTO_FRACTION = 0.9


def free_device_memory(device: torch.device) -> int:
    """Bytes an activation peak may use on ``device`` now: CUDA's free memory plus PyTorch's cached
    unused blocks; the host's available memory for CPU tensors."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: nothing is bounded


def resolve_default_budget(value: Any, device: torch.device | None, *, aot_compiler: bool = True, hf_checkpointing: bool = False) -> Any:
    """``"auto"`` (optimize's default) -> ``AUTO_FRACTION`` of free memory on CUDA, else ``None``;
    also ``None`` without an AOTAutograd compiler or when HF checkpointing is on (its layers are then
    honoured). Any other value is returned as it is."""
    if not (isinstance(value, str) and value.strip().lower() == "auto"):
        return value
    on_cuda = device is not None and device.type == "cuda"
    return AUTO_FRACTION if on_cuda and aot_compiler and not hf_checkpointing else None


def parse_budget(value: Any) -> MemoryBudget | None:
    """``None`` | fraction in [0, 1] of free device memory | ``"60%"`` | ``"4GiB"`` / ``"512MB"`` | ``"checkpoint"`` / ``"offload"``.

    A bare number is always a fraction, never a size: ``4`` would be ambiguous (4 bytes? 4 GiB?), so
    it is refused with a hint to write ``"4GiB"``.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("memory_budget must be None, a fraction in [0, 1], a percentage string such as '60%' or a size such as '4GiB'; got a bool")
    if isinstance(value, (int, float)):
        frac = float(value)
        if math.isnan(frac) or not 0.0 <= frac <= 1.0:
            hint = f"; for an absolute budget write a size string, e.g. memory_budget='{value:g}GiB'" if frac > 1 else ""
            raise ValueError(f"memory_budget={value!r}: a number is a fraction of the free device memory and must be in [0, 1]{hint}")
        return MemoryBudget(fraction=frac, text=f"{frac:g}")
    if isinstance(value, str):
        if value.strip().lower() in NAMED_PLANS:
            return MemoryBudget(plan=value.strip().lower(), text=value.strip().lower())
        m = _PERCENT.match(value)
        if m:
            pct = float(m.group(1))
            if not 0.0 <= pct <= 100.0:
                raise ValueError(f"memory_budget={value!r}: a percentage must be between 0% and 100%")
            return MemoryBudget(fraction=pct / 100.0, text=value.strip())
        m = _SIZE.match(value)
        if m:
            unit = m.group(2).lower()
            if unit not in _UNITS:
                raise ValueError(f"memory_budget={value!r}: unknown unit {m.group(2)!r}; use one of B, KB, MB, GB, KiB, MiB, GiB")
            nbytes = int(float(m.group(1)) * _UNITS[unit])
            if nbytes <= 0:
                raise ValueError(f"memory_budget={value!r} must be positive")
            return MemoryBudget(nbytes=nbytes, text=value.strip())
        raise ValueError(f"memory_budget={value!r} is not a percentage ('60%'), a size ('4GiB', '512MB') or one of {', '.join(map(repr, NAMED_PLANS))}")
    raise TypeError(f"memory_budget must be None, a float in [0, 1] or a string such as '60%' or '4GiB', not {type(value).__name__}")


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# Offload / prefetch custom ops
# ---------------------------------------------------------------------------------------------

_side_streams: dict[int, Any] = {}
_pending: dict[int, Any] = {}  # data_ptr of the tensor being written -> CUDA event of its copy


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def _copy_async(dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> None:
    """``dst.copy_(src)`` on the side stream after the work already queued on the compute stream."""
    compute = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(compute)
    with torch.cuda.stream(side):
        dst.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(side)
    _pending[dst.data_ptr()] = event


def _wait(t: torch.Tensor, device: torch.device) -> None:
    event = _pending.pop(t.data_ptr(), None)
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)


@torch.library.custom_op("graphtune::offload", mutates_args=())
def offload(x: torch.Tensor) -> torch.Tensor:
    """Start copying ``x`` to pinned host memory; the result is valid after ``offload_wait``."""
    if x.device.type != "cuda":
        return x.clone()
    host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
    _copy_async(host, x, x.device)
    return host


@offload.register_fake
def _offload_fake(x):
    return torch.empty(x.shape, dtype=x.dtype, device="cpu")


@torch.library.custom_op("graphtune::offload_wait", mutates_args=("host",))
def offload_wait(host: torch.Tensor, source: torch.Tensor, after: torch.Tensor | None) -> None:
    """The compute stream waits for ``source -> host``; ``source`` may be freed after this op.

    ``host`` is declared mutated (its contents are final only now); ``after`` is an ordering edge
    that keeps the wait behind the next offload, where the copy has long finished.
    """
    if source.device.type == "cuda":
        _wait(host, source.device)


@offload_wait.register_fake
def _offload_wait_fake(host, source, after):
    return None


@torch.library.custom_op("graphtune::prefetch", mutates_args=())
def prefetch(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Start copying ``host`` back to ``device``; the result is valid after ``prefetch_wait``."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.clone().to(device)
    out = torch.empty(host.shape, dtype=host.dtype, device=device)  # allocated on the compute stream
    _copy_async(out, host, device)
    return out


@prefetch.register_fake
def _prefetch_fake(host, device):
    return torch.empty(host.shape, dtype=host.dtype, device=device)


@torch.library.custom_op("graphtune::prefetch_wait", mutates_args=("tensor",))
def prefetch_wait(tensor: torch.Tensor, ahead: torch.Tensor | None) -> None:
    """The compute stream waits for the prefetch of ``tensor`` (placed right before its first use).

    ``ahead`` is the next prefetch's result: an ordering edge that issues that copy before this
    wait, so it overlaps with the backward of the layer that uses ``tensor``.
    """
    if tensor.device.type == "cuda":
        _wait(tensor, tensor.device)


@prefetch_wait.register_fake
def _prefetch_wait_fake(tensor, ahead):
    return None


_has_side_effect = getattr(torch.fx.node, "has_side_effect", None)
if _has_side_effect is not None:  # the waits return nothing: never dead code
    _has_side_effect(torch.ops.graphtune.offload_wait.default)
    _has_side_effect(torch.ops.graphtune.prefetch_wait.default)

_OFFLOAD = torch.ops.graphtune.offload.default
_OFFLOAD_WAIT = torch.ops.graphtune.offload_wait.default
_PREFETCH = torch.ops.graphtune.prefetch.default
_PREFETCH_WAIT = torch.ops.graphtune.prefetch_wait.default

# ---------------------------------------------------------------------------------------------
# Graph helpers
# ---------------------------------------------------------------------------------------------


def _hint(v: Any) -> int:
    """A symbolic size's example value (4096 where there is none), across torch's renames of the helper."""
    if isinstance(v, int):
        return v
    from torch.fx.experimental import symbolic_shapes

    for name in ("optimization_hint", "size_hint"):  # 2.13+, then 2.11-2.12 (where hint_int warns)
        helper = getattr(symbolic_shapes, name, None)
        if helper is not None:
            try:
                return int(helper(v, fallback=4096))
            except TypeError:  # a signature without ``fallback``
                continue
    return int(symbolic_shapes.hint_int(v, fallback=4096))


def _nbytes(t: torch.Tensor) -> int:
    return _hint(t.numel()) * t.element_size()


def _storage(t: torch.Tensor) -> Any:
    try:
        from torch.multiprocessing.reductions import StorageWeakRef

        return StorageWeakRef(t.untyped_storage())
    except Exception:  # a tensor without storage (e.g. sparse): identify by object
        return ("tensor", id(t))


def _tensors(node: fx.Node) -> list[torch.Tensor]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return [val]
    return []


def _outputs(gm: fx.GraphModule) -> tuple[fx.Node, list[Any]]:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return out, list(out.args[0])


def layer_path(node: fx.Node) -> str | None:
    """Path of the repeated block (``...layers.3``) a forward node belongs to, from ``nn_module_stack``."""
    from graphtune.passes.base import module_stack

    for path, _cls in module_stack(node):
        if path.rsplit(".", 1)[-1].isdigit():
            return path
    return None


def _tangent_closure(graph: fx.Graph) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.users)
    return seen


def layer_regions(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """Forward nodes of the joint graph grouped by decoder layer, layers in forward order."""
    backward = _tangent_closure(graph)
    regions: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node in backward:
            continue
        path = layer_path(node)
        if path is not None:
            regions.setdefault(path, []).append(node)
    return regions


# ---------------------------------------------------------------------------------------------
# Peak estimation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PeakEstimate:
    """Activation memory of a partition, in bytes at the capture shape (weights excluded)."""

    forward_peak: int
    backward_peak: int
    saved_bytes: int  # saved activations resident on the device between forward and backward
    offloaded_bytes: int  # saved activations kept in host memory instead

    @property
    def peak(self) -> int:
        return max(self.forward_peak, self.backward_peak)


def _simulate(gm: fx.GraphModule, live: dict[Any, int], static: set[Any], host: set[Any], keep: set[Any]) -> int:
    """Walk ``gm`` in order and return the peak of the live bytes; ``live`` starts with the inputs.

    A node allocates the storages of its outputs not seen before (views and weights allocate
    nothing, ``offload`` allocates host memory, recorded in ``host``); a storage is freed after the
    last user of any node holding it, unless it is in ``keep`` (graph outputs).
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last_use: dict[Any, int] = {}
    for node in gm.graph.nodes:
        for t in _tensors(node):
            key = _storage(t)
            end = max((order[u] for u in node.users), default=order[node])
            last_use[key] = max(last_use.get(key, end), end)
    frees: dict[int, list[Any]] = {}
    for key, idx in last_use.items():
        if key not in keep:
            frees.setdefault(idx, []).append(key)
    current = sum(live.values())
    peak = current
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "output"):
            for t in _tensors(node):
                key = _storage(t)
                if node.target is _OFFLOAD:
                    host.add(key)
                if key in live or key in static or key in host:
                    continue
                live[key] = _nbytes(t)
                current += live[key]
            peak = max(peak, current)
        for key in frees.get(order[node], ()):
            if key in live:
                current -= live.pop(key)
    return peak


def estimate_peak(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> PeakEstimate:
    """Estimate the activation peak of a partition by walking both graphs in execution order.

    Every node output is allocated when produced and freed after its storage's last use; graph
    inputs of the forward (weights, token ids) are static and not counted. Saved activations stay
    alive from the forward into the backward unless offloaded; the model outputs (logits) stay alive
    through the backward; tangents count from the backward's start. Inductor fuses and reorders, so
    this is a consistent proxy for comparing plans, not a measurement.
    """
    static = {_storage(t) for n in fw.graph.nodes if n.op == "placeholder" for t in _tensors(n)}
    _, fw_outs = _outputs(fw)
    user_outs = [o for o in fw_outs[:num_fwd_outputs] if isinstance(o, fx.Node)]
    saved = [o for o in fw_outs[num_fwd_outputs:] if isinstance(o, fx.Node)]
    keep = {_storage(t) for o in fw_outs if isinstance(o, fx.Node) for t in _tensors(o)}
    host: set[Any] = set()
    fw_peak = _simulate(fw, {}, static, host, keep)

    saved_bytes = offloaded_bytes = 0
    seen: set[Any] = set()
    for o in saved:
        for t in _tensors(o):
            key = _storage(t)
            if key in static or key in seen:
                continue
            seen.add(key)
            if key in host:
                offloaded_bytes += _nbytes(t)
            else:
                saved_bytes += _nbytes(t)

    live: dict[Any, int] = {}
    for o in user_outs:
        for t in _tensors(o):
            key = _storage(t)
            if key not in static and key not in host:
                live[key] = _nbytes(t)
    bw_keep = set(live)  # model outputs outlive the backward
    for node in bw.graph.nodes:
        if node.op != "placeholder":
            continue
        for t in _tensors(node):
            key = _storage(t)
            if key in static or key in host or node.meta.get("graphtune_offloaded"):
                continue
            live[key] = _nbytes(t)
    bw_peak = _simulate(bw, live, static, host, bw_keep)
    return PeakEstimate(fw_peak, bw_peak, saved_bytes, offloaded_bytes)


# ---------------------------------------------------------------------------------------------
# Offload insertion (after partitioning)
# ---------------------------------------------------------------------------------------------


def offload_candidates(fw: fx.GraphModule, num_fwd_outputs: int) -> list[int]:
    """Indices (into the forward outputs) of saved activations that may be offloaded, in forward order.

    Offloadable: a contiguous tensor produced by the forward (not a weight, not a view of one), at
    least ``OFFLOAD_MIN_BYTES`` large, on CUDA (or on CPU when ``OFFLOAD_CPU_TENSORS``), whose storage
    is not shared with a model output or another saved tensor, and whose forward readers all sit in
    one decoder layer: a layer input. The backward needs it only when it reaches that layer, which
    is what gives a prefetch time to hide; a tensor every layer reads (rotary cos/sin) or the head
    reads (needed first thing in the backward) would come straight back.
    """
    static = {_storage(t) for n in fw.graph.nodes if n.op == "placeholder" for t in _tensors(n)}
    _, outs = _outputs(fw)
    owners: dict[Any, int] = {}
    for o in outs:
        for t in _tensors(o) if isinstance(o, fx.Node) else ():
            owners[_storage(t)] = owners.get(_storage(t), 0) + 1
    order = {n: i for i, n in enumerate(fw.graph.nodes)}
    picked = []
    for idx in range(num_fwd_outputs, len(outs)):
        o = outs[idx]
        ts = _tensors(o) if isinstance(o, fx.Node) else []
        if len(ts) != 1 or o.op == "placeholder" or o.target in (_OFFLOAD, _OFFLOAD_WAIT):
            continue
        t = ts[0]
        key = _storage(t)
        if key in static or owners.get(key, 0) != 1 or not t.is_contiguous():
            continue
        if t.device.type == "cpu" and not OFFLOAD_CPU_TENSORS:
            continue
        if t.device.type not in ("cuda", "cpu") or _nbytes(t) < OFFLOAD_MIN_BYTES:
            continue
        layers = {layer_path(u) for u in _readers(o)}
        if len(layers) != 1 or None in layers:
            continue
        picked.append(idx)
    picked.sort(key=lambda i: order[outs[i]])
    return picked


def _readers(node: fx.Node) -> list[fx.Node]:
    """Forward ops reading ``node`` directly or through views (the output node excluded)."""
    from torch._functorch.partitioners import get_default_op_list

    op_types = get_default_op_list()
    out, stack, seen = [], [node], {node}
    while stack:
        for u in stack.pop().users:
            if u.op != "call_function" or u in seen:
                continue
            seen.add(u)
            if op_types.is_view(u) or u.target is operator.getitem:
                stack.append(u)
            else:
                out.append(u)
    return out


def insert_offloads(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, indices: Sequence[int], lookahead: int = 1) -> list[str]:
    """Route the saved activations ``fw outputs[indices]`` through host memory; returns their names.

    Forward: ``host = offload(x)`` right after ``x`` is produced; ``offload_wait(host, x, next_host)``
    right after the next offload (the last one before the output). Backward: the placeholder now
    carries the host tensor; ``prefetch`` is issued where the ``lookahead``-th previous offloaded
    tensor is first used (the first ones at the start) and ``prefetch_wait`` right before first use.
    """
    if not indices:
        return []
    out_node, outs = _outputs(fw)
    fg = fw.graph
    fw_order = {n: i for i, n in enumerate(fg.nodes)}
    chosen = sorted(indices, key=lambda i: fw_order[outs[i]])
    hosts: list[fx.Node] = []
    for idx in chosen:
        x = outs[idx]
        with fg.inserting_after(x):
            h = fg.call_function(_OFFLOAD, (x,))
        h.meta["val"] = _offload_fake(x.meta["val"])
        hosts.append(h)
    for k, (idx, h) in enumerate(zip(chosen, hosts)):
        x = outs[idx]
        nxt = hosts[k + 1] if k + 1 < len(hosts) else None
        insert = fg.inserting_after(nxt) if nxt is not None else fg.inserting_before(out_node)
        with insert:
            w = fg.call_function(_OFFLOAD_WAIT, (h, x, nxt))
        w.meta["val"] = None
    new_outs = list(outs)
    for idx, h in zip(chosen, hosts):
        new_outs[idx] = h
    out_node.args = (tuple(new_outs),)
    fg.lint()
    fw.recompile()

    # backward: the placeholders that receive the saved tensors, in the forward's output order
    bg = bw.graph
    placeholders = [n for n in bg.nodes if n.op == "placeholder"]
    saved_phs = _saved_placeholders(placeholders, outs[num_fwd_outputs:])
    bw_order = {n: i for i, n in enumerate(bg.nodes)}
    items = []
    for idx, h in zip(chosen, hosts):
        ph = saved_phs[idx - num_fwd_outputs]
        device = ph.meta["val"].device
        ph.meta["val"] = h.meta["val"]  # the backward now receives the host tensor
        ph.meta["graphtune_offloaded"] = True
        if not ph.users:
            continue
        first = min(ph.users, key=lambda u: bw_order[u])
        items.append((bw_order[first], ph, first, device))
    items.sort(key=lambda it: it[0])
    last_ph = placeholders[-1]
    devs: list[fx.Node] = []
    for j, (_pos, ph, first, device) in enumerate(items):
        users = list(ph.users)
        where = items[j - lookahead][2] if j >= lookahead else None
        insert = bg.inserting_before(where) if where is not None else bg.inserting_after(last_ph)
        with insert:
            dev = bg.call_function(_PREFETCH, (ph, device))
        dev.meta["val"] = _prefetch_fake(ph.meta["val"], device)
        for u in users:
            u.replace_input_with(ph, dev)
        devs.append(dev)
        if where is None:
            last_ph = dev
    for j, (_pos, ph, first, device) in enumerate(items):
        ahead = devs[j + lookahead] if j + lookahead < len(devs) else None
        with bg.inserting_before(first):
            w = bg.call_function(_PREFETCH_WAIT, (devs[j], ahead))
        w.meta["val"] = None
    bg.lint()
    bw.recompile()
    return [outs[i].name for i in chosen]


def _saved_placeholders(placeholders: list[fx.Node], saved_outs: list[Any]) -> list[fx.Node | None]:
    """Backward placeholders receiving the saved forward outputs, aligned with ``saved_outs``.

    AOTAutograd's contract is positional: the saved *tensors* come in the same order at the end of
    the forward's outputs and before the tangents among the backward's inputs (saved symints sit at
    the forward's end and the backward's start; RNG states stashed for recomputed random ops are
    appended to the tensors on both sides, under different names). Non-tensor entries map to None.
    """
    tangent = next((i for i, p in enumerate(placeholders) if p.name.startswith("tangents")), len(placeholders))
    bw_tensors = [p for p in placeholders[:tangent] if isinstance(p.meta.get("val"), torch.Tensor)]
    fw_tensors = [i for i, o in enumerate(saved_outs) if isinstance(o, fx.Node) and isinstance(o.meta.get("val"), torch.Tensor)]
    if len(bw_tensors) != len(fw_tensors):
        raise RuntimeError(f"graphtune memory: {len(fw_tensors)} saved tensors in the forward, {len(bw_tensors)} in the backward")
    out: list[fx.Node | None] = [None] * len(saved_outs)
    for i, ph in zip(fw_tensors, bw_tensors):
        a, b = saved_outs[i].meta["val"], ph.meta["val"]
        if a.dtype != b.dtype or a.dim() != b.dim():
            raise RuntimeError(f"graphtune memory: saved {saved_outs[i].name} does not line up with backward input {ph.name}")
        out[i] = ph
    return out


# ---------------------------------------------------------------------------------------------
# Plans and the policy
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    checkpoint: tuple[str, ...] = ()  # decoder layers recomputed in the backward
    offload: int = 0  # how many offload candidates (in forward order) go to host memory
    products: bool = False  # in the layers kept, recompute the GLU products and norm outputs

    def describe(self, n_layers: int) -> str:
        products = self.products and len(self.checkpoint) < n_layers
        if not self.checkpoint and not self.offload and not products:
            return "keep (partitioner default)"
        parts = [f"recompute {len(self.checkpoint)}/{n_layers} layers"] if self.checkpoint else []
        if products:
            kept = n_layers - len(self.checkpoint)
            parts.append(f"recompute the GLU products and norm outputs of {kept} layer{'s' if kept != 1 else ''}")
        if self.offload:
            parts.append(f"offload {self.offload} saved tensors")
        return " + ".join(parts)


@dataclasses.dataclass
class MemoryDecision:
    """What the policy chose for one captured graph (see :attr:`MemoryPolicy.decisions`)."""

    budget: str
    target_bytes: int | None
    plan: str
    checkpointed: list[str]
    offloaded: list[str]
    estimate: PeakEstimate
    default_estimate: PeakEstimate
    tried: list[tuple[str, int]]
    fits: bool
    recomputed_ops: int = 0  # forward ops that also run in the backward
    forward_graph: fx.GraphModule | None = dataclasses.field(default=None, repr=False)
    backward_graph: fx.GraphModule | None = dataclasses.field(default=None, repr=False)

    def summary(self) -> str:
        e, d = self.estimate, self.default_estimate
        lines = [
            f"memory budget {self.budget or '(HF gradient checkpointing)'}"
            + (f" -> target {format_bytes(self.target_bytes)}" if self.target_bytes is not None else "")
            + f": {self.plan}",
            f"  estimated activation peak {format_bytes(e.peak)} (default plan {format_bytes(d.peak)}); "
            f"saved on device {format_bytes(e.saved_bytes)} (default {format_bytes(d.saved_bytes)}), on host {format_bytes(e.offloaded_bytes)}; "
            f"{self.recomputed_ops} forward ops rerun in the backward",
        ]
        if not self.fits:
            lines.append("  the budget is below the smallest plan; using the smallest")
        return "\n".join(lines)


def recomputed_ops(fw: fx.GraphModule, bw: fx.GraphModule) -> int:
    """Forward ops (not views or getitems) that the backward recomputes: same node name in both graphs."""
    from torch._functorch.partitioners import get_default_op_list

    op_types = get_default_op_list()
    fw_ops = {n.name for n in fw.graph.nodes if n.op == "call_function"}
    return sum(
        1
        for n in bw.graph.nodes
        if n.op == "call_function" and n.name in fw_ops and n.target is not operator.getitem and not op_types.is_view(n)
    )


def _min_cut_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    params = inspect.signature(min_cut_rematerialization_partition).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _copy_joint(joint: fx.GraphModule) -> fx.GraphModule:
    gm = fx.GraphModule(joint, copy.deepcopy(joint.graph))
    gm.meta = dict(getattr(joint, "meta", {}))
    return gm


class MemoryPolicy:
    """Budget -> plan, as an AOTAutograd partition function (see the module docstring).

    ``budget`` None with no layers marked by HF checkpointing means: do nothing, the normal compiler
    path runs. ``lookahead``: how many offloaded tensors ahead the backward prefetches.
    """

    def __init__(self, budget: MemoryBudget | None, lookahead: int = 1):
        if lookahead < 1:
            raise ValueError("lookahead must be >= 1")
        self.budget = budget
        self.lookahead = lookahead
        self.hf_checkpointed: tuple[str, ...] = ()  # set by hf_checkpointing_off during a call
        self.device = torch.device("cpu")  # the partitioned graph's device, set by partition()
        self.decisions: list[MemoryDecision] = []

    @property
    def active(self) -> bool:
        return self.budget is not None or bool(self.hf_checkpointed)

    @property
    def last(self) -> MemoryDecision | None:
        return self.decisions[-1] if self.decisions else None

    # -- compiler integration ------------------------------------------------------------------
    def wrap_compiler(self, compiler: str | Callable) -> Callable:
        """A dynamo-backend-style callable that compiles with this policy's partitioner when active."""
        from graphtune.capture import compile_graph

        policy = self

        def compile_with_memory_policy(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
            if not policy.active:
                return compile_graph(gm, example_inputs, compiler)
            if policy.budget is None and compiler not in MEMORY_COMPILERS:
                warnings.warn(
                    f"graphtune: HF gradient checkpointing is switched off inside the captured call and compiler={compiler!r} "
                    "cannot recompute layers; activations are kept (use 'inductor' or 'aot_eager')",
                    stacklevel=2,
                )
                return compile_graph(gm, example_inputs, compiler)
            return policy.compile(gm, example_inputs, compiler)

        compile_with_memory_policy.memory_policy = policy  # type: ignore[attr-defined]
        return compile_with_memory_policy

    def compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any], compiler: str | Callable) -> Callable:
        if compiler == "inductor":
            from torch._inductor.compile_fx import compile_fx

            # AOTAutograd's cache sits above the partition: a hit would skip the plan (it depends on the
            # budget and on the free memory now, and the report reads it from this policy), so it is
            # off for this compile. Inductor's FX graph cache sits below it and keys the partitioned
            # graphs, so it stays on: a later process with the same plan reuses the compiled kernels.
            import torch._functorch.config as functorch_config

            no_aot_cache = (functorch_config.patch(enable_autograd_cache=False)
                            if hasattr(functorch_config, "enable_autograd_cache") else contextlib.nullcontext())
            with no_aot_cache:
                return compile_fx(gm, list(example_inputs), config_patches={"custom_partitioner_fn": _inductor_partitioner(self)})
        if compiler == "aot_eager":
            from torch._dynamo.backends.common import aot_autograd
            from torch._dynamo.backends.debugging import boxed_nop

            return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=self.partition, keep_inference_input_mutations=True)(gm, example_inputs)
        raise ValueError(f"memory_budget needs compiler 'inductor' or 'aot_eager' (it acts on AOTAutograd's partition), not {compiler!r}")

    # -- the partition function ----------------------------------------------------------------
    def partition(self, joint: fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
        num_fwd_outputs = kwargs["num_fwd_outputs"]
        tensors = [t for t in torch.utils._pytree.tree_leaves(joint_inputs) if isinstance(t, torch.Tensor)]
        # the graph's device: any accelerator tensor among the inputs, else the host
        self.device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
        layers = list(layer_regions(joint.graph))
        runs: dict[Plan, tuple[fx.GraphModule, fx.GraphModule, PeakEstimate, list[str]]] = {}

        def run(plan: Plan, final: bool = False):
            if plan in runs and not final:
                return runs[plan]
            target = joint if final else _copy_joint(joint)
            fw, bw = self._partition_plan(target, joint_inputs, plan, kwargs)
            offloaded: list[str] = []
            if plan.offload:
                cands = offload_candidates(fw, num_fwd_outputs)[: plan.offload]
                offloaded = insert_offloads(fw, bw, num_fwd_outputs, cands, self.lookahead)
            res = (fw, bw, estimate_peak(fw, bw, num_fwd_outputs), offloaded)
            runs[plan] = res
            return res

        default = run(Plan())
        target_bytes, fits = None, True
        if self.budget is None:  # HF gradient checkpointing: recompute exactly the layers it marked
            marked = set(self.hf_checkpointed)
            plan = Plan(checkpoint=tuple(p for p in layers if p in marked))
        elif self.budget.plan is not None:
            plan = Plan(checkpoint=tuple(layers))
            if self.budget.plan == "offload":
                plan = Plan(checkpoint=plan.checkpoint, offload=len(offload_candidates(run(plan)[0], num_fwd_outputs)))
        else:
            plan, target_bytes, fits = self._search(layers, run, default[2], num_fwd_outputs)
        fw, bw, est, offloaded = run(plan, final=True)
        tried = [(p.describe(len(layers)), r[2].peak) for p, r in runs.items()]
        decision = MemoryDecision(
            budget=self.budget.text if self.budget else "",
            target_bytes=target_bytes,
            plan=plan.describe(len(layers)),
            checkpointed=list(plan.checkpoint),
            offloaded=offloaded,
            estimate=est,
            default_estimate=default[2],
            tried=tried,
            fits=fits,
            recomputed_ops=recomputed_ops(fw, bw),
            forward_graph=fw,
            backward_graph=bw,
        )
        self.decisions.append(decision)
        if not fits:
            warnings.warn(
                f"graphtune: memory_budget={self.budget.text} is below the smallest plan graphtune can build; "
                f"using it.\n{decision.summary()}",
                stacklevel=2,
            )
        return fw, bw

    def _search(self, layers: list[str], run: Callable, default: PeakEstimate, num_fwd_outputs: int) -> tuple[Plan, int, bool]:
        """First plan of the ladder whose estimated peak fits; the smallest plan if none does.

        The ladder (module docstring) is ordered by cost and, nearly, by decreasing peak; a binary
        search over it partitions O(log L) candidates instead of all of them.
        """
        target = self.budget.target(free_device_memory(self.device))
        if default.peak <= target:
            return Plan(), target, True
        # the cheap products ride along in the layers still kept (with every layer recomputed there are none)
        ladder = [Plan(checkpoint=tuple(layers[:n]), products=n < len(layers)) for n in range(len(layers) + 1)]
        full = ladder[-1] if ladder else Plan()
        n_off = len(offload_candidates(run(full)[0], num_fwd_outputs))
        ladder += [Plan(checkpoint=full.checkpoint, offload=k) for k in range(1, n_off + 1)]
        if not ladder:
            return Plan(), target, self.budget.fraction == 0.0
        smallest = min(run(ladder[-1])[2].peak, run(full)[2].peak)
        fits = smallest <= target
        goal = target if fits else smallest
        hi = len(ladder) - 1
        while hi > 0 and run(ladder[hi])[2].peak > goal:  # offloading that did not pay: step back
            hi -= 1
        lo = 0
        while lo < hi:  # invariant: ladder[hi] fits the goal
            mid = (lo + hi) // 2
            if run(ladder[mid])[2].peak <= goal:
                hi = mid
            else:
                lo = mid + 1
        return ladder[hi], target, fits or self.budget.fraction == 0.0

    def _partition_plan(self, joint: fx.GraphModule, joint_inputs: Any, plan: Plan, kwargs: dict[str, Any]):
        from torch._functorch.partitioners import min_cut_rematerialization_partition
        from torch.utils.checkpoint import CheckpointPolicy

        if plan.checkpoint or plan.products:
            regions = layer_regions(joint.graph)
            for gid, path in enumerate(plan.checkpoint, start=1):
                for node in regions.get(path, ()):
                    if not _replayable(node) or node.meta.get("recompute") is not None:
                        continue
                    node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
                    node.meta["ac_graph_id"] = gid
            if plan.products:  # one region per recomputed op: only that op reruns, from saved inputs
                gid = len(plan.checkpoint) + 1
                for path, nodes in regions.items():
                    if path in plan.checkpoint:
                        continue
                    for node in nodes:
                        if not _cheap_to_recompute(node) or node.meta.get("recompute") is not None:
                            continue
                        for n in (node, *(u for u in node.users if u.target is operator.getitem)):
                            n.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
                            n.meta["ac_graph_id"] = gid
                        gid += 1
        return min_cut_rematerialization_partition(joint, joint_inputs, **_min_cut_kwargs(kwargs))


# elementwise ops whose inputs a layer's backward holds anyway (gate and up; the norm's input): rerunning
# them costs one memory-bound kernel each and frees their outputs, the largest being the MLP's product
# (names: this module does not import the kernels that register them)
CHEAP_RECOMPUTE = frozenset({"graphtune::swiglu", "graphtune::geglu", "graphtune::rms_norm"})


def _cheap_to_recompute(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return schema is not None and schema.name in CHEAP_RECOMPUTE


def _replayable(node: fx.Node) -> bool:
    """May a recomputed layer rerun this op? Not a random op -- except attention with ``dropout_p=0``.

    SDPA / flash / cuDNN attention carry the ``nondeterministic_seeded`` tag for their dropout; with
    ``dropout_p=0`` they are deterministic and recomputing them is what makes a recomputed layer
    cheap to keep (else its attention output and logsumexp stay saved). The partitioner wraps such
    tagged ops in its RNG-state functionalization, as it does for ``torch.utils.checkpoint``.
    A real dropout is never replayed: its output is saved instead.
    """
    if torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
        return True
    schema = getattr(node.target, "_schema", None)
    for i, arg in enumerate(schema.arguments if schema is not None else ()):
        if arg.name != "dropout_p":
            continue
        if arg.name in node.kwargs:
            value = node.kwargs[arg.name]
        elif i < len(node.args) and not arg.kwarg_only:
            value = node.args[i]
        else:
            value = arg.default_value
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0
    return False


_PARTITIONER_UUID = "graphtune-memory-policy-1"


def _inductor_partitioner(policy: MemoryPolicy | None) -> Any:
    """Inductor's ``custom_partitioner_fn``: a ``CustomPartitionerFn`` whose cache identity is stable.

    The FX graph cache keys the graphs *after* this partition (the plan is in them), so a fixed uuid
    lets a later process reuse inductor's compile of the same plan, while the partition itself (and
    the plan recorded for the report) still runs in every process. Pickling, which the cache key
    does, keeps the uuid only, never the policy and its graphs."""
    from torch._inductor.custom_graph_pass import CustomPartitionerFn  # here: inductor imports in ~1 s

    class GraphtunePartitioner(CustomPartitionerFn):
        def __call__(self, gm, joint_inputs, **kwargs):
            if policy is None:
                raise RuntimeError("a graphtune partitioner restored from a pickle has no memory policy")
            return policy.partition(gm, joint_inputs, **kwargs)

        def uuid(self):
            return _PARTITIONER_UUID

        def __reduce__(self):
            return (_restored_partitioner, ())

    return GraphtunePartitioner()


def _restored_partitioner() -> Any:
    return _inductor_partitioner(None)


# ---------------------------------------------------------------------------------------------
# HF gradient checkpointing
# ---------------------------------------------------------------------------------------------

_INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


@contextlib.contextmanager
def hf_checkpointing_off(model: torch.nn.Module, policy: MemoryPolicy | None = None) -> Iterator[tuple[str, ...]]:
    """Inside: HF gradient checkpointing is off and the input-embedding ``requires_grad_`` hooks are gone.

    ``gradient_checkpointing_enable()`` makes each decoder layer call ``torch.utils.checkpoint`` (a
    HOP whose body the passes cannot rewrite; its logger warnings break ``fullgraph``), and peft adds
    a forward hook calling ``requires_grad_`` on the embedding output (needed only by reentrant
    checkpointing; dynamo refuses it). Both are restored on exit. The paths of the layers that were
    checkpointed are yielded and stored on ``policy`` so that it recomputes the same layers itself.
    """
    flagged: list[torch.nn.Module] = []
    layers: list[str] = []
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            flagged.append(module)
            if name.rsplit(".", 1)[-1].isdigit():
                layers.append(name)
    touched: list[tuple[dict, list]] = []  # hook dicts edited, with their items in order
    for module in model.modules():
        hooks = getattr(module, "_forward_hooks", None)
        if hooks and any(getattr(fn, "__name__", "") in _INPUT_GRAD_HOOKS for fn in hooks.values()):
            touched.append((hooks, list(hooks.items())))
            for hid, fn in list(hooks.items()):
                if getattr(fn, "__name__", "") in _INPUT_GRAD_HOOKS:
                    del hooks[hid]
    for module in flagged:
        module.gradient_checkpointing = False
    if policy is not None and layers:
        policy.hf_checkpointed = tuple(layers)
    try:
        yield tuple(layers)
    finally:
        for module in flagged:
            module.gradient_checkpointing = True
        for hooks, items in touched:
            hooks.clear()
            hooks.update(items)
