"""graphtune::lora_linear_group against peft's per-projection math (and m separate lora_linear ops),
forward and backward: odd shapes, ranks and output sizes per member, biases on some members,
x_lora = x or a shared separate tensor, unused members, upstream-grad layouts, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from graphtune.kernels.lora_group import lora_linear_group, reference_lora_linear_group
from graphtune.kernels.lora_linear import lora_linear
from tests.conftest import rel_err

SHAPES = [(2, 7, 24), (5, 33), (1, 1, 8)]
MEMBERS = [  # (out features, rank, bias, scaling) per member: q/k/v-like with GQA sizes, odd ones
    [(19, 4, False, 2.0), (8, 4, False, 2.0), (8, 4, False, 2.0)],
    [(13, 3, True, 0.5), (7, 5, False, 1.0)],
]


def _make(shape, members, dtype, *, separate_x_lora=False):
    k = shape[-1]
    x = torch.randn(shape, dtype=dtype)
    weights = [torch.randn(n, k, dtype=dtype) / k**0.5 for n, _, _, _ in members]
    biases = [torch.randn(n, dtype=dtype) if b else None for n, _, b, _ in members]
    lora_as = [torch.randn(r, k, dtype=dtype) / k**0.5 for _, r, _, _ in members]
    lora_bs = [torch.randn(n, r, dtype=dtype) for n, r, _, _ in members]
    scalings = [s for _, _, _, s in members]
    mask = (torch.rand(shape) > 0.25).to(dtype) / 0.75 if separate_x_lora else None
    return x, mask, weights, biases, lora_as, lora_bs, scalings


def _cast(args, dtype):
    x, mask, weights, biases, lora_as, lora_bs, scalings = args
    c = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    return c(x), c(mask), [c(t) for t in weights], [c(t) for t in biases], [c(t) for t in lora_as], [c(t) for t in lora_bs], scalings


def _run(fn, x, mask, weights, biases, lora_as, lora_bs, scalings, grads, *, x_grad=True, use=None):
    """Forward, backward with ``grads`` on the used outputs; returns outputs and every gradient."""
    xs = x.clone().requires_grad_(x_grad)
    a = [t.clone().requires_grad_() for t in lora_as]
    b = [t.clone().requires_grad_() for t in lora_bs]
    bias = [t.clone().requires_grad_() if t is not None else None for t in biases]
    x_lora = xs * mask if mask is not None else None
    ys = fn(xs, x_lora, weights, bias, a, b, scalings)
    use = range(len(ys)) if use is None else use
    torch.autograd.backward([ys[i] for i in use], [grads[i] for i in use])
    grads_out = ([xs.grad] if x_grad else []) + [t.grad for t in a + b] + [t.grad for t in bias if t is not None]
    return [ys[i].detach() for i in use] + grads_out


def _separate_ops(x, x_lora, weights, biases, lora_as, lora_bs, scalings):
    """The same projections as m graphtune::lora_linear ops (what fuse_lora leaves)."""
    xl = x if x_lora is None else x_lora
    return [lora_linear(x, xl, w, b, a, bb, s) for w, b, a, bb, s in zip(weights, biases, lora_as, lora_bs, scalings)]


@pytest.mark.parametrize("separate_x_lora", [False, True], ids=["x_lora_is_x", "shared_x_lora"])
@pytest.mark.parametrize("members", MEMBERS, ids=["qkv", "mixed"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_peft_fp32(shape, members, separate_x_lora):
    args = _make(shape, members, torch.float32, separate_x_lora=separate_x_lora)
    grads = [torch.randn(*shape[:-1], n) for n, _, _, _ in members]
    got = _run(lora_linear_group, *args, grads)
    for want in (_run(reference_lora_linear_group, *args, grads), _run(_separate_ops, *args, grads)):
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            assert rel_err(g, w) <= 1e-5


def test_bf16_matches_fp32_reference():
    """bf16 inputs: close to the fp32 math on the same (rounded) inputs, as close as peft's bf16 is."""
    members = MEMBERS[0]
    args = _make((3, 11, 64), members, torch.bfloat16)
    grads = [torch.randn(3, 11, n, dtype=torch.bfloat16) for n, _, _, _ in members]
    got = _run(lora_linear_group, *args, grads)
    peft_bf16 = _run(reference_lora_linear_group, *args, grads)
    exact = _run(reference_lora_linear_group, *_cast(args, torch.float32), [g.float() for g in grads])
    for g, p, e in zip(got, peft_bf16, exact):
        assert g.dtype == torch.bfloat16
        assert rel_err(g, e) <= 2e-2
        assert rel_err(g, e) <= 2 * rel_err(p, e) + 1e-2  # no worse than peft's own bf16 rounding


def test_no_input_grad_and_unused_member():
    """x frozen (first layer) -> no dx work; a member whose output is unused gets no LoRA gradient."""
    members = MEMBERS[0]
    args = _make((2, 5, 16), members, torch.float32)
    grads = [torch.randn(2, 5, n) for n, _, _, _ in members]
    got = _run(lora_linear_group, *args, grads, x_grad=False, use=[0, 2])
    want = _run(reference_lora_linear_group, *args, grads, x_grad=False, use=[0, 2])
    # outputs 0 and 2, then dA_0..2, dB_0..2: member 1 gets none, as in peft
    assert got[3] is None and got[6] is None and want[3] is None and want[6] is None
    for i in (0, 1, 2, 4, 5, 7):
        assert rel_err(got[i], want[i]) <= 1e-5


@pytest.mark.parametrize("grad_kind", ["noncontig", "expanded"])
def test_upstream_grad_layouts(grad_kind, make_grad):
    members = MEMBERS[1]
    args = _make((3, 5, 24), members, torch.float32)
    grads = [make_grad(grad_kind, torch.empty(3, 5, n)) for n, _, _, _ in members]
    got = _run(lora_linear_group, *args, grads)
    want = _run(reference_lora_linear_group, *args, grads)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


def test_saves_x_once_and_no_rank_r_activation():
    """Saved for backward: x (once) and the parameters -- no (N x r) LoRA activation, no x copy."""
    members = MEMBERS[0]
    x, _, weights, biases, lora_as, lora_bs, scalings = _make((4, 6, 32), members, torch.float32)
    x.requires_grad_()
    lora_as = [a.requires_grad_() for a in lora_as]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear_group(x, None, weights, biases, lora_as, lora_bs, scalings)
    params = {id(t) for t in weights + lora_as + lora_bs}
    activations = [t for t in saved if id(t) not in params]
    assert len(activations) == 1 and activations[0].data_ptr() == x.data_ptr()


def test_opcheck():
    members = MEMBERS[1]
    x, mask, weights, biases, lora_as, lora_bs, scalings = _make((2, 3, 8), members, torch.float32, separate_x_lora=True)
    x.requires_grad_()
    for t in lora_as + lora_bs:
        t.requires_grad_()
    present = [b for b in biases if b is not None]
    for x_lora in (None, x.detach() * mask):
        torch.library.opcheck(
            torch.ops.graphtune.lora_linear_group.default,
            (x, x_lora, weights, present, [b is not None for b in biases], lora_as, lora_bs, scalings),
        )


def test_bad_shapes_are_clear_errors():
    x, _, weights, biases, lora_as, lora_bs, scalings = _make((2, 8), MEMBERS[0], torch.float32)
    with pytest.raises(ValueError, match="do not chain"):
        lora_linear_group(x, None, weights, biases, [lora_as[0][:, :4]] + lora_as[1:], lora_bs, scalings)
    with pytest.raises(ValueError, match="3 weights but"):
        lora_linear_group(x, None, weights, biases, lora_as[:2], lora_bs, scalings)
