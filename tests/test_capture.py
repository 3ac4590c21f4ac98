"""Capture: parameter FQNs, the inductor path, and capture of bf16 models."""

from __future__ import annotations

import pytest
import torch

import graphtune
from graphtune.capture import build_context, capture
from graphtune.passes import default_passes
from graphtune.tiny import tiny_batch, tiny_model
from tests.helpers import batches, compare_step, twin_models


def test_placeholders_map_to_parameter_fqns_through_peft():
    model = tiny_model("llama", lora=True)
    forward = type(model).forward.__get__(model)
    captured, _ = capture(model, forward, (), tiny_batch(), default_passes())
    names = set(captured.ctx.param_names.values())
    expected = {n for n, _ in model.named_parameters()}
    assert expected <= names  # every parameter is a graph input, named by its FQN
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in names
    assert all("lora_" in n for n in captured.ctx.trainable)


def test_context_ignores_non_parameter_inputs():
    model = tiny_model("llama")
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    ctx = build_context(gm, [torch.randn(2, 2)], model)
    assert ctx.param_names == {}


@pytest.mark.slow
def test_inductor_compiler_trains_like_eager():
    ref, opt = twin_models("qwen3", lora=True)
    graphtune.optimize(opt)  # inductor is the default
    for batch in batches():
        compare_step(ref, opt, batch)


def test_bf16_model_within_bf16_tolerance():
    ref, opt = twin_models("gemma3", lora=True, dtype=torch.bfloat16)
    graphtune.optimize(opt, compiler="aot_eager")
    batch = tiny_batch(2, 8)
    out_ref, out_opt = ref(**batch), opt(**batch)
    torch.testing.assert_close(out_opt.loss, out_ref.loss, rtol=2e-2, atol=2e-2)
    out_ref.loss.backward()
    out_opt.loss.backward()
    for (n, a), (_, b) in zip(opt.named_parameters(), ref.named_parameters()):
        if b.requires_grad:
            scale = b.grad.float().abs().max()
            assert (a.grad.float() - b.grad.float()).abs().max() <= 5e-2 * scale + 1e-3, n


def test_module_stack_skips_modules_reached_through_globals():
    """transformers 5.25 wraps apply_rotary_pos_emb in a hub-kernel module that dynamo records
    under a global: it is not a submodule of the model and must not hide the attention layer."""
    import torch.fx as fx

    from graphtune.passes.base import module_path, module_stack

    g = fx.Graph()
    n = g.placeholder("x")
    n.meta["nn_module_stack"] = {
        "a": ("L['self'].model.layers[0]", "transformers.models.llama.modeling_llama.LlamaDecoderLayer"),
        "b": ("L['self'].model.layers[0].self_attn", "transformers.models.llama.modeling_llama.LlamaAttention"),
        "c": ("G['__import_transformers_dot_models_dot_llama_dot_modeling_llama'].apply_rotary_pos_emb", "kernels.Fn"),
    }
    assert module_stack(n) == [("model.layers.0", "LlamaDecoderLayer"), ("model.layers.0.self_attn", "LlamaAttention")]
    assert module_path(n) == "model.layers.0.self_attn"
