"""Kernel profile of one LoRA training step (forward + backward + AdamW) for one bench/peers.py config.

Builds the model exactly as ``bench/peers.py`` does for the config (``peers.load_hf`` / ``peers.load_unsloth``:
same random-init model directory, LoRA config, train mode, HF checkpointing for the peers, ``torch.compile``
for F, ``graphtune.optimize`` for G/GC), runs ``--warm`` warm-up steps (compilation happens there), times
``--steps`` steps with CUDA events, measures where memory goes in one more step (static weights + adapters +
optimizer state, what the forward leaves saved for the backward, the forward and backward peaks), then runs
``torch.profiler`` with CUDA activity over ``--steps`` steps and prints:

* GPU-busy time per step (sum of kernel + memcpy/memset durations / steps) next to the wall time per step
  (the difference is launch gaps / host overhead);
* the top ``--top`` kernels by total CUDA time, with their share, calls and category;
* a grouping into categories: GEMM (cutlass / cublas / nvjet / sm90 / inductor matmul templates), attention
  (flash / cudnn / efficient / flex), triton (inductor ``triton_poi/red/per_*`` fused kernels and graphtune's
  own ``_*_kernel`` kernels, listed by name), elementwise/copy/cast, reductions, optimizer/foreach, other.

    python bench/profile_step.py G /tmp/bench_llama_1b 2x2048
    python bench/profile_step.py F /tmp/bench_llama_1b 2x2048 --warm 4 --steps 3 --top 25
    python bench/profile_step.py A /tmp/x 1x64 --cpu-smoke      # tiny random Llama on the CPU: checks the logic

``--cpu-smoke`` writes a 2-layer random Llama to the given directory, loads it on the CPU (the same
``load_hf`` path with ``device_map="cpu"``) and profiles CPU activity instead; its numbers mean
nothing, it only exercises the code paths. ``--json FILE`` also writes the summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

CATEGORIES = ["GEMM", "attention", "triton", "elementwise/copy/cast", "reduction", "optimizer/foreach", "other"]


def categorize(name: str) -> str:
    """One category per kernel name (order of the tests matters: the first match wins)."""
    n = name.lower()
    if re.search(r"flash|fmha|cudnn.*(attn|attention|sdpa)|efficient_attention|mem_eff|attention|_attn|sdpa|flex", n):
        return "attention"
    if n.startswith("triton_tem_") and re.search(r"mm|bmm|addmm", n):
        return "GEMM"  # inductor's triton matmul templates
    if re.search(r"gemm|cutlass|cublas|nvjet|sm90_|sm80_|xmma|wgmma|gemv|matmul|splitk|cijk|ampere_.*(bf16|fp16|s16816)|sgemm", n):
        return "GEMM"
    if re.search(r"multi_tensor|foreach|adam|fused_adam", n):
        return "optimizer/foreach"
    if n.startswith("triton_") or is_graphtune_kernel(name):
        return "triton"
    if re.search(r"reduce|softmax|norm|cross_entropy|nll_loss|logsumexp|argmax|sum_kernel|mean|welford|cumsum|scan", n):
        return "reduction"
    if re.search(r"elementwise|vectorized|unrolled|copy|memcpy|memset|cast|fill|cat_|catarray|index|gather|scatter|"
                 r"where|clamp|pointwise|embedding|arange|bfloat16_copy|to_copy|direct_copy", n):
        return "elementwise/copy/cast"
    return "other"


def is_graphtune_kernel(name: str) -> bool:
    """graphtune's own Triton kernels are module-level ``_<op>_kernel`` functions (``_rms_norm_fwd_kernel``, ...)."""
    return bool(re.fullmatch(r"_[a-z0-9_]+_kernel", name))


def triton_kind(name: str) -> str:
    if is_graphtune_kernel(name):
        return "graphtune"
    m = re.match(r"triton_(poi|red|per|tem)_", name)
    return {"poi": "inductor pointwise", "red": "inductor reduction", "per": "inductor persistent reduction",
            "tem": "inductor template"}.get(m.group(1), "triton") if m else "triton (other)"


def device_events(prof, want_cuda: bool) -> list[tuple[str, float]]:
    """(name, duration µs) of every device-side activity (kernels, memcpy, memset) the profiler saw."""
    from torch.autograd import DeviceType

    out = []
    kr = getattr(prof.profiler, "kineto_results", None)
    if kr is not None:
        for e in kr.events():
            dt = e.device_type()
            if (dt == DeviceType.CUDA) if want_cuda else (dt == DeviceType.CPU):
                dur = e.duration_ns() / 1000.0 if hasattr(e, "duration_ns") else float(e.duration_us())
                out.append((e.name(), dur))
    if not out:  # fall back to the parsed FunctionEvents
        for e in prof.events():
            if (e.device_type == DeviceType.CUDA) if want_cuda else (e.device_type == DeviceType.CPU):
                out.append((e.name, float(e.time_range.elapsed_us())))
    return out


def summarize(events: list[tuple[str, float]], steps: int, top: int) -> dict:
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, dur in events:
        by_name[name][0] += dur
        by_name[name][1] += 1
    total = sum(v[0] for v in by_name.values()) or 1.0
    cats: dict[str, float] = defaultdict(float)
    cat_n: dict[str, int] = defaultdict(int)
    for name, (dur, n) in by_name.items():
        c = categorize(name)
        cats[c] += dur
        cat_n[c] += n
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    triton = [(k, v) for k, v in ranked if categorize(k) == "triton"]
    tkinds: dict[str, float] = defaultdict(float)
    for k, v in triton:
        tkinds[triton_kind(k)] += v[0]
    return dict(
        busy_ms_per_step=total / steps / 1000.0,
        n_kernels_per_step=sum(v[1] for v in by_name.values()) / steps,
        n_distinct=len(by_name),
        categories={c: dict(ms_per_step=cats.get(c, 0.0) / steps / 1000.0, share=cats.get(c, 0.0) / total,
                            launches_per_step=cat_n.get(c, 0) / steps) for c in CATEGORIES},
        top=[dict(name=k, ms_per_step=v[0] / steps / 1000.0, share=v[0] / total, calls_per_step=v[1] / steps,
                  category=categorize(k)) for k, v in ranked[:top]],
        triton_kinds={k: dict(ms_per_step=v / steps / 1000.0, share=v / total) for k, v in tkinds.items()},
        triton_top=[dict(name=k, ms_per_step=v[0] / steps / 1000.0, share=v[0] / total, calls_per_step=v[1] / steps)
                    for k, v in triton[:30]],
        graphtune_kernels=sorted({k for k, _ in triton if is_graphtune_kernel(k)}),
    )


def print_summary(s: dict, label: str) -> None:
    print(f"\n==== {label}")
    print(f"wall ms/step {s.get('wall_ms_per_step', float('nan')):.2f} | GPU-busy ms/step {s['busy_ms_per_step']:.2f} "
          f"| device activities/step {s['n_kernels_per_step']:.0f} ({s['n_distinct']} distinct)")
    if "mem" in s:
        print("memory GiB: " + ", ".join(f"{k}={v:.3f}" for k, v in s["mem"].items()))
    print("\ncategory | ms/step | share | launches/step")
    for c, v in s["categories"].items():
        print(f"{c} | {v['ms_per_step']:.2f} | {100 * v['share']:.1f}% | {v['launches_per_step']:.0f}")
    print("\ntriton by kind: " + ", ".join(f"{k} {v['ms_per_step']:.2f} ms ({100 * v['share']:.1f}%)"
                                          for k, v in sorted(s["triton_kinds"].items(), key=lambda kv: -kv[1]['share'])))
    print("graphtune kernels seen: " + (", ".join(s["graphtune_kernels"]) or "none"))
    print(f"\ntop {len(s['top'])} kernels | ms/step | share | calls/step | category")
    for i, k in enumerate(s["top"], 1):
        print(f"{i:2d}. {k['name'][:150]} | {k['ms_per_step']:.3f} | {100 * k['share']:.1f}% | {k['calls_per_step']:.0f} | {k['category']}")
    print("\ntriton kernels (top 30) | ms/step | share | calls/step")
    for k in s["triton_top"]:
        print(f"  {k['name'][:150]} | {k['ms_per_step']:.3f} | {100 * k['share']:.1f}% | {k['calls_per_step']:.0f}")


def make_tiny(d: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(d, "config.json")):
        return
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=256, use_cache=False, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cfg")
    ap.add_argument("model_dir")
    ap.add_argument("shape", help="BxT, e.g. 2x2048")
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    b, t = (int(v) for v in a.shape.split("x"))

    if a.cfg in peers.GRAPHTUNE:
        sys.path.insert(0, str(peers.ROOT))
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = not a.cpu_smoke
    if a.cpu_smoke:
        make_tiny(a.model_dir)
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    t0 = time.time()
    if a.cfg in peers.UNSLOTH:
        model, step, info = peers.load_unsloth(a.cfg, a.model_dir, t)
    else:
        model, step, info = peers.load_hf(a.cfg, a.model_dir, device_map="cpu" if a.cpu_smoke else None)
    print(f"loaded {a.cfg} in {time.time() - t0:.1f}s: {info}", flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device=dev).manual_seed(1234)
    vocab = model.config.vocab_size
    x = torch.randint(0, min(vocab, 128000), (b, t), device=dev, generator=gen)

    def one_step():
        loss = step(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    tw = time.time()
    losses = [one_step() for _ in range(a.warm)]
    sync()
    print(f"warm-up {a.warm} steps: {time.time() - tw:.1f}s, losses {[round(float(v), 4) for v in losses]}", flush=True)

    # wall time per step, no profiler
    if cuda:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(a.steps):
            one_step()
        e1.record()
        sync()
        wall_ms = e0.elapsed_time(e1) / a.steps
    else:
        tw = time.time()
        for _ in range(a.steps):
            one_step()
        wall_ms = (time.time() - tw) * 1000 / a.steps

    # where memory goes, one step
    mem = {}
    if cuda:
        G = 2**30
        sync()
        torch.cuda.reset_peak_memory_stats()
        m0 = torch.cuda.memory_allocated()
        mem["static"] = m0 / G  # weights + adapters + AdamW state (grads freed by zero_grad(set_to_none))
        loss = step(input_ids=x, labels=x).loss
        sync()
        mem["after_fwd_held"] = (torch.cuda.memory_allocated() - m0) / G  # saved for backward + loss/logits kept
        mem["fwd_peak_above_static"] = (torch.cuda.max_memory_allocated() - m0) / G
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        sync()
        mem["bwd_peak_above_static"] = (torch.cuda.max_memory_allocated() - m0) / G
        mem["after_bwd_held"] = (torch.cuda.memory_allocated() - m0) / G  # LoRA grads
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
        sync()
        mem["peak_total"] = (m0 / G) + max(mem["fwd_peak_above_static"], mem["bwd_peak_above_static"])
        print("memory GiB: " + ", ".join(f"{k}={v:.3f}" for k, v in mem.items()), flush=True)

    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(a.steps):
            one_step()
        sync()
    evs = device_events(prof, want_cuda=cuda)
    s = summarize(evs, a.steps, a.top)
    s.update(cfg=a.cfg, B=b, L=t, wall_ms_per_step=wall_ms, tok_s=b * t / (wall_ms / 1000), mem=mem, info=info,
             device=torch.cuda.get_device_name() if cuda else "cpu")
    if a.cfg in peers.GRAPHTUNE:
        import graphtune

        rep = graphtune.last_report(model)
        s["passes"] = {r.name: r.count for r in rep.passes} if rep is not None else None
        print(f"graphtune passes: {s['passes']}")
    print_summary(s, f"{a.cfg} {b}x{t} on {s['device']} ({s['tok_s']:.0f} tok/s unprofiled)")
    print("PROFILE " + json.dumps(dict(cfg=a.cfg, B=b, L=t, wall_ms_per_step=round(wall_ms, 2),
                                       busy_ms_per_step=round(s["busy_ms_per_step"], 2),
                                       categories={c: round(v["share"], 4) for c, v in s["categories"].items()},
                                       mem={k: round(v, 3) for k, v in mem.items()})), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1, default=str))


if __name__ == "__main__":
    main()
