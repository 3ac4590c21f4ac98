"""graphtune attention inside the eight families: vs HF's eager attention (fp32, relative <= 1e-5,
loss / logits / every gradient), with sequences shorter and longer than the sliding window (8 in the
tiny Gemma-2/3 configs), Gemma-2's logit softcap, packed batches, padding masks, KV-cache
generation, and one compiled (dispatched) Gemma-2 packed training step."""

from __future__ import annotations

import pytest
import torch

import graphtune
import graphtune.attention as ga
from graphtune.data.packing import PackingCollator
from graphtune.tiny import FAMILIES, tiny_batch, tiny_model
from tests.conftest import rel_err

SOFTCAP = 1.0  # Gemma-2's default 50 never bites at tiny-model score sizes


def sharp_model(family, *, attn="graphtune", seed=0, **kw):
    """A tiny model whose attention is far from uniform (q/k projections scaled up), so windows,
    documents and softcap change the result measurably."""
    if family == "gemma2":
        kw.setdefault("attn_logit_softcapping", SOFTCAP)
    model = tiny_model(family, seed=seed, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(6.0)
    if attn == "graphtune":
        ga.enable(model)
    else:
        model.set_attn_implementation(attn)
    model.train()
    return model


def _step(model, batch, **extra):
    out = model(**batch, **extra)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def _assert_same(out, grads, out_ref, grads_ref, tol=1e-5):
    assert rel_err(out.loss, out_ref.loss) <= tol
    if out.logits.shape[-1] != 0:  # fuse_linear_cross_entropy returns empty logits in training graphs
        assert rel_err(out.logits, out_ref.logits) <= tol
    assert grads.keys() == grads_ref.keys()
    worst = max(grads, key=lambda n: rel_err(grads[n], grads_ref[n]))
    assert rel_err(grads[worst], grads_ref[worst]) <= tol, worst


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_eager_attention(family):
    """T=5 < window < T=20; Gemma-2 with softcap (sliding and full layers)."""
    ref = sharp_model(family, attn="eager")
    model = sharp_model(family)
    for seq in (5, 20):
        batch = tiny_batch(2, seq, seed=seq)
        _assert_same(*_step(model, batch), *_step(ref, batch))
    if family in ("gemma2", "gemma3"):  # the window and the softcap matter at these sizes
        wide = sharp_model(family, attn="eager", sliding_window=64, attn_logit_softcapping=None)
        assert rel_err(wide(**tiny_batch(2, 20, seed=20)).logits, ref(**tiny_batch(2, 20, seed=20)).logits) > 1e-2


@pytest.mark.parametrize(
    "family,kw",
    [
        ("mistral", dict(sliding_window=8)),
        ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0)),
        ("phi3", dict(sliding_window=8)),
    ],
    ids=["mistral", "qwen2", "phi3"],
)
def test_sliding_window_configs_match_eager(family, kw):
    """The window the modeling code passes (Mistral/Qwen2/Phi-3 configs with a window) is the one its
    eager mask applies."""
    ref = sharp_model(family, attn="eager", **kw)
    model = sharp_model(family, **kw)
    batch = tiny_batch(2, 20, seed=1)
    _assert_same(*_step(model, batch), *_step(ref, batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_equal_examples_alone(family):
    model = sharp_model(family)
    lengths = [6, 13, 3]
    g = torch.Generator().manual_seed(3)
    exs = [{"input_ids": torch.randint(0, 256, (n,), generator=g).tolist()} for n in lengths]
    batch = PackingCollator()(exs)
    logits = model(**batch).logits[0]
    start = 0
    for ex in exs:
        ids = torch.tensor([ex["input_ids"]])
        alone = model(input_ids=ids).logits[0]
        assert rel_err(logits[start:start + len(ids[0])], alone) <= 1e-5
        start += len(ids[0])


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_padding_mask_matches_eager_on_real_tokens(family):
    ref = sharp_model(family, attn="eager")
    model = sharp_model(family)
    batch = tiny_batch(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    batch["labels"][1, 7:] = -100
    out, grads = _step(model, batch, attention_mask=mask)
    out_ref, grads_ref = _step(ref, batch, attention_mask=mask)
    assert rel_err(out.loss, out_ref.loss) <= 1e-5
    real = mask.bool()
    assert rel_err(out.logits[real], out_ref.logits[real]) <= 1e-5
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) <= 1e-5, name


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generation_with_kv_cache(family):
    """Decode steps have T=1 < S: bottom-right causal (and sliding window for Gemma-3)."""
    ref = sharp_model(family, attn="eager").eval()
    model = sharp_model(family).eval()
    prompt = tiny_batch(1, 10)["input_ids"]
    want = ref.generate(prompt, max_new_tokens=6, do_sample=False)
    got = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_gemma2_refuses_sdpa_but_takes_graphtune():
    model = tiny_model("gemma2")
    with pytest.raises(ValueError, match="does not support"):
        model.set_attn_implementation("sdpa")
    model.set_attn_implementation("graphtune")
    assert model.config._attn_implementation == "graphtune" and ga.uses_graphtune(model)


def test_enable_and_context_restore_peft_models():
    model = tiny_model("qwen3", lora=True)
    before = model.config._attn_implementation
    with ga.implementation(model):
        assert ga.uses_graphtune(model)
    assert model.config._attn_implementation == before
    previous = ga.enable(model)
    assert ga.uses_graphtune(model)
    ga.disable(previous)
    assert model.config._attn_implementation == before


def test_attention_dropout_falls_back_with_a_warning():
    model = sharp_model("llama", attention_dropout=0.5)
    ref = sharp_model("llama", attn="eager", attention_dropout=0.5)
    batch = tiny_batch(2, 9)
    with pytest.warns(UserWarning, match="no attention dropout"):
        model(**batch).loss.backward()
    model.eval(), ref.eval()  # no dropout in eval: graphtune's node again, equal to eager
    assert rel_err(model(**batch).logits, ref(**batch).logits) <= 1e-5


def test_compiled_gemma2_packed_training_step():
    """optimize() with the dispatch pass (reference on a CPU): softcap, sliding + full layers and
    packed documents shorter and longer than the window; equal to eager and to the padded batch."""
    eager = sharp_model("gemma2")
    padded_ref = sharp_model("gemma2", attn="eager")
    model = sharp_model("gemma2")
    graphtune.optimize(model, compiler="aot_eager")
    g = torch.Generator().manual_seed(5)
    for lengths in ([6, 13, 3], [11, 4, 9, 2]):
        exs = [{"input_ids": torch.randint(0, 256, (n,), generator=g).tolist()} for n in lengths]
        batch = PackingCollator()(exs)
        out, grads = _step(model, batch)
        _assert_same(out, grads, *_step(eager, batch))
        n = max(lengths)
        padded = {
            "input_ids": torch.tensor([e["input_ids"] + [0] * (n - len(e["input_ids"])) for e in exs]),
            "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (n - len(e["input_ids"])) for e in exs]),
            "labels": torch.tensor([[-100] + e["input_ids"][1:] + [-100] * (n - len(e["input_ids"])) for e in exs]),
        }
        out_p, grads_p = _step(padded_ref, padded, use_cache=False)
        assert rel_err(out.loss, out_p.loss) <= 1e-5
        for name in grads_p:
            assert rel_err(grads[name], grads_p[name]) <= 1e-5, name
    assert len(model.forward.captures) == 1
    report = graphtune.last_report(model)
    assert report.family == "gemma2" and report.unmatched == [] and report.warnings == []
    dispatch = next(p for p in report.passes if p.name == "dispatch_attention")
    assert dispatch.count == 2 and dispatch.by_rewrite == {"reference": 2}
    attn = [line for line in report.graph_text.splitlines() if "graphtune.attention(" in line]
    assert ", True, 8, 1.0, 'reference')" in attn[0] and ", True, 0, 1.0, 'reference')" in attn[1]
