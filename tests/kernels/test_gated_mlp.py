"""graphtune::swiglu and graphtune::geglu against HF's ``ACT2FN[act](gate) * up``, forward and backward.

One suite for both gated-MLP kernels (LlamaMLP: ``silu``; GemmaMLP: ``gelu_pytorch_tanh``): they share
layouts, dtypes and autograd wiring, and differ only in the activation.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.activations import ACT2FN

import graphtune.kernels.geglu as geglu_mod
import graphtune.kernels.swiglu as swiglu_mod
from graphtune.kernels._dispatch import use_triton

GATED = {
    "swiglu": SimpleNamespace(op=swiglu_mod.swiglu, reference=swiglu_mod.reference_swiglu, act=ACT2FN["silu"], mod=swiglu_mod),
    "geglu": SimpleNamespace(op=geglu_mod.geglu, reference=geglu_mod.reference_geglu, act=ACT2FN["gelu_pytorch_tanh"], mod=geglu_mod),
}


@pytest.fixture(params=sorted(GATED))
def gated(request):
    case = GATED[request.param]
    case.hf = lambda gate, up: case.act(gate) * up  # act_fn(gate_proj(x)) * up_proj(x)
    return case


SHAPES = [(2, 7, 67), (3, 5, 129), (4, 256), (1, 1, 1)]
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 2e-2, 2e-2),
    (torch.float16, 2e-3, 2e-3),
]



def _run(fn, gate, up, dh):
    gate = gate.detach().clone().requires_grad_(True)
    up = up.detach().clone().requires_grad_(True)
    h = fn(gate, up)
    h.backward(dh)
    return h.detach(), gate.grad, up.grad


def _inputs(shape, dtype, layout):
    if layout == "chunked":  # a fused gate_up projection split in two: row stride 2 * F
        gate, up = (torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype) * 2).chunk(2, dim=-1)
    elif layout == "transposed" and len(shape) >= 2:
        gate = (torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype) * 2).transpose(-1, -2)
        up = torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype).transpose(-1, -2)
    else:
        gate, up = torch.randn(shape, dtype=dtype) * 2, torch.randn(shape, dtype=dtype)
    return gate, up


@pytest.mark.parametrize("layout", ["contiguous", "chunked", "transposed"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_hf(gated, shape, dtype, atol, rtol, layout):
    gate, up = _inputs(shape, dtype, layout)
    dh = torch.randn(shape, dtype=dtype)
    h, dg, du = _run(gated.op, gate, up, dh)
    h_ref, dg_ref, du_ref = _run(gated.hf, gate, up, dh)
    assert h.is_contiguous() and h.dtype == h_ref.dtype
    torch.testing.assert_close(h, h_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(dg, dg_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(du, du_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("grad_kind", ["random", "noncontig", "expanded"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:2])
def test_upstream_grad_layouts(gated, dtype, atol, rtol, grad_kind, make_grad):
    gate, up = _inputs((3, 5, 129), dtype, "contiguous")
    dh = make_grad(grad_kind, gate)
    got = _run(gated.op, gate, up, dh)
    want = _run(gated.reference, gate, up, dh)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def test_backward_outputs_contiguous_in_input_dtypes(gated):
    gate, up = _inputs((2, 3, 40), torch.bfloat16, "chunked")
    dh = torch.randn(2, 3, 40, dtype=torch.bfloat16).expand(2, 3, 40)
    op = getattr(torch.ops.graphtune, gated.op.__name__ + "_backward")
    dg, du = op(dh, gate, up)
    assert dg.is_contiguous() and du.is_contiguous()
    assert dg.dtype == gate.dtype and du.dtype == up.dtype


def test_mixed_dtypes_promote(gated):
    gate, up = torch.randn(4, 33, dtype=torch.bfloat16), torch.randn(4, 33)
    dh = torch.randn(4, 33)
    got = _run(gated.op, gate, up, dh)
    want = _run(gated.hf, gate, up, dh)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_shape_mismatch_raises(gated):
    with pytest.raises(ValueError, match="same shape"):
        gated.op(torch.randn(2, 8), torch.randn(2, 1))


def test_dispatch_runs_triton_under_interpret(gated, monkeypatch, triton_expected, interpret_env):
    """Fails if TRITON_INTERPRET=1 is set but the op silently ran the torch reference."""
    gate, up = _inputs((2, 16), torch.float32, "contiguous")
    assert use_triton(gate) is triton_expected
    if interpret_env:
        assert triton_expected, "TRITON_INTERPRET=1 is set but graphtune would not run Triton"
    calls = []
    for name in ("_triton_forward", "_triton_backward"):
        real = getattr(gated.mod, name)
        monkeypatch.setattr(gated.mod, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    h = gated.op(gate.requires_grad_(True), up)
    h.sum().backward()
    assert calls == (["_triton_forward", "_triton_backward"] if triton_expected else [])


def test_opcheck(gated):
    gate = torch.randn(3, 20, requires_grad=True)
    up = torch.randn(3, 20, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.graphtune, gated.op.__name__).default, (gate, up))
    dh = torch.randn(3, 20)
    torch.library.opcheck(
        getattr(torch.ops.graphtune, gated.op.__name__ + "_backward").default, (dh, gate.detach(), up.detach())
    )


def test_torch_compile_aot_eager(gated):
    torch._dynamo.reset()
    gu = torch.randn(2, 5, 48)

    def f(x):
        gate, up = x.chunk(2, dim=-1)
        return (gated.op(gate, up) ** 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    xs = [gu.clone().requires_grad_(True) for _ in range(2)]
    out = compiled(xs[0])
    out.backward()
    g, u = xs[1].chunk(2, dim=-1)
    ref = (gated.reference(g, u) ** 2).sum()
    ref.backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-5, rtol=1e-5)
