"""Split-bf16 products: fp32 operands as ``hi + lo`` bf16 pairs on bf16 tensor cores, fp32 accumulation.

Why: peft's default (``autocast_adapter_dtype=True``) keeps the LoRA weights in fp32 on a bf16 model,
so every adapter product is an fp32 GEMM -- CUDA cores only, since graphtune never turns on TF32
(a process-wide flag). Profiled on an H100 (Llama-3.2-1B LoRA, 1x8192) those fp32 GEMMs were 23% of
the step's GPU time. Here:

* a bf16 activation is exact in bf16;
* an fp32 value ``v`` splits as ``hi = bf16(v)``, ``lo = bf16(v - hi)`` with ``|v - hi - lo| <= 2^-17 |v|``
  (``v - hi`` is exact in fp32);
* ``a @ v`` for an exact-bf16 ``a`` is ``a @ hi + a @ lo``: two bf16 products, each exact in fp32,
  accumulated in fp32; ``u @ v`` for two split values keeps three terms ``hi hi + hi lo + lo hi``
  (``lo lo`` is below ``2^-16`` relative).

The terms are laid out as column blocks of one matrix (:func:`split_blocks`, pattern ``"HL"``,
``"HHL"``, ``"HLH"``), so one GEMM with K = 2r or 3r forms the whole sum, and a ``[M, 2r]`` fp32 GEMM
output is folded back with :func:`fold_halves`. The result is within ~1e-5 relative of the fp32
product -- far inside the bf16 rounding the projection's output gets anyway.

:func:`mm_f32` is ``torch.mm(a, b, out_dtype=torch.float32)`` on CUDA (bf16 in, fp32 out, no rounding
of the product to bf16); elsewhere the same math as an fp32 matmul of the upcast operands.
"""

from __future__ import annotations

import os

import torch

from graphtune.kernels._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["split_blocks", "reference_split_blocks", "fold_halves", "mm_f32", "split_enabled"]

PATTERNS = ("HL", "HHL", "HLH")
BLOCK_R = 32
BLOCK_C = 32


def split_enabled(device: torch.device) -> bool:
    """``GRAPHTUNE_LORA_SPLIT``: unset or ``0`` never (the fp32 path, as peft computes it; the default:
    timed on an H100, the whole step with the split path ran at 0.64x the speed of the default pipeline),
    ``auto`` on CUDA only, ``1`` everywhere (the CPU tests use it)."""
    mode = os.environ.get("GRAPHTUNE_LORA_SPLIT", "0").strip().lower()
    if mode in ("1", "on", "true", "yes"):
        return True
    if mode in ("0", "off", "false", "no", ""):
        return False
    if mode != "auto":
        raise ValueError(f"GRAPHTUNE_LORA_SPLIT must be 0, auto or 1, not {mode!r}")
    return torch.device(device).type == "cuda"


def _check(x: torch.Tensor, pattern: str, n_sum: int) -> None:
    if pattern not in PATTERNS:
        raise ValueError(f"split_blocks: pattern must be one of {PATTERNS}, not {pattern!r}")
    if x.dim() != 2 or x.shape[1] % n_sum:
        raise ValueError(f"split_blocks: need a 2-D input whose columns divide into {n_sum} blocks, got {tuple(x.shape)}")


def reference_split_blocks(x: torch.Tensor, pattern: str, n_sum: int = 1, scale: float = 1.0) -> torch.Tensor:
    """``v = scale * (sum of the n_sum column blocks of x)`` in fp32, then ``hi``/``lo`` blocks laid out
    as ``pattern`` says: ``[R, C] -> [R, len(pattern) * C]`` bf16."""
    _check(x, pattern, n_sum)
    c = x.shape[1] // n_sum
    v = x[:, :c].float()
    if n_sum == 2:
        v = v + x[:, c:].float()
    if scale != 1.0:
        v = v * scale
    hi = v.to(torch.bfloat16)
    lo = (v - hi.float()).to(torch.bfloat16)
    return torch.cat([hi if p == "H" else lo for p in pattern], dim=1)


if HAS_TRITON:

    @triton.jit
    def _round_to_bf16(v):
        """fp32 -> the nearest bf16 value (ties to even), as fp32: the rounding is done on the bits, so the
        result does not depend on how a backend's fp32 -> bf16 cast rounds (Triton's CPU interpreter
        truncates); the cast of the result is then exact."""
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _split_bf16_kernel(X, OUT, R, C, sx_r, sx_c, so_r, scale, N_SUM: tl.constexpr, P0: tl.constexpr,
                           P1: tl.constexpr, P2: tl.constexpr, NP: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        src = X + rows[:, None].to(tl.int64) * sx_r + cols[None, :].to(tl.int64) * sx_c
        v = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        if N_SUM == 2:
            v += tl.load(src + C * sx_c, mask=mask, other=0.0).to(tl.float32)
        v = v * scale
        hi32 = _round_to_bf16(v)
        hi = hi32.to(tl.bfloat16)
        lo = _round_to_bf16(v - hi32).to(tl.bfloat16)
        dst = OUT + rows[:, None].to(tl.int64) * so_r + cols[None, :]
        if P0 == 0:
            tl.store(dst, hi, mask=mask)
        else:
            tl.store(dst, lo, mask=mask)
        if P1 == 0:
            tl.store(dst + C, hi, mask=mask)
        else:
            tl.store(dst + C, lo, mask=mask)
        if NP == 3:
            if P2 == 0:
                tl.store(dst + 2 * C, hi, mask=mask)
            else:
                tl.store(dst + 2 * C, lo, mask=mask)


def split_blocks(x: torch.Tensor, pattern: str, n_sum: int = 1, scale: float = 1.0) -> torch.Tensor:
    """:func:`reference_split_blocks` as one Triton launch (any input strides; transposed views are
    read in place), the torch reference where Triton does not run."""
    _check(x, pattern, n_sum)
    if not use_triton(x):
        return reference_split_blocks(x, pattern, n_sum, scale)
    r, c = x.shape[0], x.shape[1] // n_sum
    out = torch.empty((r, len(pattern) * c), dtype=torch.bfloat16, device=x.device)
    codes = [0 if p == "H" else 1 for p in pattern] + [0]
    grid = (triton.cdiv(r, BLOCK_R), triton.cdiv(c, BLOCK_C))
    # enable_fp_fusion=False: ptxas would otherwise contract ``v * scale - hi`` into one FMA, so ``lo``
    # would be taken from the unrounded product and differ from the reference's bits.
    _split_bf16_kernel[grid](x, out, r, c, x.stride(0), x.stride(1), out.stride(0), float(scale), N_SUM=n_sum,
                             P0=codes[0], P1=codes[1], P2=codes[2], NP=len(pattern), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                             enable_fp_fusion=False)
    return out


def fold_halves(y: torch.Tensor, dim: int, scale: float = 1.0) -> torch.Tensor:
    """``scale * (first half + second half)`` of ``y`` along ``dim`` (a split GEMM's two term blocks)."""
    n = y.shape[dim] // 2
    out = y.narrow(dim, 0, n) + y.narrow(dim, n, n)
    return out.mul_(scale) if scale != 1.0 else out


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for bf16 ``a``, ``b`` with an fp32 result: products exact, fp32 accumulation."""
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()
