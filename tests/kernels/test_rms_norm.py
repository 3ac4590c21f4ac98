"""graphtune::rms_norm against the HF math (LlamaRMSNorm, Gemma3RMSNorm), forward and backward."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import graphtune.kernels.rms_norm as rms_mod
from graphtune.kernels._dispatch import use_triton
from graphtune.kernels.rms_norm import reference_rms_norm, rms_norm

SHAPES = [(2, 7, 67), (3, 5, 129), (4, 64), (1, 3, 2, 16)]
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 2e-2, 2e-2),
    (torch.float16, 2e-3, 2e-3),
]
MODES = [  # (cast_before_weight, offset): Llama form, Gemma form
    pytest.param(True, 0.0, id="llama"),
    pytest.param(False, 1.0, id="gemma"),
]
EPS = 1e-6


def _run(fn, x, w, dy, w_grad: bool):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(w_grad)
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _inputs(shape, dtype, gemma: bool):
    x = torch.randn(shape, dtype=dtype) * 2.0
    w = (torch.randn(shape[-1]) * 0.1 if gemma else 1.0 + torch.randn(shape[-1]) * 0.1).to(dtype)
    return x, w


@pytest.mark.parametrize("w_grad", [True, False])
@pytest.mark.parametrize("cast_before_weight, offset", MODES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, atol, rtol, cast_before_weight, offset, w_grad):
    x, w = _inputs(shape, dtype, not cast_before_weight)
    dy = torch.randn(shape, dtype=dtype)
    y, dx, dw = _run(lambda a, b: rms_norm(a, b, EPS, offset, cast_before_weight), x, w, dy, w_grad)
    y_ref, dx_ref, dw_ref = _run(
        lambda a, b: reference_rms_norm(a, b, EPS, offset, cast_before_weight), x, w, dy, w_grad
    )
    assert y.dtype == y_ref.dtype and y.is_contiguous()
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(dx, dx_ref, atol=atol, rtol=rtol)
    if w_grad:
        assert dw.dtype == w.dtype
        # dW sums over all rows: its error grows with the row count in low precision.
        torch.testing.assert_close(dw, dw_ref, atol=atol * 4, rtol=rtol)
    else:
        assert dw is None


@pytest.mark.parametrize("grad_kind", ["random", "noncontig", "expanded"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:2])
@pytest.mark.parametrize("shape", [(2, 7, 67), (3, 5, 129)])
def test_matches_hf_modules(shape, dtype, atol, rtol, grad_kind, make_grad):
    """The real HF modules, with non-contiguous and stride-0 upstream grads."""
    x = torch.randn(shape, dtype=dtype)
    dy = make_grad(grad_kind, torch.empty(shape, dtype=dtype))
    for gemma in (False, True):
        module = Gemma3RMSNorm(shape[-1], eps=EPS) if gemma else LlamaRMSNorm(shape[-1], eps=EPS)
        module = module.to(dtype)
        with torch.no_grad():
            module.weight.copy_(torch.randn(shape[-1]) * 0.2 + (0.0 if gemma else 1.0))
        offset, cast = (1.0, False) if gemma else (0.0, True)
        y, dx, dw = _run(lambda a, b: rms_norm(a, b, EPS, offset, cast), x, module.weight, dy, True)
        x_ref = x.clone().requires_grad_(True)
        y_ref = module(x_ref)
        y_ref.backward(dy)
        torch.testing.assert_close(y, y_ref.detach(), atol=atol, rtol=rtol)
        torch.testing.assert_close(dx, x_ref.grad, atol=atol, rtol=rtol)
        torch.testing.assert_close(dw, module.weight.grad, atol=atol * 4, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:2])
def test_non_contiguous_input(dtype, atol, rtol):
    """Gemma3's q_norm/k_norm see transposed tensors: the output must still be contiguous."""
    x = torch.randn(2, 5, 3, 24, dtype=dtype).transpose(1, 2)
    w = torch.randn(24, dtype=dtype)
    dy = torch.randn(x.shape, dtype=dtype)
    for cast, offset in ((True, 0.0), (False, 1.0)):
        y, dx, dw = _run(lambda a, b: rms_norm(a, b, EPS, offset, cast), x, w, dy, True)
        y_ref, dx_ref, dw_ref = _run(lambda a, b: reference_rms_norm(a, b, EPS, offset, cast), x, w, dy, True)
        assert y.is_contiguous()  # (x.grad follows x's strides: AccumulateGrad's layout rule)
        dx_op, _ = torch.ops.graphtune.rms_norm_backward(dy, x, w, EPS, offset, cast, True)
        assert dx_op.is_contiguous()
        torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
        torch.testing.assert_close(dx, dx_ref, atol=atol, rtol=rtol)
        torch.testing.assert_close(dw, dw_ref, atol=atol * 4, rtol=rtol)


@pytest.mark.parametrize("cast_before_weight, offset", MODES)
def test_chunked_rows(monkeypatch, cast_before_weight, offset):
    """Rows wider than MAX_FUSED_N loop over column chunks (shrunk here to hit that path)."""
    monkeypatch.setattr(rms_mod, "MAX_FUSED_N", 32)
    x, w = _inputs((3, 5, 129), torch.float32, not cast_before_weight)
    dy = torch.randn(x.shape)
    got = _run(lambda a, b: rms_norm(a, b, EPS, offset, cast_before_weight), x, w, dy, True)
    ref = _run(lambda a, b: reference_rms_norm(a, b, EPS, offset, cast_before_weight), x, w, dy, True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 600, 40), (20, 1100)])  # ACC_2D (short rows) and 1-D dW accumulator
def test_dw_partials_loop_over_tiles(monkeypatch, shape):
    """One program looping over several row tiles (as on a GPU, one program per SM)."""
    monkeypatch.setattr(rms_mod, "_dw_programs", lambda t: 1)
    x, w = _inputs(shape, torch.float32, False)
    dy = torch.randn(shape)
    got = _run(lambda a, b: rms_norm(a, b, EPS), x, w, dy, True)
    ref = _run(lambda a, b: reference_rms_norm(a, b, EPS), x, w, dy, True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)  # dW sums 1200 rows in fp32


def test_dtype_promotion_llama_form():
    """Llama: ``weight * n.to(x.dtype)`` promotes; Gemma: the output keeps x's dtype."""
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    w32 = torch.randn(40)
    y = rms_norm(x, w32, EPS)
    assert y.dtype == torch.float32
    # bf16 tolerance: n is rounded to bf16 (and Triton's CPU interpreter truncates instead of
    # rounding to nearest even, so it may land one bf16 ulp off).
    torch.testing.assert_close(y, reference_rms_norm(x, w32, EPS), atol=2e-2, rtol=2e-2)
    y_gemma = rms_norm(x, w32, EPS, 1.0, False)
    assert y_gemma.dtype == torch.bfloat16
    xg = x.clone().requires_grad_(True)
    wg = w32.clone().requires_grad_(True)
    rms_norm(xg, wg, EPS).sum().backward()
    assert xg.grad.dtype == torch.bfloat16 and wg.grad.dtype == torch.float32


def test_backward_op_without_weight_grad():
    x, w = _inputs((4, 33), torch.float32, False)
    dy = torch.randn(4, 33)
    dx, dw = torch.ops.graphtune.rms_norm_backward(dy, x, w, EPS, 0.0, True, False)
    assert dw.numel() == 0
    dx2, dw2 = torch.ops.graphtune.rms_norm_backward(dy, x, w, EPS, 0.0, True, True)
    torch.testing.assert_close(dx, dx2)
    assert dw2.shape == w.shape


def test_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight must be 1-D"):
        rms_norm(x, torch.randn(7), EPS)
    with pytest.raises(ValueError, match="weight must be 1-D"):
        rms_norm(x, torch.randn(2, 8), EPS)
    with pytest.raises(ValueError, match="offset must be 0"):
        rms_norm(x, torch.randn(8), EPS, 1.0, True)


def test_dispatch_runs_triton_under_interpret(monkeypatch, triton_expected, interpret_env):
    """Fails if TRITON_INTERPRET=1 is set but the op silently ran the torch reference."""
    x = torch.randn(2, 16)
    assert use_triton(x) is triton_expected
    if interpret_env:
        assert triton_expected, "TRITON_INTERPRET=1 is set but graphtune would not run Triton"
    calls = []
    real_fwd, real_bwd = rms_mod._triton_forward, rms_mod._triton_backward
    monkeypatch.setattr(rms_mod, "_triton_forward", lambda *a: calls.append("fwd") or real_fwd(*a))
    monkeypatch.setattr(rms_mod, "_triton_backward", lambda *a: calls.append("bwd") or real_bwd(*a))
    xg = x.clone().requires_grad_(True)
    rms_norm(xg, torch.randn(16, requires_grad=True), EPS).sum().backward()
    assert calls == (["fwd", "bwd"] if triton_expected else [])


def test_opcheck():
    x = torch.randn(3, 20, requires_grad=True)
    w = torch.randn(20, requires_grad=True)
    for cast, offset in ((True, 0.0), (False, 1.0)):
        torch.library.opcheck(torch.ops.graphtune.rms_norm.default, (x, w, EPS, offset, cast))
    dy = torch.randn(3, 20)
    for need in (True, False):
        torch.library.opcheck(
            torch.ops.graphtune.rms_norm_backward.default, (dy, x.detach(), w.detach(), EPS, 0.0, True, need)
        )


@pytest.mark.parametrize("w_grad", [True, False])
def test_torch_compile_aot_eager(w_grad):
    torch._dynamo.reset()
    x = torch.randn(2, 3, 8, 24).transpose(1, 2)  # non-contiguous, like Gemma3's q_norm input
    w = torch.randn(24) * 0.1

    def f(a, b):
        return (rms_norm(a, b, EPS, 1.0, False) * 1.5).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ws = [w.clone().requires_grad_(w_grad) for _ in range(2)]
    out = compiled(xs[0], ws[0])
    out.backward()
    ref = (reference_rms_norm(xs[1], ws[1], EPS, 1.0, False) * 1.5).sum()
    ref.backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-5, rtol=1e-5)
    if w_grad:
        torch.testing.assert_close(ws[0].grad, ws[1].grad, atol=1e-5, rtol=1e-5)
    else:
        assert ws[0].grad is None
