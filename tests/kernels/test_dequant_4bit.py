"""bitsandbytes 4-bit dequantization (Triton under TRITON_INTERPRET, else the torch reference) and the
``graphtune::lora_linear_4bit`` op built on its workspace.

* dequant: equal to ``bitsandbytes.functional.dequantize_4bit`` value for value (``torch.equal``:
  bitwise, except that +0.0 == -0.0 -- bitsandbytes itself writes FP4's code 8 as -0.0 in its CPU
  kernel and +0.0 in its torch fallback) for NF4/FP4 x double quant x blocksizes x odd shapes x
  fp32/bf16/fp16 outputs, and with a non-uint8 ``quant_storage``;
* workspace: grow-only, reused, never saved by autograd and never aliased by an output, so a second
  layer's dequantization between forward and backward cannot corrupt the first layer's gradients;
* op: forward, dx, dA, dB and db against the reference on the same quantized weights, with and
  without a dropout mask on the LoRA input.
"""

from __future__ import annotations

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

import graphtune.kernels.dequant_4bit as dq  # noqa: E402
from graphtune.kernels._dispatch import use_triton  # noqa: E402
from graphtune.kernels.lora_linear_4bit import lora_linear_4bit, reference_lora_linear_4bit  # noqa: E402
from tests.bnb_oracle import bnb_dequantize_flat  # noqa: E402  (why flat: see there)

QUANT_TYPES = ["nf4", "fp4"]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(37, 51), (19, 130), (64, 64)]  # odd element counts (1887 and 2470 are not multiples of 64)


def _quantize(shape, quant_type, double_quant, blocksize, dtype=torch.float32, **kw):
    w = torch.randn(shape, dtype=torch.float32) * 0.05
    w[0, :3] = 0.0  # exact zeros: code 7 (NF4) / 0 and 8 (FP4)
    return bnb_functional.quantize_4bit(w.to(dtype), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type, **kw)


def _nested(qs) -> dict:
    if not qs.nested:
        return {}
    return dict(absmax2=qs.state2.absmax, code2=qs.state2.code, offset=qs.offset, blocksize2=qs.state2.blocksize)


def test_code_tables_match_bitsandbytes():
    for quant_type, table in (("nf4", dq.NF4_CODE), ("fp4", dq.FP4_CODE)):
        theirs = bnb_functional.get_4bit_type(quant_type, device="cpu")
        ours = dq.code_table(quant_type, _device()).cpu()
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), quant_type  # bitwise, signed zeros too
        assert len(table) == 16


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double_quant"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequant_equals_bitsandbytes(quant_type, double_quant, blocksize, out_dtype):
    for shape in SHAPES:
        packed, qs = _quantize(shape, quant_type, double_quant, blocksize, dtype=out_dtype)
        want = bnb_dequantize_flat(packed, qs)
        assert want.dtype == out_dtype
        got = dq.dequantize_4bit(packed, qs.absmax, qs.shape, qs.blocksize, qs.quant_type, out_dtype, **_nested(qs))
        ref = dq.reference_dequantize_4bit(packed, qs.absmax, qs.shape, qs.blocksize, qs.quant_type, out_dtype, **_nested(qs))
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got, want), (shape, (got.float() - want.float()).abs().max())
        assert torch.equal(ref, want), shape


@pytest.mark.parametrize("blocksize", [32, 256, 4096])
def test_dequant_other_blocksizes_and_quant_storage(blocksize):
    """Blocks larger than one Triton program (4096 > 2048 outputs), and bf16 ``quant_storage`` (FSDP)."""
    for quant_type in QUANT_TYPES:
        packed, qs = _quantize((71, 132), quant_type, True, blocksize, quant_storage=torch.bfloat16)
        assert packed.dtype == torch.bfloat16
        want = bnb_dequantize_flat(packed, qs)
        got = dq.dequantize_4bit(packed, qs.absmax, qs.shape, qs.blocksize, qs.quant_type, torch.float32, **_nested(qs))
        assert torch.equal(got, want)


def test_dispatch_runs_triton_under_interpret(monkeypatch, triton_expected, interpret_env):
    """Fails if TRITON_INTERPRET=1 is set but dequantization silently ran the torch reference."""
    packed, qs = _quantize((8, 16), "nf4", True, 64)
    assert use_triton(packed) is triton_expected
    if interpret_env:
        assert triton_expected
    calls = []
    real = dq._launch
    monkeypatch.setattr(dq, "_launch", lambda *a: calls.append(1) or real(*a))
    dq.dequantize_4bit(packed, qs.absmax, qs.shape, 64, "nf4", torch.float32, **_nested(qs))
    assert calls == ([1] if triton_expected else [])


def test_workspace_grows_only_and_is_reused():
    dq.release_workspace()
    small = dq.workspace(100, _device(), torch.float32)
    large = dq.workspace(1000, _device(), torch.float32)
    again = dq.workspace(10, _device(), torch.float32)
    assert again.data_ptr() == large.data_ptr() and again.numel() == 10
    assert dq._WORKSPACE[(_device(), torch.float32)].numel() == 1000
    other = dq.workspace(10, _device(), torch.bfloat16)  # one buffer per dtype
    assert other.untyped_storage().data_ptr() != large.untyped_storage().data_ptr()
    del small
    packed, qs = _quantize((19, 24), "fp4", False, 64)
    w = dq.dequantize_4bit_workspace(packed, qs.absmax, qs.shape, 64, "fp4", torch.float32)
    assert w.shape == (19, 24) and w.data_ptr() == large.data_ptr()
    assert torch.equal(w, bnb_dequantize_flat(packed, qs))


# ----------------------------------------------------------------------------------------------
# graphtune::lora_linear_4bit
# ----------------------------------------------------------------------------------------------
def _device() -> torch.device:
    return torch.empty(0).device  # GRAPHTUNE_TEST_DEVICE=cuda makes it the GPU


def _layer(n_out, n_in, quant_type="nf4", double_quant=True, blocksize=64, bias=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, device="cpu").to(_device())
    packed, qs = _quantize((n_out, n_in), quant_type, double_quant, blocksize)
    nested = (qs.state2.absmax, qs.state2.code, qs.offset) if qs.nested else (None, None, None)
    return dict(
        packed=packed, absmax=qs.absmax, nested=nested, quant_type=quant_type, blocksize=blocksize,
        bias=(randn(n_out) * 0.1).to(dtype) if bias else None,
        a=(randn(4, n_in) * 0.2).to(dtype), b=(randn(n_out, 4) * 0.2).to(dtype),
        n_out=n_out, n_in=n_in, dense=bnb_dequantize_flat(packed, qs),
    )


def _apply(fn, layer, x, x_lora, a, b, bias):
    return fn(x, x_lora, layer["packed"], layer["absmax"], *layer["nested"], bias, a, b, 0.75,
              layer["n_out"], layer["n_in"], layer["blocksize"], layer["quant_type"])


def _run(fn, layer, x, mask, dy):
    xs = x.detach().clone().requires_grad_(True)
    a, b = layer["a"].clone().requires_grad_(True), layer["b"].clone().requires_grad_(True)
    bias = layer["bias"].clone().requires_grad_(True) if layer["bias"] is not None else None
    y = _apply(fn, layer, xs, xs if mask is None else xs * mask, a, b, bias)
    y.backward(dy)
    return [y, xs.grad, a.grad, b.grad] + ([bias.grad] if bias is not None else [])


def _rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "dropout_mask"])
@pytest.mark.parametrize("quant", [("nf4", True, 64, False), ("fp4", False, 128, True)], ids=["nf4_dq_b64", "fp4_b128_bias"])
def test_op_matches_reference(quant, dropout):
    quant_type, double_quant, blocksize, bias = quant
    layer = _layer(19, 37, quant_type, double_quant, blocksize, bias)
    x = torch.randn(2, 5, 37)
    mask = (torch.rand(x.shape) > 0.3).float() / 0.7 if dropout else None  # peft's dropout, one fixed mask
    dy = torch.randn(2, 5, 19)
    got, want = _run(lora_linear_4bit, layer, x, mask, dy), _run(reference_lora_linear_4bit, layer, x, mask, dy)
    for name, g, w in zip(("y", "dx", "dA", "dB", "db"), got, want):
        assert _rel(g, w) <= 1e-6, name
    # and against plain torch math on bitsandbytes' own dense weight
    xs = x.clone().requires_grad_(True)
    x_lora = xs if mask is None else xs * mask
    y = torch.nn.functional.linear(xs, layer["dense"], layer["bias"]) + ((x_lora @ layer["a"].t()) @ layer["b"].t()) * 0.75
    y.backward(dy)
    assert _rel(got[0], y) <= 1e-6 and _rel(got[1], xs.grad) <= 1e-6


def test_op_bf16():
    layer = _layer(24, 40, "nf4", True, 64, True, dtype=torch.bfloat16)
    x = torch.randn(3, 40).to(torch.bfloat16)
    dy = torch.randn(3, 24).to(torch.bfloat16)
    got, want = _run(lora_linear_4bit, layer, x, None, dy), _run(reference_lora_linear_4bit, layer, x, None, dy)
    for name, g, w in zip(("y", "dx", "dA", "dB", "db"), got, want):
        assert g.dtype == torch.bfloat16 and _rel(g, w) <= 2e-2, name


def test_backward_redequantizes_after_other_layers_reused_the_workspace():
    """Two layers of different sizes: the second forward overwrites (and grows) the workspace before
    either backward runs. Correct grads prove the backward re-dequantizes; nothing autograd saved and
    no output may share memory with the workspace."""
    dq.release_workspace()
    l1, l2 = _layer(20, 16, "nf4", True, seed=1), _layer(48, 20, "fp4", False, seed=2)
    x = torch.randn(3, 16)
    saved: list[torch.Tensor] = []

    def forward(fn, keep):
        xs = x.clone().requires_grad_(True)
        params = [t.clone().requires_grad_(True) for t in (l1["a"], l1["b"], l2["a"], l2["b"])]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: keep.append(t) or t, lambda t: t):
            h = _apply(fn, l1, xs, xs, params[0], params[1], None)
            y = _apply(fn, l2, h, h, params[2], params[3], None)
        return xs, params, h, y

    xs, params, h, y = forward(lora_linear_4bit, saved)
    ws = dq._WORKSPACE[(_device(), torch.float32)]
    assert ws.numel() >= 48 * 20
    ws_storage = ws.untyped_storage().data_ptr()
    for t in [h, y, *saved]:
        assert t.untyped_storage().data_ptr() != ws_storage, "an output or saved tensor aliases the workspace"
    assert not any(t.shape in ((20, 16), (48, 20)) and t.is_floating_point() for t in saved), "a dense weight was saved"
    ws.fill_(float("nan"))  # whatever the workspace holds now must not matter
    y.backward(torch.ones_like(y))
    rxs, rparams, _, ry = forward(reference_lora_linear_4bit, [])
    ry.backward(torch.ones_like(ry))
    assert _rel(y, ry) <= 1e-6 and _rel(xs.grad, rxs.grad) <= 1e-6
    for p, r in zip(params, rparams):
        assert _rel(p.grad, r.grad) <= 1e-6


def test_frozen_input_skips_dx():
    layer = _layer(8, 16)
    x = torch.randn(4, 16)  # no grad: the first layer's q/k/v under frozen embeddings
    a = layer["a"].clone().requires_grad_(True)
    y = _apply(lora_linear_4bit, layer, x, x, a, layer["b"], None)
    y.sum().backward()
    assert a.grad is not None and x.grad is None


def test_opcheck():
    layer = _layer(12, 20, "fp4", True, bias=True)
    args = (torch.randn(2, 3, 20, requires_grad=True), torch.randn(2, 3, 20, requires_grad=True), layer["packed"],
            layer["absmax"], *layer["nested"], layer["bias"].requires_grad_(True), layer["a"].requires_grad_(True),
            layer["b"].requires_grad_(True), 0.5, 12, 20, 64, "fp4")
    torch.library.opcheck(torch.ops.graphtune.lora_linear_4bit.default, args)
