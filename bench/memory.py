"""Activation-memory benchmark (GPU): peak memory and tokens/s of a LoRA training step per memory budget.

Model: random-init Llama-3.2-1B shape (16 layers, hidden 2048, MLP 8192, vocab 128256), bf16, LoRA
r=16 on q,k,v,o,gate,up,down, AdamW, batch 2 x 2048 tokens. Settings:

* ``hf``            HF + peft eager (SDPA), nothing saved differently: the eager reference
* ``hf-ckpt``       HF + peft with ``gradient_checkpointing_enable(use_reentrant=False)``
* ``none``          graphtune.optimize(memory_budget=None): what the AOT partitioner keeps
* ``auto``          graphtune's default (0.9 of the free device memory: keeps everything while it fits)
* ``6GiB`` ``4GiB`` ``2GiB`` (any size)  graphtune with that activation budget
* ``50%`` (any percentage)  that fraction of the device memory free at compile time
* ``0%``            graphtune's smallest plan (the policy decides whether offloading pays)
* ``offload``       every layer recomputed, every layer input in pinned host memory (unsloth's
                    offloaded gradient checkpointing, with async copies and prefetch)
* ``checkpoint``    every layer recomputed from its input (what HF checkpointing does)
* ``hf-ckpt+gt``    HF checkpointing enabled on the model, then graphtune.optimize: graphtune turns it
                    off inside the captured call and recomputes the same layers itself
* ``aot-50%``       graphtune with no budget but ``torch._functorch.config.activation_memory_budget=0.5``
                    (the AOT partitioner's own knapsack recompute budget), the reference to beat

Reported per setting: peak memory of a step (max_memory_allocated) and its part above the memory
held before the step (weights + optimizer state), tokens/s (median of ``--steps`` steps after one
warm-up/compile step), the first step's wall time (compile), the step-0 loss (the same data and
weights in every setting, so the losses agree to bf16 noise) and graphtune's plan.

    python bench/memory.py [--settings hf,none,auto,4GiB,2GiB,offload] [--batch 2] [--seq 2048] [--steps 5]

Each graphtune setting compiles the 1B graph with inductor (a minute or two); pass a subset with
``--settings`` to stay within a time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import graphtune  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL = ("hf", "hf-ckpt", "none", "auto", "6GiB", "4GiB", "2GiB", "50%", "0%", "offload", "checkpoint", "hf-ckpt+gt", "aot-50%")
DEFAULT = ("hf", "hf-ckpt", "none", "auto", "6GiB", "4GiB", "2GiB", "offload")


def make_model():
    import peft
    import transformers as tf

    cfg = tf.LlamaConfig(max_position_embeddings=8192, rms_norm_eps=1e-5, use_cache=False, **LLAMA_1B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    return model


def set_hf_checkpointing(model, on: bool) -> None:
    base = model.get_base_model()
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def run_setting(model, lora_state, setting: str, batch: dict, steps: int, compiler: str) -> dict:
    graphtune.restore(model)
    torch._dynamo.reset()
    model.load_state_dict(lora_state, strict=False)  # same starting weights for every setting
    set_hf_checkpointing(model, setting in ("hf-ckpt", "hf-ckpt+gt"))
    patch = contextlib.nullcontext()
    if setting not in ("hf", "hf-ckpt"):
        budget = None
        if setting.endswith(("%", "iB")) and not setting.startswith("aot"):
            budget = setting
        elif setting in ("offload", "checkpoint", "auto"):
            budget = setting
        elif setting == "aot-50%":
            patch = torch._functorch.config.patch(activation_memory_budget=0.5)
        graphtune.optimize(model, compiler=compiler, memory_budget=budget)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens = batch["input_ids"].numel()
    losses = []

    def step():
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with patch:
        losses.append(step().item())  # compile + warm-up; the optimizer state is created here
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated()
    ms = statistics.median(times)
    plan = ""
    fwd = model.__dict__.get("forward")
    if fwd is not None and getattr(fwd, "memory", None) is not None and fwd.memory.last is not None:
        d = fwd.memory.last
        plan = f"{d.plan}; est. peak {d.estimate.peak / 2**30:.2f} GiB (default {d.default_estimate.peak / 2**30:.2f})"
    elif fwd is not None:
        plan = "partitioner default" + (" (activation_memory_budget=0.5)" if setting == "aot-50%" else "")
    return dict(setting=setting, peak=peak / 2**30, act=(peak - held) / 2**30, tok_s=tokens / ms * 1e3,
                first=first, loss=losses[0], plan=plan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(DEFAULT), help=f"comma-separated subset of: {', '.join(ALL)}")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compiler", default="inductor")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("memory.py needs a CUDA device (run it on the GPU machine)")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in ALL and not s.endswith(("%", "iB"))]
    if unknown:
        sys.exit(f"unknown settings {unknown}; known: {', '.join(ALL)}")
    card = torch.cuda.get_device_name()
    print(f"# {card}; torch {torch.__version__}; Llama-3.2-1B shape, LoRA r=16, bf16, batch {args.batch} x {args.seq}")
    model = make_model()
    lora_state = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, LLAMA_1B["vocab_size"], (args.batch, args.seq), generator=g).cuda()
    batch = {"input_ids": ids, "labels": ids.clone()}
    rows = []
    for s in settings:
        try:
            r = run_setting(model, lora_state, s, batch, args.steps, args.compiler)
        except torch.cuda.OutOfMemoryError:
            r = dict(setting=s, error="OOM")
        except Exception as e:  # noqa: BLE001 - one failing setting must not hide the rest
            r = dict(setting=s, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
        rows.append(r)
        if "error" in r:
            print(f"  {s:11s} {r['error']}", flush=True)
        else:
            print(f"  {s:11s} peak {r['peak']:6.2f} GiB (step {r['act']:5.2f}) {r['tok_s']:8.0f} tok/s "
                  f"first {r['first']:5.0f} s loss {r['loss']:.4f}  {r['plan']}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    print("\n| setting | peak GiB | above weights+optimizer GiB | tok/s | first step s | step-0 loss | plan |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['setting']} | {r['error']} | | | | | |")
        else:
            print(f"| {r['setting']} | {r['peak']:.2f} | {r['act']:.2f} | {r['tok_s']:.0f} | {r['first']:.0f} | {r['loss']:.4f} | {r['plan']} |")
    print(f"\n{card}")


if __name__ == "__main__":
    main()
