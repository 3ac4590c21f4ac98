"""Every family's GGUF loaded by llama.cpp (in a subprocess) against HF transformers.

One tiny peft-LoRA model per family (hidden 256, 2 layers, weights N(0, 0.08)), captured once; F32
is exported from the random weights, every other type after AdamW steps on the probe text (until
each next-token prediction leads by a margin, like a trained model). LoRA is merged by the export.
Checks:

* F32: max |llama.cpp - HF| <= 1e-4 (3e-3 for the GELU families: ggml's fp16 GELU table);
* F16 / BF16 / Q8_0: argmax agreement 100% on the probe text;
* every quantized type against HF run on the weights dequantized from the same file, with each
  projection's input rounded to the type ggml-cpu converts activations to (relative Frobenius
  error <= 3e-2; measured 1e-7..6e-3): quantization error cancels, layout errors (0.3..1) do not;
* negative control: the same llama export without the q/k permutation fails the F32 check.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from graphtune.export.gguf import Lowering, capture_graph, to_gguf
from graphtune.tiny import FAMILIES
from tests.export.helpers import (
    F32_TOL,
    PROBE_TEXT,
    dequantized_reference,
    hf_logits,
    make_model,
    memorize,
    need_llama_cpp,
    rel_err,
    run_llama,
)

TOKENIZER_OF = {"llama": "spm_tokenizer", "mistral": "spm_tokenizer", "qwen2": "qwen2_tokenizer",
                "qwen3": "qwen2_tokenizer", "gemma": "gemma_tokenizer", "gemma2": "gemma_tokenizer",
                "gemma3": "gemma_tokenizer", "phi3": "bpe_tokenizer"}
ARGMAX_TYPES = ("F16", "BF16", "Q8_0")
ALL_QUANTS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q5_K_S", "Q5_K_M", "Q4_K_S", "Q4_K_M")
QUANTS_OF = {f: (ALL_QUANTS if f == "llama" else ("Q8_0", "Q4_K_M")) for f in FAMILIES}
DEQUANT_TOL = 3e-2


@dataclasses.dataclass
class Case:
    family: str
    ids: list[int]
    hf_random: np.ndarray  # HF logits of the random-init model (the F32 file)
    hf: np.ndarray  # HF logits after the brief training (every other file)
    lowering: Lowering
    files: dict[str, Path]
    llama: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def cases(request, tmp_path_factory):
    built: dict[str, Case] = {}

    def get(family: str) -> Case:
        if family not in built:
            need_llama_cpp()
            tok = request.getfixturevalue(TOKENIZER_OF[family])
            tmp = tmp_path_factory.mktemp(f"gguf_{family}")
            ids = tok(PROBE_TEXT, add_special_tokens=False)["input_ids"][:48]
            model = make_model(family)
            captured = capture_graph(model)  # the graph does not depend on the weights' values
            low = Lowering(model, captured=captured)
            files = {"F32": to_gguf(model, tok, tmp / f"{family}.F32.gguf", quant="F32", progress=False,
                                    captured=captured).path}
            hf_random = hf_logits(model, ids)
            # then a briefly trained model (every position, the last one included, has a clear next
            # token): argmax comparisons test the export rather than near-ties of random logits
            memorize(model, ids + [ids[0]])
            for q in ARGMAX_TYPES + tuple(t for t in QUANTS_OF[family] if t not in ARGMAX_TYPES):
                files[q] = to_gguf(model, tok, tmp / f"{family}.{q}.gguf", quant=q, progress=False, captured=captured).path
            out = run_llama([{"kind": "logits", "model": str(p), "ids": ids} for p in files.values()], tmp / "run")
            llama = {q: out[f"logits_{i}"] for i, q in enumerate(files)}
            built[family] = Case(family, ids, hf_random, hf_logits(model, ids), low, files, llama)
        return built[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_logits_match_hf(cases, family):
    c = cases(family)
    err = float(np.abs(c.llama["F32"] - c.hf_random).max())
    assert err <= F32_TOL[family], f"{family} F32: max |llama.cpp - HF| = {err:.3g} > {F32_TOL[family]:g}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("quant", ARGMAX_TYPES)
def test_float_and_q8_argmax_agree(cases, family, quant):
    c = cases(family)
    agree = float((c.llama[quant].argmax(-1) == c.hf.argmax(-1)).mean())
    assert agree == 1.0, f"{family} {quant}: argmax agreement {agree:.0%} (rel err {rel_err(c.llama[quant], c.hf):.3g})"


@pytest.mark.parametrize("family,quant", [(f, q) for f in FAMILIES for q in QUANTS_OF[f]])
def test_quantized_matches_hf_on_dequantized_weights(cases, family, quant):
    c = cases(family)
    ref = hf_logits(dequantized_reference(c.lowering, c.files[quant]), c.ids)
    err = rel_err(c.llama[quant], ref)
    assert err <= DEQUANT_TOL, f"{family} {quant}: relative error {err:.3g} vs HF on the file's dequantized weights"


def test_negative_control_without_permutation_fails(cases, monkeypatch, tmp_path, spm_tokenizer):
    """Drop Llama's q/k permutation: the same F32 check must fail (the test can see layout bugs)."""
    need_llama_cpp()
    import graphtune.export.families.llama as llama_family

    c = cases("llama")
    monkeypatch.setattr(llama_family, "permute_rows", lambda t, n_head: t)
    path = to_gguf(c.lowering.model, spm_tokenizer, tmp_path / "noperm.gguf", quant="F32", progress=False,
                   captured=c.lowering.captured).path
    out = run_llama([{"kind": "logits", "model": str(path), "ids": c.ids}], tmp_path / "run")
    err = float(np.abs(out["logits_0"] - c.hf).max())
    assert err > 100 * F32_TOL["llama"], f"without the permutation the logits still match (max err {err:.3g})"
