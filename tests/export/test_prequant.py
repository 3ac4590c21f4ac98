"""The CLI's speculative quantization (graphtune.export.prequant): checkpoint matrices quantized and
written into the output's temporary file while the graph is captured, the header inserted in front
of them afterwards. The file must hold exactly the tensors the usual layout holds; whatever the
speculation cannot prove (a plan of other types, a transform that is not a row gather, a
filesystem without FALLOC_FL_INSERT_RANGE) falls back to the usual path with the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf
from graphtune.export import _cquants, fileio, prequant
from tests.export.helpers import make_model, run_llama

pytestmark = pytest.mark.skipif(_cquants.library() is None, reason="the C quantizers are unavailable here")


def _checkpoint(tmp_path: Path, family: str, tokenizer, **kw) -> Path:
    model = make_model(family, hidden=64, lora=False, **kw).to(torch.bfloat16)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    return ckpt


def _export(ckpt: Path, out: Path, quant: str, monkeypatch, capsys, *, speculate: bool, extra=()) -> dict:
    from graphtune.export.cli import main

    monkeypatch.setenv("GRAPHTUNE_EXPORT_PREQUANT", "1" if speculate else "0")
    rc = main([str(ckpt), str(out), "--quant", quant, "--no-progress", "--no-cache", "--json", *extra])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-3000:]
    text = cap.out
    return json.loads(text[text.index("{"):text.rindex("}") + 1])["gguf"]


def _contents(path: Path) -> tuple[dict, dict, int]:
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: (t.tensor_type.name, tuple(int(s) for s in t.shape), bytes(t.data)) for t in r.tensors}
    kvs = {f.name: [bytes(p) for p in f.parts[1:]] for f in r.fields.values()
           if not f.name.startswith("GGUF.") and f.name != "graphtune.header_padding"}
    return tensors, kvs, r.data_offset


def _need_insert_range(folder: Path) -> None:
    """The speculative layout needs FALLOC_FL_INSERT_RANGE where the output goes (ext4, xfs)."""
    import errno
    import os

    probe = folder / "insert-range-probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.ftruncate(fd, 2 * os.fstat(fd).st_blksize)
        fileio.insert_range(fd, 0, os.fstat(fd).st_blksize)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        pytest.skip(f"this filesystem cannot insert ranges ({e}); the fallback is tested separately")
    finally:
        os.close(fd)
        probe.unlink()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3"])
def test_speculative_file_holds_the_usual_tensors(family, tmp_path, bpe_tokenizer, monkeypatch, capsys):
    """Q8_0 from a bf16 checkpoint: every matrix is speculated; the file has the usual tensors
    (names, types, bytes) and metadata, its data section starts on a filesystem block, and llama's
    permuted q/k rows come from the speculated bytes reordered."""
    _need_insert_range(tmp_path)
    ckpt = _checkpoint(tmp_path, family, bpe_tokenizer)
    out = tmp_path / "out"
    usual = _export(ckpt, out / "usual.gguf", "Q8_0", monkeypatch, capsys, speculate=False)
    spec = _export(ckpt, out / "spec.gguf", "Q8_0", monkeypatch, capsys, speculate=True)
    assert not any("quantized while" in n for n in usual["notes"])
    [note] = [n for n in spec["notes"] if "quantized while" in n]
    n_matrices = sum(len(t["shape"]) == 2 for t in spec["tensors"])
    used = int(note.split(" of ")[0])
    # Gemma's q rows carry a folded scale: not a row gather, made again into their slots
    assert used == n_matrices - (2 if family == "gemma2" else 0), note
    assert note.endswith("speculative layout)"), note
    a, akv, _ = _contents(out / "usual.gguf")
    b, bkv, data_offset = _contents(out / "spec.gguf")
    assert a == b and akv == bkv
    assert data_offset % 4096 == 0
    assert _leftovers(out) == []


def test_llama_cpp_runs_the_speculative_file(tmp_path, bpe_tokenizer, monkeypatch, capsys):
    """llama.cpp loads the speculative layout (tensors in slot order, the padding key) and computes
    the same logits as from the usual file."""
    _need_insert_range(tmp_path)
    ckpt = _checkpoint(tmp_path, "llama", bpe_tokenizer)
    _export(ckpt, tmp_path / "usual.gguf", "Q8_0", monkeypatch, capsys, speculate=False)
    _export(ckpt, tmp_path / "spec.gguf", "Q8_0", monkeypatch, capsys, speculate=True)
    ids = bpe_tokenizer("def fib(n): return n")["input_ids"][:12]
    got = run_llama([{"kind": "logits", "model": str(tmp_path / n), "ids": ids} for n in ("usual.gguf", "spec.gguf")],
                    tmp_path / "run")
    assert np.array_equal(got["logits_0"], got["logits_1"])


def test_a_plan_of_other_types_writes_the_usual_bytes(tmp_path, bpe_tokenizer, monkeypatch, capsys):
    """Q4_K_M gives some matrices Q6_K: the speculative layout cannot hold them, its file is
    discarded, and the usual file is written -- byte for byte the same as without speculation
    (the Q4_K matrices still come from the speculated bytes)."""
    ckpt = _checkpoint(tmp_path, "llama", bpe_tokenizer, hidden_size=256, intermediate_size=512)
    _export(ckpt, tmp_path / "usual.gguf", "Q4_K_M", monkeypatch, capsys, speculate=False)
    spec = _export(ckpt, tmp_path / "spec.gguf", "Q4_K_M", monkeypatch, capsys, speculate=True)
    assert (tmp_path / "spec.gguf").read_bytes() == (tmp_path / "usual.gguf").read_bytes()
    assert any("quantized while" in n and "usual layout" in n for n in spec["notes"]), spec["notes"]
    assert _leftovers(tmp_path) == []


def test_without_insert_range_the_usual_layout_is_written(tmp_path, bpe_tokenizer, monkeypatch, capsys):
    """A filesystem that cannot insert the header in front of the written tensors (tmpfs, btrfs,
    non-Linux): the speculated bytes are written in the usual layout instead."""
    import errno

    ckpt = _checkpoint(tmp_path, "llama", bpe_tokenizer)
    _export(ckpt, tmp_path / "usual.gguf", "Q8_0", monkeypatch, capsys, speculate=False)

    def refuse(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(fileio, "insert_range", refuse)
    spec = _export(ckpt, tmp_path / "spec.gguf", "Q8_0", monkeypatch, capsys, speculate=True)
    assert (tmp_path / "spec.gguf").read_bytes() == (tmp_path / "usual.gguf").read_bytes()
    assert any("quantized while" in n and "usual layout" in n for n in spec["notes"]), spec["notes"]
    assert _leftovers(tmp_path) == []


def test_a_failed_export_leaves_no_file(tmp_path, bpe_tokenizer, monkeypatch):
    """An error while the tensors are written: neither the output nor a temporary file remains."""
    from graphtune.export import quants
    from graphtune.export.cli import main

    ckpt = _checkpoint(tmp_path, "llama", bpe_tokenizer)
    out = tmp_path / "out"
    real = quants.quantize

    def fail(data, qtype, **kw):
        if data.dim() == 1:
            raise RuntimeError("disk on fire")
        return real(data, qtype, **kw)

    monkeypatch.setattr(quants, "quantize", fail)
    monkeypatch.setenv("GRAPHTUNE_EXPORT_PREQUANT", "1")
    with pytest.raises(RuntimeError, match="disk on fire"):
        main([str(ckpt), str(out / "m.gguf"), "--quant", "Q8_0", "--no-progress", "--no-cache"])
    assert list(out.iterdir()) == []


def test_row_gather_is_what_the_transform_does():
    """``transform_row_gather`` for every role of every family: where it returns rows, the
    transform of a random tensor is exactly those rows; Gemma's scaled q and a transform that moves
    columns return None."""
    from graphtune.export.families import GGUFFamily
    from graphtune.export.families.llama import Llama
    from graphtune.export.gguf import Lowering

    g = torch.Generator().manual_seed(0)
    seen_permuted = seen_none = 0
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"):
        low = Lowering(make_model(family, hidden=64, lora=False, query_pre_attn_scalar=32)
                       if family.startswith("gemma") else make_model(family, hidden=64, lora=False))
        fam = low.family
        for r in low.ordered_roles():
            shape = low.source.shape(r.fqn)
            if len(shape) != 2:
                continue
            index = fam.transform_row_gather(r.role, r.bid, r.part, shape, r.offset)
            t = torch.randn(shape, generator=g)
            moved = fam.transform(r.role, r.bid, r.part, t.clone(), r.offset)
            if index is None:
                seen_none += 1
                continue
            assert torch.equal(moved, t[index]), (family, r.role)
            seen_permuted += not torch.equal(index, torch.arange(shape[0]))
    assert seen_permuted >= 4 and seen_none >= 2  # llama-like q/k; gemma's folded q

    class Columns(Llama):  # moves values within rows: not a row gather
        def transform(self, role, bid, part, t, offset=0.0):
            return t.flip(1)

        def transform_moves_only(self, role, bid, part, offset=0.0):
            return True

    spec = low.spec
    assert Columns(spec).transform_row_gather("attn_q", 0, "weight", (8, 64)) is None
    assert GGUFFamily.transform_row_gather(Llama(spec), "attn_q", 0, "weight", (8, 4, 2)) is None


def test_prequantizer_matches_the_quantizer_and_honours_its_budget(tmp_path, bpe_tokenizer):
    """Speculated bytes are those of ``quants.quantize`` on the checkpoint tensor; nothing is
    speculated beyond ``max_bytes``; ``take`` hands a tensor out once; ``close`` removes an
    unclaimed file."""
    from safetensors.torch import load_file

    from graphtune.export import quants

    ckpt = _checkpoint(tmp_path, "llama", bpe_tokenizer)
    weights = load_file(str(ckpt / "model.safetensors"))
    pre = prequant.start_for(ckpt, "Q8_0", tmp_path / "out" / "m.gguf")
    assert pre is not None and pre.tmp is not None and pre.tmp.exists()
    pre.wait()
    assert pre.error is None and all(pre.on_disk(s.key) for s in pre.slots)
    for slot in pre.slots:
        got = pre.take(slot.key, gguf.GGMLQuantizationType.Q8_0)
        assert got is not None and np.array_equal(got, quants.quantize(weights[slot.key], gguf.GGMLQuantizationType.Q8_0))
        assert pre.take(slot.key, gguf.GGMLQuantizationType.Q8_0) is None
    assert pre.take(pre.slots[0].key, gguf.GGMLQuantizationType.Q4_K) is None
    tmp = pre.tmp
    pre.close()
    assert not tmp.exists()

    small = prequant.Prequantizer(ckpt, int(gguf.GGMLQuantizationType.Q8_0), max_bytes=0).start()
    small.wait()
    assert small.finished() == [] and small.held_bytes == 0
    small.close()
