"""Whole models through the Triton kernels (the CPU interpreter when TRITON_INTERPRET=1): the captured
graph's strides, dtypes and autograd wiring must work with the real kernels, not only the references."""

from __future__ import annotations

import pytest
import torch

import graphtune
from graphtune.kernels._dispatch import TRITON_INTERPRET, use_triton
from tests.helpers import compare_step, tiny_batch, twin_models


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
def test_model_through_kernels_matches_eager(family):
    if TRITON_INTERPRET:
        assert use_triton(torch.empty(1)), "TRITON_INTERPRET=1 but the Triton path is not taken"
    ref, opt = twin_models(family, lora=True)
    graphtune.optimize(opt, compiler="aot_eager")
    compare_step(ref, opt, tiny_batch(2, 7, seed=3))
