"""Phi-3: fused ``qkv_proj`` (sliced into q/k/v) and ``gate_up_proj`` (``chunk(2)``), partial rotary
(``q[..., :R]`` rotated, the rest passed through) and ``up * silu(gate)`` operand order.

Contributes the partial-rotary RoPE variant and the up-first SwiGLU variant.
"""

import torch
from torch.nn.functional import silu

from graphtune.passes.base import Rewrite
from graphtune.passes.fuse_rope import make_rope_replacement, slice_bounds
from graphtune.passes.fuse_swiglu import swiglu_replacement
from graphtune.patterns import Family, register_family
from graphtune.patterns.llama import Llama


def rotary_widths(graph):
    bounds = slice_bounds(graph)
    for rotary in sorted(bounds):
        if rotary % 2 == 0 and rotary // 2 in bounds:
            yield {"rotary": rotary, "half": rotary // 2}


def make_partial_rope_pattern(rotary: int, half: int):
    def partial_rope_pattern(q, k, cos, sin):
        cos = cos.unsqueeze(1)
        sin = sin.unsqueeze(1)
        q_rot, q_pass = q[..., :rotary], q[..., rotary:]
        k_rot, k_pass = k[..., :rotary], k[..., rotary:]
        q_embed = torch.cat(
            [(q_rot * cos) + (torch.cat((-q_rot[..., half:], q_rot[..., :half]), dim=-1) * sin), q_pass], dim=-1
        )
        k_embed = torch.cat(
            [(k_rot * cos) + (torch.cat((-k_rot[..., half:], k_rot[..., :half]), dim=-1) * sin), k_pass], dim=-1
        )
        return q_embed, k_embed

    return partial_rope_pattern


PARTIAL_ROPE = Rewrite("partial_rotary", make_partial_rope_pattern, make_rope_replacement, literals=rotary_widths)


def up_times_silu_gate_pattern(gate, up):
    return up * silu(gate)


SWIGLU_UP_FIRST = Rewrite("up_times_act_gate", up_times_silu_gate_pattern, swiglu_replacement)


@register_family
class Phi3(Family):
    name = "phi3"
    architectures = ("Phi3ForCausalLM",)
    decoder_layer_class = "Phi3DecoderLayer"
    structure = {**Llama.structure, "fused_qkv": True}
    rewrites = {"fuse_rope": (PARTIAL_ROPE,), "fuse_swiglu": (SWIGLU_UP_FIRST,)}
    expected_counts = Llama.expected_counts
