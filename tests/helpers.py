"""Comparison of an optimized model against its eager twin (same seed, same weights)."""

from __future__ import annotations

import torch

from graphtune.tiny import tiny_batch, tiny_model
from tests.conftest import rel_err

SHAPES = ((2, 8), (3, 11))  # the second has an odd sequence length


def twin_models(family: str, *, lora: bool, **kw):
    ref = tiny_model(family, lora=lora, **kw)
    opt = tiny_model(family, lora=lora, **kw)
    ref.train()
    opt.train()
    return ref, opt


def compare_step(ref, opt, batch, *, tol: float = 1e-5) -> dict[str, float]:
    """Run forward+backward on both with the same batch; return the worst relative errors."""
    out_ref = ref(**batch)
    out_ref.loss.backward()
    out_opt = opt(**batch)
    out_opt.loss.backward()
    errs = {"loss": rel_err(out_opt.loss, out_ref.loss)}
    if out_opt.logits.shape[-1] == 0 and out_opt.logits.shape[:-1] == out_ref.logits.shape[:-1]:
        errs["logits"] = 0.0  # fuse_linear_cross_entropy: training graphs return empty [B, T, 0] logits
    else:
        errs["logits"] = rel_err(out_opt.logits, out_ref.logits)
    grad_errs = {}
    for (name, p_ref), (_, p_opt) in zip(ref.named_parameters(), opt.named_parameters()):
        if p_ref.requires_grad:
            assert p_opt.grad is not None, f"{name} got no gradient from the optimized model"
            grad_errs[name] = rel_err(p_opt.grad, p_ref.grad)
    errs["grad"] = max(grad_errs.values())
    worst = max(grad_errs, key=grad_errs.get)
    for key in ("loss", "logits", "grad"):
        assert errs[key] <= tol, f"{key} relative error {errs[key]:.3g} > {tol} (worst grad: {worst})"
    ref.zero_grad(set_to_none=True)
    opt.zero_grad(set_to_none=True)
    return errs


def batches():
    return [tiny_batch(b, s, seed=s) for b, s in SHAPES]


__all__ = ["SHAPES", "batches", "compare_step", "twin_models", "tiny_batch", "tiny_model", "torch"]
