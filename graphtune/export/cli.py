"""``graphtune export``: an HF checkpoint folder (optionally + a peft adapter) -> GGUF, LoRA-adapter
GGUF, merged safetensors, Ollama Modelfile.

    graphtune export ./my-model model.Q4_K_M.gguf --quant Q4_K_M --modelfile
    graphtune export ./base model.gguf --adapter ./lora --lora-gguf lora.gguf --merged ./merged

Without ``--adapter`` the model is never materialized: its graph is captured on a skeleton on the
meta device and each tensor is read from the safetensors files when it is written. The graph
analysis and the vocabulary are cached per checkpoint and code version (``graphtune.export.cache``;
``--no-cache``), so exporting the same checkpoint again skips the capture and the tokenizer.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphtune export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF checkpoint folder (config.json + *.safetensors [+ tokenizer])")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--quant", "-q", default="Q8_0",
                   help="F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q6_K, Q5_K_S, Q5_K_M, Q4_K_S, Q4_K_M (default Q8_0)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--adapter", help="peft LoRA adapter folder to load on top of the model")
    p.add_argument("--no-merge", action="store_true", help="write the base weights, not base + LoRA")
    p.add_argument("--lora-gguf", help="also write the adapter as a llama.cpp LoRA GGUF to this path")
    p.add_argument("--merged", help="also save the merged model as HF safetensors to this folder")
    p.add_argument("--modelfile", action="store_true", help="also write an Ollama Modelfile next to the GGUF")
    p.add_argument("--name", help="general.name (default: the model folder name)")
    p.add_argument("--capture-layers", default="2", help="decoder layers to trace (default 2; 'all')")
    p.add_argument("--device", help="quantize on this torch device (e.g. cuda)")
    p.add_argument("--no-cache", action="store_true",
                   help="do not use or fill the export cache (graph analysis, vocabulary; see graphtune.export.cache)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from graphtune.export import recipes
    except ImportError as e:  # pragma: no cover - depends on the gguf extra
        print(f"graphtune export needs the 'gguf' extra: pip install 'graphtune[gguf]' ({e})", file=sys.stderr)
        return 2
    from graphtune.errors import GraphtuneError  # not graphtune.export.families: that imports torch

    try:
        recipes.file_type(args.quant)
    except ValueError as e:
        print(f"graphtune export: {e}", file=sys.stderr)
        return 2
    layers = None if args.capture_layers == "all" else int(args.capture_layers)
    pre = None
    if not (args.adapter or args.merged or args.lora_gguf) and args.device in (None, "cpu") and Path(args.model).is_dir():
        # before torch and transformers are imported: the quantization and the disk work on the
        # other core while this one imports and captures (see graphtune.export.prequant)
        from graphtune.export import prequant

        pre = prequant.start_for(args.model, args.quant, args.out)
    try:
        return _run(args, layers, pre)
    except (GraphtuneError, FileNotFoundError, OSError, ValueError) as e:  # ExportError is a GraphtuneError
        print(f"graphtune export: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if pre is not None:
            pre.close()


def _run(args: argparse.Namespace, layers: int | None, prequantizer=None) -> int:
    t0 = time.perf_counter()
    import torch

    from graphtune.export import cache, save_merged, to_gguf, to_gguf_adapter, write_modelfile
    from graphtune.export.families import ExportError
    from graphtune.export.merge import SafetensorsSource

    phases = {"imports": time.perf_counter() - t0}
    model_dir = Path(args.model)
    tok_dir = args.tokenizer or args.model
    progress = not args.no_progress
    use_cache = cache.enabled() and not args.no_cache
    needs_weights = bool(args.adapter or args.merged or args.lora_gguf)
    tokenizer = None

    def load_tokenizer():
        nonlocal tokenizer
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        return tokenizer

    name = args.name or model_dir.resolve().name
    lowering = model = source = None
    t = time.perf_counter()
    if needs_weights:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
        if args.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, args.adapter)
    else:
        # the model is never materialized: roles from the graph of a meta-device skeleton (or from
        # the cache of an earlier export of this checkpoint), tensors streamed from safetensors
        from graphtune.export.gguf import Lowering

        source = SafetensorsSource(model_dir, prequantizer=prequantizer)
        key = (cache.lowering_key(model_dir, source.signature(), layers)
               if use_cache and (model_dir / "config.json").is_file() else None)
        entry = cache.load("lowering", key) if key else None
        if entry is not None:
            try:  # replayed from the cache: transformers is not even imported
                lowering = Lowering.from_cache(entry, None, source)
            except (KeyError, TypeError, ValueError, ExportError) as e:
                logging.getLogger("graphtune.export").info("export cache entry not replayable (%s); reading the config", e)
        if lowering is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(args.model)
            if entry is not None:
                lowering = Lowering.from_cache(entry, config, source)
            else:
                from transformers import AutoModelForCausalLM

                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(config)
                lowering = Lowering(model, merge_lora=not args.no_merge, capture_layers=layers, source=source)
                if key:
                    _store(cache, "lowering", key, lowering.to_cache)
    phases["model"] = time.perf_counter() - t

    t = time.perf_counter()
    vocab = None
    if lowering is not None and use_cache and Path(tok_dir).is_dir():
        from graphtune.export.tokenizer import build_vocab

        n_vocab = lowering.spec.n_vocab
        vkey = cache.vocab_key(tok_dir, n_vocab)
        entry = cache.load("vocab", vkey)
        if entry is not None:
            vocab = cache.vocab_from_json(entry["vocab"])
        else:
            vocab = build_vocab(load_tokenizer(), n_vocab)
            _store(cache, "vocab", vkey, lambda: {"vocab": cache.vocab_to_json(vocab)})
    phases["tokenizer"] = time.perf_counter() - t
    _resume_gc()

    summary = to_gguf(model, vocab if vocab is not None else load_tokenizer(), args.out, quant=args.quant,
                      merge_lora=not args.no_merge, name=name, progress=progress, capture_layers=layers,
                      device=args.device, source=source, lowering=lowering)
    results = {"gguf": summary}
    if args.lora_gguf:
        results["lora_gguf"] = to_gguf_adapter(model, args.lora_gguf, progress=progress, capture_layers=layers, name=name)
    if args.merged:
        save_merged(model, args.merged, load_tokenizer(), progress=progress)
    if args.modelfile:
        out = Path(args.out)
        mf = write_modelfile(out.parent / "Modelfile", load_tokenizer(), f"./{out.name}")
        print(f"wrote {mf}")
    phases["total"] = time.perf_counter() - t0
    if args.json:
        js = {k: _as_json(v) for k, v in results.items()}
        js["cli_seconds"] = phases
        print(json.dumps(js, indent=2))
    else:
        for v in results.values():
            print(v.summary())
    print(f"graphtune export: done in {time.perf_counter() - t0:.1f}s")
    return 0


def _store(cache, kind: str, key: str, make) -> None:
    """Fill the export cache; an entry that cannot be made only costs the next export its speed."""
    try:
        cache.store(kind, key, make())
    except Exception as e:  # noqa: BLE001 - the export itself has succeeded or will
        logging.getLogger("graphtune.export").info("export cache: %s entry not stored (%s)", kind, e)


def _as_json(summary) -> dict:
    return {
        "path": str(summary.path), "kind": summary.kind, "family": summary.family, "arch": summary.arch,
        "file_type": summary.file_type, "bytes": summary.nbytes, "types": summary.types(),
        "fallbacks": summary.fallbacks, "notes": summary.notes, "checks": summary.checks, "vocab": summary.vocab,
        "seconds": summary.seconds,
        "tensors": [{"name": t.name, "shape": list(t.shape), "type": t.type, "reason": t.reason} for t in summary.tensors],
    }


_gc_deferred = False


def _resume_gc() -> None:
    """After the graph analysis and the vocabulary: what they left in memory is frozen (never scanned
    again) and the collector runs again for the write. Only where :func:`run_and_exit` turned it off."""
    global _gc_deferred
    if _gc_deferred:
        _gc_deferred = False
        gc.freeze()
        gc.enable()


def run_and_exit(argv: list[str] | None = None) -> None:
    """``main`` as the whole process (``graphtune export``, ``python -m graphtune.export.cli``).

    The cyclic garbage collector is off until the graph has been analysed: imports, the transformers
    skeleton and dynamo's capture allocate millions of long-lived objects, and the collections they
    trigger took ~2.5 s of a first export; the objects are then frozen and collection resumes
    (:func:`_resume_gc`). At the end the process leaves without the interpreter's teardown of torch,
    triton, sympy and friends (seconds of module clean-up at exit; the GGUF is already fsynced and
    renamed by then)."""
    global _gc_deferred
    if gc.isenabled():
        gc.disable()
        _gc_deferred = True
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(int(rc or 0))


if __name__ == "__main__":
    run_and_exit()
