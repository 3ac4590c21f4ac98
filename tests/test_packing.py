"""Padding-free packing: collator and datasets packing function shapes, boundary labels, exact
num_items_in_batch, overflow split/reject, TRL's shapes; and with a model, every packed example's
loss equals the example run alone, gradients equal the padded (unpacked) batch."""

from __future__ import annotations

import pytest
import torch

import graphtune.attention as ga
from graphtune.data.packing import (
    IGNORE_INDEX,
    PackingCollator,
    mask_boundary_labels,
    num_items_in_batch,
    pack_examples,
    segment_lengths,
)
from graphtune.tiny import tiny_model
from tests.conftest import rel_err


def _examples(lengths, seed=0, labels=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        ex = {"input_ids": ids}
        if labels:  # a prompt of 2 tokens masked, as SFT does
            ex["labels"] = [IGNORE_INDEX] * min(2, n) + ids[2:]
        out.append(ex)
    return out


def test_collator_output():
    exs = _examples([5, 1, 7, 3], labels=True)
    batch = PackingCollator()(exs)
    assert set(batch) == {"input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, 16)
    assert batch["input_ids"][0].tolist() == sum((e["input_ids"] for e in exs), [])
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 6, 13, 16] and batch["cu_seq_lens_q"].dtype == torch.int32
    starts = batch["cu_seq_lens_q"][:-1].tolist()
    labels = batch["labels"][0]
    assert all(labels[s] == IGNORE_INDEX for s in starts)  # no target across a boundary
    # everything else is the example's own label
    for (a, b), ex in zip(zip(starts, batch["cu_seq_lens_q"][1:].tolist()), exs):
        assert labels[a + 1:b].tolist() == ex["labels"][1:]
    # exact count: each example contributes what it contributes alone (its labels[1:])
    alone = sum(sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX) for ex in exs)
    assert num_items_in_batch(batch["labels"]) == alone == 9
    full = PackingCollator(return_max_length=True, return_seq_idx=True, return_num_items=True)(exs)
    assert full["max_length_q"] == full["max_length_k"] == 7
    assert full["seq_idx"][0].tolist() == [0] * 5 + [1] + [2] * 7 + [3] * 3
    assert int(full["num_items_in_batch"]) == 9


def test_pad_to_multiple_is_its_own_document():
    batch = PackingCollator(pad_to_multiple_of=8, pad_token_id=0)(_examples([5, 6]))
    assert batch["input_ids"].shape == (1, 16)
    assert batch["input_ids"][0, 11:].eq(0).all() and batch["labels"][0, 11:].eq(IGNORE_INDEX).all()
    assert batch["position_ids"][0, 11:].tolist() == [0, 1, 2, 3, 4]
    assert batch["cu_seq_lens_k"].tolist() == [0, 5, 11, 16]


def test_overflow_error_and_split():
    exs = _examples([4, 11])
    with pytest.raises(ValueError, match=r"example 1 has 11 tokens, more than max_seq_length=5.*overflow='split'.*3"):
        PackingCollator(max_seq_length=5)(exs)
    batch = PackingCollator(max_seq_length=5, overflow="split")(exs)
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 9, 14, 15]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0]
    assert batch["input_ids"][0].tolist() == exs[0]["input_ids"] + exs[1]["input_ids"]  # nothing dropped
    assert num_items_in_batch(batch["labels"]) == 3 + 4 + 4 + 0
    with pytest.raises(ValueError, match="overflow must be"):
        PackingCollator(overflow="truncate")


def test_bad_examples_are_clear_errors():
    with pytest.raises(ValueError, match="empty list"):
        PackingCollator()([])
    with pytest.raises(ValueError, match="labels has 2 tokens, input_ids has 3"):
        PackingCollator()([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="padded"):
        PackingCollator()([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 0]}])
    with pytest.raises(ValueError, match="do not partition"):
        PackingCollator()([{"input_ids": [1, 2, 3], "seq_lengths": [1, 1]}])


def test_pack_examples_with_datasets_map():
    datasets = pytest.importorskip("datasets")
    lengths = [7, 3, 9, 2, 5, 5, 1, 8, 4, 6]
    ds = datasets.Dataset.from_dict({"input_ids": [e["input_ids"] for e in _examples(lengths)], "text": ["x"] * 10})
    packed = ds.map(pack_examples, batched=True, batch_size=4, remove_columns=ds.column_names, fn_kwargs={"max_seq_length": 10})
    assert set(packed.column_names) == {"input_ids", "labels", "position_ids", "seq_lengths"}
    rows = packed[:]
    assert all(len(r) <= 10 for r in rows["input_ids"])
    assert sorted(n for sl in rows["seq_lengths"] for n in sl) == sorted(lengths)  # every example once, whole
    originals = {tuple(e["input_ids"]) for e in _examples(lengths)}
    for ids, sl, pos, lab in zip(rows["input_ids"], rows["seq_lengths"], rows["position_ids"], rows["labels"]):
        starts = [sum(sl[:i]) for i in range(len(sl))]
        assert {tuple(ids[s:s + n]) for s, n in zip(starts, sl)} <= originals
        assert pos == [p for n in sl for p in range(n)]
        assert all(lab[s] == IGNORE_INDEX for s in starts)
    # best-fit decreasing per map batch: [9 | 7 3 | 2], [8 1 | 5 5], [6 4] -> 3 + 2 + 1 rows
    assert [len(r) for r in rows["input_ids"]] == [9, 10, 2, 9, 10, 10]
    # the collator takes packed rows as they are
    batch = PackingCollator(max_seq_length=10)([packed[0], packed[1]])
    assert batch["cu_seq_lens_q"].numel() - 1 == len(rows["seq_lengths"][0]) + len(rows["seq_lengths"][1])
    seq = ds.map(pack_examples, batched=True, remove_columns=ds.column_names,
                 fn_kwargs={"max_seq_length": 10, "strategy": "sequential"})
    assert [n for sl in seq["seq_lengths"] for n in sl] == lengths  # order kept
    with pytest.raises(ValueError, match="more than max_seq_length=8"):
        pack_examples({"input_ids": [[1] * 9]}, max_seq_length=8)


def test_trl_shapes_are_accepted():
    """TRL's padding-free batch (input_ids [1, N] + restarting position_ids) as one example, and a
    row from TRL's pack_dataset (seq_lengths), normalise to the same batch."""
    exs = _examples([4, 6, 3])
    ours = PackingCollator()(exs)
    trl_like = {"input_ids": ours["input_ids"], "position_ids": ours["position_ids"]}
    again = PackingCollator()([trl_like])
    for key in ours:
        assert torch.equal(again[key], ours[key]), key
    row = {"input_ids": ours["input_ids"][0].tolist(), "seq_lengths": [4, 6, 3]}
    assert torch.equal(PackingCollator()([row])["labels"], ours["labels"])
    assert segment_lengths([0, 1, 2, 0, 0, 1]) == [3, 1, 2]
    masked = mask_boundary_labels(ours["input_ids"], ours["position_ids"])
    assert torch.equal(masked, ours["labels"])
    trl = pytest.importorskip("trl.trainer.sft_trainer")
    trl_batch = trl.DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(exs)
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert torch.equal(trl_batch[key], ours[key]), key
    assert num_items_in_batch(trl_batch["labels"]) == num_items_in_batch(ours["labels"])


def _padded(exs, pad=0):
    n = max(len(e["input_ids"]) for e in exs)
    ids = torch.full((len(exs), n), pad)
    labels = torch.full((len(exs), n), IGNORE_INDEX)
    mask = torch.zeros(len(exs), n, dtype=torch.long)
    for i, e in enumerate(exs):
        m = len(e["input_ids"])
        ids[i, :m] = torch.tensor(e["input_ids"])
        labels[i, :m] = torch.tensor(e.get("labels", e["input_ids"]))
        mask[i, :m] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("family", ["llama"])
def test_packed_loss_and_grads_equal_unpacked(family):
    """fp32: each packed example's loss == that example alone; the packed batch's gradients == the
    right-padded batch's (HF's own sdpa attention with an attention mask, same token count)."""
    exs = _examples([5, 12, 3, 9], seed=1, labels=True)
    model = tiny_model(family)
    model.train()
    ga.enable(model)
    batch = PackingCollator()(exs)
    out = model(**batch)
    out.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    cu = batch["cu_seq_lens_q"].tolist()
    total = 0.0
    for i, ex in enumerate(exs):
        ids = torch.tensor([ex["input_ids"]])
        alone = model(input_ids=ids, labels=torch.tensor([ex["labels"]]))
        n = sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX)
        logits = out.logits[0, cu[i]:cu[i + 1]]
        assert rel_err(logits, alone.logits[0]) <= 1e-5
        piece = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ex["labels"][1:]), reduction="sum")
        assert rel_err(piece / n, alone.loss) <= 1e-5
        total += piece.item()
    n_items = num_items_in_batch(batch["labels"])
    assert abs(out.loss.item() - total / n_items) <= 1e-5 * total / n_items
    # unpacked: a padded batch through transformers' own attention
    with ga.implementation(model, "sdpa"):
        padded = model(**_padded(exs), use_cache=False)
    padded.loss.backward()
    assert rel_err(out.loss, padded.loss) <= 1e-5
    for name, p in model.named_parameters():
        assert rel_err(packed_grads[name], p.grad) <= 1e-5, name
