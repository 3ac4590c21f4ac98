"""bitsandbytes' 4-bit dequantization as the tests' oracle, called on the flat element order.

Why flat: bitsandbytes 0.50.2's CPU kernel returns wrong values on AVX-512 hosts for a 2-D shape whose
blocks span rows (e.g. (64, 64) or (256, 64) at blocksize 128: max error 0.07 against weights of scale
0.05, where the flat call and graphtune give 0.02). A block holds ``blocksize`` consecutive elements of
the flattened weight either way, so the flat call is the same definition.
"""

from __future__ import annotations

import copy

import torch


def bnb_dequantize_flat(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit(packed, quant_state)``, computed flat and viewed back."""
    import bitsandbytes.functional as bnbf

    flat = copy.copy(quant_state)
    flat.shape = torch.Size([quant_state.shape.numel()])
    return bnbf.dequantize_4bit(packed, flat).view(quant_state.shape)
