"""Split-bf16 products (graphtune/kernels/split_bf16.py) and the split path of ``graphtune::lora_linear``.

The split kernel against its torch reference (bit for bit: the rounding is done on the bits), the
``hi + lo`` error bound, ``mm_f32``, and the LoRA op's split path against an fp64 evaluation of peft's
math and against its fp32 path, forward and backward, on odd shapes. On CUDA
(``GRAPHTUNE_TEST_DEVICE=cuda``) the same tests run cuBLAS' bf16 -> fp32 GEMMs and real Triton.
"""

from __future__ import annotations

import pytest
import torch

from graphtune.kernels import split_bf16 as sb
from graphtune.kernels.lora_linear import lora_linear, reference_lora_linear, split_path_applies


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("pattern", sb.PATTERNS)
@pytest.mark.parametrize("n_sum,scale", [(1, 1.0), (1, 2.5), (2, 1.0), (2, -0.37)])
@pytest.mark.parametrize("transposed", [False, True])
def test_split_blocks_matches_reference(pattern, n_sum, scale, transposed, triton_expected):
    x = torch.randn(45, 33 * n_sum) * torch.logspace(-6, 6, 33 * n_sum)  # wide range of exponents
    if transposed:
        x = torch.randn(33 * n_sum, 45).t()  # a strided view, read in place
        x = x[:, : (x.shape[1] // n_sum) * n_sum]
    got = sb.split_blocks(x, pattern, n_sum, scale)
    ref = sb.reference_split_blocks(x, pattern, n_sum, scale)
    assert got.dtype == torch.bfloat16 and got.shape == (x.shape[0], len(pattern) * (x.shape[1] // n_sum))
    assert torch.equal(got, ref)


def test_hi_plus_lo_is_within_2_to_minus_16():
    v = torch.randn(300, 70) * torch.logspace(-20, 20, 70)
    hl = sb.split_blocks(v, "HL")
    approx = hl[:, :70].float() + hl[:, 70:].float()
    assert ((approx - v).abs() <= v.abs() * 2.0**-16).all()


def test_bad_pattern_and_shape_are_clear_errors():
    with pytest.raises(ValueError, match="pattern"):
        sb.split_blocks(torch.randn(3, 4), "LH")
    with pytest.raises(ValueError, match="2 blocks"):
        sb.split_blocks(torch.randn(3, 5), "HL", n_sum=2)


def test_mm_f32_keeps_the_fp32_product():
    a, b = torch.randn(37, 29).bfloat16(), torch.randn(29, 11).bfloat16()
    got = sb.mm_f32(a, b)
    assert got.dtype == torch.float32
    assert rel(got, a.double() @ b.double()) <= 1e-6


def test_split_enabled_modes(monkeypatch):
    monkeypatch.delenv("GRAPHTUNE_LORA_SPLIT", raising=False)
    assert not sb.split_enabled(torch.device("cuda")) and not sb.split_enabled(torch.device("cpu"))
    monkeypatch.setenv("GRAPHTUNE_LORA_SPLIT", "auto")
    assert sb.split_enabled(torch.device("cuda")) and not sb.split_enabled(torch.device("cpu"))
    monkeypatch.setenv("GRAPHTUNE_LORA_SPLIT", "1")
    assert sb.split_enabled(torch.device("cpu"))
    monkeypatch.setenv("GRAPHTUNE_LORA_SPLIT", "0")
    assert not sb.split_enabled(torch.device("cuda"))
    monkeypatch.setenv("GRAPHTUNE_LORA_SPLIT", "sometimes")
    with pytest.raises(ValueError, match="GRAPHTUNE_LORA_SPLIT"):
        sb.split_enabled(torch.device("cpu"))


def _lora_case(bias: bool, shape=(3, 13, 72), n_out=50, r=5):
    g = torch.Generator().manual_seed(1)
    k = shape[-1]
    cpu = torch.device("cpu")  # the generator is a CPU one; GRAPHTUNE_TEST_DEVICE=cuda moves the tensors below
    x = torch.randn(*shape, generator=g, device=cpu).bfloat16().requires_grad_()
    w = (torch.randn(n_out, k, generator=g, device=cpu) / k**0.5).bfloat16()
    b = torch.randn(n_out, generator=g, device=cpu).bfloat16() if bias else None
    a = (torch.randn(r, k, generator=g, device=cpu) / k**0.5).requires_grad_()
    bb = (torch.randn(n_out, r, generator=g, device=cpu) * 0.1).requires_grad_()
    dy = torch.randn(*shape[:-1], n_out, generator=g, device=cpu).bfloat16()
    dev = torch.get_default_device()
    return [t if t is None else t.detach().to(dev).requires_grad_(t.requires_grad) for t in (x, w, b, a, bb, dy)]


def _run_op(x, w, b, a, bb, dy, s):
    out = lora_linear(x, x, w, b, a, bb, s, torch.bfloat16)
    grads = torch.autograd.grad(out, (x, a, bb), dy)
    return (out, *grads)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape,n_out,r", [((3, 13, 72), 50, 5), ((1, 1, 24), 8, 16), ((2, 9, 40), 33, 1)])
def test_lora_op_split_path_matches_fp64_and_fp32_path(bias, shape, n_out, r, monkeypatch):
    """peft's bf16 mixed precision (x, W bf16; A, B fp32; output cast to bf16), no dropout. The adapter
    grads (fp32) are within 1e-5 of an fp64 evaluation of peft's math, as close as the fp32 path; the
    bf16 output and dx within one bf16 rounding of it."""
    x, w, b, a, bb, dy = _lora_case(bias, shape, n_out, r)
    s = 1.7
    assert split_path_applies(x, x, w, a, bb, torch.bfloat16) == sb.split_enabled(x.device)
    monkeypatch.setenv("GRAPHTUNE_LORA_SPLIT", "1")
    assert split_path_applies(x, x, w, a, bb, torch.bfloat16)
    assert not split_path_applies(x, x.float(), w, a, bb, torch.bfloat16)  # dropout: x_lora is peft's fp32 node
    assert not split_path_applies(x.half(), x.half(), w.half(), a, bb, torch.float16)
    got = _run_op(x, w, b, a, bb, dy, s)
    monkeypatch.setenv("GRAPHTUNE_LORA_SPLIT", "0")
    fp32 = _run_op(x, w, b, a, bb, dy, s)

    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a, bb))
    out64 = reference_lora_linear(xd, xd, w.double(), None if b is None else b.double(), ad, bd, s)
    ref = (out64, *torch.autograd.grad(out64, (xd, ad, bd), dy.double()))
    for g, f, rf, what in zip(got, fp32, ref, ("out", "dx", "dA", "dB")):
        assert g.dtype == f.dtype, what
        if what in ("dA", "dB"):
            assert rel(g, rf) <= 1e-5, what
        else:
            assert rel(g, rf) <= 4e-3 and rel(g, f) <= 4e-3, what  # bf16 results: a rounding step
