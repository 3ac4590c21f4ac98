"""graphtune::attention: the reference op against plain-autograd attention (fp64 and fp32, forward and
backward, every feature: causal/full, sliding window, softcap, packed documents, padding mask, GQA,
KV-cache alignment), document ids, the selection rules, and -- on CUDA (GRAPHTUNE_TEST_DEVICE=cuda)
-- every GPU implementation against the reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from graphtune.kernels import attention as ka
from tests.conftest import rel_err

DEVICE = torch.get_default_device()
ON_CUDA = DEVICE.type == "cuda"

# (name, causal, window, softcap, docs, padding mask)
FEATURES = [
    ("causal", True, 0, 0.0, False, False),
    ("full", False, 0, 0.0, False, False),
    ("window", True, 4, 0.0, False, False),
    ("window_full", False, 3, 0.0, False, False),
    ("softcap", True, 0, 2.0, False, False),
    ("docs", True, 0, 0.0, True, False),
    ("docs_window_softcap", True, 4, 2.0, True, False),
    ("padding", True, 0, 0.0, False, True),
    ("everything", True, 5, 3.0, True, True),
]


def _inputs(B=2, Hq=4, Hkv=2, T=13, S=None, D=16, dtype=torch.float64, docs=False, mask=False, seed=0):
    S = T if S is None else S
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32, device="cpu").to(DEVICE, dtype).requires_grad_()

    q, k, v = rnd(B, Hq, T, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
    seq_ids = kv_mask = None
    if docs:  # documents of 5 and T-5 tokens in every row
        pos = torch.cat([torch.arange(5), torch.arange(T - 5)])[None].to(DEVICE)
        seq_ids = ka.document_ids(pos, None, B, T)
    if mask:  # right padding of 2 and 4 tokens
        kv_mask = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
        kv_mask[0, -2:] = False
        kv_mask[1, -4:] = False
    return q, k, v, seq_ids, kv_mask


def _fwd_bwd(fn, q, k, v, grad):
    out = fn(q, k, v)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), grad)
    return out, gq, gk, gv


@pytest.mark.parametrize("gqa", [1, 2, 4], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("name,causal,window,softcap,docs,mask", FEATURES, ids=[f[0] for f in FEATURES])
def test_reference_op_matches_autograd_fp64(name, causal, window, softcap, docs, mask, gqa):
    q, k, v, seq_ids, kv_mask = _inputs(Hq=4, Hkv=4 // gqa, docs=docs, mask=mask)
    kw = dict(scale=0.3, causal=causal, window=window, softcap=softcap, seq_ids=seq_ids, kv_mask=kv_mask)
    grad = torch.randn(q.shape[0], q.shape[2], q.shape[1], v.shape[-1], dtype=q.dtype, device=DEVICE)
    got = _fwd_bwd(lambda a, b, c: ka.attention(a, b, c, **kw), q, k, v, grad)
    ref = _fwd_bwd(lambda a, b, c: ka.reference_attention(a, b, c, **kw), q, k, v, grad)
    assert got[0].shape == (2, 13, 4, 16) and got[0].is_contiguous()
    for a, b, what in zip(got, ref, ("out", "dq", "dk", "dv")):
        assert rel_err(a, b) <= 1e-12, what


@pytest.mark.parametrize("name,causal,window,softcap,docs,mask", FEATURES[:5] + FEATURES[-1:], ids=[f[0] for f in FEATURES[:5] + FEATURES[-1:]])
def test_reference_op_fp32_and_odd_sizes(name, causal, window, softcap, docs, mask):
    q, k, v, seq_ids, kv_mask = _inputs(B=3, Hq=6, Hkv=2, T=11, D=24, dtype=torch.float32, docs=docs, mask=mask)
    kw = dict(scale=24**-0.5, causal=causal, window=window, softcap=softcap, seq_ids=seq_ids, kv_mask=kv_mask)
    grad = torch.randn(3, 11, 6, 24, device=DEVICE).transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous
    got = _fwd_bwd(lambda a, b, c: ka.attention(a, b, c, **kw), q, k, v, grad)
    ref = _fwd_bwd(lambda a, b, c: ka.reference_attention(a, b, c, **kw), q, k, v, grad)
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= 1e-5


def test_kv_cache_alignment_is_bottom_right():
    """T < S (decode / chunked prefill): query t sits at key position t + S - T."""
    q, k, v, _, _ = _inputs(T=3, S=9)
    for window in (0, 4):
        got = ka.attention(q, k, v, window=window)
        ref = ka.reference_attention(q, k, v, window=window)
        assert rel_err(got, ref) <= 1e-12
    # the last query sees every key (causal), the first one all but the last two
    allowed = ka.visible_keys(3, 9, causal=True, window=0)
    assert allowed[0, -1].all() and allowed[0, 0].sum() == 7


def test_fully_masked_rows_are_zero_and_grads_finite():
    q, k, v, _, _ = _inputs(B=1, T=6)
    kv_mask = torch.tensor([[False, False, True, True, True, True]], device=DEVICE)  # left padding
    out = ka.attention(q, k, v, kv_mask=kv_mask)
    assert (out[0, :2] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_chunked_reference_matches(monkeypatch):
    monkeypatch.setattr(ka, "_CHUNK_ELEMS", 2 * 4 * 13 * 3)  # 3 query rows per chunk
    q, k, v, seq_ids, kv_mask = _inputs(docs=True, mask=True)
    kw = dict(window=4, softcap=2.0, seq_ids=seq_ids, kv_mask=kv_mask)
    grad = torch.randn(2, 13, 4, 16, dtype=q.dtype, device=DEVICE)
    got = _fwd_bwd(lambda a, b, c: ka.attention(a, b, c, **kw), q, k, v, grad)
    ref = _fwd_bwd(lambda a, b, c: ka.reference_attention(a, b, c, **kw), q, k, v, grad)
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype):
    q, k, v, seq_ids, _ = _inputs(dtype=torch.float32, docs=True)
    out32 = ka.attention(q, k, v, window=4, seq_ids=seq_ids)
    qh, kh, vh = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = ka.attention(qh, kh, vh, window=4, seq_ids=seq_ids)
    assert out.dtype == dtype
    assert rel_err(out.float(), out32) <= 2e-2
    out.float().sum().backward()
    assert qh.grad.dtype == dtype and kh.grad.shape == kh.shape


def test_opcheck():
    q, k, v, seq_ids, kv_mask = _inputs(dtype=torch.float32, docs=True, mask=True)
    torch.library.opcheck(torch.ops.graphtune.attention.default, (q, k, v, seq_ids, kv_mask, None, 0.25, True, 4, 2.0, "reference"))


def test_inside_torch_compile_dynamic():
    def f(q, k, v, pos):
        seq = ka.document_ids(pos, None, q.shape[0], q.shape[2])
        return ka.attention(q, k, v, window=4, softcap=2.0, seq_ids=seq)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (13, 17):
        q, k, v, _, _ = _inputs(dtype=torch.float32, T=T)
        pos = torch.cat([torch.arange(5), torch.arange(T - 5)])[None].to(DEVICE)
        grad = torch.randn(2, T, 4, 16, device=DEVICE)
        got = _fwd_bwd(lambda a, b, c: compiled(a, b, c, pos), q, k, v, grad)
        ref = _fwd_bwd(lambda a, b, c: f(a, b, c, pos), q, k, v, grad)
        for a, b in zip(got, ref):
            assert rel_err(a, b) <= 1e-6


def test_unsupported_impl_and_shapes_are_clear_errors():
    q, k, v, _, _ = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="lowered"):
        ka.attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="multiple"):
        ka.attention(q[:, :3], k, v)


# ----------------------------------------------------------------------------------------------
# Document ids and varlen boundaries
# ----------------------------------------------------------------------------------------------
def test_document_ids_from_positions_and_cu_seqlens():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]], device=DEVICE)
    ids = ka.document_ids(pos, None, 1, 10)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3, 3, 3]] and ids.dtype == torch.int32
    cu = torch.tensor([0, 3, 5, 6, 10], dtype=torch.int32, device=DEVICE)
    assert ka.document_ids(None, cu, 1, 10).tolist() == ids.tolist()
    # arange positions: one document per row; rows broadcast from a [1, T] position tensor
    assert ka.document_ids(torch.arange(4, device=DEVICE)[None], None, 3, 4).eq(0).all()
    got_cu, max_len = ka.cu_seqlens_from_document_ids(ids)
    assert got_cu.tolist() == cu.tolist() and max_len == 4
    # two rows: boundaries also at every row start, even when ids repeat across rows
    two = torch.zeros(2, 3, dtype=torch.int32, device=DEVICE)
    assert ka.cu_seqlens_from_document_ids(two)[0].tolist() == [0, 3, 6]


# ----------------------------------------------------------------------------------------------
# Selection rules (pure; no GPU needed)
# ----------------------------------------------------------------------------------------------
def _features(**kw):
    base = dict(device="cuda", capability=(9, 0), dtype=torch.bfloat16, head_dim=64, v_head_dim=64, num_heads=32,
                num_kv_heads=8, same_length=True, causal=True, window=0, softcap=0.0, documents="none", padding_mask=False)
    base.update(kw)
    return ka.AttentionFeatures(**base)


@pytest.mark.parametrize(
    "kw,impl",
    [
        (dict(device="cpu", dtype=torch.float32), "reference"),
        (dict(), "sdpa"),  # plain causal bf16: PyTorch's SDPA priority list, GQA in the call
        (dict(head_dim=80, v_head_dim=80), "sdpa"),
        (dict(dtype=torch.float32), "sdpa"),
        (dict(window=4096), "flash"),  # Mistral / Gemma-3 sliding layers
        (dict(documents="cu_seqlens"), "flash"),  # packed, boundaries from the collator
        (dict(documents="cu_seqlens", window=512), "flash"),
        (dict(documents="positions"), "flex"),  # packed, boundaries only from position ids: no sync
        (dict(softcap=50.0, window=4096, head_dim=256, v_head_dim=256), "flex"),  # Gemma-2
        (dict(padding_mask=True), "sdpa_masked"),  # Flex cannot compile a dynamic-batch padding mask
        (dict(padding_mask=True, window=64), "sdpa_masked"),
        (dict(padding_mask=True, softcap=30.0), "flex"),
        (dict(dtype=torch.float32, window=8), "flex"),
        (dict(head_dim=512, v_head_dim=512), "sdpa"),
        (dict(head_dim=512, v_head_dim=512, window=8), "flex"),
        (dict(same_length=False), "flash"),  # KV cache: bottom-right causal
        (dict(capability=(7, 5), dtype=torch.float16), "sdpa"),
    ],
)
def test_selection_rules(kw, impl):
    got, reason = ka.select_implementation(_features(**kw), force="auto")
    assert got == impl, reason
    assert ka.cannot_serve(got, _features(**kw)) is None


def test_forced_implementation(monkeypatch):
    monkeypatch.setenv("GRAPHTUNE_ATTENTION", "sdpa_cudnn")
    assert ka.select_implementation(_features(num_kv_heads=32))[0] == "sdpa_cudnn"
    impl, reason = ka.select_implementation(_features())  # GQA: cuDNN refused, falls back with the reason
    assert impl == "sdpa" and "refused" in reason and "GQA" in reason
    monkeypatch.setenv("GRAPHTUNE_ATTENTION", "flex")
    assert ka.select_implementation(_features())[0] == "flex"
    monkeypatch.setenv("GRAPHTUNE_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="GRAPHTUNE_ATTENTION"):
        ka.select_implementation(_features())


# ----------------------------------------------------------------------------------------------
# The lowering targets: semantics checked on the CPU where PyTorch allows, all of them on CUDA
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,causal,window,softcap,docs,mask", [f for f in FEATURES if f[3] == 0.0], ids=[f[0] for f in FEATURES if f[3] == 0.0])
def test_sdpa_masked_lowering_matches_reference(name, causal, window, softcap, docs, mask):
    """The dense-mask SDPA path (padding masks on a GPU): forward and backward, empty rows give zeros."""
    q, k, v, seq_ids, kv_mask = _inputs(dtype=torch.float32, docs=docs, mask=mask)
    kw = dict(causal=causal, window=window, seq_ids=seq_ids, kv_mask=kv_mask)
    grad = torch.randn(q.shape[0], q.shape[2], q.shape[1], v.shape[-1], device=q.device)
    got = _fwd_bwd(lambda a, b, c: ka.sdpa_masked_attention(a, b, c, seq_ids, kv_mask, 0.3, causal, window), q, k, v, grad)
    ref = _fwd_bwd(lambda a, b, c: ka.reference_attention(a, b, c, scale=0.3, **kw), q, k, v, grad)
    for a, b, what in zip(got, ref, ("out", "dq", "dk", "dv")):
        assert rel_err(a, b) <= 1e-5, what


def test_sdpa_auto_lowering_matches_reference():
    q, k, v, _, _ = _inputs(dtype=torch.float32)
    got = ka.sdpa_attention(q, k, v, 0.3, True, "auto")
    assert rel_err(got, ka.reference_attention(q, k, v, scale=0.3, causal=True)) <= 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_math_lowering_matches_reference(causal):
    q, k, v, _, _ = _inputs(dtype=torch.float32)
    got = ka.sdpa_attention(q, k, v, 0.3, causal, "math")
    ref = ka.reference_attention(q, k, v, scale=0.3, causal=causal)
    assert got.shape == ref.shape and rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("name,causal,window,softcap,docs,mask", FEATURES, ids=[f[0] for f in FEATURES])
def test_flex_lowering_semantics(name, causal, window, softcap, docs, mask):
    """Block mask + score_mod give the reference's attention (forward; FlexAttention's CPU path)."""
    q, k, v, seq_ids, kv_mask = _inputs(dtype=torch.float32, docs=docs, mask=mask)
    kw = dict(causal=causal, window=window, softcap=softcap, seq_ids=seq_ids, kv_mask=kv_mask)
    bm = ka.flex_block_mask(seq_ids, kv_mask, causal, window, 2, 13, 13, q.device)
    got = ka.flex_attention(q.detach(), k.detach(), v.detach(), bm, 0.3, softcap)  # no backward on a CPU
    ref = ka.reference_attention(q, k, v, scale=0.3, **kw)
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("name,causal,window,softcap,docs,mask", [f for f in FEATURES if f[3] > 0.0],
                         ids=[f[0] for f in FEATURES if f[3] > 0.0])
def test_flex_compiled_wrapper_with_softcap(name, causal, window, softcap, docs, mask, monkeypatch):
    """The eager path CUDA takes (``torch.compile(flex_attention)``), here on the CPU (inductor's CPU
    flex template, forward): the softcap score_mod compiles and gives the reference. A Python float
    closed over by the score_mod failed to lower (unbacked ``_local_scalar_dense``), which broke
    every softcap case of ``test_gpu_implementation_matches_reference[flex-*]`` on torch 2.11."""
    q, k, v, seq_ids, kv_mask = _inputs(dtype=torch.float32, docs=docs, mask=mask)
    monkeypatch.setattr(ka, "_compile_eager_flex", lambda q: True)
    bm = ka.flex_block_mask(seq_ids, kv_mask, causal, window, 2, 13, 13, q.device)
    got = ka.flex_attention(q.detach(), k.detach(), v.detach(), bm, 0.3, softcap)
    ref = ka.reference_attention(q, k, v, scale=0.3, causal=causal, window=window, softcap=softcap, seq_ids=seq_ids,
                                 kv_mask=kv_mask)
    assert rel_err(got, ref) <= 1e-5


GPU_CASES = list(itertools.product(
    ["sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_masked", "flash", "flex"],
    [torch.bfloat16, torch.float32],
    FEATURES + [("kv_cache", True, 0, 0.0, False, False)],
))


@pytest.mark.skipif(not ON_CUDA, reason="GPU implementations run on CUDA (GRAPHTUNE_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("impl,dtype,feat", GPU_CASES, ids=[f"{i}-{str(d)[6:]}-{f[0]}" for i, d, f in GPU_CASES])
def test_gpu_implementation_matches_reference(impl, dtype, feat):
    import graphtune.attention as ga

    name, causal, window, softcap, docs, mask = feat
    S = 21 if name == "kv_cache" else None
    T = 13 if name != "kv_cache" else 5
    q, k, v, seq_ids, kv_mask = _inputs(B=2, Hq=8, Hkv=2, T=T, S=S, D=64, dtype=torch.float32, docs=docs, mask=mask)
    cu = ka.cu_seqlens_from_document_ids(seq_ids)[0] if docs else None
    f = ga.features_of(q.to(dtype), k, v, seq_ids=seq_ids, kv_mask=kv_mask, cu_seqlens=cu, causal=causal,
                       window=window, softcap=softcap, same_length=S is None)
    if (why := ka.cannot_serve(impl, f)) is not None:
        pytest.skip(why)
    qd, kd, vd = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    grad = torch.randn(2, T, 8, 64, device=DEVICE)
    got = _fwd_bwd(lambda a, b, c: ga.run_implementation(impl, a, b, c, seq_ids, kv_mask, cu, 0.125, causal, window, softcap), qd, kd, vd, grad.to(dtype))
    kw = dict(scale=0.125, causal=causal, window=window, softcap=softcap, seq_ids=seq_ids, kv_mask=kv_mask)
    ref = _fwd_bwd(lambda a, b, c: ka.reference_attention(a, b, c, **kw), q, k, v, grad)
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    for a, b, what in zip(got, ref, ("out", "dq", "dk", "dv")):
        assert rel_err(a.float(), b) <= tol, what


def test_sdpa_masked_left_padding_gives_zero_rows():
    """Left padding: the first query rows see no key; SDPA alone would give NaN there."""
    q, k, v, _, _ = _inputs(B=1, T=6, dtype=torch.float32)
    kv_mask = torch.tensor([[False, False, True, True, True, True]], device=DEVICE)
    grad = torch.randn(1, 6, q.shape[1], v.shape[-1], device=q.device)
    got = _fwd_bwd(lambda a, b, c: ka.sdpa_masked_attention(a, b, c, None, kv_mask, 0.3, True, 0), q, k, v, grad)
    ref = _fwd_bwd(lambda a, b, c: ka.reference_attention(a, b, c, scale=0.3, causal=True, kv_mask=kv_mask), q, k, v, grad)
    assert torch.isfinite(got[0]).all() and (got[0][:, :2] == 0).all()
    for a, b, what in zip(got, ref, ("out", "dq", "dk", "dv")):
        assert rel_err(a, b) <= 1e-5, what
