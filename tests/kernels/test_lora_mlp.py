"""graphtune::lora_mlp against peft + HF's eager MLP, forward and backward: SwiGLU and GeGLU, separate
gate/up and Phi-3's fused gate_up, with and without recompute_gate_up and biases, odd shapes, fp32
and bf16; what the op saves for the backward; opcheck (fake impl and autograd registration)."""

from __future__ import annotations

import pytest
import torch

from graphtune.kernels.lora_mlp import lora_mlp, reference_lora_mlp
from tests.conftest import rel_err

# the Triton interpreter's sigmoid overflows numpy's exp() for large negative inputs (it still gives the limit, 0)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

SHAPES = [(2, 7, 24), (5, 33)]


def _make(shape, ffn, dtype, *, fused=False, bias=False, rank=4, out=None):
    k = shape[-1]
    out = out or k
    rows = [2 * ffn, out] if fused else [ffn, ffn, out]
    cols = [k, ffn] if fused else [k, k, ffn]
    x = torch.randn(shape, dtype=dtype)
    weights = [torch.randn(n, c, dtype=dtype) / c**0.5 for n, c in zip(rows, cols)]
    biases = [torch.randn(n, dtype=dtype) * 0.1 if bias and i != 1 else None for i, n in enumerate(rows)]  # up has none
    lora_as = [torch.randn(rank, c, dtype=dtype) / c**0.5 for c in cols]
    lora_bs = [torch.randn(n, rank, dtype=dtype) * 0.5 for n in rows]
    scalings = [2.0, 0.5, 1.5][: len(rows)]
    return x, weights, biases, lora_as, lora_bs, scalings


def _run(fn, x, weights, biases, lora_as, lora_bs, scalings, dy, **kw):
    xs = x.clone().requires_grad_()
    a = [t.clone().requires_grad_() for t in lora_as]
    b = [t.clone().requires_grad_() for t in lora_bs]
    bias = [t.clone().requires_grad_() if t is not None else None for t in biases]
    y = fn(xs, weights, bias, a, b, scalings, **kw)
    y.backward(dy)
    return [y.detach(), xs.grad] + [t.grad for t in a + b] + [t.grad for t in bias if t is not None]


@pytest.mark.parametrize("recompute", [False, True], ids=["save_gate_up", "recompute_gate_up"])
@pytest.mark.parametrize("fused, bias", [(False, False), (False, True), (True, False), (True, True)], ids=["separate", "separate_bias", "gate_up", "gate_up_bias"])
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_peft_fp32(shape, activation, fused, bias, recompute):
    args = _make(shape, 37, torch.float32, fused=fused, bias=bias, out=shape[-1] + 3)
    dy = torch.randn(*shape[:-1], shape[-1] + 3)
    got = _run(lora_mlp, *args, dy, activation=activation, recompute_gate_up=recompute)
    want = _run(reference_lora_mlp, *args, dy, activation=activation)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "gate_up"])
def test_bf16_as_close_as_peft(activation, fused):
    """bf16: within the anchors' tolerance of the fp32 math on the same inputs, and no worse than
    peft's own bf16 eager result."""
    args = _make((3, 11, 64), 96, torch.bfloat16, fused=fused)
    dy = torch.randn(3, 11, 64, dtype=torch.bfloat16)
    got = _run(lora_mlp, *args, dy, activation=activation)
    peft_bf16 = _run(reference_lora_mlp, *args, dy, activation=activation)
    x, weights, biases, lora_as, lora_bs, scalings = args
    exact = _run(
        reference_lora_mlp, x.float(), [w.float() for w in weights], biases, [a.float() for a in lora_as],
        [b.float() for b in lora_bs], scalings, dy.float(), activation=activation,
    )
    for g, p, e in zip(got, peft_bf16, exact):
        assert g.dtype == torch.bfloat16
        assert rel_err(g, e) <= 3e-2
        assert rel_err(g, e) <= 2 * rel_err(p, e) + 1e-2


@pytest.mark.parametrize("grad_kind", ["noncontig", "expanded"])
def test_upstream_grad_layouts(grad_kind, make_grad):
    args = _make((3, 5, 24), 40, torch.float32, fused=True)
    dy = make_grad(grad_kind, torch.empty(3, 5, 24))
    got = _run(lora_mlp, *args, dy)
    want = _run(reference_lora_mlp, *args, dy)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


def test_frozen_input_gets_no_gradient_work():
    """x not requiring grad (as for a first layer): the LoRA grads still match, dx is not computed."""
    x, weights, biases, lora_as, lora_bs, scalings = _make((2, 5, 16), 24, torch.float32)
    a = [t.clone().requires_grad_() for t in lora_as]
    y = lora_mlp(x, weights, biases, a, lora_bs, scalings)
    y.sum().backward()
    a_ref = [t.clone().requires_grad_() for t in lora_as]
    reference_lora_mlp(x, weights, biases, a_ref, lora_bs, scalings).sum().backward()
    for g, w in zip(a, a_ref):
        assert rel_err(g.grad, w.grad) <= 1e-5


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "gate_up"])
@pytest.mark.parametrize("recompute", [False, True], ids=["save_gate_up", "recompute_gate_up"])
def test_saves_x_and_gate_up_only(fused, recompute):
    """What the backward keeps besides parameters: x and gate/up (N x 2F in all), or x alone --
    never the activation product p (N x F) nor any rank-r activation."""
    n_tok, k, ffn = 4 * 6, 32, 48
    x, weights, biases, lora_as, lora_bs, scalings = _make((4, 6, k), ffn, torch.float32, fused=fused)
    x.requires_grad_()
    lora_as = [a.requires_grad_() for a in lora_as]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_mlp(x, weights, biases, lora_as, lora_bs, scalings, recompute_gate_up=recompute)
    params = {id(t) for t in weights + lora_as + lora_bs}
    activations = [t for t in saved if id(t) not in params]
    assert activations[0].data_ptr() == x.data_ptr()
    extra = sum(t.numel() for t in activations[1:])
    assert extra == (0 if recompute else 2 * n_tok * ffn)


@pytest.mark.parametrize("fused, recompute", [(False, False), (True, True)])
def test_opcheck(fused, recompute):
    x, weights, biases, lora_as, lora_bs, scalings = _make((2, 3, 8), 12, torch.float32, fused=fused, bias=True)
    x.requires_grad_()
    for t in lora_as + lora_bs:
        t.requires_grad_()
    present = [b for b in biases if b is not None]
    torch.library.opcheck(
        torch.ops.graphtune.lora_mlp.default,
        (x, weights, present, [b is not None for b in biases], lora_as, lora_bs, scalings, "swiglu", recompute),
    )


def test_bad_arguments_are_clear_errors():
    x, weights, biases, lora_as, lora_bs, scalings = _make((2, 8), 12, torch.float32)
    with pytest.raises(ValueError, match="activation"):
        lora_mlp(x, weights, biases, lora_as, lora_bs, scalings, activation="relu")
    with pytest.raises(ValueError, match="do not chain"):
        lora_mlp(x, [weights[0], weights[1][:5], weights[2]], biases, lora_as, lora_bs, scalings)
    with pytest.raises(ValueError, match="gate_up, down"):
        lora_mlp(x, weights[:1], biases[:1], lora_as[:1], lora_bs[:1], scalings[:1])
