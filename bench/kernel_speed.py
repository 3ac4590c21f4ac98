"""Kernel benchmark (GPU): forward+backward time of each graphtune kernel vs eager PyTorch and torch.compile.

Llama-3-8B sizes by default: 8192 tokens, hidden 4096, 32 q heads / 8 kv heads of 128, ffn 14336, bf16.
Achieved bandwidth = the minimum bytes each op must move (forward + backward) / measured time,
reported against the device-to-device copy bandwidth measured in the same run (target: >= 80%).
The norm weight is frozen (the LoRA setting: no dW); ``--norm-weight-grad`` measures dW too.

    python bench/kernel_speed.py [--tokens 8192] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import graphtune.kernels  # noqa: E402,F401  (registers torch.ops.graphtune.*)


def cuda_time_ms(fn: Callable[[], object], warmup: int = 5, iters: int = 25) -> float:
    """Median wall time of ``fn`` on the GPU, measured with CUDA events, L2 flushed before each run."""
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_ms(fn: Callable[[], object]) -> float:
    """Device time of ``fn`` replayed from a CUDA graph: host/dispatch overhead excluded, as it is
    when a training step's GPU queue runs ahead of Python."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time_ms(graph.replay)


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_time_ms(lambda: y.copy_(x))
    return 2 * nbytes / (ms * 1e-3) / 1e9


# -- references (HF math) ---------------------------------------------------------------------------
def ref_rms_norm(x, w, eps=1e-5):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def ref_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def ref_swiglu(g, u):
    return F.silu(g) * u


def ref_geglu(g, u):
    return F.gelu(g, approximate="tanh") * u


def gt_rms_norm(x, w, eps=1e-5):
    return torch.ops.graphtune.rms_norm(x, w, eps, 0.0, True)


def gt_rope(q, k, cos, sin):
    return torch.ops.graphtune.rope(q, k, cos, sin)


def gt_swiglu(g, u):
    return torch.ops.graphtune.swiglu(g, u)


def gt_geglu(g, u):
    return torch.ops.graphtune.geglu(g, u)


def make_cases(tokens: int, hidden: int, ffn: int, heads: int, kv_heads: int, head_dim: int, dtype, norm_weight_grad: bool):
    dev = "cuda"
    el = torch.empty((), dtype=dtype).element_size()
    cases = []

    x = torch.randn(1, tokens, hidden, device=dev, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(hidden, device=dev, dtype=dtype)).requires_grad_(norm_weight_grad)
    dy = torch.randn_like(x)
    n = x.numel() * el
    # fwd: read x, write y; bwd: read dy, x, write dx (weight and its grad are negligible)
    cases.append(("rms_norm", (x, w), (dy,), 5 * n, gt_rms_norm, ref_rms_norm, [x, w] if norm_weight_grad else [x]))

    q = torch.randn(1, tokens, heads, head_dim, device=dev, dtype=dtype).transpose(1, 2).requires_grad_(True)
    k = torch.randn(1, tokens, kv_heads, head_dim, device=dev, dtype=dtype).transpose(1, 2).requires_grad_(True)
    pos = torch.arange(tokens, device=dev, dtype=torch.float32)[None]
    inv = 1.0 / (500000 ** (torch.arange(0, head_dim, 2, device=dev).float() / head_dim))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    dq, dk = torch.randn(1, heads, tokens, head_dim, device=dev, dtype=dtype), torch.randn(1, kv_heads, tokens, head_dim, device=dev, dtype=dtype)
    nqk = (q.numel() + k.numel()) * el
    cases.append(("rope", (q, k, cos, sin), (dq, dk), 4 * nqk + 2 * 2 * cos.numel() * el, gt_rope, ref_rope, [q, k]))

    for name, gt, ref in (("swiglu", gt_swiglu, ref_swiglu), ("geglu", gt_geglu, ref_geglu)):
        g = torch.randn(1, tokens, ffn, device=dev, dtype=dtype, requires_grad=True)
        u = torch.randn(1, tokens, ffn, device=dev, dtype=dtype, requires_grad=True)
        dh = torch.randn_like(g)
        m = g.numel() * el
        # fwd: read g, u, write h; bwd: read dh, g, u, write dg, du
        cases.append((name, (g, u), (dh,), 8 * m, gt, ref, [g, u]))
    return cases


def fwd_bwd(fn, inputs, grads, wrt):
    def step():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, wrt, grads)

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--norm-weight-grad", action="store_true")
    ap.add_argument("--csv", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernel_speed.py needs a CUDA GPU", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth_gbs()
    print(f"card: {card}; torch {torch.__version__}; copy bandwidth {copy_bw:.0f} GB/s")
    rows = []
    # The first capture of an autograd backward in a process can fail (the engine touches the legacy
    # stream); absorb that on a throwaway step so no measured case is affected.
    warm = torch.randn(64, 64, device="cuda", requires_grad=True)
    for _ in range(2):
        try:
            graph_time_ms(lambda: torch.autograd.grad((warm * 2).sum(), [warm]))
        except Exception:
            torch.cuda.synchronize()
    cases = make_cases(args.tokens, args.hidden, args.ffn, args.heads, args.kv_heads, args.head_dim, torch.bfloat16, args.norm_weight_grad)
    for name, inputs, grads, nbytes, gt, ref, wrt in cases:
        # correctness on the benchmark shape before timing
        out_gt, out_ref = gt(*inputs), ref(*inputs)
        out_gt = out_gt if isinstance(out_gt, tuple) else (out_gt,)
        out_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
        err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(out_gt, out_ref))
        compiled = torch.compile(ref)
        timings, host = {}, {}
        for provider, fn in (("graphtune", gt), ("eager", ref), ("torch.compile", compiled)):
            step = fwd_bwd(fn, inputs, grads, wrt)
            host[provider] = cuda_time_ms(step)
            try:
                timings[provider] = graph_time_ms(step)
            except Exception as e:  # pragma: no cover - depends on the provider
                print(f"{name}/{provider}: CUDA graph capture failed ({type(e).__name__}); timing eagerly")
                timings[provider] = host[provider]
        for provider, ms in timings.items():
            gbs = nbytes / (ms * 1e-3) / 1e9
            rows.append(
                dict(card=card, kernel=name, provider=provider, ms=round(ms, 4), host_ms=round(host[provider], 4), gb_s=round(gbs, 1),
                     pct_copy_bw=round(100 * gbs / copy_bw, 1), speedup_vs_eager=round(timings["eager"] / ms, 2),
                     speedup_vs_compile=round(timings["torch.compile"] / ms, 2), fwd_rel_err=f"{err:.2e}")
            )
    print("fwd+bwd ms: device time replayed from a CUDA graph; host ms: the same step launched from Python")
    hdr = f"{'kernel':<9} {'provider':<14} {'fwd+bwd ms':>10} {'host ms':>8} {'GB/s':>7} {'% copy':>7} {'vs eager':>8} {'vs compile':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['kernel']:<9} {r['provider']:<14} {r['ms']:>10.3f} {r['host_ms']:>8.3f} {r['gb_s']:>7.0f} {r['pct_copy_bw']:>6.1f}% {r['speedup_vs_eager']:>7.2f}x {r['speedup_vs_compile']:>9.2f}x")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
