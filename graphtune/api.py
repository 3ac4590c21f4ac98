"""Public entry points: ``optimize``, ``explain``, ``restore``, ``last_report``.

``optimize`` does not monkey-patch classes or modules: it sets one *instance* attribute, the model's
``forward``, to a callable that validates inputs, marks batch/sequence dims dynamic and calls a
dynamo-compiled entry whose backend rewrites the captured graph. ``restore`` removes it again.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from graphtune.capture import COMPILERS, CapturedGraph, capture, fresh_entry, make_backend, mark_dynamic_inputs
from graphtune.errors import CaptureError, GraphtuneError, VerificationError
from graphtune.memory import MEMORY_COMPILERS, MemoryBudget, MemoryPolicy, hf_checkpointing_off, parse_budget, resolve_default_budget  # memory_budget
from graphtune.passes import Pass, default_passes, pass_by_name
from graphtune.report import Report

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# max|optimized - eager| / max|eager| allowed by verify=True, per compute dtype
VERIFY_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}

_INTEGER_INPUTS = ("input_ids", "labels", "position_ids", "attention_mask")


def _model_device(model: torch.nn.Module) -> torch.device | None:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else None


def _resolve_passes(passes: Sequence[Pass | str] | None, device: torch.device | None = None) -> list[Pass]:
    if passes is None:
        return default_passes(device.type if device is not None else None)
    out = []
    for p in passes:
        if isinstance(p, str):
            out.append(pass_by_name(p))
        elif isinstance(p, Pass):
            out.append(p)
        else:
            raise TypeError(f"passes must be Pass instances or pass names, got {type(p).__name__}")
    return out


def _check_model(model: Any) -> torch.dtype:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"graphtune.optimize expects a torch.nn.Module, got {type(model).__name__}")
    dtypes = set()
    for name, p in model.named_parameters():
        if p.is_floating_point():
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"parameter {name} has dtype {p.dtype}; graphtune supports "
                    f"{', '.join(str(d) for d in SUPPORTED_DTYPES)} models"
                )
            dtypes.add(p.dtype)
    # the least precise dtype present decides the verification tolerance
    for d in (torch.float16, torch.bfloat16, torch.float32):
        if d in dtypes:
            return d
    return torch.float32


def _check_inputs(args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """Clear errors for inputs no causal-LM graph can serve, before dynamo turns them into traces."""
    batch_shape = None
    for key in _INTEGER_INPUTS:
        value = kwargs.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key} must be a torch.Tensor, got {type(value).__name__}")
        if key != "attention_mask" and value.is_floating_point():
            raise TypeError(f"{key} must be an integer tensor, got {value.dtype}")
        if value.dim() != 2:
            raise ValueError(f"{key} must be 2-D [batch, sequence], got shape {tuple(value.shape)}")
        if value.numel() == 0:
            raise ValueError(f"{key} is empty (shape {tuple(value.shape)})")
        if batch_shape is None:
            batch_shape = (key, tuple(value.shape))
        elif key != "attention_mask" and tuple(value.shape) != batch_shape[1]:
            raise ValueError(f"{key} has shape {tuple(value.shape)} but {batch_shape[0]} has {batch_shape[1]}")
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None and embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be 3-D [batch, sequence, hidden], got {tuple(embeds.shape)}")
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and i == 0 and not a.is_floating_point() and a.dim() != 2:
            raise ValueError(f"input_ids must be 2-D [batch, sequence], got shape {tuple(a.shape)}")


def _attention_configs(model: torch.nn.Module) -> list[Any]:
    """Configs of the transformers models in ``model`` that can run graphtune's attention node."""
    if "transformers" not in sys.modules:  # not a transformers model: nothing to switch
        return []
    from graphtune import attention

    return attention.configs(model)


def _attention_scope(configs: list[Any]) -> contextlib.AbstractContextManager:
    """Inside: every config in ``configs`` uses ``attn_implementation="graphtune"`` (restored after)."""
    if not configs:
        return contextlib.nullcontext()
    from graphtune import attention

    return attention.implementation(configs)


def _outputs_to_tensors(out: Any) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"output": out}
    items = out.items() if hasattr(out, "items") else enumerate(out if isinstance(out, (tuple, list)) else [])
    return {str(k): v for k, v in items if isinstance(v, torch.Tensor)}


def _scalar(outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """What to differentiate for verification: the loss if present, else a fixed projection of outputs."""
    if "loss" in outputs and outputs["loss"].requires_grad:
        return outputs["loss"]
    total = None
    for name in sorted(outputs):
        t = outputs[name]
        if not (t.requires_grad and t.is_floating_point()):
            continue
        g = torch.Generator().manual_seed(1234)
        w = torch.randn(t.shape, generator=g, dtype=torch.float32, device="cpu").to(t.device)
        term = (t.float() * w).sum()
        total = term if total is None else total + term
    return total


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a - b).abs().max().item() / max(scale, 1e-12) if a.numel() else 0.0


def _logits_not_materialized(ref: torch.Tensor, got: torch.Tensor, report: Report | None) -> bool:
    """fuse_linear_cross_entropy fired: the graph returns an empty ``[..., 0]`` tensor where the logits were."""
    return (
        report is not None
        and report.counts.get("fuse_linear_cross_entropy", 0) > 0
        and got.numel() == 0
        and got.shape[:-1] == ref.shape[:-1]
    )


class OptimizedForward:
    """The callable installed as ``model.forward`` by :func:`optimize`."""

    def __init__(self, model: torch.nn.Module, passes: list[Pass], compiler: str | Callable, verify: bool, dtype: torch.dtype, attention: bool = True, memory_budget: MemoryBudget | None = None):
        self.model = model
        # memory_budget (graphtune/memory.py): the policy partitions with keep/recompute/offload decisions
        self.memory = MemoryPolicy(memory_budget)
        compiler = self.memory.wrap_compiler(compiler)
        # switched only for the duration of each compiled call: eager use of the model is untouched
        self.attention_configs = _attention_configs(model) if attention else []
        self.original_forward = type(model).forward.__get__(model)
        self.passes = passes
        self.compiler = compiler
        self.verify = verify
        self.dtype = dtype
        self.captures: list[CapturedGraph] = []
        self.passthrough = False  # set when nothing in the graph is known: the model stays eager
        self._compiled = self._build(passes, compiler, self.captures.append)

    def _build(self, passes: list[Pass], compiler: str | Callable, sink: Callable[[CapturedGraph], None]) -> Callable:
        backend = make_backend(self.model, passes, compiler, sink)
        return torch.compile(fresh_entry(self.original_forward), backend=backend, fullgraph=True)

    @property
    def report(self) -> Report | None:
        return self.captures[-1].report if self.captures else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.passthrough:
            return self.original_forward(*args, **kwargs)
        _check_inputs(args, kwargs)
        if self.attention_configs and self.model.training and "use_cache" not in kwargs:
            # a training step never reads a KV cache; building one costs a copy of k and v per layer.
            # Only with graphtune's attention: HF's own mask code would then build a [B, 1, T, T] mask.
            kwargs["use_cache"] = False
        first = not self.captures
        if first and self.verify:
            return self._verified_call(args, kwargs)
        out = self._call_compiled(self._compiled, args, kwargs)
        if first and self.report is not None and self.report.total_rewrites == 0:
            self._give_up()
        return out

    def _give_up(self) -> None:
        warnings.warn(
            "graphtune found no known pattern in this model; it is left unchanged (eager).\n"
            + self.report.summary(),
            stacklevel=3,
        )
        self.passthrough = True

    def _call_compiled(self, fn: Callable, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        mark_dynamic_inputs(args, kwargs)
        try:
            with _attention_scope(self.attention_configs), hf_checkpointing_off(self.model, self.memory):
                return fn(*args, **kwargs)
        except GraphtuneError:
            raise
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
            raise CaptureError(f"graphtune could not capture this model's forward as one graph: {e}") from e
        except torch._dynamo.exc.TorchRuntimeError as e:
            shapes = {k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            raise CaptureError(f"the captured graph cannot serve inputs with shapes {shapes}: {e}") from e

    # -- verification --------------------------------------------------------------------------
    def _run_and_grad(self, fn: Callable, args, kwargs, params) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = fn(*args, **kwargs)
        tensors = _outputs_to_tensors(out)
        scalar = _scalar(tensors)
        grads: dict[str, torch.Tensor] = {}
        if scalar is not None and params:
            names, ps = zip(*params)
            gs = torch.autograd.grad(scalar, ps, allow_unused=True)
            grads = {n: g for n, g in zip(names, gs) if g is not None}
        return out, tensors, grads

    def _compare(self, ref: tuple, got: tuple) -> list[str]:
        tol = VERIFY_TOLERANCE[self.dtype]
        problems = []
        for kind, r, g in (("output", ref[1], got[1]), ("grad", ref[2], got[2])):
            for name in sorted(r):
                if name not in g:
                    problems.append(f"{kind} {name} missing from the optimized run")
                    continue
                if kind == "output" and _logits_not_materialized(r[name], g[name], self.report):
                    continue  # fuse_linear_cross_entropy returns an empty [..., 0] tensor as logits
                if r[name].shape != g[name].shape:
                    problems.append(f"{kind} {name} shape {tuple(g[name].shape)} != eager {tuple(r[name].shape)}")
                    continue
                err = _rel_err(g[name], r[name])
                if not err <= tol:
                    problems.append(f"{kind} {name}: relative error {err:.3g} > {tol:g}")
        return problems

    def _verified_call(self, args, kwargs) -> Any:
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        ref = self._run_and_grad(self.original_forward, args, kwargs, params)
        got = self._run_and_grad(lambda *a, **k: self._call_compiled(self._compiled, a, k), args, kwargs, params)
        problems = self._compare(ref, got)
        if problems:
            raise VerificationError(self._blame(args, kwargs, params, ref) + "\n  " + "\n  ".join(problems[:20]))
        if self.report is not None and self.report.total_rewrites == 0:
            self._give_up()
            return self.original_forward(*args, **kwargs)
        # the verification outputs' graph is consumed (compiled backwards donate buffers): run again
        return self._call_compiled(self._compiled, args, kwargs)

    def _blame(self, args, kwargs, params, ref) -> str:
        """Find the pass whose rewrite alone makes the result differ from eager."""
        trials: list[tuple[str, list[Pass]]] = [("no pass (the compiler itself)", [])]
        trials += [(f"pass {p.name!r}", [p]) for p in self.passes]
        for label, subset in trials:
            fn = self._build(subset, self.compiler, lambda _c: None)
            got = self._run_and_grad(lambda *a, **k: self._call_compiled(fn, a, k), args, kwargs, params)
            if self._compare(ref, got):
                return f"graphtune verification failed: {label} changes outputs or gradients vs eager"
        return "graphtune verification failed: passes differ from eager only in combination"


def optimize(
    model: torch.nn.Module,
    *,
    passes: Sequence[Pass | str] | None = None,
    compiler: str | Callable = "inductor",
    verify: bool = False,
    attention: bool = True,
    memory_budget: float | str | None = "auto",
) -> torch.nn.Module:
    """Return ``model`` (same object, plain or peft-wrapped) with a captured, rewritten, compiled forward.

    The graph is captured on the first call (and again when shapes/modes change beyond what the
    dynamic dims cover). ``compiler`` is ``"inductor"`` (default), ``"aot_eager"`` or ``"eager"``.
    With ``verify=True`` the first batch runs eagerly as well and outputs and gradients of the
    trainable parameters are compared; a difference raises :class:`VerificationError` naming the
    offending pass. A model in which no known pattern is found is left unchanged, with a warning
    that shows the report. With ``attention=True`` (default) a transformers model's attention runs
    through graphtune's attention node during optimized calls (``attn_implementation="graphtune"``,
    no ``[B, 1, T, T]`` mask; the ``dispatch_attention`` pass picks the kernel per layer);
    ``attention=False`` keeps the model's own implementation.
    ``memory_budget`` bounds activation memory (README, "Activation memory"): ``None`` keeps what the
    partitioner keeps; a fraction in [0, 1] or ``"60%"`` of the device memory free when the graph is
    compiled, or a size such as ``"4GiB"``; graphtune then recomputes decoder layers and offloads
    saved activations to host memory until the estimated peak fits (``"checkpoint"`` / ``"offload"``
    name those plans). The default ``"auto"`` is 0.9 of free memory on CUDA with an AOTAutograd
    compiler (nothing is recomputed while everything fits) and ``None`` elsewhere or when HF
    gradient checkpointing is on (its layers are then recomputed).
    HF ``gradient_checkpointing_enable()`` is honoured: graphtune recomputes the same layers itself
    (with ``memory_budget`` set, the budget decides).
    """
    dtype = _check_model(model)
    if isinstance(compiler, str) and compiler not in COMPILERS:
        raise ValueError(f"compiler must be one of {', '.join(COMPILERS)} or a dynamo backend callable, not {compiler!r}")
    device = _model_device(model)
    hf_checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    memory_budget = resolve_default_budget(memory_budget, device, aot_compiler=compiler in MEMORY_COMPILERS, hf_checkpointing=hf_checkpointing)
    budget = parse_budget(memory_budget)
    if budget is not None and compiler not in MEMORY_COMPILERS:
        raise ValueError(f"memory_budget needs compiler 'inductor' or 'aot_eager' (it acts on AOTAutograd's partition), not {compiler!r}")
    restore(model)
    model.forward = OptimizedForward(model, _resolve_passes(passes, device), compiler, verify, dtype, attention, budget)
    return model


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`optimize`: the model's class forward is used again."""
    if isinstance(model.__dict__.get("forward"), OptimizedForward):
        del model.__dict__["forward"]
    return model


def last_report(model: torch.nn.Module) -> Report | None:
    """The report of the most recent graph captured for an optimized model (None before the first call)."""
    fwd = model.__dict__.get("forward")
    return fwd.report if isinstance(fwd, OptimizedForward) else None


def explain(
    model: torch.nn.Module,
    *args: Any,
    passes: Sequence[Pass | str] | None = None,
    attention: bool = True,
    **example_inputs: Any,
) -> Report:
    """Capture ``model`` on the example inputs and report what the passes would do.

    The report holds the detected family, per-pass rewrite counts (and refusals with reasons),
    unmatched candidate modules, and the canonical text of the rewritten graph. The model is not
    changed; its forward runs once.
    """
    _check_model(model)
    _check_inputs(args, example_inputs)
    fwd = model.__dict__.get("forward")
    forward = fwd.original_forward if isinstance(fwd, OptimizedForward) else type(model).forward.__get__(model)
    try:
        with _attention_scope(_attention_configs(model) if attention else []), hf_checkpointing_off(model):
            captured, _ = capture(model, forward, args, example_inputs, _resolve_passes(passes, _model_device(model)))
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
        raise CaptureError(f"graphtune could not capture this model's forward as one graph: {e}") from e
    return captured.report
