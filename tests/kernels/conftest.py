"""Fixtures for the kernel tests.

The suite runs twice: with ``TRITON_INTERPRET=1`` (the Makefile sets it for its own pytest process,
so the Triton kernels run on the CPU) and without it (the ops fall back to the torch reference).
Nothing here changes global state beyond seeding torch's RNG per test.
"""

from __future__ import annotations

import os

import pytest
import torch

import graphtune.kernels  # noqa: F401  (registers the graphtune:: ops)
from graphtune.kernels import _dispatch

# On the GPU machine: GRAPHTUNE_TEST_DEVICE=cuda runs the same tests on CUDA tensors (real Triton).
TEST_DEVICE = os.environ.get("GRAPHTUNE_TEST_DEVICE", "cpu")
if TEST_DEVICE != "cpu":
    torch.set_default_device(TEST_DEVICE)


def _triton_expected() -> bool:
    """Whether the ops must take the Triton path on a default-device tensor in this process."""
    if not _dispatch.HAS_TRITON or _dispatch.kernel_mode() == "reference":
        return False
    return TEST_DEVICE.startswith("cuda") or _dispatch.TRITON_INTERPRET


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def triton_expected() -> bool:
    return _triton_expected()


@pytest.fixture
def interpret_env() -> bool:
    """Whether the environment asks for Triton on the CPU, read independently of graphtune's parsing."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return interpret and os.environ.get("GRAPHTUNE_KERNELS", "auto").lower() != "reference"


@pytest.fixture
def make_grad():
    """``make_grad(kind, like)``: an upstream grad shaped like ``like``.

    kind ``"random"``: contiguous randn; ``"noncontig"``: a transposed view of a randn tensor;
    ``"expanded"``: a row broadcast with stride 0 over all leading dims (what ``.sum()``-style
    reductions and broadcasts hand to a backward).
    """

    def make(kind: str, like: torch.Tensor) -> torch.Tensor:
        shape, dtype = like.shape, like.dtype
        if kind == "random":
            return torch.randn(shape, dtype=dtype)
        if kind == "noncontig":
            g = torch.randn(tuple(reversed(shape)), dtype=dtype)
            g = g.permute(*reversed(range(len(shape))))
            assert not g.is_contiguous() or len(shape) < 2
            return g
        if kind == "expanded":
            g = torch.randn(shape[-1], dtype=dtype).expand(shape)
            assert g.stride()[0] == 0 or len(shape) < 2
            return g
        raise ValueError(kind)

    return make

