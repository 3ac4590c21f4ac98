"""A gated MLP block with LoRA on every projection as one custom op: ``graphtune::lora_mlp``.

``down(act(gate(x)) * up(x))`` where each of gate/up/down is a frozen linear plus a LoRA branch
(``W x + b + s B A x``) and ``act`` is SiLU (``"swiglu"``: Llama, Mistral, Qwen, Phi-3) or tanh-GELU
(``"geglu"``: Gemma). Phi-3's fused ``gate_up_proj`` is the two-weight form: ``weights = [W_gu, W_down]``,
``gate, up = gate_up(x).chunk(2, -1)``.

Why one op: as separate ``lora_linear`` + ``swiglu`` ops the block saves the down projection's
input, the activation product ``p = act(gate) * up`` (N x F), for its LoRA-A gradient. This op's
backward recomputes ``p`` from gate and up with the Triton GLU forward (``graphtune::swiglu`` /
``graphtune::geglu``, the same kernels and roundings as the unfused graph) and saves only

* ``x`` (the block input), ``gate`` and ``up`` (pre-activations), and the LoRA weights; or
* with ``recompute_gate_up=True``, ``x`` alone: gate and up are recomputed in the backward too
  (two base matmuls of 2 N K F flops each plus their LoRA branch: the price of the memory).

Nothing rank-r is saved either (the LoRA activations ``x A^T``, ``p A_down^T`` are recomputed
N x r matmuls). Backward, with everything 2-D (N tokens)::

    p    = act(gate, up)                                  Triton GLU forward (recomputed)
    dp   = dy W_d + (s_d dy B_d) A_d                      one (N x F) buffer, addmm_
    dA_d, dB_d from p and dy;  p is freed here
    dgate, dup = act_backward(dp, gate, up)               Triton GLU backward
    dx   = dgate W_g + dup W_u + dH_gu A_gu               one (N x K) buffer (see lora_group.py)

Memory per layer (N tokens, hidden K, intermediate F, rank r, b bytes per element), counted in
elements, times b for bytes. peft eager saves x (N K), the gate output and silu(gate) (2 N F), up
(N F), the product p (N F) and three rank-r activations (3 N r): N K + 4 N F + 3 N r. This op saves
N K + 2 N F, i.e. **(2 N F + 3 N r) b bytes less** (``recompute_gate_up``: N K only, **(4 N F +
3 N r) b** less). Against graphtune's unfused ``lora_linear`` + ``swiglu`` graph (N K + 3 N F) it
saves **N F b** (recompute: **3 N F b**). Example, Llama-3-8B (K 4096, F 14336) at 8192 tokens in
bf16: N F b = 235 MB per layer. The backward also allocates one dx buffer instead of the 4 (gate
and up: base and LoRA parts) autograd would sum, and one dp buffer instead of 2.

All matmuls are torch (cuBLAS on CUDA) in the input dtype, like peft's; the frozen weights are
never copied (Phi-3's gate/up halves are row views of ``W_gu``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

import graphtune.kernels.geglu  # noqa: F401  (registers graphtune::geglu)
import graphtune.kernels.swiglu  # noqa: F401  (registers graphtune::swiglu)
from graphtune.kernels.lora_group import lora_backward_2d, lora_forward_2d, spread_biases

__all__ = ["ACTIVATIONS", "lora_mlp", "reference_lora_mlp"]

ACTIVATIONS = ("swiglu", "geglu")


def _act(activation: str):
    return torch.ops.graphtune.swiglu if activation == "swiglu" else torch.ops.graphtune.geglu


def _act_backward(activation: str):
    return torch.ops.graphtune.swiglu_backward if activation == "swiglu" else torch.ops.graphtune.geglu_backward


def reference_lora_mlp(x, weights, biases, lora_as, lora_bs, scalings, activation: str = "swiglu") -> torch.Tensor:
    """peft + HF eager: each projection ``linear(x, W, b) + linear(linear(x, A), B) * s``, then
    ``down(act(gate) * up)`` (Phi-3: ``gate, up = gate_up(x).chunk(2, -1)``)."""

    def proj(t, i):
        return F.linear(t, weights[i], biases[i]) + F.linear(F.linear(t, lora_as[i]), lora_bs[i]) * scalings[i]

    if len(weights) == 2:
        gate, up = proj(x, 0).chunk(2, dim=-1)
    else:
        gate, up = proj(x, 0), proj(x, 1)
    act = F.silu(gate) if activation == "swiglu" else F.gelu(gate, approximate="tanh")
    return proj(act * up, len(weights) - 1)


def _check(x, weights, biases, has_bias, lora_as, lora_bs, scalings, activation) -> None:
    m = len(weights)
    if activation not in ACTIVATIONS:
        raise ValueError(f"graphtune::lora_mlp: activation must be one of {ACTIVATIONS}, not {activation!r}")
    if m not in (2, 3) or not (len(lora_as) == len(lora_bs) == len(scalings) == len(has_bias) == m):
        raise ValueError(
            f"graphtune::lora_mlp: needs [gate, up, down] or [gate_up, down]; got {m} weights, {len(lora_as)} lora_as, "
            f"{len(lora_bs)} lora_bs, {len(scalings)} scalings, {len(has_bias)} has_bias"
        )
    if len(biases) != sum(has_bias):
        raise ValueError(f"graphtune::lora_mlp: {len(biases)} biases for {sum(has_bias)} projections with a bias")
    for i, (w, a, bb) in enumerate(zip(weights, lora_as, lora_bs)):
        if w.dim() != 2 or a.dim() != 2 or bb.dim() != 2 or a.shape[1] != w.shape[1] or bb.shape != (w.shape[0], a.shape[0]):
            raise ValueError(
                f"graphtune::lora_mlp: projection {i}: weight {tuple(w.shape)}, lora_a {tuple(a.shape)}, "
                f"lora_b {tuple(bb.shape)} do not chain"
            )
    ffn = weights[-1].shape[1]
    gate_rows = 2 * ffn if m == 2 else ffn
    if any(w.shape != (gate_rows, x.shape[-1]) for w in weights[:-1]):
        raise ValueError(
            f"graphtune::lora_mlp: x {tuple(x.shape)}, gate/up weights {[tuple(w.shape) for w in weights[:-1]]} "
            f"and down weight {tuple(weights[-1].shape)} do not chain"
        )


def _gate_up(x2, weights, biases, lora_as, lora_bs, scalings):
    """(gate, up, tensors to save): 2-D (N x F); Phi-3's halves are column views of one (N x 2F)."""
    if len(weights) == 2:
        gu = lora_forward_2d(x2, x2, weights[:1], biases[:1], lora_as[:1], lora_bs[:1], scalings[:1])[0]
        ffn = weights[1].shape[1]
        return gu[:, :ffn], gu[:, ffn:], [gu]
    gate, up = lora_forward_2d(x2, x2, weights[:2], biases[:2], lora_as[:2], lora_bs[:2], scalings[:2])
    return gate, up, [gate, up]


@torch.library.custom_op("graphtune::lora_mlp", mutates_args=())
def _lora_mlp_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    has_bias: list[bool],
    lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor],
    scalings: list[float],
    activation: str,
    recompute_gate_up: bool,
) -> list[torch.Tensor]:
    """``[y] + saved``: ``saved`` are the pre-activations kept for the backward ([gate, up], Phi-3's
    [gate_up], or [] with ``recompute_gate_up``); they are outputs only so autograd can keep them.
    ``biases`` holds the present biases in projection order; ``has_bias`` says which have one."""
    _check(x, weights, biases, has_bias, lora_as, lora_bs, scalings, activation)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    bias_list = spread_biases(biases, has_bias)
    gate, up, saved = _gate_up(x2, weights, bias_list, lora_as, lora_bs, scalings)
    p = _act(activation)(gate, up)
    y = lora_forward_2d(p, p, weights[-1:], bias_list[-1:], lora_as[-1:], lora_bs[-1:], scalings[-1:])[0]
    del p
    out = [y.reshape(*lead, y.shape[-1])]
    if not recompute_gate_up:
        out += [t.reshape(*lead, t.shape[-1]) for t in saved]
    return out


def _saved_shapes(x, weights, recompute_gate_up):
    if recompute_gate_up:
        return []
    ffn = weights[-1].shape[1]
    return [(*x.shape[:-1], 2 * ffn)] if len(weights) == 2 else [(*x.shape[:-1], ffn)] * 2


@_lora_mlp_op.register_fake
def _lora_mlp_fake(x, weights, biases, has_bias, lora_as, lora_bs, scalings, activation, recompute_gate_up):
    _check(x, weights, biases, has_bias, lora_as, lora_bs, scalings, activation)
    dtype = torch.promote_types(x.dtype, weights[0].dtype)
    y = x.new_empty((*x.shape[:-1], weights[-1].shape[0]), dtype=dtype)
    return [y] + [x.new_empty(s, dtype=dtype) for s in _saved_shapes(x, weights, recompute_gate_up)]


@torch.library.custom_op("graphtune::lora_mlp_backward", mutates_args=())
def _lora_mlp_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    saved: list[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    has_bias: list[bool],
    lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor],
    scalings: list[float],
    activation: str,
    need_dx: bool,
    need_db: list[bool],
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(dx or empty, [dA_i], [dB_i], [db_i for projections with need_db]); recomputes the activation
    product (and gate/up when ``saved`` is empty)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    dy2 = dy.reshape(-1, dy.shape[-1])
    bias_list = spread_biases(biases, has_bias)
    fused = len(weights) == 2
    ffn = weights[-1].shape[1]
    if not saved:
        gate, up, _ = _gate_up(x2, weights, bias_list, lora_as, lora_bs, scalings)
    elif fused:
        gu = saved[0].reshape(-1, 2 * ffn)
        gate, up = gu[:, :ffn], gu[:, ffn:]
    else:
        gate, up = saved[0].reshape(-1, ffn), saved[1].reshape(-1, ffn)

    # down projection: its input p is recomputed, its input gradient dp is one buffer
    p = _act(activation)(gate, up)
    dp, _, (d_a_down,), (d_b_down,) = lora_backward_2d(
        [dy2], p, weights[-1:], lora_as[-1:], lora_bs[-1:], scalings[-1:], need_dx=True, x_lora_is_x=True, need_dx_lora=False
    )
    del p
    d_gate, d_up = _act_backward(activation)(dp, gate, up)
    del dp

    # gate and up read x: one rank-r matmul, one dx buffer
    if fused:  # two members that share A: the row halves of W_gu and B_gu (views, no copies)
        w, a, bb, s = weights[0], lora_as[0], lora_bs[0], scalings[0]
        dx, _, d_as, d_bs = lora_backward_2d(
            [d_gate, d_up], x2, [w[:ffn], w[ffn:]], [a, a], [bb[:ffn], bb[ffn:]], [s, s],
            need_dx=need_dx, x_lora_is_x=True, need_dx_lora=False,
        )
        d_as, d_bs = [d_as[0] + d_as[1]], [torch.cat(d_bs)]
        gate_up_db = [torch.cat([d_gate.sum(0), d_up.sum(0)])]
    else:
        dx, _, d_as, d_bs = lora_backward_2d(
            [d_gate, d_up], x2, weights[:2], lora_as[:2], lora_bs[:2], scalings[:2],
            need_dx=need_dx, x_lora_is_x=True, need_dx_lora=False,
        )
        gate_up_db = [d_gate.sum(0), d_up.sum(0)]
    all_db = gate_up_db + [dy2.sum(0)]
    dbs = [db for db, need in zip(all_db, need_db) if need]
    return (dx.reshape(x.shape) if dx is not None else x.new_empty(0), d_as + [d_a_down], d_bs + [d_b_down], dbs)


@_lora_mlp_backward_op.register_fake
def _lora_mlp_backward_fake(dy, x, saved, weights, biases, has_bias, lora_as, lora_bs, scalings, activation, need_dx, need_db):
    dtype = torch.promote_types(dy.dtype, weights[0].dtype)
    return (
        x.new_empty(x.shape if need_dx else (0,), dtype=dtype),
        [a.new_empty(a.shape) for a in lora_as],
        [bb.new_empty(bb.shape) for bb in lora_bs],
        [w.new_empty(w.shape[0]) for w, need in zip(weights, need_db) if need],
    )


def _setup_context(ctx, inputs, output):
    x, weights, biases, has_bias, lora_as, lora_bs, scalings, activation, recompute_gate_up = inputs
    saved = list(output[1:])
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # the saved pre-activations never get a (zero) gradient
    ctx.save_for_backward(x, *saved, *weights, *biases, *lora_as, *lora_bs)
    ctx.counts = (len(saved), len(weights), len(biases))
    ctx.has_bias = list(has_bias)
    ctx.scalings = list(scalings)
    ctx.activation = activation


def _backward(ctx, grads):
    dy = grads[0]
    n_saved, m, n_bias = ctx.counts
    need = ctx.needs_input_grad
    if dy is None:
        return None, [None] * m, [None] * n_bias, None, [None] * m, [None] * m, None, None, None
    t = ctx.saved_tensors
    x, rest = t[0], t[1:]
    saved, rest = list(rest[:n_saved]), rest[n_saved:]
    weights, rest = list(rest[:m]), rest[m:]
    biases, rest = list(rest[:n_bias]), rest[n_bias:]
    lora_as, lora_bs = list(rest[:m]), list(rest[m:])
    need_bias = list(need[2]) if isinstance(need[2], (list, tuple)) else [bool(need[2])] * n_bias
    need_db, it = [], iter(need_bias)
    for h in ctx.has_bias:
        need_db.append(bool(next(it)) if h else False)
    dx, d_as, d_bs, dbs = _lora_mlp_backward_op(
        dy, x, saved, weights, biases, ctx.has_bias, lora_as, lora_bs, ctx.scalings, ctx.activation, bool(need[0]), need_db
    )
    it_db = iter(dbs)
    grad_biases = [next(it_db) if need_db[i] else None for i in range(m) if ctx.has_bias[i]]
    return (
        dx if need[0] else None,
        [None] * m,  # frozen base weights: the pass refuses trainable ones
        grad_biases,
        None,
        [g if n else None for g, n in zip(d_as, need[4])],
        [g if n else None for g, n in zip(d_bs, need[5])],
        None,
        None,
        None,
    )


_lora_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def lora_mlp(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    activation: str = "swiglu",
    recompute_gate_up: bool = False,
) -> torch.Tensor:
    """The LoRA MLP block via ``graphtune::lora_mlp``: projections ``[gate, up, down]`` or Phi-3's
    ``[gate_up, down]``; ``biases`` has one entry (or None) per projection."""
    has_bias = [b is not None for b in biases]
    present = [b for b in biases if b is not None]
    return torch.ops.graphtune.lora_mlp(
        x, list(weights), present, has_bias, list(lora_as), list(lora_bs), [float(s) for s in scalings],
        activation, bool(recompute_gate_up),
    )[0]
