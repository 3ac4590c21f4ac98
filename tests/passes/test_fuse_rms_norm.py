from __future__ import annotations

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tests.passes.common import check_pass, explain_one


class Norms(torch.nn.Module):
    def __init__(self, cls, hidden):
        super().__init__()
        self.a = cls(hidden, eps=1e-5)
        self.b = cls(hidden, eps=1e-6)
        with torch.no_grad():
            self.a.weight.normal_()
            self.b.weight.normal_()

    def forward(self, x):
        return self.b(self.a(x) * 2.0)


@pytest.mark.parametrize("cls, variant", [(LlamaRMSNorm, "llama"), (Gemma3RMSNorm, "gemma")])
@pytest.mark.parametrize("shape", [(2, 7, 67), (3, 5, 32)])
def test_rewrites_and_matches_eager(cls, variant, shape):
    report = check_pass(Norms(cls, shape[-1]), (torch.randn(shape),), "fuse_rms_norm")
    (res,) = report.passes
    assert res.count == 2 and res.by_rewrite == {variant: 2}


def test_intermediate_escaping_blocks_the_rewrite():
    class Leaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(16))

        def forward(self, x):
            h = x.to(torch.float32)
            variance = h.pow(2).mean(-1, keepdim=True)
            out = self.weight * (h * torch.rsqrt(variance + 1e-6)).to(x.dtype)
            return out, variance  # the variance is used outside the norm

    res, _ = explain_one(Leaky(), (torch.randn(2, 3, 16),), "fuse_rms_norm")
    assert res.count == 0


def test_cast_to_other_dtype_is_refused_with_reason():
    class CastsToHalf(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(16, dtype=torch.float16))

        def forward(self, x):
            h = x.to(torch.float32)
            variance = h.pow(2).mean(-1, keepdim=True)
            h = h * torch.rsqrt(variance + 1e-6)
            return self.weight * h.to(torch.float16)

    res, _ = explain_one(CastsToHalf(), (torch.randn(2, 3, 16),), "fuse_rms_norm")
    assert res.count == 0 and len(res.refused) == 1
    assert "not to the input dtype" in res.refused[0].reason
