"""fuse_lora_mlp (with group_lora after it, as in the default pipeline) on every family with LoRA on all
projections: loss, logits and every LoRA gradient equal eager's (fp32, ≤1e-5), exact counts and
variants (SwiGLU, Gemma's GeGLU, Phi-3's fused gate_up), recompute_gate_up on half of them, and lora_dropout > 0
(refused with the reason, peft's masks kept, still equal to eager)."""

from __future__ import annotations

import peft
import pytest
import torch

import graphtune
from graphtune.passes import pass_by_name
from graphtune.passes.fuse_lora_mlp import FuseLoRAMLP
from graphtune.tiny import FAMILIES, randomize_lora_b, tiny_batch, tiny_model
from tests.conftest import rel_err
from tests.helpers import compare_step, twin_models

# the default pipeline's order, restricted to the passes these rewrites depend on
BEFORE = ["fuse_lora", "fuse_rms_norm", "fuse_rope", "fuse_swiglu", "fuse_geglu"]
PASSES = [*BEFORE, "fuse_lora_mlp", "group_lora", "dispatch_attention"]
VARIANT = {"phi3": "swiglu_gate_up", "gemma": "geglu", "gemma2": "geglu", "gemma3": "geglu"}


# half the families run with recompute_gate_up=True (gate and up recomputed in the backward, only x saved)
RECOMPUTE = {"mistral", "qwen3", "gemma2", "phi3"}


def _passes(recompute_gate_up: bool) -> list:
    mlp = FuseLoRAMLP(recompute_gate_up=recompute_gate_up)
    return [pass_by_name(n) for n in BEFORE] + [mlp] + [pass_by_name(n) for n in PASSES[len(BEFORE) + 1:]]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_eager(family):
    recompute = family in RECOMPUTE
    ref, opt = twin_models(family, lora=True)
    graphtune.optimize(opt, compiler="aot_eager", passes=_passes(recompute))
    compare_step(ref, opt, tiny_batch(3, 11, seed=11))
    report = graphtune.last_report(opt)
    mlp = next(p for p in report.passes if p.name == "fuse_lora_mlp")
    group = next(p for p in report.passes if p.name == "group_lora")
    variant = VARIANT.get(family, "swiglu")
    assert mlp.by_rewrite == {variant: 2}, report.summary()
    assert mlp.sites == [f"base_model.model.model.layers.{i}.mlp" for i in range(2)]
    # q/k/v share the attention input (Phi-3's qkv_proj is one projection: nothing to group)
    assert group.count == (0 if family == "phi3" else 2) and group.by_rewrite in ({}, {"same_input": 2})
    assert report.family == family, report.family_reason
    assert report.unmatched == [] and report.warnings == [], report.summary()
    assert not any(p.refused for p in report.passes), report.summary()
    text = report.graph_text
    lines = [line for line in text.splitlines() if "graphtune.lora_mlp(" in line]
    assert len(lines) == 2 and "graphtune.swiglu(" not in text and "graphtune.geglu(" not in text
    activation = variant.split("_")[0]
    assert all(f", '{activation}', {recompute})" in line and line.endswith(".mlp  [fuse_lora_mlp]") for line in lines)


def _peft_dropout(seed=0):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(tiny_model("qwen2"), cfg)
    randomize_lora_b(model, seed + 1)
    model.train()
    return model


def test_lora_dropout_is_refused_and_keeps_peft_masks():
    """Each projection draws its own mask: neither pass may merge them. Both refuse with the reason,
    and with the same seed the optimized model equals eager (same masks, same gradients)."""
    ref, opt = _peft_dropout(), _peft_dropout()
    graphtune.optimize(opt, compiler="aot_eager", passes=PASSES)
    batch = tiny_batch(2, 9)
    torch.manual_seed(123)
    out_ref = ref(**batch)
    torch.manual_seed(123)
    out_opt = opt(**batch)
    out_ref.loss.backward()
    out_opt.loss.backward()
    assert rel_err(out_opt.loss, out_ref.loss) <= 1e-5
    assert rel_err(out_opt.logits, out_ref.logits) <= 1e-5
    for (n, a), (_, b) in zip(opt.named_parameters(), ref.named_parameters()):
        if b.requires_grad:
            assert rel_err(a.grad, b.grad) <= 1e-5, n
    report = graphtune.last_report(opt)
    mlp = next(p for p in report.passes if p.name == "fuse_lora_mlp")
    group = next(p for p in report.passes if p.name == "group_lora")
    assert mlp.count == 0 and group.count == 0
    assert [r.site for r in mlp.refused] == [f"base_model.model.model.layers.{i}.mlp" for i in range(2)]
    assert all("lora_dropout" in r.reason for r in mlp.refused + group.refused)
    # q/k/v per layer, and gate/up (left to group_lora by the refused MLP): all different masks
    assert len(group.refused) == 4
    unmatched = [u for u in report.unmatched if u.expected_pass == "fuse_lora_mlp"]
    assert len(unmatched) == 2 and all("lora_dropout" in u.reason for u in unmatched)


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma"])
def test_mixed_precision_blocks_are_refused_with_the_reason(family):
    """peft's default on a bf16 model (fp32 adapters) is fused projection by projection; the MLP block and
    the q/k/v group are not, and the report says why instead of a silent count of 0."""
    model = tiny_model(family, lora=True, dtype=torch.bfloat16, num_hidden_layers=2)
    model.train()
    report = graphtune.explain(model, **tiny_batch(2, 9))
    assert report.counts["fuse_lora"] > 0 and report.counts["fuse_lora_mlp"] == 0 and report.counts["group_lora"] == 0
    mlp = next(p for p in report.passes if p.name == "fuse_lora_mlp")
    mlps = {f"base_model.model.model.layers.{i}.mlp" for i in range(2)}
    assert {r.site for r in mlp.refused} == mlps
    assert all("mixed-precision" in r.reason and "float32 adapters on a bfloat16 base" in r.reason for r in mlp.refused)
    unmatched = {u.module: u.reason for u in report.unmatched if u.expected_pass == "fuse_lora_mlp"}
    assert unmatched.keys() == mlps and all("mixed-precision" in r for r in unmatched.values())
    group = next(p for p in report.passes if p.name == "group_lora")
    attention = {f"base_model.model.model.layers.{i}.self_attn" for i in range(2)}
    want = set() if family == "phi3" else attention | mlps  # Phi-3's qkv and gate_up are one projection each
    assert {r.site for r in group.refused} == want
    assert all("lora_linear_group takes one dtype" in r.reason for r in group.refused)
