"""Configuration variants the family rules must carry, checked in llama.cpp (F32 logits vs HF):
Llama-3 rope scaling (``rope_freqs``) with tied embeddings, Phi-3 partial rotary (``rope.dimension_count``
from the graph's cos/sin), Gemma-3 with linear rope scaling on its global layers."""

from __future__ import annotations

import numpy as np
import pytest

from graphtune.export import to_gguf
from tests.export.helpers import F32_TOL, hf_logits, make_model, need_llama_cpp, run_llama

IDS = list(range(5, 61))
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

VARIANTS = {
    "llama3_rope_tied": ("llama", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "phi3_partial_rotary": ("phi3", dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "default",
                                                          "partial_rotary_factor": 0.5})),
    "gemma3_linear_rope": ("gemma3", dict(rope_parameters={
        "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 4.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        layer_types=["sliding_attention", "full_attention"])),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_f32_logits_match_hf(variant, tmp_path, spm_tokenizer):
    need_llama_cpp()
    family, overrides = VARIANTS[variant]
    model = make_model(family, hidden=64, **overrides)
    s = to_gguf(model, spm_tokenizer, tmp_path / f"{variant}.gguf", quant="F32", progress=False)
    names = {t.name for t in s.tensors}
    if variant == "llama3_rope_tied":
        assert "rope_freqs.weight" in names and "output.weight" not in names
    out = run_llama([{"kind": "logits", "model": str(s.path), "ids": IDS}], tmp_path / "run")
    err = float(np.abs(out["logits_0"] - hf_logits(model, IDS)).max())
    assert err <= F32_TOL[family], f"{variant}: max |llama.cpp - HF| = {err:.3g}"
