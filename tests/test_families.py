"""Every family, plain and peft-LoRA: optimized vs eager loss, logits and trainable gradients (fp32,
relative error ≤ 1e-5) at two shapes including an odd sequence length; exact rewrite counts."""

from __future__ import annotations

import pytest

import graphtune
from graphtune.tiny import FAMILIES
from tests.helpers import batches, compare_step, twin_models

EXPECTED = {
    #           rms_norm rope swiglu geglu  (2 layers)
    "llama": (5, 2, 2, 0),
    "mistral": (5, 2, 2, 0),
    "qwen2": (5, 2, 2, 0),
    "qwen3": (9, 2, 2, 0),
    "gemma": (5, 2, 0, 2),
    "gemma2": (9, 2, 0, 2),
    "gemma3": (13, 2, 0, 2),
    "phi3": (5, 2, 2, 0),
}


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_eager(family, lora):
    ref, opt = twin_models(family, lora=lora)
    graphtune.optimize(opt, compiler="aot_eager")
    for batch in batches():
        compare_step(ref, opt, batch)
    report = graphtune.last_report(opt)
    assert report.family == family, report.family_reason
    counts = report.counts
    assert (counts["fuse_rms_norm"], counts["fuse_rope"], counts["fuse_swiglu"], counts["fuse_geglu"]) == EXPECTED[family]
    # LoRA on every projection: 7 per layer, or 4 with Phi-3's fused qkv / gate_up
    assert counts["fuse_lora"] == ((8 if family == "phi3" else 14) if lora else 0)
    assert report.unmatched == [], report.summary()
    assert report.warnings == [], report.summary()
    assert not any(p.refused for p in report.passes), report.summary()
    # the second, odd shape reused the graph: batch and sequence are dynamic
    assert len(opt.forward.captures) == 1


def test_full_finetune_weights_get_gradients():
    """Norm weights trainable (no LoRA): the rms_norm backward must produce dW, and match eager."""
    ref, opt = twin_models("gemma3", lora=False)
    graphtune.optimize(opt, compiler="aot_eager")
    for batch in batches():
        compare_step(ref, opt, batch)
