"""optimize / explain / restore / verify: behaviour, clear errors, and pass-through of unknown models."""

from __future__ import annotations

import warnings

import pytest
import torch

import graphtune
from graphtune.passes import default_passes
from graphtune.passes.base import Pass, Rewrite
from graphtune.passes.fuse_swiglu import can_fuse_gated, swiglu_pattern
from graphtune.tiny import tiny_batch, tiny_model
from tests.conftest import rel_err


def test_rejects_non_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        graphtune.optimize(lambda x: x)


def test_rejects_unsupported_dtype():
    model = tiny_model("llama").double()
    with pytest.raises(TypeError, match="float64"):
        graphtune.optimize(model)


def test_rejects_unknown_compiler_and_pass():
    with pytest.raises(ValueError, match="compiler"):
        graphtune.optimize(tiny_model("llama"), compiler="tvm")
    with pytest.raises(KeyError, match="fuse_nothing"):
        graphtune.optimize(tiny_model("llama"), passes=["fuse_nothing"])


@pytest.mark.parametrize(
    "batch, match",
    [
        ({"input_ids": torch.zeros(2, 3, 4, dtype=torch.long)}, "2-D"),
        ({"input_ids": torch.zeros(2, 5)}, "integer"),
        ({"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.zeros(2, 6, dtype=torch.long)}, "labels has shape"),
        ({"input_ids": torch.zeros(2, 0, dtype=torch.long)}, "empty"),
    ],
)
def test_bad_inputs_get_clear_errors(batch, match):
    model = graphtune.optimize(tiny_model("llama"), compiler="eager")
    with pytest.raises((ValueError, TypeError), match=match):
        model(**batch)


def test_out_of_vocabulary_ids_are_the_models_error_not_a_silent_pass():
    model = graphtune.optimize(tiny_model("llama"), compiler="eager")
    with pytest.raises(Exception):
        model(input_ids=torch.full((2, 4), 10_000, dtype=torch.long))


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_toy_model_passes_through_unchanged_with_a_warning():
    toy = Toy()
    x = torch.randn(4, 8)
    expected = toy(x)
    graphtune.optimize(toy, compiler="aot_eager")
    with pytest.warns(UserWarning, match="no known pattern"):
        out = toy(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert toy.forward.passthrough
    torch.testing.assert_close(toy(x), expected, rtol=0, atol=0)  # eager from now on
    report = graphtune.explain(Toy(), x)
    assert report.family is None and report.total_rewrites == 0


def test_optimize_returns_same_object_and_restore_undoes_it():
    model = tiny_model("llama")
    assert graphtune.optimize(model, compiler="eager") is model
    assert "forward" in model.__dict__
    graphtune.restore(model)
    assert "forward" not in model.__dict__
    assert graphtune.last_report(model) is None


def test_explain_reports_family_counts_and_graph():
    model = tiny_model("qwen3", lora=True)
    report = graphtune.explain(model, **tiny_batch())
    assert report.family == "qwen3"
    assert report.counts == {
        "fuse_lora": 14, "fuse_qlora": 0, "fuse_rms_norm": 9, "fuse_rope": 2, "fuse_swiglu": 2, "fuse_geglu": 0, "dispatch_attention": 2,
        "fuse_lora_mlp": 2, "group_lora": 2, "fuse_linear_cross_entropy": 1,
    }
    assert "torch.ops.graphtune.rope" in report.graph_text
    assert "qwen3" in report.summary()
    # explain changes nothing
    assert "forward" not in model.__dict__


def test_explain_lists_unmatched_modules_when_a_pass_is_missing():
    """With the swiglu pass replaced by one that never matches, the MLPs are listed as unmatched."""

    class NeverSwiGLU(Pass):
        name = "fuse_swiglu"
        rewrites = ()

        def is_candidate_module(self, class_name, nodes):
            return class_name.endswith("MLP")

    passes = [p for p in default_passes() if p.name != "fuse_swiglu"] + [NeverSwiGLU()]
    report = graphtune.explain(tiny_model("llama"), passes=passes, **tiny_batch())
    unmatched = [u for u in report.unmatched if u.expected_pass == "fuse_swiglu"]
    assert [u.module for u in unmatched] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(u.module_class == "LlamaMLP" for u in unmatched)


def test_refused_sites_are_reported_with_reasons():
    class PickySwiGLU(Pass):
        name = "fuse_swiglu"
        rewrites = (Rewrite("act_gate_times_up", swiglu_pattern, lambda gate, up: torch.ops.graphtune.swiglu(gate, up)),)

        def guard(self, match, ctx):
            return "refused on purpose"

        def is_candidate_module(self, class_name, nodes):
            return class_name.endswith("MLP")

    passes = [p for p in default_passes() if p.name != "fuse_swiglu"] + [PickySwiGLU()]
    report = graphtune.explain(tiny_model("llama"), passes=passes, **tiny_batch())
    swiglu = next(p for p in report.passes if p.name == "fuse_swiglu")
    assert swiglu.count == 0 and len(swiglu.refused) == 2
    assert {u.reason for u in report.unmatched if u.expected_pass == "fuse_swiglu"} == {"refused on purpose"}
    assert "refused" in report.summary()
    assert any("expects 2" in w for w in report.warnings)


def _broken_swiglu_pass():
    def wrong(gate, up):
        return torch.ops.graphtune.swiglu(gate, up) * 1.001

    class BrokenSwiGLU(Pass):
        name = "broken_swiglu"
        rewrites = (Rewrite("act_gate_times_up", swiglu_pattern, wrong),)

        def guard(self, match, ctx):
            return can_fuse_gated(match, ctx)

    return BrokenSwiGLU()


def test_verify_passes_on_correct_passes_and_returns_optimized_outputs():
    model = tiny_model("llama", lora=True)
    model.train()
    ref = tiny_model("llama", lora=True)
    ref.train()
    batch = tiny_batch()
    graphtune.optimize(model, compiler="aot_eager", verify=True)
    out = model(**batch)
    out.loss.backward()  # the returned outputs still train
    ref_out = ref(**batch)
    ref_out.loss.backward()
    assert rel_err(out.loss, ref_out.loss) <= 1e-5
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            assert rel_err(p.grad, q.grad) <= 1e-5, n


def test_verify_names_the_offending_pass():
    model = tiny_model("llama", lora=True)
    model.train()
    passes = default_passes()[:1] + [_broken_swiglu_pass()]
    graphtune.optimize(model, compiler="aot_eager", passes=passes, verify=True)
    with pytest.raises(graphtune.VerificationError, match="broken_swiglu"):
        model(**tiny_batch())


def test_inputs_without_labels_and_with_attention_mask():
    model = tiny_model("mistral")
    ref = tiny_model("mistral")
    graphtune.optimize(model, compiler="aot_eager")
    ids = tiny_batch(2, 9)["input_ids"]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-6)


def test_no_recompile_across_batch_and_sequence_sizes():
    model = tiny_model("llama")
    model.train()
    graphtune.optimize(model, compiler="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recompile-limit warning would fail here
        for b, s in ((2, 8), (3, 11), (4, 5), (2, 17)):
            model(**tiny_batch(b, s, seed=s)).loss.backward()
    assert len(model.forward.captures) == 1
