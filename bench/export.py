"""GGUF export benchmark (CPU, one run): graphtune vs llama.cpp's own tools on the same checkpoint.

    python bench/export.py                 # Q8_0 and Q4_K_M, baseline included
    python bench/export.py --types Q8_0    # one type

Model: random-init Llama-3.2-1B shape (hidden 2048, 16 layers, 32/8 heads x 64, ffn 8192, tied
embeddings, llama3 rope scaling), bf16 safetensors, with a SentencePiece BPE tokenizer (32000
pieces, trained here on the Python stdlib). SentencePiece, because convert_hf_to_gguf.py refuses a
locally trained byte-level BPE whose pre-tokenizer hash is not in its table.

Baseline: the llama.cpp vendored in the llama-cpp-python 0.3.36 sdist, extracted to .cache/ (not
committed): ``convert_hf_to_gguf.py --outtype q8_0`` for Q8_0; ``--outtype f16`` then
``llama_model_quantize`` (libllama through llama_cpp, nthread = the usable cores) for Q4_K_M.
Ours: ``python -m graphtune.export.cli MODEL OUT --quant TYPE`` (graph captured on a meta-device
skeleton, tensors streamed from the safetensors files), twice per type: "first" with an empty
export cache (the graph is captured, the tokenizer converted), "again" with the cache that run
filled (graphtune.export.cache: a re-export of the same checkpoint). The C quantizers are built
before the runs (once per machine; the build time is reported separately).

Every tool runs as its own process; wall times include interpreter start-up and imports. The
runs of one type follow each other (ours first, ours again, llama.cpp), with the 1-minute load
average recorded before each (the machine may be shared). Before them the checkpoint is read and
the shared libraries imported once, untimed, so the first tool does not pay the cold page cache for
both. The tensor sets (names and shapes) of
both files are compared, and so are the tensor types and bytes.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench_export"
SDIST_VERSION = "0.3.36"
SDIST_DIR = ROOT / ".cache" / "llama_sdist"
LLAMA_CPP = SDIST_DIR / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"
PY = sys.executable


def ensure_sdist() -> Path:
    if (LLAMA_CPP / "convert_hf_to_gguf.py").exists():
        return LLAMA_CPP
    SDIST_DIR.mkdir(parents=True, exist_ok=True)
    tgz = SDIST_DIR / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not tgz.exists():
        subprocess.run([PY, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={SDIST_VERSION}", "-d", str(SDIST_DIR)], check=False)
    with tarfile.open(tgz) as tf:
        tf.extractall(SDIST_DIR, filter="data")
    return LLAMA_CPP


def make_checkpoint(model_dir: Path) -> Path:
    """Random-init Llama-3.2-1B-shape checkpoint + SentencePiece tokenizer (cached)."""
    marker = model_dir / ".complete"
    if marker.exists():
        return model_dir
    import sysconfig

    import sentencepiece as spm
    import torch
    import transformers

    model_dir.mkdir(parents=True, exist_ok=True)
    corpus = CACHE / "corpus.txt"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with open(corpus, "w", encoding="utf-8") as out:
        n = 0
        for f in sorted(stdlib.rglob("*.py")):
            if "site-packages" in f.parts or "test" in f.parts:
                continue
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            out.write(text)
            n += len(text)
            if n > 12_000_000:
                break
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(CACHE / "sp"), vocab_size=32000, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        input_sentence_size=400000, shuffle_input_sentence=True, max_sentence_length=4096, minloglevel=2,
        num_threads=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    (CACHE / "sp.model").replace(model_dir / "tokenizer.model")
    tok = transformers.LlamaTokenizer.from_pretrained(str(model_dir))
    tok.save_pretrained(model_dir)
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    marker.write_text("ok")
    return model_dir


def timed(cmd: list[str], log: Path, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (rc {proc.returncode}); see {log}")
    return dt


def warm_page_cache(model_dir: Path) -> None:
    """Read the checkpoint and import the libraries both tools load (torch, numpy, safetensors, gguf,
    transformers' config), untimed: otherwise whichever tool runs first pays the cold reads for both."""
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    subprocess.run([PY, "-c", "import torch, numpy, safetensors, gguf, transformers; "
                    f"transformers.AutoConfig.from_pretrained({str(model_dir)!r})"], capture_output=True, check=False)


def load() -> float:
    return os.getloadavg()[0]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def llama_quantize(src: Path, dst: Path, ftype: str, log: Path) -> float:
    code = (
        "import sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{ftype}\n"
        f"p.nthread = {cores()}\n"
        f"rc = llama_cpp.llama_model_quantize({str(src).encode()!r}, {str(dst).encode()!r}, p)\n"
        "sys.exit(rc)\n"
    )
    return timed([PY, "-c", code], log)


def tensor_set(path: Path) -> dict[str, tuple[tuple[int, ...], str, int]]:
    import gguf

    r = gguf.GGUFReader(str(path))
    return {t.name: (tuple(int(x) for x in t.shape), gguf.GGMLQuantizationType(t.tensor_type).name, bytes(t.data))
            for t in r.tensors}


def compare(ours: Path, theirs: Path) -> dict:
    a, b = tensor_set(ours), tensor_set(theirs)
    same_set = {n: s for n, (s, _, _) in a.items()} == {n: s for n, (s, _, _) in b.items()}
    common = set(a) & set(b)
    same_type = sum(a[n][1] == b[n][1] for n in common)
    same_bytes = sum(a[n][2] == b[n][2] for n in common)
    return {"identical_tensor_set": same_set, "tensors": len(a), "only_ours": sorted(set(a) - set(b)),
            "only_theirs": sorted(set(b) - set(a)), "same_type": same_type, "byte_identical": same_bytes,
            "size_ours": ours.stat().st_size, "size_theirs": theirs.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M"])
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the .gguf outputs")
    args = ap.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    model_dir = make_checkpoint(CACHE / "llama-3.2-1b-shape")
    out_dir = CACHE / "out"
    out_dir.mkdir(exist_ok=True)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
               "rows": []}
    probe = subprocess.run([PY, "-c", "import json, time; from graphtune.export import _cquants as c; "
                            "t = time.perf_counter(); lib = c.library(); "
                            "print(json.dumps([time.perf_counter() - t, lib is not None, c.unavailable_reason()]))"],
                           capture_output=True, text=True, check=False)
    try:
        secs, ok, why = json.loads(probe.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        secs, ok, why = float("nan"), False, probe.stderr[-500:]
    results["c_quantizers"] = {"ready_s": secs, "available": ok, "why_not": why}
    export_cache = out_dir / "export-cache"
    for qt in args.types:
        row = {"type": qt}
        ours = out_dir / f"graphtune.{qt}.gguf"
        shutil.rmtree(export_cache, ignore_errors=True)
        env = {"GRAPHTUNE_EXPORT_CACHE_DIR": str(export_cache)}
        first_copy = out_dir / f"graphtune.{qt}.first.gguf"
        warm_page_cache(model_dir)
        for run in ("first", "again"):
            row[f"load_before_graphtune_{run}"] = load()
            log_path = out_dir / f"graphtune.{qt}.{run}.log"
            row[f"graphtune_{run}_s"] = timed([PY, "-m", "graphtune.export.cli", str(model_dir), str(ours), "--quant", qt,
                                              "--no-progress", "--json"], log_path, env)
            if run == "first":
                ours.replace(first_copy)
            else:
                row["first_and_again_identical"] = filecmp.cmp(first_copy, ours, shallow=False)
                first_copy.unlink()
            log = log_path.read_text()
            try:
                js = json.loads(log[log.index("{"): log.rindex("}") + 1])
                row[f"graphtune_{run}_breakdown"] = {**js["cli_seconds"], **{f"to_gguf.{k}": v for k, v in js["gguf"]["seconds"].items()}}
            except (ValueError, KeyError):
                pass
        row["graphtune_s"] = row["graphtune_first_s"]
        if not args.skip_baseline:
            llama_cpp_dir = ensure_sdist()
            convert = [PY, str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(model_dir)]
            theirs = out_dir / f"llama.cpp.{qt}.gguf"
            row["load_before_llama_cpp"] = load()
            if qt in ("F32", "F16", "BF16", "Q8_0"):
                row["llama_cpp_s"] = timed(convert + ["--outtype", qt.lower(), "--outfile", str(theirs)],
                                           out_dir / f"convert.{qt}.log")
                row["llama_cpp_steps"] = {"convert_hf_to_gguf": row["llama_cpp_s"]}
            else:
                f16 = out_dir / "llama.cpp.F16.gguf"
                t_conv = timed(convert + ["--outtype", "f16", "--outfile", str(f16)], out_dir / "convert.F16.log")
                t_q = llama_quantize(f16, theirs, qt, out_dir / f"quantize.{qt}.log")
                row["llama_cpp_s"] = t_conv + t_q
                row["llama_cpp_steps"] = {"convert_hf_to_gguf f16": t_conv, "llama_model_quantize": t_q}
                if not args.keep:
                    f16.unlink(missing_ok=True)
            row["load_after"] = load()
            row["ratio_first"] = row["graphtune_first_s"] / row["llama_cpp_s"]
            row["ratio_again"] = row["graphtune_again_s"] / row["llama_cpp_s"]
            row["compare"] = compare(ours, theirs)
            if not args.keep:
                theirs.unlink(missing_ok=True)
        if not args.keep:
            ours.unlink(missing_ok=True)
        results["rows"].append(row)
        print(json.dumps(row, indent=2), flush=True)
    (CACHE / "results.json").write_text(json.dumps(results, indent=2))
    cq = results["c_quantizers"]
    print(f"\nC quantizers: {'available' if cq['available'] else 'UNAVAILABLE (' + str(cq['why_not']) + ')'}, "
          f"ready in {cq['ready_s']:.1f}s (compiled and self-checked on first use, loaded afterwards)")
    print("| type | graphtune first s | graphtune again s | llama.cpp s | ratio first | ratio again | load (1-min avg) "
          "| identical tensor set | same type | byte-identical |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        c = r.get("compare", {})
        loads = "/".join(f"{r[k]:.1f}" for k in ("load_before_graphtune_first", "load_before_graphtune_again",
                                                   "load_before_llama_cpp", "load_after") if k in r)
        print(f"| {r['type']} | {r['graphtune_first_s']:.1f} | {r['graphtune_again_s']:.1f} | "
              f"{r.get('llama_cpp_s', float('nan')):.1f} | {r.get('ratio_first', float('nan')):.2f} | "
              f"{r.get('ratio_again', float('nan')):.2f} | {loads} | {c.get('identical_tensor_set')} | "
              f"{c.get('same_type')}/{c.get('tensors')} | {c.get('byte_identical')}/{c.get('tensors')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
