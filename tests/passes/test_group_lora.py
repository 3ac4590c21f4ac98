"""group_lora: lora_linear nodes with the same x and x_lora become one lora_linear_group -- on small
modules (per-member scalings and ranks, biases on some members, a shared dropout input; refusals)
and on models without the MLP block fused (q/k/v and gate/up grouped; Qwen-2's q/k/v biases), and
with LoRA on only some projections."""

from __future__ import annotations

import peft
import pytest
import torch

import graphtune
from graphtune.tiny import randomize_lora_b, tiny_batch, tiny_model
from tests.helpers import compare_step, twin_models
from tests.passes.common import check_pass, explain_one

PASSES = ["fuse_lora", "fuse_rms_norm", "fuse_rope", "fuse_swiglu", "fuse_geglu", "group_lora", "dispatch_attention"]


class Projections(torch.nn.Module):
    """LoRA projections of one input written with graphtune::lora_linear (what fuse_lora leaves).

    ``lora_inputs``: per member, "x" (x_lora is x), "shared" (one dropped input for all "shared"
    members) or "own" (a member-specific dropped input, as peft's per-module dropout gives).
    """

    def __init__(self, lora_inputs=("x", "x", "x"), outs=(19, 8, 8), ranks=(4, 4, 2), bias=(True, False, True),
                 scalings=(2.0, 0.5, 1.0), hidden=24, trainable_base=False):
        super().__init__()
        self.lora_inputs, self.scalings = lora_inputs, scalings
        self.w = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(n, hidden) / hidden**0.5, requires_grad=trainable_base) for n in outs)
        self.b = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(n) * 0.1, requires_grad=False) for n, has in zip(outs, bias) if has)
        self.has_bias = bias
        self.a = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(r, hidden) / hidden**0.5) for r in ranks)
        self.l = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(n, r) * 0.3) for n, r in zip(outs, ranks))
        self.masks = [(torch.rand(hidden) > 0.3).float() / 0.7 for _ in outs]

    def forward(self, x):
        shared = x * self.masks[0]
        outs, biases = [], iter(self.b)
        for i, kind in enumerate(self.lora_inputs):
            x_lora = x if kind == "x" else shared if kind == "shared" else x * self.masks[i]
            bias = next(biases) if self.has_bias[i] else None
            outs.append(torch.ops.graphtune.lora_linear(x, x_lora, self.w[i], bias, self.a[i], self.l[i], self.scalings[i]))
        return tuple(outs)


def _group_lines(report):
    return [line for line in report.graph_text.splitlines() if "graphtune.lora_linear_group(" in line]


def test_three_members_mixed_biases_ranks_scalings():
    report = check_pass(Projections(), (torch.randn(2, 7, 24),), "group_lora")
    result = report.passes[0]
    assert result.count == 1 and result.by_rewrite == {"same_input": 1}
    (line,) = _group_lines(report)
    assert "(%input:l_args_0_, None, [" in line and "[True, False, True]" in line and "[2.0, 0.5, 1.0]" in line
    assert "graphtune.lora_linear(" not in report.graph_text


def test_shared_separate_lora_input_groups_and_own_inputs_stay():
    """Two members read one dropped input (grouped, x_lora passed); a third has its own (left alone)."""
    module = Projections(lora_inputs=("shared", "shared", "own"))
    report = check_pass(module, (torch.randn(3, 5, 24),), "group_lora")
    result = report.passes[0]
    assert result.count == 1 and result.by_rewrite == {"same_dropout_input": 1} and not result.refused
    (line,) = _group_lines(report)
    assert "(%input:l_args_0_, %shared, [" in line
    assert report.graph_text.count("graphtune.lora_linear(") == 1


def test_every_member_with_its_own_mask_is_refused():
    res, _ = explain_one(Projections(lora_inputs=("own", "own", "own")), (torch.randn(2, 3, 24),), "group_lora")
    assert res.count == 0 and len(res.refused) == 1
    assert "different LoRA inputs" in res.refused[0].reason and "lora_dropout" in res.refused[0].reason


def test_trainable_base_weight_is_refused():
    res, _ = explain_one(Projections(trainable_base=True), (torch.randn(2, 3, 24),), "group_lora")
    assert res.count == 0 and "requires grad" in res.refused[0].reason


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_model_without_fused_mlp_groups_qkv_and_gate_up(family):
    """Without fuse_lora_mlp, gate/up are grouped too: 2 groups per layer (Qwen-2's q/k/v have biases)."""
    ref, opt = twin_models(family, lora=True)
    graphtune.optimize(opt, compiler="aot_eager", passes=PASSES)
    compare_step(ref, opt, tiny_batch(3, 11, seed=5))
    report = graphtune.last_report(opt)
    group = next(p for p in report.passes if p.name == "group_lora")
    assert group.count == 4 and not group.refused
    assert group.sites == [f"base_model.model.model.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "mlp")]
    lines = _group_lines(report)
    qkv_bias = "[True, True, True]" if family == "qwen2" else "[False, False, False]"
    assert sum(qkv_bias in line for line in lines) == 2 and sum("[False, False]" in line for line in lines) == 2
    # family detection still sees three attention projections (and Qwen-2's biases) through the group
    assert report.family == family, report.family_reason
    assert report.unmatched == [] and report.warnings == [], report.summary()


def test_lora_on_some_projections_groups_what_shares_an_input():
    """LoRA on q and v only (a common config): q and v grouped; k stays a plain linear."""
    torch.manual_seed(0)
    models = []
    for _ in range(2):
        model = peft.get_peft_model(tiny_model("gemma3"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        randomize_lora_b(model, 1)
        model.train()
        models.append(model)
    ref, opt = models
    graphtune.optimize(opt, compiler="aot_eager", passes=[*PASSES[:-2], "fuse_lora_mlp", "group_lora"])
    compare_step(ref, opt, tiny_batch(2, 9, seed=2))
    report = graphtune.last_report(opt)
    assert report.counts["group_lora"] == 2 and report.counts["fuse_lora_mlp"] == 0
    assert report.family == "gemma3", report.family_reason
    assert report.unmatched == [] and not any(p.refused for p in report.passes), report.summary()
