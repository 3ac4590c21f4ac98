"""graphtune::geglu against HF's ``ACT2FN["gelu_pytorch_tanh"](gate) * up`` (Gemma), fwd and bwd."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

import graphtune.kernels.geglu as op_mod
from graphtune.kernels._dispatch import use_triton
from graphtune.kernels.geglu import geglu, reference_geglu

OP = geglu
REFERENCE = reference_geglu
HF_ACT = ACT2FN["gelu_pytorch_tanh"]

SHAPES = [(2, 7, 67), (3, 5, 129), (4, 256), (1, 1, 1)]
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 2e-2, 2e-2),
    (torch.float16, 2e-3, 2e-3),
]


def _hf(gate, up):
    return HF_ACT(gate) * up  # GemmaMLP: act_fn(gate_proj(x)) * up_proj(x)


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
def test_matches_hf(shape, dtype, atol, rtol, layout):
    gate, up = _inputs(shape, dtype, layout)
    dh = torch.randn(shape, dtype=dtype)
    h, dg, du = _run(OP, gate, up, dh)
    h_ref, dg_ref, du_ref = _run(_hf, gate, up, dh)
    assert h.is_contiguous() and h.dtype == h_ref.dtype
    torch.testing.assert_close(h, h_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(dg, dg_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(du, du_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("grad_kind", ["random", "noncontig", "expanded"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:2])
def test_upstream_grad_layouts(dtype, atol, rtol, grad_kind, make_grad):
    gate, up = _inputs((3, 5, 129), dtype, "contiguous")
    dh = make_grad(grad_kind, gate)
    got = _run(OP, gate, up, dh)
    want = _run(REFERENCE, gate, up, dh)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def test_backward_outputs_contiguous_in_input_dtypes():
    gate, up = _inputs((2, 3, 40), torch.bfloat16, "chunked")
    dh = torch.randn(2, 3, 40, dtype=torch.bfloat16).expand(2, 3, 40)
    op = getattr(torch.ops.graphtune, OP.__name__ + "_backward")
    dg, du = op(dh, gate, up)
    assert dg.is_contiguous() and du.is_contiguous()
    assert dg.dtype == gate.dtype and du.dtype == up.dtype


def test_mixed_dtypes_promote():
    gate, up = torch.randn(4, 33, dtype=torch.bfloat16), torch.randn(4, 33)
    dh = torch.randn(4, 33)
    got = _run(OP, gate, up, dh)
    want = _run(_hf, gate, up, dh)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        OP(torch.randn(2, 8), torch.randn(2, 1))


def test_dispatch_runs_triton_under_interpret(monkeypatch, triton_expected, interpret_env):
    """Fails if TRITON_INTERPRET=1 is set but the op silently ran the torch reference."""
    gate, up = _inputs((2, 16), torch.float32, "contiguous")
    assert use_triton(gate) is triton_expected
    if interpret_env:
        assert triton_expected, "TRITON_INTERPRET=1 is set but graphtune would not run Triton"
    calls = []
    for name in ("_triton_forward", "_triton_backward"):
        real = getattr(op_mod, name)
        monkeypatch.setattr(op_mod, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    h = OP(gate.requires_grad_(True), up)
    h.sum().backward()
    assert calls == (["_triton_forward", "_triton_backward"] if triton_expected else [])


def test_opcheck():
    gate = torch.randn(3, 20, requires_grad=True)
    up = torch.randn(3, 20, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.graphtune, OP.__name__).default, (gate, up))
    dh = torch.randn(3, 20)
    torch.library.opcheck(
        getattr(torch.ops.graphtune, OP.__name__ + "_backward").default, (dh, gate.detach(), up.detach())
    )


def test_torch_compile_aot_eager():
    torch._dynamo.reset()
    gu = torch.randn(2, 5, 48)

    def f(x):
        gate, up = x.chunk(2, dim=-1)
        return (OP(gate, up) ** 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    xs = [gu.clone().requires_grad_(True) for _ in range(2)]
    out = compiled(xs[0])
    out.backward()
    g, u = xs[1].chunk(2, dim=-1)
    ref = (REFERENCE(g, u) ** 2).sum()
    ref.backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-5, rtol=1e-5)
