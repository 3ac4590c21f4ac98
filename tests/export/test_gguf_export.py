"""Export behaviour that needs no llama.cpp: atomic writes, errors that name what is missing,
fallback reporting, structure checks, metadata, the CLI, merged safetensors, QLoRA, Modelfile."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import gguf

from graphtune.export import (
    ExportError,
    UnsupportedFamilyError,
    capture_graph,
    save_merged,
    to_gguf,
    write_modelfile,
)
from graphtune.export.gguf import Lowering, _no_bnb_cpu_repacking
from tests.export.helpers import dequantized_reference, hf_logits, make_model


@pytest.fixture(scope="module")
def tiny_llama():
    model = make_model("llama", hidden=64)
    return model, capture_graph(model)


def _kv(reader: gguf.GGUFReader, key: str):
    field = reader.fields[key]
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode()
    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
        return [field.parts[i].tolist()[0] if field.types[-1] != gguf.GGUFValueType.STRING else bytes(field.parts[i]).decode()
                for i in field.data]
    return field.parts[field.data[0]].tolist()[0]


def test_metadata_and_tensor_set(tiny_llama, spm_tokenizer, tmp_path):
    model, cg = tiny_llama
    s = to_gguf(model, spm_tokenizer, tmp_path / "m.gguf", quant="Q8_0", progress=False, captured=cg)
    r = gguf.GGUFReader(str(s.path))
    assert _kv(r, "general.architecture") == "llama" and _kv(r, "general.type") == "model"
    assert _kv(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert _kv(r, "llama.block_count") == 2 and _kv(r, "llama.attention.head_count_kv") == 2
    assert _kv(r, "llama.rope.dimension_count") == 16 and _kv(r, "tokenizer.ggml.model") == "llama"
    assert _kv(r, "tokenizer.ggml.add_bos_token") in (0, 1, True, False)
    names = {t.name for t in r.tensors}
    assert names == {t.name for t in s.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.ffn_down.weight"} <= names
    # Q8_0 file: matrices Q8_0, norms F32 (convert_hf_to_gguf's policy)
    types = {t.name: t.type for t in s.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_llama3_rope_writes_rope_freqs(spm_tokenizer, tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = make_model("llama", hidden=64, lora=False, rope_parameters=rope, tie_word_embeddings=True)
    s = to_gguf(model, spm_tokenizer, tmp_path / "l3.gguf", quant="F32", progress=False)
    r = gguf.GGUFReader(str(s.path))
    freqs = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    assert freqs.data.shape == (8,) and float(np.max(freqs.data)) > 1.0
    assert "output.weight" not in {t.name for t in r.tensors}  # tied: llama.cpp reuses token_embd


def test_interrupted_export_leaves_no_file(tiny_llama, spm_tokenizer, tmp_path, monkeypatch):
    import graphtune.export.gguf as gg

    model, cg = tiny_llama
    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous export")
    calls = {"n": 0}
    real = gg.quants.quantize

    def failing(data, qtype, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("interrupted mid-write")
        return real(data, qtype, **kw)

    monkeypatch.setattr(gg.quants, "quantize", failing)
    with pytest.raises(KeyboardInterrupt):
        to_gguf(model, spm_tokenizer, target, quant="Q8_0", progress=False, captured=cg)
    assert target.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left behind


def test_unknown_quant_type_names_the_supported_ones(tiny_llama, spm_tokenizer, tmp_path):
    model, cg = tiny_llama
    with pytest.raises(ExportError, match="Q3_K.*supported: F32, F16, BF16, Q8_0"):
        to_gguf(model, spm_tokenizer, tmp_path / "x.gguf", quant="Q3_K", progress=False, captured=cg)


def test_fallbacks_are_reported(tiny_llama, spm_tokenizer, tmp_path, caplog):
    model, cg = tiny_llama  # hidden 64: rows are not a multiple of the 256-wide K-quant blocks
    with caplog.at_level(logging.WARNING, logger="graphtune.export"):
        s = to_gguf(model, spm_tokenizer, tmp_path / "k.gguf", quant="Q4_K_M", progress=False, captured=cg)
    assert s.fallbacks and all("not a multiple" in f for f in s.fallbacks)
    rec = {t.name: t for t in s.tensors}
    assert rec["blk.0.attn_q.weight"].type == "Q5_0" and "Q4_K → Q5_0" in rec["blk.0.attn_q.weight"].reason
    assert any("fallback" in m for m in caplog.messages)
    assert "fallback:" in s.summary()


def test_unsupported_family_is_a_clear_error(tmp_path, spm_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512, n_positions=64)).eval()
    with pytest.raises(UnsupportedFamilyError, match="no family was detected.*GGUF lowerings exist for: gemma, gemma2"):
        to_gguf(model, spm_tokenizer, tmp_path / "g.gguf", progress=False)


def test_graph_structure_must_match_the_arch(tiny_llama, monkeypatch):
    """A llama graph lowered as gemma: offsets, activation and tying disagree, and the error says so."""
    model, cg = tiny_llama
    monkeypatch.setattr(cg.report, "family", "gemma")
    monkeypatch.setattr(Lowering, "_family", lambda self, report, roles: ("gemma", "forced by the test"))
    with pytest.raises(ExportError) as e:
        Lowering(model, captured=cg)
    msg = str(e.value)
    assert "activation='swiglu'" in msg and "expects 'geglu'" in msg
    assert "rms_norm offsets [0.0]" in msg and "always uses token_embd" in msg


def test_untied_gemma_cannot_be_lowered(spm_tokenizer, tmp_path):
    model = make_model("gemma", hidden=64, tie_word_embeddings=False)
    with pytest.raises(ExportError, match="not tied to the token embedding.*'gemma' always uses token_embd"):
        to_gguf(model, spm_tokenizer, tmp_path / "g.gguf", progress=False)


def test_truncated_capture_checks_every_layer(spm_tokenizer, tmp_path):
    model = make_model("qwen3", hidden=64, num_hidden_layers=4, lora=False)
    low = Lowering(model, capture_layers=1)
    assert len(low.roles.layers) == 4 and any("1 of 4 decoder layers traced" in c for c in low.checks)
    s = to_gguf(model, spm_tokenizer, tmp_path / "q.gguf", quant="F16", progress=False, captured=low.captured)
    assert "blk.3.attn_k_norm.weight" in {t.name for t in s.tensors}


def test_save_merged_round_trip(tmp_path, spm_tokenizer):
    from transformers import AutoModelForCausalLM

    model = make_model("qwen2", hidden=64)
    out = save_merged(model, tmp_path / "merged", spm_tokenizer, progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = list(range(5, 30))
    np.testing.assert_allclose(hf_logits(merged, ids), hf_logits(model, ids), atol=1e-5, rtol=0)
    assert (out / "tokenizer.json").exists() and not list(out.glob(".*tmp*"))


def _nf4_llama(tmp_path):
    """A tiny Llama saved and reloaded as bitsandbytes NF4 on the CPU (fp32 compute), or a skip."""
    import transformers

    make_model("llama", hidden=64, lora=False).save_pretrained(tmp_path / "base")
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=q, device_map="cpu")
    except Exception as e:  # noqa: BLE001 - bitsandbytes without a CPU backend
        pytest.skip(f"bitsandbytes 4-bit cannot load on this machine: {e}")


def test_save_merged_qlora_dequantizes(tmp_path, spm_tokenizer):
    pytest.importorskip("bitsandbytes")
    import peft
    import transformers

    qm = _nf4_llama(tmp_path)
    pm = peft.get_peft_model(qm, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    low = Lowering(pm.eval())
    assert low.family.name == "llama"  # not phi3: bitsandbytes' gemm_4bit nodes are projections too
    merged = transformers.AutoModelForCausalLM.from_pretrained(save_merged(pm, tmp_path / "m", progress=False)).eval()
    ids = list(range(3, 20))
    # the oracle is bitsandbytes on the weights as quantized: on an AVX512-BF16 CPU its inference path
    # would first convert them to its CPU layout with bf16 absmax, i.e. other numbers
    with _no_bnb_cpu_repacking(pm):
        want = hf_logits(pm, ids)
    np.testing.assert_allclose(hf_logits(merged, ids), want, atol=1e-4, rtol=0)
    # the GGUF of the QLoRA model holds the same merged weights (read back through the family's inverse)
    s = to_gguf(pm, spm_tokenizer, tmp_path / "q.gguf", quant="F32", progress=False, captured=low.captured)
    ref = dequantized_reference(low, s.path)
    np.testing.assert_allclose(hf_logits(ref, ids), want, atol=1e-4, rtol=0)
    assert not any(getattr(getattr(m, "weight", None), "quant_state", None) is not None
                   and getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in pm.modules())


def test_capture_keeps_bitsandbytes_from_converting_weights_on_cpu(tmp_path):
    """On an AVX512-BF16 CPU, bitsandbytes converts a Linear4bit weight in place during eval inference;
    the export's capture switches that off per module (and restores the switch), on any host: here the
    switch is forced on, as such a CPU sets it."""
    pytest.importorskip("bitsandbytes")
    qm = _nf4_llama(tmp_path)
    linears = [m for m in qm.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert linears
    for m in linears:
        m.support_avx512bf16_for_cpu = 1  # what bitsandbytes' has_avx512bf16() returns on such a CPU
    low = Lowering(qm.eval())
    assert low.family.name == "llama"
    assert all(m.support_avx512bf16_for_cpu == 1 for m in linears)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linears)


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_weight_reads_bitsandbytes_cpu_layout(double_quant):
    """A weight bitsandbytes already converted to its CPU kernel layout (CPU inference before the export)
    dequantizes to the values that model now computes with: the same codes, absmax rounded to bf16."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    if not hasattr(bnbf, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes has no CPU weight layout")
    from graphtune.export.merge import dequantize_weight
    from graphtune.kernels.dequant_4bit import dequantize_4bit

    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(5)) * 0.05
    param = bnb.nn.Params4bit(w, requires_grad=False, blocksize=64, compress_statistics=double_quant,
                              quant_type="nf4").to("cpu")
    qs = param.quant_state
    absmax = (bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset) if qs.nested else qs.absmax
    want = dequantize_4bit(param.data, absmax.float().bfloat16().float(), (96, 128), 64, "nf4", torch.float32)
    assert not torch.equal(want, dequantize_weight(param))  # the bf16 absmax is another model
    param.data, param.quant_state = bnbf._convert_weight_packed_for_cpu(param.data, qs)
    assert param.quant_state.packing_format_for_cpu
    got = dequantize_weight(param)
    assert got.dtype == torch.float32 and got.shape == (96, 128)
    assert torch.equal(got, want)


def test_modelfile_converts_chatml_and_notes_unknown_templates(bpe_tokenizer, tmp_path):
    path = write_modelfile(tmp_path, bpe_tokenizer, "./model.gguf")
    text = path.read_text()
    assert text.startswith("FROM ./model.gguf\n") and "# chat template: chatml" in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    odd = bpe_tokenizer.chat_template
    try:
        bpe_tokenizer.chat_template = "{% for m in messages %}### {{ m['content'] }}\n{% endfor %}"
        text = write_modelfile(tmp_path / "Modelfile2", bpe_tokenizer, "m.gguf").read_text()
    finally:
        bpe_tokenizer.chat_template = odd
    assert "TEMPLATE" not in text and "#   {% for m in messages %}### {{ m['content'] }}" in text


def test_cli_exports_from_a_checkpoint_folder(tmp_path, bpe_tokenizer, capsys):
    from graphtune.export.cli import main

    model = make_model("phi3", hidden=64, lora=False)
    model.save_pretrained(tmp_path / "ckpt")
    bpe_tokenizer.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out" / "phi3.gguf"
    rc = main([str(tmp_path / "ckpt"), str(out), "--quant", "Q8_0", "--modelfile", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    r = gguf.GGUFReader(str(out))
    assert _kv(r, "general.architecture") == "phi3" and _kv(r, "tokenizer.ggml.pre") == "gpt-2"
    assert "blk.1.attn_qkv.weight" in {t.name for t in r.tensors}
    assert (out.parent / "Modelfile").read_text().startswith("FROM ./phi3.gguf")
    assert main([str(tmp_path / "ckpt"), str(out), "--quant", "Q2_K"]) == 2
    assert "unknown GGUF file type 'Q2_K'" in capsys.readouterr().err


def test_cli_with_adapter_writes_lora_gguf_and_merged(tmp_path, bpe_tokenizer, capsys):
    from graphtune.export.cli import main

    model = make_model("llama", hidden=64)
    model.get_base_model().save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    bpe_tokenizer.save_pretrained(tmp_path / "base")
    rc = main([str(tmp_path / "base"), str(tmp_path / "m.gguf"), "--adapter", str(tmp_path / "adapter"), "--quant", "F16",
               "--lora-gguf", str(tmp_path / "lora.gguf"), "--merged", str(tmp_path / "merged"), "--no-progress", "--json"])
    assert rc == 0, capsys.readouterr().err
    r = gguf.GGUFReader(str(tmp_path / "lora.gguf"))
    assert _kv(r, "general.type") == "adapter" and _kv(r, "adapter.type") == "lora"
    assert abs(_kv(r, "adapter.lora.alpha") - 8.0) < 1e-6
    assert "blk.0.attn_q.weight.lora_a" in {t.name for t in r.tensors}
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_cli_cache_gives_the_same_file_without_a_capture(tmp_path, bpe_tokenizer, capsys, monkeypatch):
    """A second export of a checkpoint reads the graph analysis and the vocabulary from the export
    cache (no skeleton, no capture, no tokenizer load) and writes the same bytes; a changed
    config.json is a miss; --no-cache writes the same bytes too."""
    import json

    import graphtune.export.gguf as gg
    from graphtune.export.cli import main

    monkeypatch.setenv("GRAPHTUNE_EXPORT_CACHE_DIR", str(tmp_path / "cache"))
    model = make_model("llama", hidden=64, lora=False).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    bpe_tokenizer.save_pretrained(tmp_path / "ckpt")

    def export(out, *extra):
        rc = main([str(tmp_path / "ckpt"), str(tmp_path / out), "--quant", "Q4_K_M", "--no-progress", "--json", *extra])
        text = capsys.readouterr().out
        assert rc == 0, text
        return json.loads(text[text.index("{"):text.rindex("}") + 1]), (tmp_path / out).read_bytes()

    first, data = export("a.gguf")
    assert not any("export cache" in c for c in first["gguf"]["checks"])
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["lowering", "vocab"]

    captures = []
    monkeypatch.setattr(gg, "capture_graph", lambda *a, **k: captures.append(1))
    second, data2 = export("b.gguf")
    assert data2 == data and not captures
    assert any("export cache" in c for c in second["gguf"]["checks"])
    assert second["gguf"]["checks"][:2] == first["gguf"]["checks"][:2]
    monkeypatch.undo()
    monkeypatch.setenv("GRAPHTUNE_EXPORT_CACHE_DIR", str(tmp_path / "cache"))

    assert export("c.gguf", "--no-cache")[1] == data
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg["rms_norm_eps"] != 1e-5 else 2e-5
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    third, _ = export("d.gguf")
    assert not any("export cache" in c for c in third["gguf"]["checks"])
    assert len(list((tmp_path / "cache").glob("lowering-*.json"))) == 2


def test_roles_and_vocab_survive_the_cache_round_trip(tiny_llama, spm_tokenizer):
    from graphtune.export import cache
    from graphtune.export.tokenizer import build_vocab

    model, cg = tiny_llama
    low = Lowering(model, captured=cg)
    entry = json_round_trip(low.to_cache())
    assert cache.roles_from_json(entry["roles"]) == low.roles
    again = Lowering.from_cache(entry, model.config, low.source)
    assert [(r.fqn, n) for r, n in again.names()] == [(r.fqn, n) for r, n in low.names()]
    assert again.spec == low.spec
    vocab = build_vocab(spm_tokenizer, low.spec.n_vocab)
    assert cache.vocab_from_json(json_round_trip(cache.vocab_to_json(vocab))) == vocab


def json_round_trip(obj):
    import json

    return json.loads(json.dumps(obj))


def test_bf16_tensors_reach_the_quantizer_as_they_are(tiny_llama, spm_tokenizer, tmp_path, monkeypatch):
    """A tensor whose fix-up only moves values (Llama's q/k permutation) is quantized from the
    model's own bf16 values -- the same bytes as from the float32 copy; a family whose transform
    does arithmetic and does not vouch for it gets float32."""
    import graphtune.export.gguf as gg
    from graphtune.export.families.llama import Llama

    model = make_model("llama", hidden=256, lora=False).to(torch.bfloat16)
    cg = capture_graph(model)
    seen = {}
    real = gg.quants.quantize

    def spy(data, qtype, **kw):
        seen[tuple(data.shape), qtype] = data.dtype
        return real(data, qtype, **kw)

    monkeypatch.setattr(gg.quants, "quantize", spy)
    a = to_gguf(model, spm_tokenizer, tmp_path / "a.gguf", quant="Q4_K_M", progress=False, captured=cg)
    assert torch.bfloat16 in seen.values()
    monkeypatch.setattr(Llama, "transform_moves_only", lambda self, *a, **k: False)
    seen.clear()
    b = to_gguf(model, spm_tokenizer, tmp_path / "b.gguf", quant="Q4_K_M", progress=False, captured=cg)
    assert set(seen.values()) == {torch.float32}
    assert a.path.read_bytes() == b.path.read_bytes()


def test_which_transforms_may_see_the_checkpoint_dtype():
    from graphtune.export.families import GGUFFamily, ModelSpec
    from graphtune.export.families.gemma import Gemma
    from graphtune.export.families.llama import Llama

    spec = ModelSpec(config=None, n_layers=1, n_embd=8, n_ff=8, n_head=2, n_head_kv=2, head_dim=4, n_rot=4,
                     n_vocab=8, n_ctx=8, rms_eps=1e-6, tied=True, attention_scale=None)

    class Scaled(GGUFFamily):  # overrides transform with arithmetic, says nothing about it
        def transform(self, role, bid, part, t, offset=0.0):
            return t * 2

    assert not Scaled(spec).accepts_native_dtype("attn_q", 0, "weight")
    assert Llama(spec).accepts_native_dtype("attn_q", 0, "weight")
    assert not Llama(spec).accepts_native_dtype("attn_norm", 0, "weight", offset=1.0)
    gem = Gemma(dataclasses_replace(spec, attention_scale=0.125))  # != 1/sqrt(4): folded into q
    assert not gem.accepts_native_dtype("attn_q", 0, "weight") and gem.accepts_native_dtype("attn_k", 0, "weight")


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


@pytest.mark.parametrize("direct", [False, True])
def test_tensors_are_written_at_their_offsets_in_any_order(tiny_llama, spm_tokenizer, tmp_path, monkeypatch, direct):
    """Worker threads finish tensors in any order; the file is the one gguf-py writes in order
    (also with every tensor's page-aligned middle written through O_DIRECT, where the filesystem
    of the test's temporary folder allows it)."""
    import random
    import time as _time

    import graphtune.export.gguf as gg

    model, cg = tiny_llama
    a = to_gguf(model, spm_tokenizer, tmp_path / "a.gguf", quant="Q8_0", progress=False, captured=cg)
    real = gg.quants.quantize
    rng = random.Random(0)

    def slow(data, qtype, **kw):
        _time.sleep(rng.random() * 0.02)
        return real(data, qtype, **kw)

    monkeypatch.setattr(gg.quants, "quantize", slow)
    low = Lowering(model, captured=cg)
    planned, _ = low.plan("Q8_0")
    arrays = [gg.quants.quantize(t.produce(), t.qtype) for t in planned]
    w = gguf.GGUFWriter(str(tmp_path / "ref.gguf"), "llama")
    for t, arr in zip(planned, arrays):
        w.add_tensor(t.name, arr, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from graphtune.export import fileio

    monkeypatch.setattr(fileio, "DIRECT_MIN", 0 if direct else 1 << 62)
    ways = []
    real_write = fileio.TensorFile.write

    def write(self, data, offset, direct):
        ways.append(direct and self.direct_fd is not None)
        return real_write(self, data, offset, direct)

    monkeypatch.setattr(fileio.TensorFile, "write", write)
    gg.write_gguf(tmp_path / "b.gguf", "llama", lambda _w: None, planned, progress=False, workers=4)
    assert (tmp_path / "b.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()
    if not direct:
        assert not any(ways)
    elif not any(ways):
        pytest.skip("no O_DIRECT on this filesystem: only the buffered path was checked")
    assert a.path.stat().st_size > (tmp_path / "b.gguf").stat().st_size  # a has the vocabulary too


_REPLAY_CASES = {
    **{f: (f, {}) for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")},
    "llama3_rope": ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 16})),
    "phi3_longrope": ("phi3", dict(max_position_embeddings=512, original_max_position_embeddings=128, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0 + 0.1 * i for i in range(8)],
        "short_factor": [1.0] * 8}, sliding_window=64)),
}


@pytest.mark.parametrize("case", list(_REPLAY_CASES))
def test_cached_lowering_replays_the_same_file_without_the_config(case, spm_tokenizer, tmp_path):
    """What a family derives from the config (metadata, extra tensors like rope_freqs and Phi-3's
    long-rope factors, notes) replayed from a JSON cache entry gives the same file as the live
    lowering: the CLI's cache hits never import transformers."""
    import json

    from graphtune.export import cache

    family, overrides = _REPLAY_CASES[case]
    model = make_model(family, hidden=64, lora=False, **overrides)
    live = Lowering(model)
    entry = json.loads(json.dumps(live.to_cache()))
    replayed = Lowering.from_cache(entry, None, live.source)
    assert isinstance(replayed.spec.config, cache.ConfigView)
    a = to_gguf(model, spm_tokenizer, tmp_path / "a.gguf", quant="Q8_0", progress=False, lowering=live, name="m")
    b = to_gguf(None, spm_tokenizer, tmp_path / "b.gguf", quant="Q8_0", progress=False, lowering=replayed, name="m")
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.notes == b.notes and a.checks == [c for c in b.checks if "export cache" not in c]
    if case == "llama3_rope":
        assert "rope_freqs.weight" in {t.name for t in b.tensors}
    if case == "phi3_longrope":
        assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= {t.name for t in b.tensors}


def test_export_after_training_with_graphtune_optimize(spm_tokenizer, tmp_path):
    """An optimized LoRA model's training graph holds fused nodes (lora_mlp, grouped projections,
    fused cross-entropy); export captures its own graph and writes the same tensors as without optimize."""
    import graphtune
    from graphtune.tiny import tiny_batch

    plain = make_model("llama", hidden=64)
    trained = make_model("llama", hidden=64)
    trained.load_state_dict(plain.state_dict())
    trained.train()
    graphtune.optimize(trained, compiler="aot_eager")
    batch = tiny_batch(2, 8, vocab=trained.get_input_embeddings().weight.shape[0])
    trained(**batch).loss.backward()
    assert graphtune.last_report(trained).counts.get("fuse_lora_mlp", 0) > 0
    a = to_gguf(plain, spm_tokenizer, tmp_path / "a.gguf", quant="F32", progress=False)
    b = to_gguf(trained, spm_tokenizer, tmp_path / "b.gguf", quant="F32", progress=False)
    ra, rb = gguf.GGUFReader(str(a.path)), gguf.GGUFReader(str(b.path))
    assert {t.name for t in ra.tensors} == {t.name for t in rb.tensors}
    for ta, tb in zip(sorted(ra.tensors, key=lambda t: t.name), sorted(rb.tensors, key=lambda t: t.name)):
        assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name


def test_header_packing_is_gguf_pys(tmp_path):
    """graphtune packs the metadata arrays at once; the bytes must be gguf-py's item-by-item ones
    (strings with non-ASCII, floats, ints, bools, bytes items and merges)."""
    import io

    from graphtune.export.gguf import kv_bytes

    w = gguf.GGUFWriter(None, "llama")
    w.add_name("m")
    w.add_uint32("llama.block_count", 7)
    w.add_float32("llama.rope.freq_base", 0.1)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_token_list(["a", "é", "<s>", "▁x"] * 500)
    w.add_token_scores([0.1, -3.0, 1e-30, -1e30] * 500)
    w.add_token_types([1, 2, 3, 6] * 500)
    w.add_token_merges(["a b", "c d"])
    w.add_array("test.bools", [True, False, True])
    w.add_array("test.bytes", [b"ab", b"c"])
    w.add_array("test.ints", [1, -2, 2**31 - 1])
    buf = io.BytesIO()
    w.fout, w.state = [buf], gguf.gguf_writer.WriterState.EMPTY
    w.write_header_to_file()
    start = buf.tell()
    w.write_kv_data_to_file()
    assert kv_bytes(w) == buf.getvalue()[start:]
    w2 = gguf.GGUFWriter(None, "llama")
    w2.add_array("test.too_big", [2**31])
    with pytest.raises(Exception):
        kv_bytes(w2)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_dequantize_weight_4bit_blocks_spanning_rows(quant_type, double_quant):
    """The QLoRA merge dequantizes with graphtune's kernel: equal to bitsandbytes' definition (the flat
    call) also where a block spans rows (blocksize 128 > 64 columns), where bitsandbytes 0.50.2's own
    CPU 2-D call is wrong on AVX-512 hosts; and within NF4/FP4 rounding of the original weights."""
    bnb = pytest.importorskip("bitsandbytes")
    from graphtune.export.merge import dequantize_weight
    from tests.bnb_oracle import bnb_dequantize_flat

    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3)) * 0.05
    param = bnb.nn.Params4bit(w.bfloat16(), requires_grad=False, blocksize=128, compress_statistics=double_quant,
                              quant_type=quant_type).to("cpu")  # quantizes
    want = bnb_dequantize_flat(param.data, param.quant_state).float()
    got = dequantize_weight(param)
    assert got.dtype == torch.float32 and got.shape == (64, 64)
    assert torch.equal(got, want)
    assert (got - w).abs().max() <= 0.2 * w.abs().max()  # NF4/FP4 rounding; the wrong 2-D call is off by 0.32
