"""Run one pass over a small module's captured graph and compare with eager, forward and backward."""

from __future__ import annotations

import copy

import torch

import graphtune
from graphtune.passes import pass_by_name
from tests.conftest import rel_err


def check_pass(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], pass_name: str, *, tol: float = 1e-5, grad_inputs: tuple[bool, ...] | None = None):
    """Optimize a copy with only ``pass_name``; assert outputs and input/param grads match eager."""
    ref = module
    opt = graphtune.optimize(copy.deepcopy(module), passes=[pass_name], compiler="aot_eager")
    grad_inputs = grad_inputs or tuple(x.is_floating_point() for x in inputs)
    ref_in = [x.detach().clone().requires_grad_(g) for x, g in zip(inputs, grad_inputs)]
    opt_in = [x.detach().clone().requires_grad_(g) for x, g in zip(inputs, grad_inputs)]
    out_ref, out_opt = ref(*ref_in), opt(*opt_in)
    out_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    out_opt = out_opt if isinstance(out_opt, tuple) else (out_opt,)
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(o.shape, generator=g) for o in out_ref]
    sum(((o * w).sum() for o, w in zip(out_ref, weights))).backward()
    sum(((o * w).sum() for o, w in zip(out_opt, weights))).backward()
    for a, b in zip(out_opt, out_ref):
        assert rel_err(a, b) <= tol
    for a, b in zip(opt_in, ref_in):
        if b.grad is not None:
            assert rel_err(a.grad, b.grad) <= tol
    for (n, a), (_, b) in zip(opt.named_parameters(), ref.named_parameters()):
        if b.requires_grad:
            assert rel_err(a.grad, b.grad) <= tol, n
    return graphtune.last_report(opt)


def explain_one(module: torch.nn.Module, inputs: tuple, pass_name: str):
    report = graphtune.explain(module, *inputs, passes=[pass_by_name(pass_name)])
    return next(p for p in report.passes if p.name == pass_name), report
