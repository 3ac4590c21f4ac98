"""Packing benchmark (GPU): padding-free packed batches vs padded batches, training tokens/s.

The data is a fixed sample of example lengths drawn from a log-normal (median 300 tokens, sigma 0.9,
clipped to [16, 4096]). Every mode trains on the *same examples in the same order*, ``--per-step``
examples per optimizer step, and is charged only for real tokens (pad tokens do not count):

* ``padded  hf``        : HF + peft, SDPA, right-padded ``[k, longest]`` + attention_mask (the usual baseline)
* ``padded  graphtune`` : graphtune.optimize, the same padded batches (padding mask -> FlexAttention)
* ``packed  graphtune`` : graphtune.optimize + :class:`graphtune.data.packing.PackingCollator`,
  ``[1, sum of lengths]``, no padding, boundaries as cu_seqlens (-> FlashAttention-2 varlen)

Model: random-init Llama-3.2-1B shape (vocab 128256), bf16, LoRA r=16 alpha=16 on q,k,v,o,gate,up,down,
AdamW on the LoRA parameters, model.train(). Compile/warm-up steps (one pass over ``--warmup``
batches, which includes the longest ones) are not timed. Target: packed >= 1.3x padded (hf).

    python bench/packing.py [--examples 512] [--per-step 4] [--modes padded-hf,padded-graphtune,packed-graphtune]
    python bench/packing.py --model tiny --device cpu --examples 16   # smoke test of the script itself
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import graphtune  # noqa: E402
import graphtune.attention as ga  # noqa: E402
from graphtune.data.packing import PackingCollator  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("padded-hf", "padded-graphtune", "packed-graphtune")


def lengths_sample(n: int, median: int, sigma: float, max_len: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * sigma + math.log(median)
    return [int(v) for v in x.exp().round().clamp(16, max_len)]


def graphtune_passes():
    """The default pipeline, with dispatch_attention added if the installed graphtune lacks it."""
    from graphtune.passes import default_passes

    passes = default_passes()
    if not any(p.name == "dispatch_attention" for p in passes):
        from graphtune.passes.dispatch_attention import DispatchAttention

        passes.append(DispatchAttention())
    return passes


def make_model(kind: str, device: str, dtype: torch.dtype):
    import peft
    import transformers as tf

    if kind == "1b":
        cfg = tf.LlamaConfig(max_position_embeddings=131072, rms_norm_eps=1e-5, use_cache=False, **LLAMA_1B)
        if hasattr(cfg, "rope_parameters"):
            cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    else:
        from graphtune.tiny import tiny_config

        cfg = tiny_config("llama", use_cache=False, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    return model


def batches(examples: list[list[int]], per_step: int, packed: bool, device: str):
    collate = PackingCollator()
    for i in range(0, len(examples), per_step):
        chunk = examples[i:i + per_step]
        if packed:
            b = collate([{"input_ids": ids} for ids in chunk])
        else:
            n = max(len(ids) for ids in chunk)
            ids = torch.zeros(len(chunk), n, dtype=torch.long)
            mask = torch.zeros(len(chunk), n, dtype=torch.long)
            for j, e in enumerate(chunk):
                ids[j, :len(e)] = torch.tensor(e)
                mask[j, :len(e)] = 1
            labels = ids.masked_fill(mask == 0, -100)
            b = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}


def run_mode(mode: str, args, examples: list[list[int]]) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    model = make_model(args.model, device, dtype)
    if mode.endswith("graphtune"):
        ga.enable(model)
        graphtune.optimize(model, passes=graphtune_passes(), compiler=args.compiler)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    packed = mode.startswith("packed")

    def step(batch):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # warm-up: the longest examples first (largest shapes), then a few ordinary batches
    longest = sorted(examples, key=len, reverse=True)[: args.per_step * 2]
    t0 = time.perf_counter()
    for b in batches(longest + examples[: args.per_step * args.warmup], args.per_step, packed, device):
        step(b)
    sync()
    warm_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    slots = 0
    t0 = time.perf_counter()
    for b in batches(examples, args.per_step, packed, device):
        slots += b["input_ids"].numel()
        step(b)
    sync()
    secs = time.perf_counter() - t0
    tokens = sum(len(e) for e in examples)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    report = graphtune.last_report(model) if mode.endswith("graphtune") else None
    attn = ""
    if report is not None:
        d = next((p for p in report.passes if p.name == "dispatch_attention"), None)
        attn = ", ".join(f"{k}={v}" for k, v in sorted(d.by_rewrite.items())) if d else "(no dispatch pass)"
    model = opt = None  # free before the next mode
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(mode=mode, steps=math.ceil(len(examples) / args.per_step), tokens=tokens, slots=slots,
                secs=secs, tok_s=tokens / secs, peak=peak, warm=warm_s, attention=attn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--per-step", type=int, default=4)
    ap.add_argument("--median", type=int, default=300)
    ap.add_argument("--sigma", type=float, default=0.9)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=4, help="ordinary batches after the longest ones")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--model", choices=("1b", "tiny"), default="1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compiler", default="inductor")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or pass --device cpu --model tiny for a smoke test")
    lengths = lengths_sample(args.examples, args.median, args.sigma, args.max_len, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    vocab = LLAMA_1B["vocab_size"] if args.model == "1b" else 256
    examples = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    card = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    srt = sorted(lengths)
    print(f"# {card}; torch {torch.__version__}; model {args.model} LoRA r=16; {args.dtype}; compiler {args.compiler}")
    print(f"# {len(lengths)} examples, {args.per_step}/step; lengths median {srt[len(srt) // 2]}, "
          f"p90 {srt[int(len(srt) * 0.9)]}, max {srt[-1]}; {sum(lengths)} tokens")
    rows = []
    for mode in args.modes.split(","):
        try:
            rows.append(run_mode(mode, args, examples))
        except torch.cuda.OutOfMemoryError as e:  # report and continue with the next mode
            rows.append(dict(mode=mode, error=f"OOM: {str(e).splitlines()[0]}"))
        except Exception as e:  # noqa: BLE001 - a failing mode must not hide the others
            rows.append(dict(mode=mode, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        r = rows[-1]
        if "error" in r:
            print(f"  {mode}: {r['error']}", flush=True)
        else:
            print(f"  {mode}: {r['tok_s']:.0f} tok/s ({r['secs']:.1f}s, warm-up {r['warm']:.0f}s)", flush=True)
    base = next((r["tok_s"] for r in rows if r.get("mode") == "padded-hf" and "tok_s" in r), None)
    print()
    print("| mode | steps | real tokens | token slots (pad incl.) | pad % | time s | real tok/s | vs padded-hf | peak GiB | attention |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | – | – | – | – | – | {r['error']} | – | – | – |")
            continue
        pad = 100 * (1 - r["tokens"] / r["slots"])
        speed = f"{r['tok_s'] / base:.2f}x" if base else "–"
        print(f"| {r['mode']} | {r['steps']} | {r['tokens']} | {r['slots']} | {pad:.1f} | {r['secs']:.1f} | "
              f"{r['tok_s']:.0f} | {speed} | {r['peak']:.2f} | {r['attention']} |")
    print(f"\n{card}")


if __name__ == "__main__":
    main()
