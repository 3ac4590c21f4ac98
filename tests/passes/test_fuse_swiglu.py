from __future__ import annotations

import torch

from tests.passes.common import check_pass, explain_one


class GatedMLP(torch.nn.Module):
    def __init__(self, hidden=24, ffn=40, act=torch.nn.functional.silu, up_first=False):
        super().__init__()
        self.gate, self.up, self.down = (torch.nn.Linear(hidden, ffn), torch.nn.Linear(hidden, ffn), torch.nn.Linear(ffn, hidden))
        self.act, self.up_first = act, up_first

    def forward(self, x):
        g, u = self.gate(x), self.up(x)
        return self.down(u * self.act(g) if self.up_first else self.act(g) * u)


def test_swiglu_matches_eager():
    report = check_pass(GatedMLP(), (torch.randn(2, 7, 24),), "fuse_swiglu")
    assert report.passes[0].count == 1


def test_up_first_order_is_a_family_variant():
    report = check_pass(GatedMLP(up_first=True), (torch.randn(3, 5, 24),), "fuse_swiglu")
    assert report.passes[0].by_rewrite == {"up_times_act_gate": 1}


def test_broadcasting_is_refused():
    class Broadcast(torch.nn.Module):
        def forward(self, g, u):
            return torch.nn.functional.silu(g) * u

    res, _ = explain_one(Broadcast(), (torch.randn(2, 5, 8), torch.randn(1, 1, 8)), "fuse_swiglu")
    assert res.count == 0 and "same shape" in res.refused[0].reason
