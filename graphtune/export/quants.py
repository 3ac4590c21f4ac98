"""GGUF tensor quantizers written for graphtune, vectorized in torch (CPU or CUDA).

``quantize(data, qtype)`` returns the bytes ggml stores for a tensor, shaped like
``gguf.quants.quantize`` shapes them: ``(*rows, bytes_per_row)`` ``uint8`` for block types,
so ``GGUFWriter.add_tensor(name, arr, raw_dtype=qtype)`` takes the result as is.

* F32 / F16 / BF16 / Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 are bit-identical to gguf-py's numpy
  quantizers (which are themselves ggml's ``quantize_row_*_ref``).
* Q4_K / Q5_K / Q6_K follow ggml's reference quantizers (``quantize_row_q{4,5,6}_K_ref``: the
  ``make_qkx2_quants`` / ``make_qx_quants`` scale searches over the same candidate grids, the
  same 6-bit scale/min packing). Every float operation is done in float32 in ggml's order,
  including sequential (not pairwise) accumulation of the per-group sums, so the blocks come
  out byte-identical to what libggml writes when llama.cpp quantizes without an imatrix.

Two implementations, byte-identical to each other:

* **C** (:mod:`graphtune.export._cquants`, CPU, Q8_0 / Q4_K / Q5_K / Q6_K): compiled on first use
  with the system C compiler and self-checked against the torch path; the groups of a super-block
  run in vector lanes, which makes Q4_K ~6x faster than ggml's own reference code. It reads
  float32, float16 and bfloat16 inputs directly (no float32 copy of a bf16 checkpoint tensor).
* **torch** (everything else, CUDA, or ``GRAPHTUNE_QUANT_BACKEND=torch``): all blocks of a chunk
  at once (the only Python loops run over the fixed candidate grid and the 16/32 elements of a
  group, never over blocks or rows), in chunks of blocks to bound memory, on the input tensor's
  device or on ``device=`` (e.g. ``"cuda"``).

The result comes back as numpy.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
from typing import Sequence

import numpy as np
import torch

import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = [
    "QuantizationError",
    "SUPPORTED_TYPES",
    "can_quantize",
    "dequantize",
    "quantize",
    "quantized_shape",
    "select_backend",
]

QT = GGMLQuantizationType
QK_K = gguf.QK_K  # 256

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (
    QT.F32, QT.F16, QT.BF16,
    QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
    QT.Q4_K, QT.Q5_K, QT.Q6_K,
)
_FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)

# elements per chunk (bounds the temporaries: the K-quant searches keep ~15 float32 copies of a chunk)
_CHUNK_ELEMS_CPU = 1 << 19
_CHUNK_ELEMS_CUDA = 1 << 24

_GROUP_MAX_EPS = np.float32(1e-15)
_C_TYPE_IDS = (8, 12, 13, 14)  # Q8_0, Q4_K, Q5_K, Q6_K: also in C (graphtune.export._cquants)


class QuantizationError(gguf.QuantError, ValueError):
    """A tensor cannot be quantized to the requested type (shape or values)."""


def _qtype(qtype) -> GGMLQuantizationType:
    try:
        return QT(qtype)
    except ValueError:
        if isinstance(qtype, str) and qtype.upper() in QT.__members__:
            return QT[qtype.upper()]
        raise QuantizationError(f"unknown GGML quantization type {qtype!r}") from None


def can_quantize(shape: Sequence[int], qtype) -> bool:
    """True when graphtune can produce ``qtype`` for a tensor of ``shape`` (row length a
    multiple of the block size; float types always)."""
    qtype = _qtype(qtype)
    if qtype not in SUPPORTED_TYPES:
        return False
    if qtype in _FLOAT_TYPES:
        return True
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return False
    return shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0


def quantized_shape(shape: Sequence[int], qtype) -> tuple[int, ...]:
    """Shape of ``quantize``'s result for a tensor of ``shape`` (as gguf-py shapes it)."""
    qtype = _qtype(qtype)
    shape = tuple(int(s) for s in shape)
    if qtype in (QT.F32, QT.F16):
        return shape
    block, size = GGML_QUANT_SIZES[qtype]
    if not can_quantize(shape, qtype):
        raise QuantizationError(f"Can't quantize tensor with shape {shape} to {qtype.name}: "
                                f"row length {shape[-1] if shape else 0} is not a multiple of {block}")
    return (*shape[:-1], shape[-1] // block * size)


# --------------------------------------------------------------------------------------------
# exact float32 helpers (torch's scalar fast paths may multiply by a reciprocal: never use them)


def _full(ref: torch.Tensor, value) -> torch.Tensor:
    """A float32 constant broadcast to ``ref``'s shape (stride 0; never a 'cpu scalar')."""
    return torch.full((), float(np.float32(value)), dtype=torch.float32, device=ref.device).expand(ref.shape)


def _rdiv(c, t: torch.Tensor) -> torch.Tensor:
    """c / t elementwise in float32 (correctly rounded division)."""
    return torch.div(_full(t, c), t)


def _div(t: torch.Tensor, c) -> torch.Tensor:
    """t / c elementwise in float32 (correctly rounded division)."""
    return torch.div(t, _full(t, c))


def _f16_bytes(t: torch.Tensor) -> torch.Tensor:
    """float32 (n,) -> (n, 2) uint8 little-endian IEEE half (round to nearest even)."""
    h = t.to(torch.float16).contiguous().view(torch.int16).to(torch.int32)
    return torch.stack((h & 0xFF, (h >> 8) & 0xFF), dim=-1).to(torch.uint8)


def _f16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n,) float32 (via IEEE half)."""
    h = b[..., 0].to(torch.int32) | (b[..., 1].to(torch.int32) << 8)
    h = torch.where(h >= 0x8000, h - 0x10000, h).to(torch.int16)
    return h.view(torch.float16).to(torch.float32)


def _seqsum(t: torch.Tensor, first: bool = False) -> torch.Tensor:
    """Sum over dim 0 in order, in float32, like a C ``for`` loop ``s += t[i]`` starting at 0
    (or at ``t[0]`` when ``first``)."""
    parts = t.unbind(0)
    acc = parts[0].clone() if first else parts[0] + 0.0
    for p in parts[1:]:
        acc.add_(p)
    return acc


_JUST_BELOW_HALF = np.nextafter(np.float32(0.5), np.float32(0))


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero), same results as gguf-py's ``np_roundf``:
    trunc(x ± 0.49999997) (checked against it for every float32 of magnitude 2**-30 .. 256)."""
    return torch.add(x, torch.copysign(_full(x, _JUST_BELOW_HALF), x)).trunc_()


def _pack_bits_le(bits: torch.Tensor) -> torch.Tensor:
    """(n, 8*k) of 0/1 -> (n, k) uint8, bit j of byte i = bits[8*i + j] (numpy bitorder=little)."""
    n = bits.shape[0]
    b = bits.to(torch.int32).reshape(n, -1, 8)
    shifts = torch.arange(8, device=bits.device, dtype=torch.int32)
    return (b << shifts).sum(-1).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# legacy 32-element block types (bit-exact with gguf-py)


def _argmax_signed(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each row (first one on ties), like ggml's loop."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    return torch.gather(x, -1, idx)


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), _rdiv(1.0, d))


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(dim=-1, keepdim=True)
    d = _div(amax, 127)
    q = _roundf(x * _inv(d)).to(torch.int8).view(torch.uint8)
    return torch.cat((_f16_bytes(d[:, 0]), q), dim=-1)


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    d = _div(_argmax_signed(x), -8)
    q = torch.trunc(x * _inv(d) + 8.5).clamp_(0, 15).to(torch.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return torch.cat((_f16_bytes(d[:, 0]), qs), dim=-1)


def _q4_1(x: torch.Tensor) -> torch.Tensor:
    mx = x.amax(dim=-1, keepdim=True)
    mn = x.amin(dim=-1, keepdim=True)
    d = _div(mx - mn, 15)
    q = torch.trunc((x - mn) * _inv(d) + 0.5).clamp_(0, 15).to(torch.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return torch.cat((_f16_bytes(d[:, 0]), _f16_bytes(mn[:, 0]), qs), dim=-1)


def _q5_pack(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    qh = _pack_bits_le(q >> 4)
    return qh, qs


def _q5_0(x: torch.Tensor) -> torch.Tensor:
    d = _div(_argmax_signed(x), -16)
    q = torch.trunc(x * _inv(d) + 16.5).clamp_(0, 31).to(torch.uint8)
    qh, qs = _q5_pack(q)
    return torch.cat((_f16_bytes(d[:, 0]), qh, qs), dim=-1)


def _q5_1(x: torch.Tensor) -> torch.Tensor:
    mx = x.amax(dim=-1, keepdim=True)
    mn = x.amin(dim=-1, keepdim=True)
    d = _div(mx - mn, 31)
    q = torch.trunc((x - mn) * _inv(d) + 0.5).clamp_(0, 31).to(torch.uint8)
    qh, qs = _q5_pack(q)
    return torch.cat((_f16_bytes(d[:, 0]), _f16_bytes(mn[:, 0]), qh, qs), dim=-1)


# --------------------------------------------------------------------------------------------
# K-quants (super-blocks of 256), ggml's reference algorithms


def _make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml ``make_qkx2_quants`` for every group at once.

    x, w: (n, G) float32, one group per column. Returns (scale (G,), the_min (G,), L (n, G) float).
    The levels of the winning candidate are recomputed at the end from its (iscale, min) with
    the same float operations, instead of being carried through every step.
    """
    xmin = x.amin(dim=0)
    xmax = x.amax(dim=0)
    sum_w = _seqsum(w, first=True)
    sum_x = _seqsum(w * x, first=True)
    zero = torch.zeros_like(xmin)
    xmin = torch.where(xmin > 0, zero, xmin)
    degenerate = xmax == xmin
    rng = torch.where(degenerate, torch.ones_like(xmin), xmax - xmin)

    iscale = _rdiv(nmax, rng)
    scale = _rdiv(1.0, iscale)
    L = torch.mul(x - xmin, iscale).round_().clamp_(0, nmax)
    diff = L.mul_(scale).add_(xmin).sub_(x)
    best_error = _seqsum(diff.mul_(diff).mul_(w))
    mn = xmin
    best_iscale, best_mn = iscale, xmin  # the candidate whose levels are kept

    n, G = x.shape
    buf = torch.empty((n, 3, G), dtype=torch.float32, device=x.device)
    for step in range(nstep + 1):
        # ggml updates `min` in place: later candidates are measured from the best min so far
        c = np.float32(np.float32(np.float32(rmin) + np.float32(rdelta) * np.float32(step)) + np.float32(nmax))
        iscale = _rdiv(c, torch.where(degenerate, rng, xmax - mn))
        l = torch.sub(x, mn).mul_(iscale).round_().clamp_(0, nmax)
        wl = torch.mul(w, l, out=buf[:, 0])
        torch.mul(wl, l, out=buf[:, 1])
        torch.mul(wl, x, out=buf[:, 2])
        sums = _seqsum(buf)
        sum_l, sum_l2, sum_xl = sums[0], sums[1], sums[2]
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, zero, this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        diff = l.mul_(this_scale).add_(this_min).sub_(x)
        cur_error = _seqsum(diff.mul_(diff).mul_(w))
        better = (D > 0) & (cur_error < best_error)
        best_iscale = torch.where(better, iscale, best_iscale)
        best_mn = torch.where(better, mn, best_mn)
        best_error = torch.where(better, cur_error, best_error)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)

    L = torch.sub(x, best_mn).mul_(best_iscale).round_().clamp_(0, nmax)
    L = torch.where(degenerate, torch.zeros_like(L), L)
    scale = torch.where(degenerate, zero, scale)
    mn = torch.where(degenerate, xmin, mn)
    return scale, -mn, L


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and 8 six-bit mins -> ggml's 12-byte K_SCALE layout. ls, lm: (nb, 8) int32."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat((lo, mid, hi), dim=-1).to(torch.uint8)


def _q45_k(xb: torch.Tensor, five_bit: bool) -> torch.Tensor:
    """quantize_row_q4_K_ref / quantize_row_q5_K_ref on (nb, 256) float32."""
    nb = xb.shape[0]
    nmax = 31 if five_bit else 15
    x = xb.reshape(nb * 8, 32).t().contiguous()  # (32, groups)
    sum_x2 = _seqsum(x * x)
    # sqrtf: torch's CPU sqrt is not correctly rounded; float64 sqrt rounded to float32 is
    av_x = torch.sqrt(_div(sum_x2, 32).double()).float()
    w = av_x + x.abs()
    if five_bit:
        scales, mins, L = _make_qkx2(x, w, nmax, -0.5, 0.1, 15)
    else:
        scales, mins, L = _make_qkx2(x, w, nmax, -1.0, 0.1, 20)
    del x, w
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    L = L.t().reshape(nb, 8, 32)

    zero = torch.zeros((), dtype=torch.float32, device=xb.device)
    max_scale = scales.amax(dim=1, keepdim=True)
    max_scale = torch.where(max_scale > 0, max_scale, zero)
    max_min = mins.amax(dim=1, keepdim=True)
    max_min = torch.where(max_min > 0, max_min, zero)
    inv_scale = torch.where(max_scale > 0, _rdiv(63.0, max_scale), zero)
    inv_min = torch.where(max_min > 0, _rdiv(63.0, max_min), zero)
    # uint8 ls = nearest_int(...); ls = MIN(63, ls)
    ls = (torch.round(inv_scale * scales).to(torch.int32) & 0xFF).clamp_(max=63)
    lm = (torch.round(inv_min * mins).to(torch.int32) & 0xFF).clamp_(max=63)
    d_bytes = _f16_bytes(_div(max_scale, 63)[:, 0])
    dmin_bytes = _f16_bytes(_div(max_min, 63)[:, 0])

    d = _f16_from_bytes(d_bytes)[:, None] * ls.to(torch.float32)  # (nb, 8)
    dm = _f16_from_bytes(dmin_bytes)[:, None] * lm.to(torch.float32)
    xr = xb.reshape(nb, 8, 32)
    lq = torch.round((xr + dm[..., None]) / d[..., None]).clamp_(0, nmax)
    L = torch.where((d != 0)[..., None], lq, L).to(torch.uint8).reshape(nb, 4, 2, 32)

    parts = [d_bytes, dmin_bytes, _pack_scales_k4(ls, lm)]
    if five_bit:
        hb = (L >> 4).reshape(nb, 8, 32).to(torch.int32)
        shifts = torch.arange(8, device=xb.device, dtype=torch.int32)[None, :, None]
        parts.append((hb << shifts).sum(1).to(torch.uint8))  # qh (nb, 32)
        L = L & 0xF
    parts.append((L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128))
    return torch.cat(parts, dim=-1)


def _make_qx_q6(x: torch.Tensor):
    """ggml ``make_qx_quants(16, 32, x, L, rmse_type=1, NULL)`` for every group at once.

    x: (16, G). Returns (scale (G,), L (16, G) float in [0, 63])."""
    nmax = 32
    idx = x.abs().argmax(dim=0, keepdim=True)
    amax_signed = torch.gather(x, 0, idx)[0]
    allzero = amax_signed.abs() < _GROUP_MAX_EPS
    mx = torch.where(allzero, torch.ones_like(amax_signed), amax_signed)
    w = x * x
    wx = w * x
    zero = torch.zeros_like(mx)
    buf = torch.empty((x.shape[0], 2, x.shape[1]), dtype=torch.float32, device=x.device)

    def candidate(c):
        iscale = _rdiv(-c, mx)
        l = torch.mul(x, iscale).round_().clamp_(-nmax, nmax - 1)
        torch.mul(wx, l, out=buf[:, 0])
        torch.mul(w, l, out=buf[:, 1]).mul_(l)
        sums = _seqsum(buf)
        return iscale, sums[0], sums[1]

    best_iscale, sumlx, suml2 = candidate(np.float32(nmax))
    scale = torch.where(suml2 != 0, sumlx / suml2, zero)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        c = np.float32(np.float32(nmax) + np.float32(np.float32(0.1) * np.float32(step)))
        iscale, sumlx, suml2 = candidate(c)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = torch.where(better, iscale, best_iscale)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    L = torch.mul(x, best_iscale).round_().clamp_(-nmax, nmax - 1).add_(nmax)
    L = torch.where(allzero, torch.zeros_like(L), L)
    scale = torch.where(allzero, zero, scale)
    return scale, L


def _q6_k(xb: torch.Tensor) -> torch.Tensor:
    """quantize_row_q6_K_ref on (nb, 256) float32."""
    nb = xb.shape[0]
    x = xb.reshape(nb * 16, 16).t().contiguous()  # (16, groups)
    scales, L = _make_qx_q6(x)
    del x
    scales = scales.reshape(nb, 16)
    L = L.t().reshape(nb, 16, 16)

    idx = scales.abs().argmax(dim=1, keepdim=True)
    max_scale = torch.gather(scales, 1, idx)
    blank = max_scale.abs()[:, 0] < _GROUP_MAX_EPS
    max_scale = torch.where(blank[:, None], torch.ones_like(max_scale), max_scale)
    iscale = _rdiv(-128.0, max_scale)
    d_bytes = _f16_bytes(_rdiv(1.0, iscale)[:, 0])
    sc = torch.round(iscale * scales).clamp_(max=127).to(torch.int32)  # int8 range by construction
    d = _f16_from_bytes(d_bytes)[:, None] * sc.to(torch.float32)  # (nb, 16)
    xr = xb.reshape(nb, 16, 16)
    lq = torch.round(xr / d[..., None]).clamp_(-32, 31) + 32
    L = torch.where((d != 0)[..., None], lq, L).to(torch.uint8).reshape(nb, 2, 4, 32)

    ql = (L[:, :, 0:2] & 0xF) | ((L[:, :, 2:4] & 0xF) << 4)  # (nb, 2, 2, 32)
    hb = (L >> 4).to(torch.int32)
    qh = hb[:, :, 0] | (hb[:, :, 1] << 2) | (hb[:, :, 2] << 4) | (hb[:, :, 3] << 6)  # (nb, 2, 32)
    out = torch.cat((
        ql.reshape(nb, 128),
        qh.to(torch.uint8).reshape(nb, 64),
        sc.to(torch.int8).view(torch.uint8),
        d_bytes,
    ), dim=-1)
    out[blank] = 0
    return out


_BLOCK_QUANTIZERS = {
    QT.Q8_0: _q8_0,
    QT.Q4_0: _q4_0,
    QT.Q4_1: _q4_1,
    QT.Q5_0: _q5_0,
    QT.Q5_1: _q5_1,
    QT.Q4_K: lambda x: _q45_k(x, five_bit=False),
    QT.Q5_K: lambda x: _q45_k(x, five_bit=True),
    QT.Q6_K: _q6_k,
}


# --------------------------------------------------------------------------------------------
# dequantizers (same float32 expressions as ggml / gguf-py)


def _deq_q8_0(b):
    return _f16_from_bytes(b[:, 0:2])[:, None] * b[:, 2:].view(torch.int8).to(torch.float32)


def _nibbles(qs):  # (n, 16) -> (n, 32): low nibbles then high nibbles
    return torch.cat((qs & 0xF, qs >> 4), dim=-1)


def _deq_q4_0(b):
    d = _f16_from_bytes(b[:, 0:2])[:, None]
    return d * (_nibbles(b[:, 2:]).to(torch.float32) - 8)


def _deq_q4_1(b):
    d = _f16_from_bytes(b[:, 0:2])[:, None]
    m = _f16_from_bytes(b[:, 2:4])[:, None]
    return d * _nibbles(b[:, 4:]).to(torch.float32) + m


def _unpack_bits_le(b):  # (n, k) uint8 -> (n, 8k) 0/1 int32
    shifts = torch.arange(8, device=b.device, dtype=torch.int32)
    return ((b.to(torch.int32)[..., None] >> shifts) & 1).reshape(b.shape[0], -1)


def _deq_q5_0(b):
    d = _f16_from_bytes(b[:, 0:2])[:, None]
    q = _nibbles(b[:, 6:]).to(torch.int32) | (_unpack_bits_le(b[:, 2:6]) << 4)
    return d * (q - 16).to(torch.float32)


def _deq_q5_1(b):
    d = _f16_from_bytes(b[:, 0:2])[:, None]
    m = _f16_from_bytes(b[:, 2:4])[:, None]
    q = _nibbles(b[:, 8:]).to(torch.int32) | (_unpack_bits_le(b[:, 4:8]) << 4)
    return d * q.to(torch.float32) + m


def _unpack_scales_k4(s):  # (nb, 12) -> sc, m (nb, 8) int32
    s = s.to(torch.int32)
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((lo & 63, (hi & 0xF) | ((lo >> 6) << 4)), dim=-1)
    m = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=-1)
    return sc, m


def _deq_q45_k(b, five_bit):
    nb = b.shape[0]
    d = _f16_from_bytes(b[:, 0:2])[:, None]
    dmin = _f16_from_bytes(b[:, 2:4])[:, None]
    sc, m = _unpack_scales_k4(b[:, 4:16])
    d = (d * sc.to(torch.float32))[..., None]  # (nb, 8, 1)
    dm = (dmin * m.to(torch.float32))[..., None]
    qs = b[:, 48:176] if five_bit else b[:, 16:144]
    q = torch.stack((qs.reshape(nb, 4, 32) & 0xF, qs.reshape(nb, 4, 32) >> 4), dim=2).reshape(nb, 8, 32)
    q = q.to(torch.int32)
    if five_bit:
        qh = b[:, 16:48].to(torch.int32)  # (nb, 32)
        shifts = torch.arange(8, device=b.device, dtype=torch.int32)[None, :, None]
        q = q | (((qh[:, None, :] >> shifts) & 1) << 4)
    return (d * q.to(torch.float32) - dm).reshape(nb, QK_K)


def _deq_q6_k(b):
    nb = b.shape[0]
    ql = b[:, 0:128].reshape(nb, 2, 2, 32).to(torch.int32)
    qh = b[:, 128:192].reshape(nb, 2, 32).to(torch.int32)
    sc = b[:, 192:208].view(torch.int8).to(torch.float32)
    d = _f16_from_bytes(b[:, 208:210])[:, None]
    low = torch.cat((ql & 0xF, ql >> 4), dim=2)  # (nb, 2, 4, 32): quarters 0,1 (low nibbles) 2,3 (high)
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.int32)[None, None, :, None]
    high = (qh[:, :, None, :] >> shifts) & 3
    q = ((low | (high << 4)) - 32).to(torch.float32).reshape(nb, 16, 16)
    return ((d * sc)[..., None] * q).reshape(nb, QK_K)


_BLOCK_DEQUANTIZERS = {
    QT.Q8_0: _deq_q8_0,
    QT.Q4_0: _deq_q4_0,
    QT.Q4_1: _deq_q4_1,
    QT.Q5_0: _deq_q5_0,
    QT.Q5_1: _deq_q5_1,
    QT.Q4_K: lambda b: _deq_q45_k(b, five_bit=False),
    QT.Q5_K: lambda b: _deq_q45_k(b, five_bit=True),
    QT.Q6_K: _deq_q6_k,
}


# --------------------------------------------------------------------------------------------
# public API


def _as_tensor(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.detach()
    if isinstance(data, np.ndarray) or np.isscalar(data) or isinstance(data, (list, tuple)):
        arr = np.asarray(data)
        if arr.dtype == np.float16 or arr.dtype == np.float32:
            return torch.from_numpy(np.ascontiguousarray(arr))
        if arr.dtype.kind in "fiub":
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        raise QuantizationError(f"cannot quantize an array of dtype {arr.dtype}")
    # gguf.LazyNumpyTensor and friends
    if hasattr(data, "numpy"):
        return _as_tensor(data.numpy())
    raise QuantizationError(f"cannot quantize an object of type {type(data).__name__}")


def _chunk_elems(device: torch.device, chunk_elems: int | None) -> int:
    if chunk_elems:
        return int(chunk_elems)
    return _CHUNK_ELEMS_CUDA if device.type == "cuda" else _CHUNK_ELEMS_CPU


def _cpu_workers(threads: int | None) -> int:
    if threads:
        return max(1, int(threads))
    env = os.environ.get("GRAPHTUNE_QUANT_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))


@contextlib.contextmanager
def _single_threaded_ops():
    """torch intra-op threads off while we run: our ops are small and many, and OpenMP's
    spinning workers made them 10x slower on a loaded 2-core machine. Parallelism comes from
    running chunks in several Python threads instead (torch kernels release the GIL)."""
    prev = torch.get_num_threads()
    if prev != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if prev != 1:
            torch.set_num_threads(prev)


def _run_chunks(n_chunks: int, work, device: torch.device, threads: int | None) -> None:
    """work(i) for every chunk: in order on CUDA, on a pool of threads on the CPU."""
    if device.type != "cpu":
        for i in range(n_chunks):
            work(i)
        return
    workers = min(_cpu_workers(threads), n_chunks)
    with _single_threaded_ops():
        if workers <= 1:
            for i in range(n_chunks):
                work(i)
            return
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="graphtune-quant") as pool:
            for f in [pool.submit(work, i) for i in range(n_chunks)]:
                f.result()


def _bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 bits (int64) exactly as ggml_compute_fp32_to_bf16 / gguf-py (NaNs kept quiet)."""
    n = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    is_nan = (n & 0x7FFFFFFF) > 0x7F800000
    rounded = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    quiet = ((n & 0xFFFF0000) | (64 << 16)) >> 16
    return torch.where(is_nan, quiet, rounded) & 0xFFFF


_BACKENDS = ("auto", "c", "torch")
_C_SRC_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_C_CHUNK_BLOCKS = 4096  # per C call when a tensor is split over threads (1 M elements of K-quants)


def select_backend(name: str | None = None) -> str:
    """The quantizer backend for CPU block types: ``"c"`` when the C library is usable (and not
    refused by ``name`` / ``$GRAPHTUNE_QUANT_BACKEND``), else ``"torch"``."""
    name = (name or os.environ.get("GRAPHTUNE_QUANT_BACKEND") or "auto").lower()
    if name not in _BACKENDS:
        raise QuantizationError(f"quantizer backend must be one of {', '.join(_BACKENDS)}, not {name!r}")
    if name == "torch":
        return "torch"
    from graphtune.export import _cquants

    if _cquants.library() is None:
        if name == "c":
            raise QuantizationError(f"the C quantizers are unavailable: {_cquants.unavailable_reason()}")
        return "torch"
    return "c"


def _out_bytes(out: np.ndarray | None, nbytes: int) -> np.ndarray | None:
    """``out`` as a flat uint8 view of exactly ``nbytes`` (or None)."""
    if out is None:
        return None
    flat = out.reshape(-1).view(np.uint8)
    if flat.nbytes != nbytes or not flat.flags.c_contiguous or not flat.flags.writeable:
        raise QuantizationError(f"out= must be a writable contiguous buffer of {nbytes} bytes, got {out.nbytes}")
    return flat


def _into(res: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``res``, copied into ``out`` (same bytes, viewed with res's dtype and shape) when given."""
    if out is None:
        return res
    flat = _out_bytes(out, res.nbytes)
    view = flat.view(res.dtype).reshape(res.shape)
    np.copyto(view, res)
    return view


def _quantize_c(t: torch.Tensor, qtype: GGMLQuantizationType, out_shape: tuple[int, ...],
                threads: int | None, out: np.ndarray | None = None) -> np.ndarray:
    """The C quantizers on a CPU tensor (float32 / float16 / bfloat16 read as they are)."""
    from graphtune.export import _cquants

    lib = _cquants.library()
    if t.dtype not in _C_SRC_TYPES:
        t = t.to(torch.float32)
    t = t.contiguous()
    block, size = GGML_QUANT_SIZES[qtype]
    n_blocks = t.numel() // block
    nbytes = int(np.prod(out_shape, dtype=np.int64))
    out = _out_bytes(out, nbytes)
    if out is None:
        out = np.empty(nbytes, dtype=np.uint8)
    src, dst, kind = t.data_ptr(), out.ctypes.data, _C_SRC_TYPES[t.dtype]
    step = max(1, _C_CHUNK_BLOCKS * (8 if qtype == QT.Q8_0 else 1))
    chunks = [(i, min(step, n_blocks - i)) for i in range(0, n_blocks, step)]
    workers = min(_cpu_workers(threads), len(chunks))
    if workers <= 1:
        bad = [_cquants.quantize_blocks(lib, int(qtype), src, kind, dst + i * size, i, n) for i, n in chunks]
    else:
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="graphtune-quant") as pool:
            bad = list(pool.map(lambda c: _cquants.quantize_blocks(lib, int(qtype), src, kind, dst + c[0] * size,
                                                                   c[0], c[1]), chunks))
    if any(b != -1 for b in bad):
        raise QuantizationError(f"tensor of shape {tuple(t.shape)} has non-finite values; cannot quantize to {qtype.name}")
    return out.reshape(out_shape)


def quantize(data: torch.Tensor | np.ndarray, qtype: GGMLQuantizationType, *,
             device: str | torch.device | None = None, chunk_elems: int | None = None,
             threads: int | None = None, backend: str | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Quantize ``data`` to ``qtype`` like ``gguf.quants.quantize`` (same values, dtype, shape).

    F32 -> float32 array, F16 -> float16 array, everything else -> uint8 ``(*rows, bytes_per_row)``.
    ``data``: any float tensor or array (bfloat16 / float16 / float32 go to the C quantizers as
    they are; the values are always those of the float32 conversion).
    ``device``: where to compute (default: the tensor's device; numpy arrays on the CPU).
    ``chunk_elems``: elements per chunk of the torch path (memory bound; default 2**19 on CPU,
    2**24 on CUDA). ``threads``: CPU worker threads (default: $GRAPHTUNE_QUANT_THREADS or the
    usable cores, at most 8); torch's own intra-op threads are set to 1 for the duration of the
    call. ``backend``: ``"auto"`` (default, or ``$GRAPHTUNE_QUANT_BACKEND``), ``"c"`` or ``"torch"``.
    ``out``: a writable contiguous buffer of exactly the result's size to hold it (the C quantizers
    write there directly); the result is then a view of it.
    Raises QuantizationError for unsupported types, row lengths that are not a multiple of the
    block size, and (block types) non-finite values.
    """
    qtype = _qtype(qtype)
    if qtype not in SUPPORTED_TYPES:
        raise QuantizationError(f"graphtune cannot quantize to {qtype.name}; supported: "
                                + ", ".join(t.name for t in SUPPORTED_TYPES))

    if qtype in (QT.F32, QT.F16) and isinstance(data, np.ndarray):
        # the same conversion gguf-py makes (numpy rounds float64 -> float16 directly)
        return _into(data.astype(np.float32 if qtype == QT.F32 else np.float16, copy=False), out)

    t = _as_tensor(data)
    shape = tuple(t.shape)
    if qtype in (QT.F32, QT.F16):
        want = torch.float32 if qtype == QT.F32 else torch.float16
        if t.dtype == torch.float64 and qtype == QT.F16:
            return _into(t.cpu().numpy().astype(np.float16), out)
        return _into(t.to(device="cpu", dtype=want).contiguous().numpy(), out)

    out_shape = quantized_shape(shape, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    dev = torch.device(device) if device is not None else t.device
    if (int(qtype) in _C_TYPE_IDS and t.device.type == "cpu" and dev.type == "cpu" and t.numel()
            and select_backend(backend) == "c"):
        return _quantize_c(t, qtype, out_shape, threads, out)
    if out is not None:
        return _into(quantize(t, qtype, device=device, chunk_elems=chunk_elems, threads=threads, backend=backend), out)
    flat = t.reshape(-1)
    n = flat.numel()
    out = np.empty(int(np.prod(out_shape, dtype=np.int64)), dtype=np.uint8)
    if n == 0:
        return out.reshape(out_shape)

    step = max(block, _chunk_elems(dev, chunk_elems) // block * block)

    def work(i: int) -> None:
        start = i * step
        stop = min(n, start + step)
        with torch.no_grad():
            x = flat[start:stop].to(device=dev, dtype=torch.float32)
            if qtype == QT.BF16:
                bits = _bf16_bits(x)
                res = torch.stack((bits & 0xFF, bits >> 8), dim=-1).to(torch.uint8)
            else:
                lo, hi = torch.aminmax(x)  # NaN propagates
                if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                    raise QuantizationError(f"tensor of shape {shape} has non-finite values; "
                                            f"cannot quantize to {qtype.name}")
                res = _BLOCK_QUANTIZERS[qtype](x.reshape(-1, block))
            out[start // block * size:stop // block * size] = res.reshape(-1).cpu().numpy()

    _run_chunks((n + step - 1) // step, work, dev, threads)
    return out.reshape(out_shape)


def dequantize(raw: np.ndarray | torch.Tensor, qtype: GGMLQuantizationType, *,
               device: str | torch.device | None = None) -> np.ndarray:
    """Inverse of ``quantize``: float32 array of shape ``(*rows, row_length)``.

    ``raw`` is what ``quantize`` returned (or a GGUFReader tensor's ``data``): uint8 bytes
    ``(*rows, bytes_per_row)`` for block types and BF16, float arrays for F32/F16.
    """
    qtype = _qtype(qtype)
    if qtype not in SUPPORTED_TYPES:
        raise QuantizationError(f"graphtune cannot dequantize {qtype.name}")
    if isinstance(raw, torch.Tensor):
        if raw.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            return raw.detach().to(device="cpu", dtype=torch.float32).numpy()
        raw = raw.detach().cpu().numpy()
    raw = np.asarray(raw)
    if qtype == QT.F32:
        return raw.view(np.float32) if raw.dtype == np.uint8 else raw.astype(np.float32, copy=False)
    if qtype == QT.F16:
        return (raw.view(np.float16) if raw.dtype == np.uint8 else raw).astype(np.float32)
    if qtype == QT.BF16:
        if raw.dtype != np.uint8:
            raw = raw.view(np.uint8)
        bits = raw.reshape(*raw.shape[:-1], -1, 2).astype(np.uint32)
        return ((bits[..., 0] | (bits[..., 1] << 8)) << 16).view(np.float32)
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8)
    block, size = GGML_QUANT_SIZES[qtype]
    if raw.ndim == 0 or raw.shape[-1] % size:
        raise QuantizationError(f"{qtype.name} rows must be a multiple of {size} bytes, got shape {raw.shape}")
    out_shape = (*raw.shape[:-1], raw.shape[-1] // size * block)
    blocks = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1, size))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = np.empty((blocks.shape[0], block), dtype=np.float32)
    step = max(1, _chunk_elems(dev, None) // block)

    def work(i: int) -> None:
        with torch.no_grad():
            b = blocks[i * step:(i + 1) * step].to(dev)
            out[i * step:(i + 1) * step] = _BLOCK_DEQUANTIZERS[qtype](b).cpu().numpy()

    _run_chunks((blocks.shape[0] + step - 1) // step, work, dev, None)
    return out.reshape(out_shape)
