"""LoRA projections that read one input, as one custom op: ``graphtune::lora_linear_group``.

Why: q/k/v (and gate/up when the MLP block is not fused) are m projections of the same hidden state
``x``. As m separate ``lora_linear`` ops (or peft's eager modules) they run m rank-r matmuls over
``x_lora``, and their backward hands autograd 2m gradient tensors of ``x``'s size (base and LoRA part
of each member) that it then sums. This op, for members ``i`` with frozen ``W_i`` (n_i x K), optional
bias ``b_i``, LoRA ``A_i`` (r_i x K), ``B_i`` (n_i x r_i) and scaling ``s_i``::

    H   = x_lora A_cat^T              one (N x R) matmul, A_cat = cat_i(A_i), R = sum r_i
    y_i = x W_i^T + b_i + s_i H_i B_i^T     base matmul (bias as the addmm input), LoRA added by
                                            addmm_(alpha=s_i) into the same buffer

and in the backward, with ``H`` recomputed (never saved)::

    dB_i   = s_i dy_i^T H_i                 (n_i x r_i)
    dH^T   = [s_i B_i^T dy_i^T]_i           rows of one (R x N) buffer, written by addmm(beta=0)
    dA_cat = dH^T x_lora                    one matmul; dA_i are its row blocks
    dx     = sum_i dy_i W_i  (+ dH A_cat when x_lora is x)   ONE (N x K) buffer, addmm_ accumulation
    db_i   = sum over tokens of dy_i        (only when the bias is trainable)

``x_lora`` is ``None`` when the members' LoRA input is ``x`` itself (no lora_dropout): then ``dx`` is
the only gradient of ``x`` -- one tensor instead of the 2m autograd would sum. A separate ``x_lora``
(shared by all members) gets its own gradient ``dH A_cat``. Frozen base weights get no gradient.

Memory per layer (q/k/v: m = 3; N tokens, hidden K, ranks r_i, R = sum r_i, b bytes per element):

* saved for backward vs peft eager: peft keeps each member's ``h_i = x_lora A_i^T`` (N r_i b) besides
  ``x``; this op keeps ``x_lora`` only: **N R b** less (the same as m ``graphtune::lora_linear`` ops);
* backward transients vs peft eager / m ``lora_linear`` ops: 2m gradient tensors of N K b each
  (base and LoRA part per member) that autograd adds up become one: up to **(2m - 1) N K b** fewer
  bytes allocated, and 2m - 1 full-size adds disappear;
* forward transients vs peft eager: no ``linear(h_i, B_i)``, ``* s_i`` and ``+`` temporaries of
  N n_i b each (**2 N sum(n_i) b**); the rank-r matmul reads ``x_lora`` once instead of m times.

Everything is torch matmuls (cuBLAS on CUDA, in the input dtype like peft's): slices of ``H`` and the
transposes are strided views, never copies; only ``A_cat`` (R x K) and the dA split are small copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["lora_linear_group", "reference_lora_linear_group"]


def reference_lora_linear_group(x, x_lora, weights, biases, lora_as, lora_bs, scalings) -> list[torch.Tensor]:
    """peft's math per member: ``linear(x, W_i, b_i) + linear(linear(x_lora, A_i), B_i) * s_i``."""
    x_lora = x if x_lora is None else x_lora
    F = torch.nn.functional
    return [
        F.linear(x, w, b) + F.linear(F.linear(x_lora, a), bb) * s
        for w, b, a, bb, s in zip(weights, biases, lora_as, lora_bs, scalings)
    ]


# ----------------------------------------------------------------------------------------------
# 2-D building blocks, shared with ``lora_mlp.py`` (x2: N x K; every matmul is one cuBLAS call)
# ----------------------------------------------------------------------------------------------
def spread_biases(biases: Sequence[torch.Tensor], has_bias: Sequence[bool]) -> list[torch.Tensor | None]:
    """The op's compact bias list (present biases only, see below) back to one entry per member."""
    it = iter(biases)
    out = [next(it) if h else None for h in has_bias]
    if next(it, None) is not None:
        raise ValueError("more biases than has_bias entries that are True")
    return out


def lora_forward_2d(
    x2: torch.Tensor,
    xl2: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
) -> list[torch.Tensor]:
    """``[x2 W_i^T + b_i + s_i (xl2 A_i^T) B_i^T]``: one rank-R matmul, then per member base + addmm_."""
    a_cat = lora_as[0] if len(lora_as) == 1 else torch.cat(list(lora_as))
    h = xl2 @ a_cat.t()  # (N, R)
    ys, off = [], 0
    for w, b, a, bb, s in zip(weights, biases, lora_as, lora_bs, scalings):
        r = a.shape[0]
        y = torch.addmm(b, x2, w.t()) if b is not None else torch.mm(x2, w.t())
        y.addmm_(h[:, off : off + r], bb.t(), alpha=s)
        ys.append(y)
        off += r
    return ys


def lora_backward_2d(
    dys: Sequence[torch.Tensor],
    xl2: torch.Tensor,
    weights: Sequence[torch.Tensor],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    *,
    need_dx: bool,
    x_lora_is_x: bool,
    need_dx_lora: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
    """(dx, dx_lora, [dA_i], [dB_i]) for members sharing ``xl2`` (see the module docstring).

    ``dys`` are (N x n_i) 2-D gradients. With ``x_lora_is_x`` the LoRA part of the input gradient
    is accumulated into ``dx`` and ``dx_lora`` is None.
    """
    a_cat = lora_as[0] if len(lora_as) == 1 else torch.cat(list(lora_as))
    n_tok = xl2.shape[0]
    h = xl2 @ a_cat.t()  # recomputed (N, R)
    dht = xl2.new_empty((a_cat.shape[0], n_tok))  # dH^T: member blocks are contiguous row ranges
    d_bs, off = [], 0
    for dy, a, bb, s in zip(dys, lora_as, lora_bs, scalings):
        r = a.shape[0]
        d_bs.append(torch.addmm(bb, dy.t(), h[:, off : off + r], beta=0, alpha=s))
        dht[off : off + r].addmm_(bb.t(), dy.t(), beta=0, alpha=s)
        off += r
    del h
    d_a_cat = dht @ xl2  # (R, K)
    d_as, off = [], 0
    for a in lora_as:  # the op's outputs must not alias each other: R x K is small
        d_as.append(d_a_cat[off : off + a.shape[0]].clone())
        off += a.shape[0]
    dx = dx_lora = None
    if need_dx:
        dx = torch.mm(dys[0], weights[0])
        for dy, w in zip(dys[1:], weights[1:]):
            dx.addmm_(dy, w)
        if x_lora_is_x:
            dx.addmm_(dht.t(), a_cat)
    if not x_lora_is_x and need_dx_lora:
        dx_lora = torch.mm(dht.t(), a_cat)
    return dx, dx_lora, d_as, d_bs


def _check(x, x_lora, weights, biases, has_bias, lora_as, lora_bs, scalings) -> None:
    m = len(weights)
    if m == 0 or not (len(lora_as) == len(lora_bs) == len(scalings) == len(has_bias) == m):
        raise ValueError(
            f"graphtune::lora_linear_group: {m} weights but {len(lora_as)} lora_as, {len(lora_bs)} lora_bs, "
            f"{len(scalings)} scalings, {len(has_bias)} has_bias"
        )
    if len(biases) != sum(has_bias):
        raise ValueError(f"graphtune::lora_linear_group: {len(biases)} biases for {sum(has_bias)} members with a bias")
    if x_lora is not None and x_lora.shape != x.shape:
        raise ValueError(f"graphtune::lora_linear_group: x {tuple(x.shape)} and x_lora {tuple(x_lora.shape)} differ")
    k = x.shape[-1]
    for i, (w, a, bb) in enumerate(zip(weights, lora_as, lora_bs)):
        if w.dim() != 2 or a.dim() != 2 or bb.dim() != 2:
            raise ValueError(f"graphtune::lora_linear_group: member {i}: weight, lora_a and lora_b must be 2-D")
        if w.shape[1] != k or a.shape[1] != k or bb.shape[1] != a.shape[0] or bb.shape[0] != w.shape[0]:
            raise ValueError(
                f"graphtune::lora_linear_group: member {i}: shapes do not chain: x {tuple(x.shape)}, weight "
                f"{tuple(w.shape)}, lora_a {tuple(a.shape)}, lora_b {tuple(bb.shape)}"
            )


@torch.library.custom_op("graphtune::lora_linear_group", mutates_args=())
def _lora_linear_group_op(
    x: torch.Tensor,
    x_lora: torch.Tensor | None,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    has_bias: list[bool],
    lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor],
    scalings: list[float],
) -> list[torch.Tensor]:
    """One output per member. ``biases`` holds only the present biases, in member order, with
    ``has_bias`` saying which members have one (autograd cannot take a list with None in it)."""
    _check(x, x_lora, weights, biases, has_bias, lora_as, lora_bs, scalings)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    xl2 = x2 if x_lora is None else x_lora.reshape(-1, k)
    ys = lora_forward_2d(x2, xl2, weights, spread_biases(biases, has_bias), lora_as, lora_bs, scalings)
    return [y.reshape(*lead, y.shape[-1]) for y in ys]


@_lora_linear_group_op.register_fake
def _lora_linear_group_fake(x, x_lora, weights, biases, has_bias, lora_as, lora_bs, scalings):
    _check(x, x_lora, weights, biases, has_bias, lora_as, lora_bs, scalings)
    dtype = torch.promote_types(x.dtype, weights[0].dtype)
    return [x.new_empty((*x.shape[:-1], w.shape[0]), dtype=dtype) for w in weights]


@torch.library.custom_op("graphtune::lora_linear_group_backward", mutates_args=())
def _lora_linear_group_backward_op(
    dys: list[torch.Tensor],
    x_lora: torch.Tensor,
    weights: list[torch.Tensor],
    lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor],
    scalings: list[float],
    x_lora_is_x: bool,
    need_dx: bool,
    need_dx_lora: bool,
    need_db: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(dx or empty, dx_lora or empty, [dA_i], [dB_i], [db_i for members with need_db]).

    ``x_lora`` is the tensor the members' LoRA read (``x`` itself when ``x_lora_is_x``)."""
    k = x_lora.shape[-1]
    xl2 = x_lora.reshape(-1, k)
    dys2 = [dy.reshape(-1, dy.shape[-1]) for dy in dys]
    dx, dx_lora, d_as, d_bs = lora_backward_2d(
        dys2, xl2, weights, lora_as, lora_bs, scalings, need_dx=need_dx, x_lora_is_x=x_lora_is_x, need_dx_lora=need_dx_lora
    )
    empty = x_lora.new_empty(0)
    dbs = [dy.sum(0) for dy, need in zip(dys2, need_db) if need]
    return (
        dx.reshape(x_lora.shape) if dx is not None else empty,
        dx_lora.reshape(x_lora.shape) if dx_lora is not None else empty.clone(),
        d_as,
        d_bs,
        dbs,
    )


@_lora_linear_group_backward_op.register_fake
def _lora_linear_group_backward_fake(dys, x_lora, weights, lora_as, lora_bs, scalings, x_lora_is_x, need_dx, need_dx_lora, need_db):
    dtype = torch.promote_types(dys[0].dtype, weights[0].dtype)
    full = lambda need: x_lora.new_empty(x_lora.shape if need else (0,), dtype=dtype)  # noqa: E731
    return (
        full(need_dx),
        full(need_dx_lora and not x_lora_is_x),
        [a.new_empty(a.shape) for a in lora_as],
        [bb.new_empty(bb.shape) for bb in lora_bs],
        [dy.new_empty(dy.shape[-1]) for dy, need in zip(dys, need_db) if need],
    )


def _setup_context(ctx, inputs, output):
    x, x_lora, weights, biases, has_bias, lora_as, lora_bs, scalings = inputs
    m = len(weights)
    # x_lora once (x itself without dropout), never H; the frozen weights are references, not copies
    ctx.save_for_backward(x if x_lora is None else x_lora, *weights, *lora_as, *lora_bs)
    ctx.m = m
    ctx.scalings = list(scalings)
    ctx.has_bias = list(has_bias)
    ctx.x_lora_is_x = x_lora is None
    ctx.set_materialize_grads(False)  # an unused member's grad stays None instead of a zero tensor


def _backward(ctx, dys):
    saved = ctx.saved_tensors
    m = ctx.m
    x_lora, weights, lora_as, lora_bs = saved[0], saved[1 : 1 + m], saved[1 + m : 1 + 2 * m], saved[1 + 2 * m :]
    need = ctx.needs_input_grad  # structured like the inputs: lists for the list arguments
    need_bias = list(need[3]) if isinstance(need[3], (list, tuple)) else [bool(need[3])] * sum(ctx.has_bias)
    present = [i for i in range(m) if dys[i] is not None]
    bias_slot = {i: j for j, i in enumerate(i for i in range(m) if ctx.has_bias[i])}
    none_as, none_bs, none_biases = [None] * m, [None] * m, [None] * len(bias_slot)
    if not present:
        return None, None, [None] * m, none_biases, None, none_as, none_bs, None
    need_db = [ctx.has_bias[i] and need_bias[bias_slot[i]] for i in present]
    dx, dx_lora, d_as, d_bs, dbs = _lora_linear_group_backward_op(
        [dys[i] for i in present],
        x_lora,
        [weights[i] for i in present],
        [lora_as[i] for i in present],
        [lora_bs[i] for i in present],
        [ctx.scalings[i] for i in present],
        ctx.x_lora_is_x,
        bool(need[0]),
        bool(need[1]) if not ctx.x_lora_is_x else False,
        need_db,
    )
    grad_as, grad_bs, grad_biases = list(none_as), list(none_bs), list(none_biases)
    it_db = iter(dbs)
    for j, i in enumerate(present):
        if need[5][i]:
            grad_as[i] = d_as[j]
        if need[6][i]:
            grad_bs[i] = d_bs[j]
        if need_db[j]:
            grad_biases[bias_slot[i]] = next(it_db)
    return (
        dx if need[0] else None,
        dx_lora if (not ctx.x_lora_is_x and need[1]) else None,
        [None] * m,  # frozen base weights: the pass refuses trainable ones
        grad_biases,
        None,
        grad_as,
        grad_bs,
        None,
    )


_lora_linear_group_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear_group(
    x: torch.Tensor,
    x_lora: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
) -> list[torch.Tensor]:
    """Members ``linear(x, W_i, b_i) + s_i * B_i(A_i(x_lora))`` via ``graphtune::lora_linear_group``.

    ``x_lora=None`` means the LoRA input is ``x`` itself; ``biases`` has one entry (or None) per member.
    """
    has_bias = [b is not None for b in biases]
    present = [b for b in biases if b is not None]
    return torch.ops.graphtune.lora_linear_group(
        x, x_lora, list(weights), present, has_bias, list(lora_as), list(lora_bs), [float(s) for s in scalings]
    )
