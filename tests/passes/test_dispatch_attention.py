"""dispatch_attention: one settled attention node per layer, visible in the report and graph text;
documents merged / dropped; GPU lowerings (SDPA, flex with a shared block mask) traced through
aot_autograd and equal to eager; refusals for models not running graphtune's attention."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

import graphtune
import graphtune.attention as ga
from graphtune.passes.dispatch_attention import DispatchAttention, attention_choices, positions_are_arange
from graphtune.tiny import tiny_batch, tiny_model
from tests.conftest import rel_err

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without")


def _graphtune_model(family, **kw):
    model = tiny_model(family, **kw)
    ga.enable(model)
    model.train()
    return model


def _lines(report, needle):
    return [line for line in report.graph_text.splitlines() if needle in line]


def test_llama_plain_batch_is_plain_causal_reference_on_cpu():
    model = _graphtune_model("llama")
    report = graphtune.explain(model, **tiny_batch())  # dispatch_attention is in the default pipeline
    result = next(p for p in report.passes if p.name == "dispatch_attention")
    assert result.count == 2 and result.by_rewrite == {"reference": 2} and not result.refused
    assert result.sites == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    attn = _lines(report, "graphtune.attention(")
    assert len(attn) == 2 and all("'reference'" in line and ", None, None, None, 0.25, True, 0, 0.0," in line for line in attn)
    # position ids came from arange inside the model: one document per row, the ids are gone
    assert _lines(report, "document_ids") == []
    assert report.family == "llama" and report.unmatched == []
    lines = [line.split() for line in report.summary().splitlines() if line.strip().startswith("dispatch_attention")]
    assert lines == [["dispatch_attention", "2", "rewritten", "[reference=2]"]]


def test_packed_batch_keeps_one_shared_document_node_with_cu_seqlens():
    model = _graphtune_model("qwen2")
    batch = tiny_batch(1, 10)
    batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    batch["cu_seq_lens_q"] = torch.tensor([0, 4, 10], dtype=torch.int32)
    batch["cu_seq_lens_k"] = batch["cu_seq_lens_q"].clone()
    report = graphtune.explain(model, passes=[DispatchAttention()], **batch)
    docs = _lines(report, "document_ids(")
    assert len(docs) == 1 and "cu_seq_lens_k" in docs[0]  # merged: was one per layer
    name = docs[0].split(" = ")[0]
    attn = _lines(report, "graphtune.attention(")
    assert len(attn) == 2 and all(f"%{name}, None, %input:l_kwargs_cu_seq_lens_k_," in line for line in attn)
    assert all("'reference')" in line for line in attn)


class ToyAttention(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)


def test_model_without_graphtune_attention_is_refused_with_a_reason():
    toy = torch.nn.Sequential(ToyAttention(), ToyAttention())
    report = graphtune.explain(toy, torch.randn(1, 2, 5, 8), passes=[DispatchAttention()])
    result = report.passes[0]
    assert result.count == 0
    assert [r.site for r in result.refused] == ["0", "1"]
    assert all("graphtune.attention.enable" in r.reason for r in result.refused)
    assert [u.module for u in report.unmatched] == ["0", "1"]


def test_positions_are_arange():
    g = fx.Graph()
    n = g.placeholder("n")
    bias = g.placeholder("bias")
    a = g.call_function(torch.arange, (n,))
    ok = g.call_method("unsqueeze", (g.call_function(operator.add, (a, 0)), 0))
    assert positions_are_arange(ok)
    assert not positions_are_arange(g.call_function(operator.mul, (a, 2)))
    assert not positions_are_arange(g.call_function(torch.arange, (0, n, 2)))
    bias.meta["example_value"] = torch.zeros(2, 5, dtype=torch.long)
    assert not positions_are_arange(g.call_function(operator.add, (a, bias)))  # per-token offsets
    assert not positions_are_arange(n)


class TwoLayers(torch.nn.Module):
    """Two attention calls through graphtune's AttentionInterface function, Gemma-2 style by default:
    a sliding layer (window 4) and a full one, both softcapped, GQA, projections with parameters."""

    class Attention(torch.nn.Module):
        is_causal = True

        def __init__(self, window, softcap):
            super().__init__()
            self.window, self.softcap = window, softcap
            self.q = torch.nn.Linear(16, 64, bias=False)
            self.kv = torch.nn.Linear(16, 64, bias=False)

        def forward(self, x, position_ids):
            B, T, _ = x.shape
            q = self.q(x).view(B, T, 4, 16).transpose(1, 2)
            k, v = self.kv(x).view(B, T, 4, 16).transpose(1, 2).chunk(2, dim=1)  # 2 kv heads
            out, _ = ga.attention_forward(self, q, k, v, None, scaling=0.5, sliding_window=self.window,
                                          softcap=self.softcap, position_ids=position_ids)
            return out.reshape(B, T, 64)[..., :16]

    def __init__(self, windows=(4, None), softcap=2.0):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([self.Attention(w, softcap) for w in windows])

    def forward(self, x, position_ids):
        for layer in self.layers:
            x = x + layer(x, position_ids)
        return x


def _toy_inputs(B, T, packed):
    x = torch.randn(B, T, 16, generator=torch.Generator().manual_seed(T))
    pos = torch.arange(T)[None].expand(B, T)
    if packed:  # two documents per row
        pos = torch.cat([torch.arange(3), torch.arange(T - 3)])[None].expand(B, T)
    return x, pos.contiguous()


@pytest.mark.parametrize("impl", ["sdpa_math", "flex"])
def test_lowerings_through_aot_autograd_match_eager(impl):
    """Each lowering traced by aot_autograd with dynamic shapes equals the eager reference; flex
    shares one block mask per distinct mask (and runs forward only on a CPU). The reference node
    through aot_autograd is covered on a whole model (tests/test_attention_models.py)."""
    plain = impl == "sdpa_math"  # SDPA serves plain causal attention only
    kw = dict(windows=(None, None), softcap=None) if plain else {}
    train = impl != "flex"
    ref = TwoLayers(**kw)
    model = graphtune.optimize(TwoLayers(**kw), passes=[DispatchAttention(choose=lambda f: (impl, "test"))], compiler="aot_eager")
    for B, T in ((2, 9), (3, 6)):
        x, pos = _toy_inputs(B, T, packed=not plain)
        xr, xo = x.clone().requires_grad_(train), x.clone().requires_grad_(train)
        with torch.set_grad_enabled(train):
            out_ref, out = ref(xr, pos), model(xo, pos)
        assert rel_err(out, out_ref) <= 1e-5
        if train:
            out_ref.square().sum().backward()
            out.square().sum().backward()
            assert rel_err(xo.grad, xr.grad) <= 1e-5
            for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
                assert rel_err(p.grad, q.grad) <= 1e-5, n
            model.zero_grad(), ref.zero_grad()
    assert len(model.forward.captures) == 1
    report = graphtune.last_report(model)
    assert report.passes[0].by_rewrite == {impl: 2}
    choices = attention_choices(model.forward.captures[0].gm)
    assert [c["impl"] for c in choices] == [impl, impl]
    if impl == "flex":
        masks = _lines(report, "flex_block_mask_for(")
        assert len(masks) == 2 and ", True, 4)" in masks[0] and ", True, 0)" in masks[1]
        assert len(_lines(report, "graphtune.kernels.attention.flex_attention(")) == 2
    if impl == "sdpa_math":
        assert len(_lines(report, "graphtune.kernels.attention.sdpa_attention(")) == 2
    else:
        assert len(_lines(report, "document_ids(")) == 1
