"""Padding-free packing: many examples in one row, positions restarting per example, no padding.

Two pieces, usable separately or together:

* :func:`pack_examples` -- for ``Dataset.map(batched=True)``: bins examples into rows of at most
  ``max_seq_length`` tokens (best-fit decreasing, or in order) and records each row's
  ``seq_lengths``. Same columns as TRL's ``pack_dataset`` (``input_ids``, ``seq_lengths``) plus
  ``labels`` and ``position_ids``.
* :class:`PackingCollator` -- turns a list of examples (plain ones, rows from
  :func:`pack_examples` / TRL's ``pack_dataset``, or examples with position ids that restart)
  into one padding-free batch ``[1, total]``::

      input_ids     [1, N]   every example, concatenated
      labels        [1, N]   the example's labels; the FIRST token of every example is -100
      position_ids  [1, N]   0..len-1 per example
      cu_seq_lens_q/_k [n+1] int32 example boundaries (FlashAttention varlen form)
      (max_length_q/_k int, seq_idx [1, N] when asked for)

  These are the keys TRL's padding-free collator emits, so the same model code serves both.

Why the first label of every example is -100: HF's causal-LM loss shifts labels left by one, so
the label at an example's first token is the target of the *previous example's last token*.
Masking it means no token is trained to predict across a boundary, and
``num_items_in_batch`` (the count of ``labels[..., 1:] != -100``, what ``Trainer`` computes)
is exact: each example contributes exactly the targets it would contribute alone.

No token attends across examples either: graphtune's attention (``attn_implementation=
"graphtune"``) reads the boundaries from ``position_ids`` / ``cu_seq_lens_k``. (transformers' own
sdpa/eager attention detects packing from ``position_ids`` only when no KV cache is created, i.e.
with ``use_cache=False``; otherwise it silently attends across examples.)

Examples longer than ``max_seq_length`` are never silently truncated: ``overflow="error"``
(default) raises naming the example, ``overflow="split"`` cuts it into chunks of at most
``max_seq_length`` that are trained as separate examples (positions restart in each chunk, and
the first token of a chunk is not predicted).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "IGNORE_INDEX",
    "PackingCollator",
    "mask_boundary_labels",
    "num_items_in_batch",
    "pack_examples",
    "segment_lengths",
    "split_overflow",
]

IGNORE_INDEX = -100
OVERFLOW_POLICIES = ("error", "split")


def _as_list(x: Any, name: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() == 2 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D (or [1, n]); got shape {tuple(x.shape)}")
        return [int(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        if len(x) == 1 and isinstance(x[0], (list, tuple)):
            x = x[0]
        return [int(v) for v in x]
    raise TypeError(f"{name} must be a list of ints or a tensor, got {type(x).__name__}")


def segment_lengths(position_ids: Sequence[int]) -> list[int]:
    """Lengths of the runs of ``position_ids`` that continue by +1 (a new example starts elsewhere)."""
    lengths: list[int] = []
    prev = None
    for p in position_ids:
        if prev is None or p != prev + 1:
            lengths.append(0)
        lengths[-1] += 1
        prev = p
    return lengths


def split_overflow(length: int, max_seq_length: int | None, overflow: str, where: str) -> list[int]:
    """Chunk lengths for one example of ``length`` tokens under the overflow policy."""
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, not {overflow!r}")
    if max_seq_length is None or length <= max_seq_length:
        return [length]
    if overflow == "error":
        chunks = -(-length // max_seq_length)
        raise ValueError(
            f"{where} has {length} tokens, more than max_seq_length={max_seq_length}. graphtune never "
            f"truncates silently: raise max_seq_length, filter long examples out, or pass overflow='split' "
            f"to train it as {chunks} separate chunks of at most {max_seq_length} tokens"
        )
    return [min(max_seq_length, length - s) for s in range(0, length, max_seq_length)]


def mask_boundary_labels(labels: torch.Tensor, position_ids: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels with the first token of every example (a position that does not continue the
    previous one by +1, and column 0) set to ``ignore_index``; returns a new tensor."""
    labels = labels.clone()
    start = torch.ones_like(position_ids, dtype=torch.bool)
    start[..., 1:] = position_ids[..., 1:] != position_ids[..., :-1] + 1
    labels[start] = ignore_index
    return labels


def num_items_in_batch(labels: torch.Tensor | Iterable[torch.Tensor], ignore_index: int = IGNORE_INDEX) -> int:
    """Tokens the causal-LM loss counts: ``labels[..., 1:] != ignore_index`` (HF shifts labels)."""
    if isinstance(labels, torch.Tensor):
        labels = [labels]
    return int(sum(int((lab[..., 1:] != ignore_index).sum()) for lab in labels))


# ----------------------------------------------------------------------------------------------
# Example -> segments
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Segment:
    input_ids: list[int]
    labels: list[int]


def _segments(example: Mapping[str, Any], index: int, max_seq_length: int | None, overflow: str) -> list[_Segment]:
    """One example (or a packed row) as its sequences, each within ``max_seq_length``."""
    if "input_ids" not in example:
        raise KeyError(f"example {index} has no 'input_ids' (keys: {sorted(example)})")
    ids = _as_list(example["input_ids"], f"example {index} input_ids")
    labels = _as_list(example["labels"], f"example {index} labels") if example.get("labels") is not None else list(ids)
    if len(labels) != len(ids):
        raise ValueError(f"example {index}: labels has {len(labels)} tokens, input_ids has {len(ids)}")
    mask = example.get("attention_mask")
    if mask is not None and not all(_as_list(mask, f"example {index} attention_mask")):
        raise ValueError(f"example {index} is padded (attention_mask has zeros); packing expects unpadded examples")
    if example.get("seq_lengths") is not None:
        lengths = _as_list(example["seq_lengths"], f"example {index} seq_lengths")
        if sum(lengths) != len(ids) or any(n <= 0 for n in lengths):
            raise ValueError(f"example {index}: seq_lengths {lengths} do not partition its {len(ids)} tokens")
    elif example.get("position_ids") is not None:
        pos = _as_list(example["position_ids"], f"example {index} position_ids")
        if len(pos) != len(ids):
            raise ValueError(f"example {index}: position_ids has {len(pos)} tokens, input_ids has {len(ids)}")
        lengths = segment_lengths(pos)
    else:
        lengths = [len(ids)]
    out: list[_Segment] = []
    start = 0
    for j, n in enumerate(lengths):
        where = f"example {index}" + (f" (sequence {j} of its packed row)" if len(lengths) > 1 else "")
        for c in split_overflow(n, max_seq_length, overflow, where):
            out.append(_Segment(ids[start:start + c], labels[start:start + c]))
            start += c
    if not out or any(len(s.input_ids) == 0 for s in out):
        raise ValueError(f"example {index} is empty")
    return out


# ----------------------------------------------------------------------------------------------
# Dataset-level packing (Dataset.map(batched=True))
# ----------------------------------------------------------------------------------------------
def _bins(lengths: Sequence[int], capacity: int, strategy: str) -> list[list[int]]:
    """Indices per row. ``"bfd"``: best-fit decreasing; ``"sequential"``: in order, a new row when full."""
    if strategy == "sequential":
        rows: list[list[int]] = []
        used = capacity + 1
        for i, n in enumerate(lengths):
            if used + n > capacity:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += n
        return rows
    if strategy != "bfd":
        raise ValueError(f"strategy must be 'bfd' or 'sequential', not {strategy!r}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows = []
    free: list[tuple[int, int]] = []  # (remaining capacity, row index), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, r = free.pop(at)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def pack_examples(
    batch: Mapping[str, Sequence[Any]],
    *,
    max_seq_length: int,
    overflow: str = "error",
    strategy: str = "bfd",
) -> dict[str, list]:
    """Pack a batch of examples (``Dataset.map(batched=True)`` columns) into rows of at most
    ``max_seq_length`` tokens.

    Returns columns ``input_ids``, ``labels`` (first token of every example -100), ``position_ids``
    and ``seq_lengths`` (TRL's column name). Use with ``remove_columns=dataset.column_names``::

        packed = ds.map(pack_examples, batched=True, remove_columns=ds.column_names,
                        fn_kwargs={"max_seq_length": 4096})
    """
    if max_seq_length is None or max_seq_length <= 0:
        raise ValueError(f"max_seq_length must be a positive int, got {max_seq_length!r}")
    if "input_ids" not in batch:
        raise KeyError(f"pack_examples needs an 'input_ids' column (got {sorted(batch)})")
    n = len(batch["input_ids"])
    segments: list[_Segment] = []
    for i in range(n):
        example = {k: v[i] for k, v in batch.items() if k in ("input_ids", "labels", "seq_lengths", "position_ids", "attention_mask")}
        segments.extend(_segments(example, i, max_seq_length, overflow))
    rows = _bins([len(s.input_ids) for s in segments], max_seq_length, strategy)
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
    for row in rows:
        ids, labels, pos, lengths = [], [], [], []
        for i in row:
            s = segments[i]
            ids += s.input_ids
            labels += [IGNORE_INDEX] + s.labels[1:]
            pos += list(range(len(s.input_ids)))
            lengths.append(len(s.input_ids))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(pos)
        out["seq_lengths"].append(lengths)
    return out


# ----------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PackingCollator:
    """Padding-free collator: a list of examples -> one ``[1, N]`` batch (see the module docstring).

    ``max_seq_length``: longest single example (None: no limit); longer ones follow ``overflow``
    (``"error"`` or ``"split"``). ``pad_to_multiple_of``: append pad tokens (labels -100, their
    own document) so N is a multiple of it. ``return_cu_seqlens`` (default True) adds
    ``cu_seq_lens_q/_k`` so varlen attention kernels need no device sync; ``return_max_length``
    adds the ``max_length_q/_k`` ints (exact varlen launch sizes, but a changing Python int
    makes torch.compile specialise once more); ``return_seq_idx`` adds TRL's ``seq_idx``;
    ``return_num_items`` adds ``num_items_in_batch`` (for loops that are not HF's Trainer).
    """

    max_seq_length: int | None = None
    overflow: str = "error"
    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None
    return_cu_seqlens: bool = True
    return_max_length: bool = False
    return_seq_idx: bool = False
    return_num_items: bool = False

    def __post_init__(self) -> None:
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, not {self.overflow!r}")
        if self.max_seq_length is not None and self.max_seq_length <= 0:
            raise ValueError(f"max_seq_length must be positive, got {self.max_seq_length}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be positive, got {self.pad_to_multiple_of}")

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("PackingCollator got an empty list of examples")
        segments: list[_Segment] = []
        for i, ex in enumerate(examples):
            segments.extend(_segments(ex, i, self.max_seq_length, self.overflow))
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        lengths: list[int] = []
        for s in segments:
            ids += s.input_ids
            labels += [IGNORE_INDEX] + s.labels[1:]
            pos += list(range(len(s.input_ids)))
            lengths.append(len(s.input_ids))
        if self.pad_to_multiple_of:
            pad = -len(ids) % self.pad_to_multiple_of
            if pad:
                ids += [self.pad_token_id] * pad
                labels += [IGNORE_INDEX] * pad
                pos += list(range(pad))
                lengths.append(pad)
        batch: dict[str, Any] = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
        }
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
        if self.return_cu_seqlens:
            batch["cu_seq_lens_q"] = cu
            batch["cu_seq_lens_k"] = cu.clone()
        if self.return_max_length:
            batch["max_length_q"] = batch["max_length_k"] = max(lengths)
        if self.return_seq_idx:
            batch["seq_idx"] = torch.repeat_interleave(
                torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths)
            )[None]
        if self.return_num_items:
            batch["num_items_in_batch"] = torch.tensor(num_items_in_batch(batch["labels"]))
        return batch
