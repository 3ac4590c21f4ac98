"""graphtune::rope against HF apply_rotary_pos_emb (Llama; Phi3 for partial rotary), fwd and bwd."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply_rope
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply_rope

import graphtune.kernels.rope as rope_mod
from graphtune.kernels._dispatch import use_triton
from graphtune.kernels.rope import reference_rope, rope

# (B, Hq, Hk, T, D, R)
SHAPES = [
    (2, 4, 2, 5, 24, 24),
    (2, 4, 2, 5, 24, 12),  # partial rotary (Phi3-style pass-through)
    (1, 3, 1, 7, 16, 16),
    (1, 5, 5, 3, 18, 10),  # odd head count, R/2 and D-R not powers of two
]
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 2e-2, 2e-2),
    (torch.float16, 2e-3, 2e-3),
]


def _cos_sin(position_ids: torch.Tensor, R: int, dtype, base: float = 10000.0):
    """HF's default rotary table: emb = cat(freqs, freqs), cos/sin [B, T, R]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qk(B, Hq, Hk, T, D, dtype, layout):
    if layout == "transposed":  # HF: proj(x).view(B, T, H, D).transpose(1, 2)
        q = torch.randn(B, T, Hq, D, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, T, Hk, D, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, T, D, dtype=dtype)
        k = torch.randn(B, Hk, T, D, dtype=dtype)
    return q, k


def _run(fn, q, k, cos, sin, dq, dk):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    oq, ok = fn(q, k, cos, sin)
    torch.autograd.backward([oq, ok], [dq, dk])
    return oq.detach(), ok.detach(), q.grad, k.grad


def _hf(R, D):
    return llama_apply_rope if R == D else phi3_apply_rope


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_hf(shape, dtype, atol, rtol, layout):
    B, Hq, Hk, T, D, R = shape
    q, k = _qk(B, Hq, Hk, T, D, dtype, layout)
    cos, sin = _cos_sin(torch.arange(T).expand(B, T), R, dtype)
    dq, dk = torch.randn(q.shape, dtype=dtype), torch.randn(k.shape, dtype=dtype)
    got = _run(rope, q, k, cos, sin, dq, dk)
    want = _run(_hf(R, D), q, k, cos, sin, dq, dk)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    assert got[0].dtype == want[0].dtype
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("grad_kind", ["random", "noncontig", "expanded"])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_general_cos_sin_and_grad_layouts(shape, grad_kind, make_grad):
    """Random cos/sin (c1 != c2, s1 != s2): the backward must be the exact transpose."""
    B, Hq, Hk, T, D, R = shape
    q, k = _qk(B, Hq, Hk, T, D, torch.float32, "transposed")
    cos, sin = torch.randn(B, T, R), torch.randn(B, T, R)
    dq, dk = make_grad(grad_kind, q), make_grad(grad_kind, k)
    got = _run(rope, q, k, cos, sin, dq, dk)
    want = _run(reference_rope, q, k, cos, sin, dq, dk)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:2])
def test_packed_positions_reset_per_example(dtype, atol, rtol):
    """Padding-free packing: positions restart per example inside one row (cos/sin per token)."""
    B, Hq, Hk, T, D = 2, 4, 2, 9, 16
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    config = LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hk, head_dim=D)
    rotary = LlamaRotaryEmbedding(config)
    x = torch.randn(B, T, Hq * D, dtype=dtype)
    cos, sin = rotary(x, position_ids)
    assert cos.dtype == dtype and cos.shape == (B, T, D)
    # Same cos/sin rows as for each example alone: token 4 of row 0 is position 0.
    torch.testing.assert_close(cos[0, 4], cos[0, 0])
    q, k = _qk(B, Hq, Hk, T, D, dtype, "transposed")
    dq, dk = torch.randn(q.shape, dtype=dtype), torch.randn(k.shape, dtype=dtype)
    got = _run(rope, q, k, cos, sin, dq, dk)
    want = _run(llama_apply_rope, q, k, cos, sin, dq, dk)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def test_broadcast_batch_cos_sin():
    """cos/sin with batch 1 serve every batch row (HF's default position_ids)."""
    B, Hq, Hk, T, D = 3, 2, 1, 4, 8
    q, k = _qk(B, Hq, Hk, T, D, torch.float32, "contiguous")
    cos, sin = _cos_sin(torch.arange(T)[None], D, torch.float32)
    dq, dk = torch.randn(q.shape), torch.randn(k.shape)
    got = _run(rope, q, k, cos, sin, dq, dk)
    want = _run(llama_apply_rope, q, k, cos, sin, dq, dk)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dtype_promotion():
    """bf16 q/k with fp32 cos/sin give fp32 outputs, as HF's eager math does; grads come back bf16."""
    B, Hq, Hk, T, D = 1, 2, 1, 3, 8
    q, k = _qk(B, Hq, Hk, T, D, torch.bfloat16, "transposed")
    cos, sin = _cos_sin(torch.arange(T)[None], D, torch.float32)
    dq, dk = torch.randn(q.shape), torch.randn(k.shape)
    got = _run(rope, q, k, cos, sin, dq, dk)
    want = _run(llama_apply_rope, q, k, cos, sin, dq, dk)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_bad_arguments():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="R even"):
        rope(q, k, torch.randn(1, 3, 7), torch.randn(1, 3, 7))
    with pytest.raises(ValueError, match="R even"):
        rope(q, k, torch.randn(1, 3, 10), torch.randn(1, 3, 10))
    with pytest.raises(ValueError, match="do not fit"):
        rope(q, k, torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="differ"):
        rope(q, torch.randn(1, 1, 3, 6), cos, cos)
    with pytest.raises(ValueError, match="must be"):
        rope(q[0], k, cos, cos)


def test_dispatch_runs_triton_under_interpret(monkeypatch, triton_expected, interpret_env):
    """Fails if TRITON_INTERPRET=1 is set but the op silently ran the torch reference."""
    q, k = _qk(1, 2, 1, 3, 8, torch.float32, "contiguous")
    assert use_triton(q) is triton_expected
    if interpret_env:
        assert triton_expected, "TRITON_INTERPRET=1 is set but graphtune would not run Triton"
    calls = []
    real = rope_mod._triton_rope
    monkeypatch.setattr(rope_mod, "_triton_rope", lambda *a: calls.append(a[4]) or real(*a))
    cos, sin = _cos_sin(torch.arange(3)[None], 8, torch.float32)
    oq, ok = rope(q.requires_grad_(True), k, cos, sin)
    (oq.sum() + ok.sum()).backward()
    assert calls == ([False, True] if triton_expected else [])  # forward, then backward


def test_opcheck():
    B, Hq, Hk, T, D, R = 1, 2, 1, 3, 8, 6
    q = torch.randn(B, T, Hq, D).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, Hk, T, D, requires_grad=True)
    cos, sin = torch.randn(B, T, R), torch.randn(B, T, R)
    torch.library.opcheck(torch.ops.graphtune.rope.default, (q, k, cos, sin))
    dq, dk = torch.randn(q.shape), torch.randn(k.shape)
    torch.library.opcheck(torch.ops.graphtune.rope_backward.default, (dq, dk, cos, sin))


def test_torch_compile_aot_eager():
    torch._dynamo.reset()
    B, Hq, Hk, T, D = 2, 2, 1, 4, 8
    q, k = _qk(B, Hq, Hk, T, D, torch.float32, "transposed")
    cos, sin = _cos_sin(torch.arange(T).expand(B, T), D, torch.float32)

    def f(a, b):
        oq, ok = rope(a, b, cos, sin)
        return (oq * 2.0).sum() + (ok * ok).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    qs = [q.clone().requires_grad_(True) for _ in range(2)]
    ks = [k.clone().requires_grad_(True) for _ in range(2)]
    out = compiled(qs[0], ks[0])
    out.backward()
    oq, ok = reference_rope(qs[1], ks[1], cos, sin)
    ref = (oq * 2.0).sum() + (ok * ok).sum()
    ref.backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(qs[0].grad, qs[1].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ks[0].grad, ks[1].grad, atol=1e-5, rtol=1e-5)
