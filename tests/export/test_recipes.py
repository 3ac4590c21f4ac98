"""graphtune.export.recipes: llama.cpp's per-tensor type choices (mixtures and fallbacks)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from graphtune.export import recipes as R  # noqa: E402

QT = gguf.GGMLQuantizationType


def _llama_tensors(n_layers, hidden=256, n_kv_rows=128, ff=512, vocab=256, tied=False, down_cols=None):
    names = [("token_embd.weight", (vocab, hidden))]
    for i in range(n_layers):
        names += [
            (f"blk.{i}.attn_norm.weight", (hidden,)),
            (f"blk.{i}.attn_q.weight", (hidden, hidden)),
            (f"blk.{i}.attn_k.weight", (n_kv_rows, hidden)),
            (f"blk.{i}.attn_v.weight", (n_kv_rows, hidden)),
            (f"blk.{i}.attn_output.weight", (hidden, hidden)),
            (f"blk.{i}.ffn_norm.weight", (hidden,)),
            (f"blk.{i}.ffn_gate.weight", (ff, hidden)),
            (f"blk.{i}.ffn_up.weight", (ff, hidden)),
            (f"blk.{i}.ffn_down.weight", (hidden, down_cols or ff)),
        ]
    names.append(("output_norm.weight", (hidden,)))
    if not tied:
        names.append(("output.weight", (vocab, hidden)))
    return names


def _types(plan):
    return {c.name: c.type for c in plan}


def test_file_types():
    assert R.file_type("Q4_K_M").llama_file_type == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert R.file_type("q4_k").name == "Q4_K_M"  # llama-quantize's alias
    assert R.file_type("Q5_K").name == "Q5_K_M"
    assert R.file_type(gguf.LlamaFileType.MOSTLY_Q6_K).default_type == QT.Q6_K
    expected = {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9,
                "Q6_K": 18, "Q5_K_S": 16, "Q5_K_M": 17, "Q4_K_S": 14, "Q4_K_M": 15}
    assert {n: int(ft.llama_file_type) for n, ft in R.FILE_TYPES.items()} == expected
    with pytest.raises(ValueError):
        R.file_type("Q3_K_M")


def test_q4_k_m_mixture_32_layers():
    plan = _types(R.plan_types(_llama_tensors(32), "Q4_K_M", 32, "llama"))
    more_bits = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]  # llama.cpp's use_more_bits
    for i in range(32):
        want = QT.Q6_K if i in more_bits else QT.Q4_K
        assert plan[f"blk.{i}.attn_v.weight"] == want
        assert plan[f"blk.{i}.ffn_down.weight"] == want
        for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert plan[f"blk.{i}.{t}.weight"] == QT.Q4_K
        assert plan[f"blk.{i}.attn_norm.weight"] == QT.F32
    assert plan["output.weight"] == QT.Q6_K
    assert plan["token_embd.weight"] == QT.Q4_K
    assert plan["output_norm.weight"] == QT.F32
    # tensor_type (one tensor, layer from its name) agrees with the whole-model plan
    for name, shape in _llama_tensors(32):
        assert R.tensor_type(name, shape, "Q4_K_M", 32, "llama")[0] == plan[name], name


def test_other_mixtures():
    n = 16
    t = _llama_tensors(n)
    q5m = _types(R.plan_types(t, "Q5_K_M", n, "llama"))
    assert q5m["blk.0.attn_v.weight"] == QT.Q6_K and q5m["blk.3.attn_v.weight"] == QT.Q5_K
    assert q5m["blk.4.ffn_down.weight"] == QT.Q6_K and q5m["blk.3.ffn_down.weight"] == QT.Q5_K
    q4s = _types(R.plan_types(t, "Q4_K_S", n, "llama"))
    assert [q4s[f"blk.{i}.attn_v.weight"] for i in range(6)] == [QT.Q5_K] * 4 + [QT.Q4_K] * 2
    assert [q4s[f"blk.{i}.ffn_down.weight"] for i in range(3)] == [QT.Q5_K] * 2 + [QT.Q4_K]
    q5s = _types(R.plan_types(t, "Q5_K_S", n, "llama"))
    assert {v for k, v in q5s.items() if k.endswith("_norm.weight")} == {QT.F32}
    assert {v for k, v in q5s.items() if not k.endswith("_norm.weight") and k != "output.weight"} == {QT.Q5_K}
    assert q5s["output.weight"] == QT.Q6_K
    q6 = _types(R.plan_types(t, "Q6_K", n, "llama"))
    assert {v for k, v in q6.items() if not k.endswith("_norm.weight")} == {QT.Q6_K}
    q8 = _types(R.plan_types(t, "Q8_0", n, "llama"))
    assert {v for k, v in q8.items() if not k.endswith("_norm.weight")} == {QT.Q8_0}
    q40 = _types(R.plan_types(t, "Q4_0", n, "llama"))
    assert q40["output.weight"] == QT.Q6_K and q40["blk.0.attn_v.weight"] == QT.Q4_0
    for ft, want in (("F16", QT.F16), ("BF16", QT.BF16), ("F32", QT.F32)):
        p = _types(R.plan_types(t, ft, n, "llama"))
        assert p["blk.0.ffn_down.weight"] == want and p["output.weight"] == want
        assert p["blk.0.attn_norm.weight"] == QT.F32


def test_tied_embeddings_take_the_output_type():
    t = _llama_tensors(4, tied=True)
    assert _types(R.plan_types(t, "Q4_K_M", 4, "llama"))["token_embd.weight"] == QT.Q6_K
    assert R.tensor_type("token_embd.weight", (256, 256), "Q4_K_M", 4, "llama", tied_embeddings=True)[0] == QT.Q6_K
    assert R.tensor_type("token_embd.weight", (256, 256), "Q4_K_M", 4, "llama")[0] == QT.Q4_K
    assert R.tensor_type("token_embd.weight", (256, 256), "Q8_0", 4, "llama", tied_embeddings=True)[0] == QT.Q8_0


def test_fallbacks_as_llama_cpp():
    # Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; then F16 when the row is not a multiple of 32
    qt, why = R.tensor_type("blk.1.ffn_down.weight", (256, 320), "Q4_K_M", 8, "llama")
    assert qt == QT.Q5_0 and "Q4_K → Q5_0" in why and "blk.1.ffn_down.weight" in why and "320" in why
    assert R.tensor_type("blk.0.ffn_down.weight", (256, 320), "Q4_K_M", 8, "llama")[0] == QT.Q8_0  # Q6_K layer
    assert R.tensor_type("blk.1.ffn_down.weight", (256, 320), "Q5_K_S", 8, "llama")[0] == QT.Q5_1
    qt, why = R.tensor_type("blk.1.ffn_down.weight", (4, 100), "Q4_K_M", 8, "llama")
    assert qt == QT.F16 and "Q4_K → Q5_0 → F16" in why
    qt, why = R.tensor_type("blk.1.ffn_down.weight", (4, 100), "Q8_0", 8, "llama")
    assert qt == QT.F16 and "Q8_0 → F16" in why
    assert R.tensor_type("blk.1.ffn_down.weight", (4, 96), "Q8_0", 8, "llama") == (QT.Q8_0, None)
    # output: not a multiple of the default block -> Q8_0 (and then the Q8_0 fallback)
    assert R.tensor_type("output.weight", (512, 320), "Q4_K_M", 8, "llama")[0] == QT.Q8_0
    assert R.tensor_type("output.weight", (512, 320), "Q4_0", 8, "llama")[0] == QT.Q8_0  # Q6_K -> Q8_0
    assert R.tensor_type("output.weight", (512, 100), "Q4_K_M", 8, "llama")[0] == QT.F16
    # no reason when nothing fell back
    assert R.tensor_type("blk.1.ffn_up.weight", (320, 256), "Q4_K_M", 8, "llama") == (QT.Q4_K, None)


def test_float_policy():
    for ft in R.FILE_TYPES:
        assert R.tensor_type("blk.0.attn_norm.weight", (256,), ft, 8, "llama")[0] == QT.F32
        assert R.tensor_type("rope_freqs.weight", (32,), ft, 8, "llama")[0] == QT.F32
        assert R.tensor_type("blk.0.attn_q.bias", (256,), ft, 8, "qwen2")[0] == QT.F32
        assert R.tensor_type("blk.0.attn_q_norm.weight", (64,), ft, 8, "gemma3")[0] == QT.F32
    assert R.tensor_type("blk.0.ffn_gate_inp.weight", (8, 256), "Q4_K_M", 8, "llama")[0] == QT.F32


def test_arch_specific_rules():
    # phi3's fused attn_qkv counts as attn_v
    assert R.tensor_type("blk.0.attn_qkv.weight", (768, 256), "Q4_K_M", 8, "phi3")[0] == QT.Q6_K
    assert R.tensor_type("blk.1.attn_qkv.weight", (768, 256), "Q4_K_M", 8, "phi3")[0] == QT.Q4_K
    # LLM_TYPE_70B (80 layers, GQA): attn_v Q4_K -> Q5_K
    assert R.tensor_type("blk.10.attn_v.weight", (1024, 8192), "Q4_K_M", 80, "llama")[0] == QT.Q5_K
    assert R.tensor_type("blk.10.attn_v.weight", (8192, 8192), "Q4_K_M", 80, "llama",
                         n_head=64, n_head_kv=64)[0] == QT.Q4_K
    # 8 experts: attn_v and attn_k Q8_0, attn_output Q5_K
    assert R.tensor_type("blk.1.attn_v.weight", (1024, 4096), "Q4_K_M", 32, "llama", n_expert=8)[0] == QT.Q8_0
    assert R.tensor_type("blk.1.attn_k.weight", (1024, 4096), "Q4_K_M", 32, "llama", n_expert=8)[0] == QT.Q8_0
    assert R.tensor_type("blk.1.attn_output.weight", (4096, 4096), "Q4_K_M", 32, "llama", n_expert=8)[0] == QT.Q5_K


# ------------------------------------------------------------------------------------------
# vs llama.cpp's own llama_model_quantize on a tiny F32 model (types chosen and the bytes)

_QUANTIZE_SCRIPT = textwrap.dedent("""
    # runs in a subprocess: a failing GGML_ASSERT aborts the whole process
    import sys, llama_cpp
    args = sys.argv[1:]
    for src, dst, ftype in zip(args[0::3], args[1::3], args[2::3]):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(ftype)
        params.nthread = 2
        if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
            sys.exit(f"llama_model_quantize failed for {dst}")
""")
FILE_TYPES = ["Q4_K_M", "Q5_K_M", "Q4_K_S", "Q5_K_S", "Q6_K", "Q4_0", "Q5_1", "Q8_0"]


def _write_tiny_model(path, n_layers, ff, tied, seed):
    rng = np.random.default_rng(seed)
    hidden, n_head, n_kv, vocab = 256, 4, 1, 256
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // n_head)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("none")
    w.add_vocab_size(vocab)
    tensors = {}
    for name, shape in _llama_tensors(n_layers, hidden, hidden // n_head * n_kv, ff, vocab, tied):
        if len(shape) == 1:
            arr = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            arr = (rng.standard_t(4, shape) * 0.03).astype(np.float32)
        tensors[name] = arr
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def llama_cpp_quantized(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    d = tmp_path_factory.mktemp("llamacpp_quant")
    models = {
        # 8 layers: use_more_bits picks layers 0, 3, 6, 7; ffn_down rows of 320 force fallbacks
        "untied": (8, 320, False),
        "tied": (2, 512, True),
    }
    out, args = {}, []
    for key, (n_layers, ff, tied) in models.items():
        src = d / f"{key}-f32.gguf"
        tensors = _write_tiny_model(src, n_layers, ff, tied, seed=len(key))
        for ft in FILE_TYPES:
            dst = d / f"{key}-{ft}.gguf"
            args += [str(src), str(dst), str(int(R.file_type(ft).llama_file_type))]
            out[(key, ft)] = (n_layers, tensors, dst)
    r = subprocess.run([sys.executable, "-c", _QUANTIZE_SCRIPT, *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out["cache"] = {}  # (model, tensor, type) -> our bytes, shared by the file types
    return out


@pytest.mark.parametrize("ft", FILE_TYPES)
@pytest.mark.parametrize("model", ["untied", "tied"])
def test_types_and_blocks_match_llama_cpp(llama_cpp_quantized, model, ft):
    from graphtune.export import quants as Q

    n_layers, tensors, path = llama_cpp_quantized[(model, ft)]
    reader = gguf.GGUFReader(str(path))
    got = {t.name: t for t in reader.tensors}
    plan = R.plan_types([(n, a.shape) for n, a in tensors.items()], ft, n_layers, "llama")
    assert sorted(c.name for c in plan) == sorted(got)
    for c in plan:
        assert c.type == got[c.name].tensor_type, (c.name, c.type.name, got[c.name].tensor_type.name)
    ftype_field = reader.fields["general.file_type"]
    assert int(ftype_field.parts[ftype_field.data[0]][0]) == int(R.file_type(ft).llama_file_type)
    # the bytes: one tensor of each (category, type) pair, all of the K-quant tensors of one layer
    seen = set()
    for c in plan:
        key = (c.name.split(".")[-2], c.type)
        if c.type == QT.F32 or key in seen:
            continue
        seen.add(key)
        ref = np.asarray(got[c.name].data)
        cache = llama_cpp_quantized["cache"]
        if (model, c.name, c.type) not in cache:
            cache[(model, c.name, c.type)] = Q.quantize(tensors[c.name], c.type)
        mine = cache[(model, c.name, c.type)]
        if c.type == QT.F16:
            assert np.array_equal(mine.view(np.uint16), ref.view(np.uint16).reshape(mine.shape)), c.name
            continue
        assert mine.shape == ref.shape, c.name
        same = (mine == ref).all(-1).mean()
        assert same == 1.0, f"{c.name} ({c.type.name}): {same:.4%} rows identical"
