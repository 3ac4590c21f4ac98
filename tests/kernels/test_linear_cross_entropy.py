"""graphtune::linear_cross_entropy against HF's ``lm_head`` + softcap + ``ForCausalLMLoss`` (materialized
logits), forward and backward (dH, dW, db), on vocab sizes that are not powers of two, odd row counts,
ignored rows, chunk boundaries and several blocks per row."""

from __future__ import annotations

import pytest
import torch

import graphtune.kernels.linear_cross_entropy as lce
from graphtune.kernels._dispatch import use_triton
from graphtune.kernels.linear_cross_entropy import linear_cross_entropy, reference_linear_cross_entropy
from tests.conftest import rel_err

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 1e-2)]


def _inputs(n, h, v, dtype, bias, ignored=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g, device="cpu") * 2).to(torch.get_default_device(), dtype)
    weight = (torch.randn(v, h, generator=g, device="cpu") * 0.3).to(torch.get_default_device(), dtype)
    b = (torch.randn(v, generator=g, device="cpu") * 0.5).to(torch.get_default_device(), dtype) if bias else None
    target = torch.randint(0, v, (n,), generator=g, device="cpu").to(torch.get_default_device())
    for i in ignored:
        target[i] = -100
    return hidden, weight, b, target


def _run(fn, hidden, weight, bias, target, *, grad_out=1.7, w_grad=True, **kw):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(w_grad)
    bias = bias.detach().clone().requires_grad_(True) if bias is not None else None
    loss = fn(hidden, weight, bias, target, **kw)
    loss.backward(torch.tensor(grad_out))
    return [loss.detach(), hidden.grad, weight.grad] + ([bias.grad] if bias is not None else [])


def _compare(got, want, tol):
    names = ("loss", "dhidden", "dweight", "dbias")
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert rel_err(a, b) <= tol, f"{name}: relative error {rel_err(a, b):.3g} > {tol}"


def _ours(hidden, weight, bias, target, **kw):
    return linear_cross_entropy(hidden, weight, bias, target, **kw)


def _hf(hidden, weight, bias, target, **kw):
    return reference_linear_cross_entropy(hidden, weight, bias, target, kw.get("ignore_index", -100), kw.get("softcap", 0.0), kw.get("num_items_in_batch"))


@pytest.mark.parametrize("softcap", [0.0, 30.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n, h, v", [(37, 24, 1000), (13, 40, 5003)])
@pytest.mark.parametrize("dtype, tol", DTYPES[:2], ids=["fp32", "bf16"])
def test_matches_hf(monkeypatch, n, h, v, dtype, tol, bias, softcap):
    """Chunks of 5 rows (the last one partial, rows 5..9 all ignored), blocks of 256 columns."""
    monkeypatch.setattr(lce, "CHUNK_ROWS", 5)
    monkeypatch.setattr(lce, "BLOCK_V", 256)
    args = _inputs(n, h, v, dtype, bias, ignored=(0, 5, 6, 7, 8, 9, n - 1))
    _compare(_run(_ours, *args, softcap=softcap), _run(_hf, *args, softcap=softcap), tol)


@pytest.mark.parametrize("dtype, tol", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_default_chunking_and_3d_hidden(dtype, tol):
    """hidden [B, T, H] as HF hands it (flattened inside), one chunk, the default block size."""
    hidden, weight, _, target = _inputs(3 * 7, 16, 1000, dtype, False, ignored=(2, 3))
    hidden = hidden.reshape(3, 7, 16)
    _compare(_run(_ours, hidden, weight, None, target), _run(_hf, hidden, weight, None, target), tol)


@pytest.mark.parametrize("rows", [1, 4, 37, 64])
def test_chunk_boundaries(monkeypatch, rows):
    monkeypatch.setattr(lce, "CHUNK_ROWS", rows)
    args = _inputs(37, 24, 1000, torch.float32, True, ignored=(1, 36))
    _compare(_run(_ours, *args), _run(_hf, *args), 1e-5)


@pytest.mark.parametrize("as_tensor", [True, False], ids=["tensor", "int"])
def test_num_items_in_batch(monkeypatch, as_tensor):
    """HF's sum / num_items_in_batch, the divisor a 0-d tensor or a Python int; upstream grad 0.25."""
    monkeypatch.setattr(lce, "CHUNK_ROWS", 8)
    args = _inputs(29, 24, 1003, torch.float32, False, ignored=(3, 4))
    n_items = torch.tensor(61) if as_tensor else 61
    kw = dict(num_items_in_batch=n_items, grad_out=0.25)
    _compare(_run(_ours, *args, **kw), _run(_hf, *args, **kw), 1e-5)


def test_frozen_weight_gets_no_gradient():
    """LoRA: a frozen lm_head; only dH is computed (and dW is never allocated)."""
    args = _inputs(11, 24, 1000, torch.float32, False)
    got, want = _run(_ours, *args, w_grad=False), _run(_hf, *args, w_grad=False)
    assert got[2] is None and want[2] is None
    _compare(got, want, 1e-5)
    hidden, weight, _, target = args
    out = torch.ops.graphtune.linear_cross_entropy(hidden, weight, None, target, -100, 0.0, "mean", None, True, False, False)
    assert out[1].shape == hidden.shape and out[2].numel() == 0 and out[3].numel() == 0


@pytest.mark.parametrize("num_items", [None, 5], ids=["mean", "sum"])
def test_all_targets_ignored(monkeypatch, num_items):
    """Like F.cross_entropy: mean over zero targets is nan, a sum is 0; every gradient is 0."""
    monkeypatch.setattr(lce, "CHUNK_ROWS", 4)
    hidden, weight, bias, target = _inputs(9, 16, 1000, torch.float32, True)
    target.fill_(-100)
    got = _run(_ours, hidden, weight, bias, target, num_items_in_batch=num_items)
    want = _run(_hf, hidden, weight, bias, target, num_items_in_batch=num_items)
    assert torch.isnan(got[0]).item() == torch.isnan(want[0]).item() == (num_items is None)
    if num_items is not None:
        assert got[0].item() == want[0].item() == 0.0
    for a, b in zip(got[1:], want[1:]):
        assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b, torch.zeros_like(b))


def test_custom_ignore_index_and_empty_input():
    args = _inputs(10, 8, 1000, torch.float32, False)
    args[3][2] = 7  # ignore_index=7: row 2 ignored, other targets equal to 7 too
    _compare(_run(_ours, *args, ignore_index=7), _run(_hf, *args, ignore_index=7), 1e-5)
    hidden, weight, _, target = _inputs(0, 8, 1000, torch.float32, False)
    assert torch.isnan(linear_cross_entropy(hidden, weight, None, target))
    assert linear_cross_entropy(hidden, weight, None, target, num_items_in_batch=3).item() == 0.0


def test_out_of_range_target():
    hidden, weight, _, target = _inputs(6, 8, 1000, torch.float32, False)
    target[4] = 1000
    loss = None
    try:
        loss = linear_cross_entropy(hidden, weight, None, target)
    except IndexError as e:  # torch path: raises like F.cross_entropy on CPU
        assert not use_triton(hidden) and "out of bounds" in str(e)
    if loss is not None:  # Triton path: no host sync, the loss is nan
        assert use_triton(hidden) and torch.isnan(loss)


def test_grad_flag_mismatch_raises():
    hidden, weight, _, target = _inputs(5, 8, 1000, torch.float32, False)
    weight.requires_grad_(True)
    out = torch.ops.graphtune.linear_cross_entropy(hidden, weight, None, target, -100, 0.0, "mean", None, False, False, False)
    with pytest.raises(RuntimeError, match="need_weight_grad=False"):
        out[0].backward()


def test_bad_arguments():
    hidden, weight, _, target = _inputs(5, 8, 1000, torch.float32, False)
    op = torch.ops.graphtune.linear_cross_entropy
    with pytest.raises(ValueError, match="weight must be"):
        op(hidden, weight.t(), None, target, -100, 0.0, "mean", None, False, False, False)
    with pytest.raises(ValueError, match="share one dtype"):
        op(hidden.double(), weight, None, target, -100, 0.0, "mean", None, False, False, False)
    with pytest.raises(ValueError, match="class indices"):
        op(hidden, weight, None, target.float(), -100, 0.0, "mean", None, False, False, False)
    with pytest.raises(ValueError, match="reduction"):
        op(hidden, weight, None, target, -100, 0.0, "none", None, False, False, False)
    with pytest.raises(ValueError, match="divisor"):
        op(hidden, weight, None, target, -100, 0.0, "mean", torch.tensor(3.0), False, False, False)
    with pytest.raises(RuntimeError, match="targets for"):
        op(hidden, weight, None, target[:3], -100, 0.0, "mean", None, False, False, False)


def test_chunk_rows_budget(monkeypatch):
    monkeypatch.setattr(lce, "CHUNK_ROWS", None)
    # 256 MiB of fp32 logits at V = 128256: 523 rows; N = 16384 -> 32 balanced chunks of 512
    rows = lce.chunk_rows(16384, 128256, 4096)
    assert rows * 128256 * 4 <= lce.CHUNK_BYTES and rows == 512
    assert lce.chunk_rows(37, 1000, 24) == 37  # small problems: one chunk
    assert lce.chunk_rows(10**6, 4 * 10**6, 64) == lce.MIN_CHUNK_ROWS  # huge V: the GEMM floor wins
    monkeypatch.setattr(lce, "CHUNK_ROWS", 3)
    assert lce.chunk_rows(37, 1000, 24) == 3


def test_dispatch_runs_triton_under_interpret(monkeypatch, triton_expected, interpret_env):
    """Fails if TRITON_INTERPRET=1 is set but the op silently ran the torch reference."""
    hidden, weight, _, target = _inputs(6, 8, 1000, torch.float32, False)
    assert use_triton(hidden) is triton_expected
    if interpret_env:
        assert triton_expected, "TRITON_INTERPRET=1 is set but graphtune would not run Triton"
    calls = []
    real = lce._triton_chunk
    monkeypatch.setattr(lce, "_triton_chunk", lambda *a: calls.append("chunk") or real(*a))
    linear_cross_entropy(hidden.requires_grad_(True), weight, None, target).backward()
    assert calls == (["chunk"] if triton_expected else [])


def test_opcheck():
    hidden, weight, bias, target = _inputs(7, 8, 1000, torch.float32, True, ignored=(2,))
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    op = torch.ops.graphtune.linear_cross_entropy.default
    torch.library.opcheck(op, (hidden, weight, bias, target, -100, 30.0, "mean", None, True, True, True))
    torch.library.opcheck(op, (hidden, weight, None, target, -100, 0.0, "sum", torch.tensor(4), True, True, False))


def test_torch_compile_aot_eager():
    torch._dynamo.reset()
    hidden, weight, _, target = _inputs(14, 16, 1000, torch.float32, False, ignored=(3,))

    def f(x, w, t):
        return linear_cross_entropy(x.reshape(2, 7, 16), w, None, t, softcap=20.0) * 3.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    xs = [hidden.clone().requires_grad_(True) for _ in range(2)]
    ws = [weight.clone().requires_grad_(True) for _ in range(2)]
    out = compiled(xs[0], ws[0], target)
    out.backward()
    ref = reference_linear_cross_entropy(xs[1].reshape(2, 7, 16), ws[1], None, target, softcap=20.0) * 3.0
    ref.backward()
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(xs[0].grad, xs[1].grad) <= 1e-5 and rel_err(ws[0].grad, ws[1].grad) <= 1e-5
