from __future__ import annotations

import functools

import torch

from tests.passes.common import check_pass, explain_one
from tests.passes.test_fuse_swiglu import GatedMLP

tanh_gelu = functools.partial(torch.nn.functional.gelu, approximate="tanh")


def test_geglu_tanh_matches_eager():
    report = check_pass(GatedMLP(act=tanh_gelu), (torch.randn(2, 9, 24),), "fuse_geglu")
    assert report.passes[0].count == 1


def test_exact_gelu_is_not_matched():
    res, _ = explain_one(GatedMLP(act=torch.nn.functional.gelu), (torch.randn(2, 9, 24),), "fuse_geglu")
    assert res.count == 0
