"""Long-context benchmark (GPU): graphtune attention vs SDPA / FlexAttention, and the longest trainable
context of the Llama-3.2-1B LoRA shape.

Part 1 -- attention forward+backward, Llama-3.2-1B heads (32 q / 8 kv, head dim 64), bf16, batch 1,
T = 2k..32k, for four masks:

* ``causal``       plain causal
* ``window``       sliding window 4096 (Mistral, Gemma-2/3 local layers)
* ``documents``    packed documents (log-normal lengths, median 300), boundaries as cu_seqlens
* ``softcap``      Gemma-2: softcap 50 + window 4096 (head dim 64 here, to compare like for like)

``graphtune`` is what the dispatch pass picks for that node (named in the table); the baselines are
SDPA as HF calls it (``is_causal``, or a dense boolean mask for the other masks, as HF's sdpa mask
builder makes one) and FlexAttention compiled with the same block mask. Times are CUDA-event
medians; TFLOP/s counts the visible (q, k) pairs only (4*D flops per pair forward, x3.5 fwd+bwd).

Part 2 -- the longest context one training step fits: random-init Llama-3.2-1B (vocab 128256), bf16,
LoRA r=16 on q,k,v,o,gate,up,down, AdamW, batch 1, T doubling from 4k until out of memory, for
HF + peft (SDPA) and graphtune.optimize (inductor); ``--checkpointing`` turns on HF gradient
checkpointing for both. Reported: tokens/s of the step and peak memory.

    python bench/long_context.py [--part attention|context|both] [--max-t 32768] [--checkpointing]
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import graphtune  # noqa: E402
import graphtune.attention as ga  # noqa: E402
from graphtune.kernels import attention as ka  # noqa: E402

HQ, HKV, D = 32, 8, 64
WINDOW, SOFTCAP = 4096, 50.0
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cuda_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def doc_lengths(T: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    out, total = [], 0
    while total < T:
        n = int(math.exp(torch.randn((), generator=g).item() * 0.9 + math.log(300)))
        n = max(16, min(n, T - total))
        out.append(n)
        total += n
    return out


def visible_pairs(T: int, case: str, docs: list[int]) -> int:
    if case == "causal":
        return T * (T + 1) // 2
    if case in ("window", "softcap"):
        return sum(min(t + 1, WINDOW) for t in range(T))
    return sum(n * (n + 1) // 2 for n in docs)


# ----------------------------------------------------------------------------------------------
# Part 1
# ----------------------------------------------------------------------------------------------
def attention_part(max_t: int) -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    dev = "cuda"
    rows = []
    for case in ("causal", "window", "documents", "softcap"):
        T = 2048
        while T <= max_t:
            docs = doc_lengths(T)
            cu = torch.tensor([0] + [sum(docs[: i + 1]) for i in range(len(docs))], dtype=torch.int32, device=dev)
            seq_ids = ka.document_ids(None, cu, 1, T) if case == "documents" else None
            window = WINDOW if case in ("window", "softcap") else 0
            softcap = SOFTCAP if case == "softcap" else 0.0
            q = torch.randn(1, HQ, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(1, HKV, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(1, HKV, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
            grad = torch.randn(1, T, HQ, D, device=dev, dtype=torch.bfloat16)
            feats = ga.features_of(q, k, v, seq_ids=seq_ids, kv_mask=None, cu_seqlens=cu if seq_ids is not None else None,
                                   causal=True, window=window, softcap=softcap, same_length=True)
            impl, _ = ka.select_implementation(feats)
            flops = visible_pairs(T, case, docs) * HQ * D * 4 * 3.5

            def fwd_bwd(f):
                def run():
                    out = f()
                    torch.autograd.backward(out, grad if out.shape[1] == T else grad.transpose(1, 2))
                    q.grad = k.grad = v.grad = None
                return run

            candidates: dict[str, Callable] = {
                f"graphtune ({impl})": lambda: ga.run_implementation(
                    impl, q, k, v, seq_ids, None, cu if seq_ids is not None else None, D**-0.5, True, window, softcap),
            }

            def mask_mod(b, h, qi, ki):
                m = ki <= qi
                if window:
                    m = m & (qi - ki < window)
                if seq_ids is not None:
                    m = m & (seq_ids[b, qi] == seq_ids[b, ki])
                return m

            block = create_block_mask(mask_mod, 1 if seq_ids is not None else None, None, T, T, device=dev, _compile=True)
            score_mod = (lambda s, b, h, qi, ki: torch.tanh(s / SOFTCAP) * SOFTCAP) if softcap else None
            candidates["flex (compiled)"] = lambda: flex(q, k, v, score_mod=score_mod, block_mask=block, enable_gqa=True)
            if not softcap:  # SDPA cannot softcap
                if case == "causal":
                    candidates["sdpa (is_causal)"] = lambda: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=True, enable_gqa=True)
                else:
                    dense = ka.visible_keys(T, T, causal=True, window=window, seq_ids=seq_ids, device=dev)[:, None]
                    candidates["sdpa (dense bool mask)"] = lambda: torch.nn.functional.scaled_dot_product_attention(
                        q, k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1), attn_mask=dense)
            for name, f in candidates.items():
                try:
                    ms = cuda_ms(fwd_bwd(f))
                    rows.append((case, T, name, f"{ms:.2f}", f"{flops / ms / 1e9:.0f}"))
                except torch.cuda.OutOfMemoryError:
                    rows.append((case, T, name, "OOM", "–"))
                except Exception as e:  # noqa: BLE001 - one failing backend must not hide the rest
                    rows.append((case, T, name, f"{type(e).__name__}", str(e).splitlines()[0][:60] if str(e) else ""))
                gc.collect()
                torch.cuda.empty_cache()
                print(f"  {case:9s} T={T:6d} {rows[-1][2]:28s} {rows[-1][3]} ms", flush=True)
            T *= 2
    print("\n| mask | T | implementation | fwd+bwd ms | TFLOP/s (visible pairs) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


# ----------------------------------------------------------------------------------------------
# Part 2
# ----------------------------------------------------------------------------------------------
def graphtune_passes():
    from graphtune.passes import default_passes

    passes = default_passes()
    if not any(p.name == "dispatch_attention" for p in passes):
        from graphtune.passes.dispatch_attention import DispatchAttention

        passes.append(DispatchAttention())
    return passes


def make_model(checkpointing: bool):
    import peft
    import transformers as tf

    cfg = tf.LlamaConfig(max_position_embeddings=262144, rms_norm_eps=1e-5, use_cache=False, **LLAMA_1B)
    if hasattr(cfg, "rope_parameters"):
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    return model


def context_part(max_t: int, checkpointing: bool, compiler: str) -> None:
    rows = []
    for mode in ("hf+peft (sdpa)", "graphtune"):
        model = make_model(checkpointing)
        if mode == "graphtune":
            ga.enable(model)
            graphtune.optimize(model, passes=graphtune_passes(), compiler=compiler)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        T = 4096
        while T <= max_t:
            ids = torch.randint(0, LLAMA_1B["vocab_size"], (1, T), device="cuda")
            batch = {"input_ids": ids, "labels": ids.clone()}

            def step():
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                step()  # compile / warm-up
                torch.cuda.synchronize()
                warm = time.perf_counter() - t0
                ms = cuda_ms(step, warmup=0, iters=3)
                peak = torch.cuda.max_memory_allocated() / 2**30
                rows.append((mode, T, f"{T / ms * 1e3:.0f}", f"{peak:.2f}", f"{warm:.0f}"))
            except torch.cuda.OutOfMemoryError:
                rows.append((mode, T, "OOM", "–", "–"))
            except Exception as e:  # noqa: BLE001
                rows.append((mode, T, f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}", "–", "–"))
            opt.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            print(f"  {mode:16s} T={T:6d} {rows[-1][2]} tok/s, peak {rows[-1][3]} GiB", flush=True)
            if rows[-1][3] == "–":
                break
            T *= 2
        if mode == "graphtune" and graphtune.last_report(model) is not None:
            print(graphtune.last_report(model).summary())
        model = opt = None  # free before the next mode
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\n| mode | T | tok/s | peak GiB | first step s |   (gradient checkpointing: {checkpointing})")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    for mode in ("hf+peft (sdpa)", "graphtune"):
        fits = [r[1] for r in rows if r[0] == mode and r[3] != "–"]
        print(f"longest trainable context, {mode}: {max(fits) if fits else 'none'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("attention", "context", "both"), default="both")
    ap.add_argument("--max-t", type=int, default=32768, help="largest T for the attention part")
    ap.add_argument("--max-context", type=int, default=262144, help="largest T tried for the training step")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--compiler", default="inductor")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("long_context.py needs a CUDA device (run it on the GPU machine)")
    card = torch.cuda.get_device_name()
    print(f"# {card}; torch {torch.__version__}; bf16")
    if args.part in ("attention", "both"):
        attention_part(args.max_t)
    if args.part in ("context", "both"):
        context_part(args.max_context, args.checkpointing, args.compiler)
    print(f"\n{card}")


if __name__ == "__main__":
    main()
