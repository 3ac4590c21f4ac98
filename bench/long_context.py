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

Part 2 -- the longest context one training step fits, for one ``bench/peers.py`` config per process
(same model shapes, LoRA config and peer settings): ``G`` graphtune (memory budget from
``GRAPHTUNE_MEMORY_BUDGET``, e.g. ``offload``), ``A`` HF+peft with gradient checkpointing, ``C``
unsloth (1B LoRA); ``Q``, ``D``, ``E`` the same for the 8B NF4 QLoRA shape. Batch 1, T doubling from
``--start`` until the step fails, then two bisection steps. ``--cap-gib 79`` caps the process's CUDA
memory so an H200 answers for an H100 80GB. Reported: tokens/s of the step and peak memory.

    python bench/long_context.py --part attention [--max-t 32768]
    GRAPHTUNE_MEMORY_BUDGET=offload python bench/long_context.py --part context --config G --size 1b --cap-gib 79
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

import graphtune.attention as ga  # noqa: E402
from graphtune.kernels import attention as ka  # noqa: E402

HQ, HKV, D = 32, 8, 64
WINDOW, SOFTCAP = 4096, 50.0


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
def context_part(cfg: str, size: str, start: int, max_t: int, cap_gib: float | None) -> None:
    """Longest context one training step fits for one ``bench/peers.py`` config, in this process.

    The model, LoRA config and peers' settings are exactly those of ``bench/peers.py`` (``G``/``Q`` are
    graphtune with ``GRAPHTUNE_MEMORY_BUDGET``, ``A``/``D`` HF+peft with gradient checkpointing, ``C``/``E``
    unsloth with its offloaded checkpointing). T doubles from ``start``; after the first failure two
    bisection steps (multiples of 4096) narrow the limit. ``cap_gib`` caps this process's CUDA memory
    (``set_per_process_memory_fraction``) so a larger card answers for a smaller one (79 GiB = H100 80GB).
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers

    peers.prepare(size)
    total = torch.cuda.get_device_properties(0).total_memory
    if cap_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))
    d = peers.model_dir(size)
    model, step_fn, info = peers.load_unsloth(cfg, d, max_t) if cfg in peers.UNSLOTH else peers.load_hf(cfg, d)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    print(f"# {cfg} {size}: {info}; memory cap {cap_gib or total / 2**30:.1f} GiB", flush=True)

    def attempt(T: int) -> tuple[bool, str]:
        ids = torch.randint(0, 128000, (1, T), device="cuda")
        try:
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step_fn(input_ids=ids, labels=ids).loss.backward()  # compile / warm-up
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            warm = time.perf_counter() - t0

            def one():
                step_fn(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            ms = cuda_ms(one, warmup=0, iters=2)
            peak = torch.cuda.max_memory_allocated() / 2**30
            return True, f"{T / ms * 1e3:.0f} tok/s, peak {peak:.2f} GiB, first step {warm:.0f} s"
        except torch.cuda.OutOfMemoryError:
            return False, "OOM"
        except Exception as e:  # noqa: BLE001 - a failure (often an OOM wrapped by a compiler) ends the search
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            return False, f"{type(e).__name__}: {first}"
        finally:
            opt.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()

    ok, bad, T = 0, None, start
    while T <= max_t:
        fit, msg = attempt(T)
        print(f"CONTEXT {cfg} {size} T={T} {'fits' if fit else 'fails'}: {msg}", flush=True)
        if not fit:
            bad = T
            break
        ok, T = T, T * 2
    for _ in range(2):
        if bad is None or bad - ok <= 4096:
            break
        mid = (ok + bad) // 2 // 4096 * 4096
        fit, msg = attempt(mid)
        print(f"CONTEXT {cfg} {size} T={mid} {'fits' if fit else 'fails'}: {msg}", flush=True)
        ok, bad = (mid, bad) if fit else (ok, mid)
    print(f"LONGEST {cfg} {size} {ok} (first failure {bad}; cap {cap_gib} GiB; {torch.cuda.get_device_name()})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("attention", "context", "both"), default="both")
    ap.add_argument("--max-t", type=int, default=32768, help="largest T for the attention part")
    ap.add_argument("--config", default="G", help="bench/peers.py config for the context part: G/A/C (1b), Q/D/E (8b)")
    ap.add_argument("--size", choices=("1b", "8b"), default="1b")
    ap.add_argument("--start", type=int, default=16384, help="first T tried for the training step")
    ap.add_argument("--max-context", type=int, default=524288, help="largest T tried for the training step")
    ap.add_argument("--cap-gib", type=float, default=None, help="cap CUDA memory (79 = an H100 80GB on a larger card)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("long_context.py needs a CUDA device (run it on the GPU machine)")
    card = torch.cuda.get_device_name()
    print(f"# {card}; torch {torch.__version__}; bf16")
    if args.part in ("attention", "both"):
        attention_part(args.max_t)
    if args.part in ("context", "both"):
        context_part(args.config, args.size, args.start, args.max_context, args.cap_gib)
    print(f"\n{card}")


if __name__ == "__main__":
    main()
