"""The LoRA-adapter GGUF applied by llama.cpp to the base GGUF matches the peft (= merged) model.

Families chosen for what the adapter must carry: Llama (q/k permutation applied to lora_b only),
Qwen-2 (biases in the base, plain adapter), Gemma-2 (the attention-scale fold on q's lora_b) and
Phi-3 (adapters on fused qkv / gate_up). Plus mixed ranks (per-layer scalings folded into B).
"""

from __future__ import annotations

import numpy as np
import pytest

from graphtune.export import capture_graph, to_gguf, to_gguf_adapter
from graphtune.export.gguf import Lowering
from tests.export.helpers import F32_TOL, hf_logits, make_model, need_llama_cpp, run_llama

IDS = list(range(7, 45))


def _check(model, tokenizer, family, tmp_path):
    need_llama_cpp()
    captured = capture_graph(model)
    base = to_gguf(model, tokenizer, tmp_path / "base.gguf", quant="F32", merge_lora=False, progress=False,
                   captured=captured).path
    adapter = to_gguf_adapter(model, tmp_path / "lora.gguf", captured=captured)
    assert all(t.name.endswith((".lora_a", ".lora_b")) for t in adapter.tensors)
    out = run_llama([{"kind": "logits", "model": str(base), "ids": IDS, "lora": str(adapter.path)},
                     {"kind": "logits", "model": str(base), "ids": IDS}], tmp_path / "run")
    ref = hf_logits(model, IDS)  # peft forward: base + LoRA
    err = float(np.abs(out["logits_0"] - ref).max())
    assert err <= F32_TOL[family], f"{family}: base GGUF + adapter vs peft: max err {err:.3g}"
    without = float(np.abs(out["logits_1"] - ref).max())
    assert without > 10 * F32_TOL[family], "the adapter changes nothing: the test would not see a broken adapter"
    return adapter


@pytest.mark.parametrize("family,fixture", [("llama", "spm_tokenizer"), ("qwen2", "qwen2_tokenizer"),
                                            ("gemma2", "gemma_tokenizer"), ("phi3", "bpe_tokenizer")])
def test_adapter_applied_by_llama_cpp_matches_merged(request, tmp_path, family, fixture):
    model = make_model(family, hidden=64)
    adapter = _check(model, request.getfixturevalue(fixture), family, tmp_path)
    assert not any("folded" in n for n in adapter.notes)


def test_mixed_ranks_fold_scalings(tmp_path, spm_tokenizer):
    import peft

    base = make_model("llama", hidden=64, lora=False)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                          rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    model = peft.get_peft_model(base, cfg)
    with __import__("torch").no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    adapter = _check(model.eval(), spm_tokenizer, "llama", tmp_path)
    assert any("folded" in n for n in adapter.notes)


def test_adapter_names_follow_convert_lora_to_gguf(tmp_path):
    model = make_model("llama", hidden=64)
    low = Lowering(model)
    s = to_gguf_adapter(model, tmp_path / "a.gguf", captured=low.captured)
    shapes = {t.name: t.shape for t in s.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == (4, 64) and shapes["blk.0.attn_q.weight.lora_b"] == (64, 4)
    assert shapes["blk.1.ffn_down.weight.lora_a"] == (4, 128)
    assert s.kind == "adapter" and s.arch == "llama"
