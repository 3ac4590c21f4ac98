"""fuse_lora on peft models: counts, eager equivalence (incl. dropout with peft's own mask, rsLoRA,
several adapters with one active), refusals and unmatched reporting (DoRA, trainable base weight)."""

from __future__ import annotations

import peft
import pytest
import torch

import graphtune
from graphtune.kernels.lora_linear import lora_linear, reference_lora_linear
from graphtune.tiny import randomize_lora_b, tiny_batch, tiny_model
from tests.conftest import rel_err
from tests.helpers import compare_step


def _peft(family="llama", seed=0, **lora_kw):
    torch.manual_seed(seed)
    base = tiny_model(family)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], **lora_kw)
    model = peft.get_peft_model(base, cfg)
    randomize_lora_b(model, seed + 1)
    model.train()
    return model


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 7, 24), (5, 33)])
def test_op_matches_reference_with_a_dropout_mask(shape, bias):
    """The op against peft's math on the same dropped input (a fixed mask), forward and backward."""
    x = torch.randn(shape, dtype=torch.float64)
    mask = (torch.rand(shape) > 0.3).double() / 0.7
    w = torch.randn(19, shape[-1], dtype=torch.float64)
    b = torch.randn(19, dtype=torch.float64) if bias else None
    a, bb = torch.randn(4, shape[-1], dtype=torch.float64), torch.randn(19, 4, dtype=torch.float64)

    def run(fn):
        xs = x.clone().requires_grad_()
        ps = [a.clone().requires_grad_(), bb.clone().requires_grad_()]
        bias_t = b.clone().requires_grad_() if b is not None else None
        y = fn(xs, xs * mask, w, bias_t, ps[0], ps[1], 0.5)
        y.backward(torch.ones_like(y).cumsum(-1))
        return [y, xs.grad, ps[0].grad, ps[1].grad] + ([bias_t.grad] if b is not None else [])

    for got, want in zip(run(lora_linear), run(reference_lora_linear)):
        assert rel_err(got, want) <= 1e-12


def test_counts_and_eager_equivalence_with_rslora():
    ref, opt = _peft(use_rslora=True), _peft(use_rslora=True)
    graphtune.optimize(opt, compiler="aot_eager")
    compare_step(ref, opt, tiny_batch(3, 11))
    report = graphtune.last_report(opt)
    assert report.counts["fuse_lora"] == 14 and report.unmatched == []


def test_dropout_uses_peft_mask():
    """lora_dropout > 0: peft's dropout node stays in the graph; same seed => same mask => same grads."""
    ref, opt = _peft(lora_dropout=0.25), _peft(lora_dropout=0.25)
    graphtune.optimize(opt, compiler="aot_eager")
    batch = tiny_batch(2, 9)
    torch.manual_seed(123)
    out_ref = ref(**batch)
    torch.manual_seed(123)
    out_opt = opt(**batch)
    assert graphtune.last_report(opt).passes[0].by_rewrite == {"peft_linear_dropout": 14}
    out_ref.loss.backward()
    out_opt.loss.backward()
    assert rel_err(out_opt.loss, out_ref.loss) <= 1e-5
    for (n, a), (_, b) in zip(opt.named_parameters(), ref.named_parameters()):
        if b.requires_grad:
            assert rel_err(a.grad, b.grad) <= 1e-5, n


def test_several_adapters_one_active():
    ref, opt = _peft(), _peft()
    for m in (ref, opt):
        m.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
        m.set_adapter("default")
    graphtune.optimize(opt, compiler="aot_eager")
    compare_step(ref, opt, tiny_batch(2, 8))
    assert graphtune.last_report(opt).counts["fuse_lora"] == 14


def test_dora_gets_a_clear_capture_error():
    """peft's DoRA forward is not capturable as one graph by dynamo (torch 2.13): say so clearly."""
    model = _peft(use_dora=True)
    with pytest.raises(graphtune.CaptureError, match="could not capture"):
        graphtune.explain(model, **tiny_batch())


def test_lora_on_embeddings_is_reported_unmatched():
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    report = graphtune.explain(model, **tiny_batch())
    assert report.counts["fuse_lora"] == 2
    unmatched = [u.module for u in report.unmatched if u.expected_pass == "fuse_lora"]
    assert unmatched == ["base_model.model.model.embed_tokens"], report.summary()


def test_trainable_base_weight_is_refused():
    model = _peft()
    model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)
    report = graphtune.explain(model, **tiny_batch())
    lora = next(p for p in report.passes if p.name == "fuse_lora")
    assert lora.count == 13 and len(lora.refused) == 1
    assert "base weight requires grad" in lora.refused[0].reason


@pytest.mark.parametrize("mode", ["x_lora_fp32_node", "x_lora_is_x", "x_lora_is_x_out_half"])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_op_mixed_precision_matches_eager_autograd(half, mode):
    """peft's autocast_adapter_dtype: half x/W, fp32 A/B; x_lora is peft's fp32 cast node (dropout case) or x
    itself, which the op casts inside; ``out_dtype`` folds peft's final ``.to(half)`` into the op. Forward
    and every grad as eager autograd computes them (eager: explicit casts, fp32 sum)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 24, generator=g).to(half).requires_grad_()
    w = torch.randn(40, 24, generator=g).to(half)
    bias = torch.randn(40, generator=g).to(half)
    a = (torch.randn(5, 24, generator=g) * 0.2).requires_grad_()
    b = (torch.randn(40, 5, generator=g) * 0.2).requires_grad_()
    dy = torch.randn(3, 7, 40, generator=g)
    out_half = mode.endswith("out_half")

    def run(fn, x_lora, **kw):
        out = fn(x, x_lora, w, bias, a, b, 2.0, **kw)
        if out_half and not kw:
            out = out.to(half)
        grads = torch.autograd.grad(out, (x, a, b), dy.to(out.dtype))
        return (out, *grads)

    got = run(lora_linear, x.to(torch.float32) if mode == "x_lora_fp32_node" else x, **({"out_dtype": half} if out_half else {}))
    ref = run(reference_lora_linear, x.to(torch.float32))
    assert got[0].dtype == ref[0].dtype == (half if out_half else torch.float32)
    for gt, rf, what in zip(got, ref, ("out", "dx", "dA", "dB")):
        assert gt.dtype == rf.dtype, what
        # the half output may differ by one rounding step where addmm's fp32 sum rounds the other way
        tol = 1e-3 if out_half and what == "out" else 1e-5
        assert rel_err(gt, rf) <= tol, what


def test_half_model_with_fp32_adapters_is_fused():
    """A bf16 model wrapped by peft keeps fp32 adapters (its default): every projection is fused, grads match eager."""
    ref = tiny_model("llama", lora=True, dtype=torch.bfloat16)
    opt = tiny_model("llama", lora=True, dtype=torch.bfloat16)
    assert {p.dtype for n, p in opt.named_parameters() if "lora_" in n} == {torch.float32}
    ref.train()
    opt.train()
    graphtune.optimize(opt, compiler="aot_eager")
    batch = tiny_batch(2, 9)
    loss_ref = ref(**batch).loss
    loss_ref.backward()
    loss = opt(**batch).loss
    loss.backward()
    report = graphtune.last_report(opt)
    assert report.counts["fuse_lora"] == 14
    by_rewrite = next(p for p in report.passes if p.name == "fuse_lora").by_rewrite
    assert by_rewrite == {"peft_linear_autocast": 14}, by_rewrite  # the fp32 cast of x moved inside the op
    assert rel_err(loss, loss_ref) <= 1e-2
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), opt.named_parameters()):
        if p_ref.requires_grad:
            assert rel_err(p.grad, p_ref.grad) <= 2e-2, name


def test_cuda_default_leaves_mixed_precision_to_the_compiler():
    """The CUDA default pipeline refuses peft's fp32-adapter-on-bf16 projections (measured slower fused) and says
    why; fp32 throughout is still fused by it, and the CPU default fuses both."""
    from graphtune.passes import default_passes
    from graphtune.passes.fuse_lora import MIXED_PRECISION_LEFT_TO_COMPILER, FuseLoRA

    for name in ("fuse_lora", "fuse_qlora"):
        assert next(p for p in default_passes("cuda") if p.name == name).fuse_mixed_precision is False
        assert next(p for p in default_passes("cpu") if p.name == name).fuse_mixed_precision is True
    half = tiny_model("llama", lora=True, dtype=torch.bfloat16)
    report = graphtune.explain(half, passes=[FuseLoRA(fuse_mixed_precision=False)], **tiny_batch())
    result = next(p for p in report.passes if p.name == "fuse_lora")
    assert result.count == 0 and len({r.site for r in result.refused}) == 14  # one refusal per site and rewrite tried
    assert {r.reason for r in result.refused} == {MIXED_PRECISION_LEFT_TO_COMPILER}
    full = tiny_model("llama", lora=True)
    assert graphtune.explain(full, passes=[FuseLoRA(fuse_mixed_precision=False)], **tiny_batch()).counts["fuse_lora"] == 14


def test_cuda_default_fuses_bf16_mixed_precision_where_the_split_path_serves(monkeypatch):
    """Where the op's split-bf16 path applies (bf16 base, fp32 adapters, no dropout; ``GRAPHTUNE_LORA_SPLIT=1``
    stands in for a CUDA device here), the CUDA default fuses every projection, and a training step gives
    eager's loss and LoRA grads; an fp16 base is still left to the compiler, with the reason."""
    from graphtune.passes.fuse_lora import MIXED_PRECISION_LEFT_TO_COMPILER, FuseLoRA

    monkeypatch.setenv("GRAPHTUNE_LORA_SPLIT", "1")
    half = tiny_model("llama", lora=True, dtype=torch.bfloat16)
    report = graphtune.explain(half, passes=[FuseLoRA(fuse_mixed_precision=False)], **tiny_batch())
    result = next(p for p in report.passes if p.name == "fuse_lora")
    assert result.count == 14 and result.by_rewrite == {"peft_linear_autocast": 14}
    fp16 = tiny_model("llama", lora=True, dtype=torch.float16)
    report = graphtune.explain(fp16, passes=[FuseLoRA(fuse_mixed_precision=False)], **tiny_batch())
    result = next(p for p in report.passes if p.name == "fuse_lora")
    assert result.count == 0 and {r.reason for r in result.refused} == {MIXED_PRECISION_LEFT_TO_COMPILER}

    ref = tiny_model("llama", lora=True, dtype=torch.bfloat16)
    opt = tiny_model("llama", lora=True, dtype=torch.bfloat16)
    for m in (ref, opt):
        randomize_lora_b(m, 0)  # B = 0 would make dA zero and the comparison empty
        m.train()
    opt.load_state_dict(ref.state_dict())
    graphtune.optimize(opt, passes=[FuseLoRA(fuse_mixed_precision=False)], compiler="aot_eager")
    batch = tiny_batch(2, 9)
    loss_ref = ref(**batch).loss
    loss_ref.backward()
    loss = opt(**batch).loss
    loss.backward()
    assert graphtune.last_report(opt).counts["fuse_lora"] == 14
    assert rel_err(loss, loss_ref) <= 1e-2
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), opt.named_parameters()):
        if p_ref.requires_grad:
            assert rel_err(p.grad, p_ref.grad) <= 2e-2, name
