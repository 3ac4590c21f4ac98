"""Vectorised MinHash signatures, LSH banding and union-find clustering.

Why this module exists: near-duplicate detection is the most expensive stage of code
curation, and a per-permutation Python loop (datasketch style) spends most of its time in
the interpreter.  Here one document costs a handful of numpy passes:

1. tokens: ``\\W``-split of the lowercased text (Stack v2 tokenisation), found with a byte
   mask; every byte >= 0x80 counts as a word character so non-ASCII identifiers stay words;
2. token hashes: a polynomial rolling hash mod 2**64 computed for *all* tokens at once from
   one prefix sum (``P[end] - P[start]`` scaled by the inverse power of the base);
3. shingles: word n-grams combined from the token hashes and mixed to 64 bits;
4. permutations: ``h_i(x) = (a_i * x + b_i) mod 2**32`` on the 32 high bits of every
   shingle, evaluated for all shingles and all permutations as one uint32 matrix and reduced
   with ``min``.  Odd ``a_i`` make every ``h_i`` a bijection of the 32-bit space, i.e. a
   permutation, and the inputs are already well mixed.

Everything is deterministic (fixed seed), so signatures are identical across processes,
machines and task splits.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "MinHasher",
    "optimal_param",
    "band_hashes",
    "connected_components",
]

_U64 = np.uint64
_MASK32 = _U64(0xFFFFFFFF)
_BASE = _U64(0x100000001B3)  # odd => invertible mod 2**64


def _inverse_mod_2_64(a: int) -> int:
    """Multiplicative inverse of an odd integer modulo 2**64 (Newton iteration)."""
    x = 1
    for _ in range(7):
        x = (x * (2 - a * x)) % (1 << 64)
    return x


_INV_BASE = _U64(_inverse_mod_2_64(int(_BASE)))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (wrapping uint64 arithmetic)."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


_WORD = np.zeros(256, dtype=bool)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
    _WORD[_c] = True
_WORD[128:] = True


class _Powers:
    """Lazily grown tables of BASE**i and BASE**-i (mod 2**64)."""

    def __init__(self) -> None:
        self.pow = np.ones(1, dtype=np.uint64)
        self.ipow = np.ones(1, dtype=np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.pow.size < n:
            size = max(n, 2 * self.pow.size, 1 << 16)
            with np.errstate(over="ignore"):
                p = np.cumprod(np.full(size - 1, _BASE, dtype=np.uint64), dtype=np.uint64)
                ip = np.cumprod(np.full(size - 1, _INV_BASE, dtype=np.uint64), dtype=np.uint64)
            self.pow = np.concatenate([np.ones(1, dtype=np.uint64), p])
            self.ipow = np.concatenate([np.ones(1, dtype=np.uint64), ip])
        return self.pow[:n], self.ipow[:n]


_POWERS = _Powers()
_LOCAL = threading.local()


def _scratch(size: int) -> np.ndarray:
    """Per-thread reusable uint32 scratch buffer of at least ``size`` elements."""
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype=np.uint32)
        _LOCAL.buf = buf
    return buf


def optimal_param(
    threshold: float,
    num_perm: int,
    false_positive_weight: float = 0.5,
    false_negative_weight: float = 0.5,
) -> tuple[int, int]:
    """Bands and rows minimising the weighted FP/FN areas of the LSH S-curve.

    Same criterion as BigCode / datasketch; (0.7, 256) gives (25, 10).
    """
    xs = np.linspace(0.0, 1.0, 2001)

    def area(y: np.ndarray, lo: float, hi: float) -> float:
        sel = (xs >= lo) & (xs <= hi)
        return float(np.trapezoid(y[sel], xs[sel]))

    best, best_err = (1, num_perm), math.inf
    for b in range(1, num_perm + 1):
        max_r = num_perm // b
        for r in range(1, max_r + 1):
            p = 1.0 - (1.0 - xs**r) ** b
            fp = area(p, 0.0, threshold)
            fn = area(1.0 - p, threshold, 1.0)
            err = false_positive_weight * fp + false_negative_weight * fn
            if err < best_err:
                best_err, best = err, (b, r)
    return best


@dataclass(frozen=True)
class MinHasher:
    """MinHash over word n-grams with ``num_perm`` 32-bit permutations.

    ``signature(text)`` returns a ``uint32[num_perm]`` array, or ``None`` when the document has
    fewer than ``ngram`` tokens (such documents are never near-duplicates, as in Stack v2).
    """

    num_perm: int = 256
    ngram: int = 5
    seed: int = 42
    lowercase: bool = True

    def __post_init__(self) -> None:
        if self.num_perm < 1 or self.ngram < 1:
            raise ValueError("num_perm and ngram must be >= 1")
        rng = np.random.default_rng(self.seed)
        a = rng.integers(0, 1 << 32, size=self.num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
        b = rng.integers(0, 1 << 32, size=self.num_perm, dtype=np.uint64).astype(np.uint32)
        k = _mix64(np.arange(1, self.ngram + 1, dtype=np.uint64) + _U64(self.seed)) | _U64(1)
        object.__setattr__(self, "_a", a)
        object.__setattr__(self, "_b", b)
        object.__setattr__(self, "_k", k)

    # -- shingling -------------------------------------------------------------------------
    def token_hashes(self, text: str) -> np.ndarray:
        """64-bit hashes of the ``\\W``-separated tokens of ``text`` (in order)."""
        if self.lowercase:
            text = text.lower()
        buf = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
        n = buf.size
        if n == 0:
            return np.empty(0, dtype=np.uint64)
        mask = np.take(_WORD, buf)
        # token boundaries: positions where the word mask flips (plus the two ends)
        flips = np.flatnonzero(mask[1:] != mask[:-1]) + 1
        starts = flips[~mask[flips - 1]] if flips.size else flips
        ends = flips[mask[flips - 1]] if flips.size else flips
        if mask[0]:
            starts = np.concatenate([np.zeros(1, dtype=starts.dtype), starts])
        if mask[-1]:
            ends = np.concatenate([ends, np.full(1, n, dtype=ends.dtype)])
        if starts.size == 0:
            return np.empty(0, dtype=np.uint64)
        pw, ipw = _POWERS.get(n)
        with np.errstate(over="ignore"):
            prefix = np.empty(n + 1, dtype=np.uint64)
            prefix[0] = 0
            np.cumsum(np.multiply(buf, pw, dtype=np.uint64), dtype=np.uint64, out=prefix[1:])
            th = (prefix[ends] - prefix[starts]) * ipw[starts]
            th ^= (ends - starts).astype(np.uint64) << _U64(56)
            return _mix64(th)

    def shingles(self, text: str) -> np.ndarray:
        """64-bit hashes of all word ``ngram``-grams of ``text`` (may contain repeats)."""
        th = self.token_hashes(text)
        count = th.size - self.ngram + 1
        if count <= 0:
            return np.empty(0, dtype=np.uint64)
        k = self._k  # type: ignore[attr-defined]
        with np.errstate(over="ignore"):
            acc = th[:count] * k[0]
            for j in range(1, self.ngram):
                acc += th[j : j + count] * k[j]
            return _mix64(acc)

    # -- signatures ------------------------------------------------------------------------
    def signature_from_shingles(self, shingles: np.ndarray) -> np.ndarray | None:
        """MinHash signature of a set of 64-bit shingle hashes (``None`` if empty)."""
        if shingles.size == 0:
            return None
        # repeats need no removal: the minimum over a multiset equals the minimum over its set
        x = (shingles >> _U64(32)).astype(np.uint32)
        a, b = self._a, self._b  # type: ignore[attr-defined]
        out: np.ndarray | None = None
        # blocks of ~1 MiB stay in cache; the scratch buffer is reused across calls because
        # a fresh multi-MiB allocation per document costs page faults comparable to the math
        chunk = max(1, (1 << 18) // self.num_perm)
        scratch = _scratch(chunk * self.num_perm)
        for s in range(0, x.size, chunk):
            xs = x[s : s + chunk]
            h = scratch[: xs.size * self.num_perm].reshape(xs.size, self.num_perm)
            np.multiply(xs[:, None], a, out=h)
            h += b
            r = h.min(axis=0)
            out = r if out is None else np.minimum(out, r, out=out)
        return out

    def signature(self, text: str) -> np.ndarray | None:
        """MinHash signature (``uint32[num_perm]``) of ``text``, ``None`` if too short."""
        return self.signature_from_shingles(self.shingles(text))

    def signatures(self, texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Signatures of many texts: (``uint32[n, num_perm]``, ``bool[n]`` valid mask)."""
        rows, valid = [], []
        for t in texts:
            s = self.signature(t)
            valid.append(s is not None)
            rows.append(s if s is not None else np.zeros(self.num_perm, dtype=np.uint32))
        if not rows:
            return np.empty((0, self.num_perm), dtype=np.uint32), np.empty(0, dtype=bool)
        return np.stack(rows), np.asarray(valid, dtype=bool)


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Collapse each band of ``rows`` signature values into one 64-bit bucket key.

    ``signatures``: ``uint32[n, num_perm]`` -> ``uint64[n, bands]``.  Band ``i`` uses values
    ``[i*rows, (i+1)*rows)``; two documents share a bucket in band ``i`` iff (up to a 2**-64
    collision) all ``rows`` values agree.
    """
    sig = np.asarray(signatures, dtype=np.uint32)
    if sig.ndim == 1:
        sig = sig[None, :]
    if sig.shape[1] < bands * rows:
        raise ValueError(f"signature has {sig.shape[1]} values, need bands*rows={bands * rows}")
    blocks = sig[:, : bands * rows].reshape(sig.shape[0], bands, rows).astype(np.uint64)
    consts = _mix64(np.arange(1, rows + 1, dtype=np.uint64) * _U64(0x9E3779B97F4A7C15)) | _U64(1)
    with np.errstate(over="ignore"):
        acc = np.zeros((sig.shape[0], bands), dtype=np.uint64)
        for j in range(rows):
            acc = _mix64(acc ^ (blocks[:, :, j] * consts[j]))
        acc ^= np.arange(bands, dtype=np.uint64)[None, :] * _U64(0xD6E8FEB86659FD93)
        return _mix64(acc)


def connected_components(num_nodes: int, edges: np.ndarray | Sequence[tuple[int, int]]) -> np.ndarray:
    """Union-find over ``edges`` (pairs of node indices); returns the component label per node.

    The label of a component is its smallest node index, so the result does not depend on
    edge order.  Implemented as vectorised min-label propagation with pointer jumping, which
    converges in a few rounds for the star-shaped edge sets LSH buckets produce.
    """
    labels = np.arange(num_nodes, dtype=np.int64)
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if e.size == 0 or num_nodes == 0:
        return labels
    u, v = e[:, 0], e[:, 1]
    while True:
        lu, lv = labels[u], labels[v]
        m = np.minimum(lu, lv)
        changed = bool(np.any(lu != lv))
        if not changed:
            break
        # hook the larger root onto the smaller one
        np.minimum.at(labels, lu, m)
        np.minimum.at(labels, lv, m)
        # pointer jumping until every node points at a root
        while True:
            nxt = labels[labels]
            if np.array_equal(nxt, labels):
                break
            labels = nxt
    return labels
