"""bitsandbytes 4-bit (NF4 / FP4) weight dequantization, Triton, into a reused workspace buffer.

Why: QLoRA's frozen base weight lives packed (two 4-bit codes per byte plus one absmax per block of
``blocksize`` values); every forward and backward of a projection needs it dense for one matmul and
never again. Dequantizing into one per-(device, dtype) buffer that only grows means no allocation per
projection and at most one dense weight alive at a time -- the largest projection's worth of memory,
not one per layer. The caller must consume the dense weight before the next dequantization into the
same buffer (``graphtune::lora_linear_4bit`` does: one matmul, then the buffer is free again).

Layout, as bitsandbytes stores it (``bitsandbytes.functional.quantize_4bit``): the weight flattened
row-major, element ``i`` in byte ``i // 2`` (high nibble for even ``i``, low nibble for odd ``i``),
value ``code[nibble] * absmax[i // blocksize]`` in fp32, then rounded once to the output dtype.
With double quantization (``compress_statistics`` / ``bnb_4bit_use_double_quant``) the absmax is
itself 8-bit: ``absmax[j] = code2[absmax_u8[j]] * absmax2[j // blocksize2] + offset`` in fp32
(multiply, round, add: the kernel is compiled without FMA contraction so that it rounds like
bitsandbytes' two separate steps). The result is bit-identical to ``bitsandbytes.functional.
dequantize_4bit`` for every output dtype (the tests check it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from graphtune.kernels._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "FP4_CODE",
    "NF4_CODE",
    "dequantize_4bit",
    "dequantize_4bit_workspace",
    "reference_dequantize_4bit",
    "release_workspace",
    "workspace",
]

# The 16 code values, fp32, exactly as ``bitsandbytes.functional.get_4bit_type`` builds them (NF4:
# the QLoRA paper's normal-float quantiles; FP4: bitsandbytes' e2m1 values divided by 12). Kept here
# so that dequantization needs no bitsandbytes import; a test checks them bit for bit.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)  # fmt: skip
QUANT_TYPES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Packed bytes per program: 2048 outputs, large enough for wide vector stores.
BLOCK_BYTES = 1024
NUM_WARPS = 4

_CODE_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}
_WORKSPACE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-entry fp32 code table of ``quant_type`` on ``device`` (cached)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    key = (quant_type, torch.device(device))
    table = _CODE_CACHE.get(key)
    if table is None:
        table = torch.tensor(QUANT_TYPES[quant_type], dtype=torch.float32, device=device)
        _CODE_CACHE[key] = table
    return table


def _check(packed, absmax, shape, blocksize, quant_type, dtype, absmax2, code2, offset, blocksize2) -> int:
    """Validate the quant-state pieces; returns the number of output elements."""
    n = math.prod(shape)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"output dtype must be one of {OUT_DTYPES}, got {dtype}")
    for name, size in (("blocksize", blocksize), ("blocksize2", blocksize2)):
        if size < 2 or size & (size - 1):  # bitsandbytes' sizes are powers of two; the kernel shifts
            raise ValueError(f"{name} must be a power of two >= 2, got {size}")
    if packed.numel() * packed.element_size() < (n + 1) // 2:
        raise ValueError(f"packed weight holds {packed.numel() * packed.element_size()} bytes, {tuple(shape)} needs {(n + 1) // 2}")
    n_blocks = -(-n // blocksize)
    if absmax.numel() < n_blocks:
        raise ValueError(f"absmax has {absmax.numel()} entries, {n_blocks} blocks of {blocksize} need one each")
    nested = absmax2 is not None
    if nested != (code2 is not None) or nested != (offset is not None):
        raise ValueError("double quantization needs absmax2, code2 and offset together")
    if nested:
        if absmax.dtype != torch.uint8:
            raise ValueError(f"double-quantized absmax must be uint8, got {absmax.dtype}")
        if code2.numel() != 256 or absmax2.numel() < -(-n_blocks // blocksize2):
            raise ValueError("code2 must have 256 entries and absmax2 one per blocksize2 absmax entries")
    elif absmax.dtype != torch.float32:
        raise ValueError(f"absmax must be float32 (or uint8 with absmax2/code2/offset), got {absmax.dtype}")
    return n


def _as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed weight as flat uint8 (bitsandbytes may store it in another ``quant_storage`` dtype)."""
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.contiguous().view(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Reference (pure torch, same fp32 roundings as bitsandbytes)
# ----------------------------------------------------------------------------------------------
def reference_dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    blocksize: int,
    quant_type: str,
    dtype: torch.dtype,
    *,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    blocksize2: int = 256,
) -> torch.Tensor:
    """A fresh dense ``shape`` tensor of ``dtype``; the math of :func:`dequantize_4bit` in torch ops."""
    n = _check(packed, absmax, shape, blocksize, quant_type, dtype, absmax2, code2, offset, blocksize2)
    b = _as_bytes(packed)[: (n + 1) // 2].to(torch.int64)
    codes = torch.stack((b >> 4, b & 15), dim=-1).reshape(-1)[:n]
    values = code_table(quant_type, packed.device)[codes]
    if absmax2 is not None:
        j = torch.arange(absmax.numel(), device=absmax.device)
        scales = code2.float()[absmax.to(torch.int64)] * absmax2.float()[j // blocksize2]
        scales = scales + offset.float()  # a separate rounding, as in bitsandbytes
    else:
        scales = absmax
    i = torch.arange(n, device=packed.device)
    return (values * scales[i // blocksize]).to(dtype).reshape(tuple(shape))


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _dequant_4bit_kernel(
        PACKED, ABSMAX, ABSMAX2, CODE2, OFFSET, CODE, OUT,
        n_out, n_bytes, half_block_shift, blocksize2_shift,
        NESTED: tl.constexpr,
        OUT_BF16: tl.constexpr,
        USE_INT64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One program: BLOCK packed bytes -> 2*BLOCK outputs (high nibble first)."""
        pid = tl.program_id(0)
        if USE_INT64:
            pid = pid.to(tl.int64)
        byte = pid * BLOCK + tl.arange(0, BLOCK)
        bmask = byte < n_bytes
        b = tl.load(PACKED + byte, mask=bmask, other=0).to(tl.int32)
        hi = tl.load(CODE + (b >> 4))  # 16-entry table: every index is in range
        lo = tl.load(CODE + (b & 15))
        blk = byte >> half_block_shift  # both nibbles of a byte share a block (blocksize is even)
        if NESTED:
            q = tl.load(ABSMAX + blk, mask=bmask, other=0).to(tl.int32)
            scale = tl.load(CODE2 + q) * tl.load(ABSMAX2 + (blk >> blocksize2_shift), mask=bmask, other=0.0)
            scale = scale + tl.load(OFFSET)
        else:
            scale = tl.load(ABSMAX + blk, mask=bmask, other=0.0)
        vals = tl.interleave(hi * scale, lo * scale)
        idx = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        if OUT_BF16:
            # fp32 -> bf16 round-to-nearest-even spelled out in integer ops: the GPU's cast does the
            # same, but Triton's CPU interpreter truncates, and the tests run there
            bits = vals.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = vals.to(OUT.dtype.element_ty)
        tl.store(OUT + idx, out, mask=idx < n_out)


def _launch(packed, absmax, n, blocksize, quant_type, absmax2, code2, offset, blocksize2, out: torch.Tensor) -> None:
    b = _as_bytes(packed)
    n_bytes = (n + 1) // 2
    nested = absmax2 is not None
    dummy = absmax  # unused pointer slots when not nested (NESTED is a constexpr)
    grid = (triton.cdiv(n_bytes, BLOCK_BYTES),)
    _dequant_4bit_kernel[grid](
        b, absmax.contiguous(),
        absmax2.float().contiguous() if nested else dummy,
        code2.float().contiguous() if nested else dummy,
        offset.float().reshape(1) if nested else dummy,
        code_table(quant_type, packed.device), out,
        n, n_bytes, (blocksize // 2).bit_length() - 1, blocksize2.bit_length() - 1,
        NESTED=nested, OUT_BF16=out.dtype == torch.bfloat16, USE_INT64=2 * (n_bytes + BLOCK_BYTES) >= 2**31,
        BLOCK=BLOCK_BYTES,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,  # round code2*absmax2 before adding offset, as bitsandbytes does
    )


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    blocksize: int,
    quant_type: str,
    dtype: torch.dtype,
    *,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    blocksize2: int = 256,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense ``shape`` weight of ``dtype`` from bitsandbytes' packed 4-bit data.

    ``absmax`` is ``quant_state.absmax`` (fp32, or uint8 when double-quantized, then with
    ``absmax2 = quant_state.state2.absmax``, ``code2 = quant_state.state2.code``,
    ``offset = quant_state.offset``). Writes into ``out`` (contiguous, ``shape``, ``dtype``) if given.
    """
    n = _check(packed, absmax, shape, blocksize, quant_type, dtype, absmax2, code2, offset, blocksize2)
    if out is None:
        out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    elif out.dtype != dtype or out.numel() != n or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of {n} elements")
    if n == 0:
        return out
    if use_triton(packed):
        _launch(packed, absmax, n, blocksize, quant_type, absmax2, code2, offset, blocksize2, out)
    else:
        out.copy_(
            reference_dequantize_4bit(
                packed, absmax, shape, blocksize, quant_type, dtype,
                absmax2=absmax2, code2=code2, offset=offset, blocksize2=blocksize2,
            ).reshape(out.shape)
        )
    return out


# ----------------------------------------------------------------------------------------------
# Workspace
# ----------------------------------------------------------------------------------------------
def workspace(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A flat ``numel`` view of the shared buffer for (device, dtype); the buffer only ever grows.

    The view is valid until the next call for the same (device, dtype): callers use it at once.
    """
    key = (torch.device(device), dtype)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACE.pop(key, None)  # free the smaller buffer before allocating the larger one
        buf = torch.empty(numel, dtype=dtype, device=device)
        _WORKSPACE[key] = buf
    return buf[:numel]


def release_workspace() -> None:
    """Drop every workspace buffer (they are re-created, at the needed size, on next use)."""
    _WORKSPACE.clear()


def dequantize_4bit_workspace(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    blocksize: int,
    quant_type: str,
    dtype: torch.dtype,
    *,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    blocksize2: int = 256,
) -> torch.Tensor:
    """:func:`dequantize_4bit` into the shared workspace: a ``shape`` view, overwritten by the next call."""
    out = workspace(math.prod(shape), packed.device, dtype).view(tuple(shape))
    return dequantize_4bit(
        packed, absmax, shape, blocksize, quant_type, dtype,
        absmax2=absmax2, code2=code2, offset=offset, blocksize2=blocksize2, out=out,
    )
