from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rope

from tests.passes.common import check_pass, explain_one


def cos_sin(positions: torch.Tensor, dim: int):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = positions[..., None].float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class Rope(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, cos, sin):
        return self.fn(q, k, cos, sin)


@pytest.mark.parametrize("head_dim", [16, 24])
def test_rotate_half_matches_eager_with_packed_positions(head_dim):
    # two packed examples in one row: positions restart at the boundary
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]])
    cos, sin = cos_sin(positions, head_dim)
    q = torch.randn(1, 11, 4, head_dim).transpose(1, 2)  # non-contiguous, as HF produces it
    k = torch.randn(1, 11, 2, head_dim).transpose(1, 2)
    report = check_pass(Rope(llama_rope), (q, k, cos, sin), "fuse_rope", grad_inputs=(True, True, False, False))
    assert report.passes[0].count == 1


def test_partial_rotary_variant():
    positions = torch.arange(7)[None]
    cos, sin = cos_sin(positions, 8)  # rotate 8 of 16 features, pass 8 through
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    report = check_pass(Rope(phi3_rope), (q, k, cos.expand(2, -1, -1), sin.expand(2, -1, -1)), "fuse_rope", grad_inputs=(True, True, False, False))
    assert report.passes[0].by_rewrite == {"partial_rotary": 1}


def test_cos_requiring_grad_is_refused():
    cos, sin = cos_sin(torch.arange(5)[None], 16)
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    res, report = explain_one(Rope(llama_rope), (q, k, cos.requires_grad_(), sin), "fuse_rope")
    assert res.count == 0 and "require grad" in res.refused[0].reason
