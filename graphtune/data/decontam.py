"""Benchmark decontamination: drop files that contain benchmark text.

Why: a code model evaluated on HumanEval / MBPP-style prompts that also saw the solutions
during training reports inflated scores.  Two checks, as in the BigCode pipeline:

* substring: a whitespace-normalised, case-insensitive benchmark string (docstring, solution,
  prompt) occurring in a file removes the file;
* n-gram overlap (optional): a file sharing at least ``min_ngram_overlap`` word n-grams with
  any single benchmark item is removed (catches reformatted copies).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable

from graphtune.data.config import DecontamConfig

__all__ = ["Decontaminator", "load_benchmark_texts"]

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


def _normalise(text: str) -> str:
    return _WS.sub(" ", text.lower()).strip()


def load_benchmark_texts(files: Iterable[str], fields: Iterable[str]) -> list[str]:
    """Benchmark items from ``.txt`` (whole file), ``.jsonl`` / ``.json`` (listed fields) or folders."""
    fields = list(fields)
    out: list[str] = []

    def from_record(rec: object) -> None:
        if isinstance(rec, str):
            out.append(rec)
        elif isinstance(rec, dict):
            for f in fields:
                v = rec.get(f)
                if isinstance(v, str) and v.strip():
                    out.append(v)

    paths: list[Path] = []
    for f in files:
        p = Path(f)
        paths.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    for p in paths:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    from_record(json.loads(line))
        elif p.suffix == ".json":
            data = json.loads(text)
            for rec in data if isinstance(data, list) else [data]:
                from_record(rec)
        else:
            out.append(text)
    return out


class Decontaminator:
    """Matches files against benchmark items; ``reason(text)`` says which check fired."""

    def __init__(self, cfg: DecontamConfig):
        self.cfg = cfg
        items = list(cfg.strings) + load_benchmark_texts(cfg.files, cfg.fields)
        norm = sorted({_normalise(t) for t in items})
        self.substrings = [t for t in norm if len(t) >= cfg.min_substring_length] if cfg.substring else []
        self.ngram_index: dict[str, set[int]] = {}
        if cfg.ngram > 0:
            for i, t in enumerate(norm):
                for g in self._ngrams(t):
                    self.ngram_index.setdefault(g, set()).add(i)
        self.num_items = len(norm)

    def _ngrams(self, norm_text: str) -> set[str]:
        toks = _WORD.findall(norm_text)
        n = self.cfg.ngram
        return {" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)}

    @property
    def active(self) -> bool:
        """Whether there is anything to check against."""
        return bool(self.substrings or self.ngram_index)

    def fingerprint(self) -> str:
        """sha256 of the normalised benchmark items (recorded in the manifest)."""
        h = hashlib.sha256()
        for s in self.substrings:
            h.update(s.encode("utf-8") + b"\0")
        h.update(str(sorted(self.ngram_index)).encode("utf-8"))
        return h.hexdigest()

    def reason(self, text: str) -> str | None:
        """``"substring"`` / ``"ngram"`` when ``text`` is contaminated, else ``None``."""
        if not self.active:
            return None
        norm = _normalise(text)
        for s in self.substrings:
            if s in norm:
                return "substring"
        if self.ngram_index:
            hits: dict[int, int] = {}
            for g in self._ngrams(norm):
                for i in self.ngram_index.get(g, ()):
                    hits[i] = hits.get(i, 0) + 1
                    if hits[i] >= self.cfg.min_ngram_overlap:
                        return "ngram"
        return None
