"""MinHash signatures, LSH banding and clustering."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from graphtune.data.minhash import (
    MinHasher,
    band_hashes,
    connected_components,
    optimal_param,
)


def _ref_shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    toks = [t for t in re.split(r"\W", text.lower()) if t]
    return {tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def test_optimal_param_matches_stack_defaults():
    assert optimal_param(0.7, 256) == (25, 10)
    assert optimal_param(0.7, 250) == (25, 10)


def test_tokenisation_matches_stack_split(data_helpers):
    text = data_helpers.make_code(1) + "\nx = foo.bar(baz)!=qux;;  __init__\n"
    mh = MinHasher()
    toks = [t for t in re.split(r"\W", text.lower()) if t]
    assert mh.token_hashes(text).size == len(toks)
    assert mh.shingles(text).size == len(toks) - 4
    # equal tokens hash equal, different tokens differ
    th = mh.token_hashes("abc def abc ABC")
    assert th[0] == th[2] == th[3] and th[0] != th[1]


def test_short_documents_have_no_signature():
    mh = MinHasher()
    assert mh.signature("only four tokens here") is None
    assert mh.signature("") is None
    assert mh.signature("!!! ??? ...") is None
    assert mh.signature("one two three four five") is not None


def test_signature_is_deterministic_and_estimates_jaccard(data_helpers):
    a = data_helpers.make_code(7, n_funcs=40)
    b = data_helpers.mutate(a, 3, fraction=0.1)
    c = data_helpers.make_code(8, n_funcs=40)
    mh = MinHasher()
    sa, sb, sc = mh.signature(a), mh.signature(b), mh.signature(c)
    assert sa.dtype == np.uint32 and sa.shape == (256,)
    assert np.array_equal(sa, MinHasher().signature(a))
    true_j = len(_ref_shingles(a) & _ref_shingles(b)) / len(_ref_shingles(a) | _ref_shingles(b))
    est = float(np.mean(sa == sb))
    assert abs(est - true_j) < 0.1
    assert float(np.mean(sa == sc)) < 0.2
    # repeated shingles do not matter (set semantics)
    sh = mh.shingles(a)
    assert np.array_equal(mh.signature_from_shingles(np.concatenate([sh, sh[::-1]])), sa)


def test_other_seed_changes_permutations(data_helpers):
    a = data_helpers.make_code(1)
    assert not np.array_equal(MinHasher(seed=1).signature(a), MinHasher(seed=2).signature(a))


def test_band_hashes_collide_only_on_equal_bands():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 2**32, size=(3, 256), dtype=np.uint64).astype(np.uint32)
    s[1] = s[0]
    s[1, 5] ^= 1  # differs in band 0 only
    b = band_hashes(s, 25, 10)
    assert b.shape == (3, 25) and b.dtype == np.uint64
    assert b[0, 0] != b[1, 0]
    assert np.array_equal(b[0, 1:], b[1, 1:])
    assert not np.any(b[0] == b[2])
    with pytest.raises(ValueError):
        band_hashes(s[:, :100], 25, 10)


def test_connected_components_matches_reference_union_find():
    rng = random.Random(0)
    n = 300
    edges = [(rng.randrange(n), rng.randrange(n)) for _ in range(200)]
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in edges:
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)
    labels = connected_components(n, edges)
    for i in range(n):
        members = [j for j in range(n) if find(j) == find(i)]
        assert labels[i] == min(members)
    # order independence
    assert np.array_equal(labels, connected_components(n, list(reversed(edges))))
    assert np.array_equal(connected_components(4, []), np.arange(4))
