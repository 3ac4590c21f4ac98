"""Near-dedup and secret-redaction benchmark for graphtune.data.

Corpus: the Python standard library's ``.py`` files (of the running interpreter, without
site-packages) plus planted near-duplicates (copies with a few edited lines).  Measures, on
one core (single process; docs/s = documents / CPU seconds):

* near-dedup throughput: graphtune's vectorised MinHash + LSH banding + union-find, against
  datasketch's ``MinHash.update_batch`` + ``MinHashLSH`` with the same parameters
  (word 5-grams, 256 permutations, threshold 0.7 -> 25 bands x 10 rows);
* duplicate recall on the planted pairs and precision of the reported pairs (a pair is a
  true duplicate when its exact 5-gram Jaccard similarity is >= the threshold);
* secret recall on planted secrets of every kind, and false redactions (keys / passwords)
  on the unmodified standard library.

Usage: ``python bench/dedup.py [--max-files 2000] [--planted 200] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphtune.data.minhash import (  # noqa: E402
    MinHasher,
    band_hashes,
    connected_components,
    optimal_param,
)
from graphtune.data.pii import PIIRedactor  # noqa: E402

THRESHOLD, NUM_PERM, NGRAM = 0.7, 256, 5


# ------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------

def stdlib_files(max_files: int) -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        if "site-packages" in p.parts or "dist-packages" in p.parts:
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append((str(p.relative_to(root)), text))
        if len(out) >= max_files:
            break
    return out


def mutate(text: str, rng: random.Random, fraction: float) -> str:
    lines = text.split("\n")
    for _ in range(max(1, int(len(lines) * fraction))):
        i = rng.randrange(len(lines))
        op = rng.random()
        if op < 0.4:
            lines[i] = lines[i] + f"  # patched {rng.randint(0, 10**6)}"
        elif op < 0.7:
            lines[i] = ""
        else:
            lines.insert(i, f"_tmp_{rng.randint(0, 10**6)} = None")
    return "\n".join(lines)


def shingle_set(text: str) -> set[str]:
    toks = [t for t in re.split(r"\W", text.lower()) if t]
    return {" ".join(toks[i : i + NGRAM]) for i in range(len(toks) - NGRAM + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, len(a | b))


# ------------------------------------------------------------------------------------------
# dedup implementations (each returns the set of duplicate pairs it reports)
# ------------------------------------------------------------------------------------------

def pairs_from_labels(labels: np.ndarray) -> set[tuple[int, int]]:
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(i)
    out = set()
    for members in groups.values():
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                out.add((members[a], members[b]))
    return out


def run_graphtune(texts: list[str]) -> tuple[set[tuple[int, int]], set[tuple[int, int]], float]:
    t0 = time.process_time()
    bands, rows = optimal_param(THRESHOLD, NUM_PERM)
    mh = MinHasher(num_perm=NUM_PERM, ngram=NGRAM)
    sigs, valid = mh.signatures(texts)
    keys = band_hashes(sigs, bands, rows)
    ids = np.flatnonzero(valid)
    edges = []
    for b in range(bands):
        k = keys[ids, b]
        order = np.argsort(k, kind="stable")
        ks, idx = k[order], ids[order]
        same = ks[1:] == ks[:-1]
        start = np.maximum.accumulate(np.where(np.concatenate([[True], ~same]), np.arange(ks.size), 0))
        members = np.flatnonzero(np.concatenate([[False], same]))
        edges.append(np.stack([idx[start[members]], idx[members]], axis=1))
    all_edges = np.concatenate(edges) if edges else np.empty((0, 2), dtype=np.int64)
    labels = connected_components(len(texts), all_edges)
    cpu = time.process_time() - t0
    return pairs_from_labels(labels), candidate_pairs(texts, keys, ids, bands), cpu


def candidate_pairs(texts: list[str], keys: np.ndarray, ids: np.ndarray, bands: int) -> set[tuple[int, int]]:
    """All pairs sharing at least one band bucket (for the precision metric, not timed)."""
    out = set()
    for b in range(bands):
        buckets: dict[int, list[int]] = {}
        for i in ids.tolist():
            buckets.setdefault(int(keys[i, b]), []).append(i)
        for g in buckets.values():
            out.update((g[x], g[y]) for x in range(len(g)) for y in range(x + 1, len(g)))
    return out


def run_datasketch(texts: list[str]) -> tuple[set[tuple[int, int]], set[tuple[int, int]], float]:
    from datasketch import MinHash, MinHashLSH

    t0 = time.process_time()
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    hashes = {}
    for i, t in enumerate(texts):
        sh = shingle_set(t)
        if not sh:
            continue
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch([s.encode("utf-8") for s in sh])
        hashes[i] = m
        lsh.insert(i, m)
    parent = list(range(len(texts)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    cands = set()
    for i, m in hashes.items():
        for j in lsh.query(m):
            if j != i:
                cands.add((min(i, j), max(i, j)))
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    labels = np.array([find(i) for i in range(len(texts))])
    cpu = time.process_time() - t0
    return pairs_from_labels(labels), cands, cpu


# ------------------------------------------------------------------------------------------
# secrets
# ------------------------------------------------------------------------------------------

def _rand(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _jwt(rng: random.Random) -> str:
    import base64

    def b64(d: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")

    payload = {"sub": _rand(rng, 10, string.digits), "name": _rand(rng, 8), "iat": rng.randint(10**9, 2 * 10**9)}
    return b64({"alg": "HS256", "typ": "JWT"}) + "." + b64(payload) + "." + _rand(rng, 43, string.ascii_letters + string.digits + "-_")


def planted_secrets(rng: random.Random, per_kind: int) -> list[tuple[str, str, str]]:
    """(kind placeholder, secret value, code snippet) triples."""
    up, low, dig = string.ascii_uppercase, string.ascii_lowercase, string.digits
    makers = {
        "aws_access_key": ("KEY", lambda: "AKIA" + _rand(rng, 16, up + dig), "AWS_ACCESS_KEY_ID = '{}'"),
        "aws_secret": ("KEY", lambda: _rand(rng, 40, string.ascii_letters + dig + "/+"), "aws_secret_access_key = \"{}\""),
        "github_token": ("KEY", lambda: "ghp_" + _rand(rng, 36), "GH_TOKEN = \"{}\""),
        "slack_token": ("KEY", lambda: f"xoxb-{_rand(rng, 12, dig)}-{_rand(rng, 13, dig)}-{_rand(rng, 24, low + dig)}", "client = WebClient(token=\"{}\")"),
        "stripe_key": ("KEY", lambda: "sk_live_" + _rand(rng, 24), "stripe.api_key = '{}'"),
        "generic_api_key": ("KEY", lambda: _rand(rng, 32), "config = {{\"api_key\": \"{}\"}}"),
        "jwt": ("KEY", lambda: _jwt(rng), "headers = {{'Authorization': 'Bearer {}'}}"),
        "password": ("PASSWORD", lambda: _rand(rng, 6) + rng.choice("!#%&*") + _rand(rng, 7), "db_password = \"{}\""),
        "basic_auth": ("PASSWORD", lambda: _rand(rng, 14), "url = 'https://deploy:{}@ci.example.org/hook'"),
        "private_key": ("KEY", lambda: "\n".join(_rand(rng, 64, string.ascii_letters + dig + "+/") for _ in range(4)),
                        "PEM = '''-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----'''"),
        "email": ("EMAIL", lambda: f"{_rand(rng, 6, low)}.{_rand(rng, 7, low)}@{_rand(rng, 8, low)}.com", "__author__ = \"Jane <{}>\""),
        "ipv4": ("IP_ADDRESS", lambda: f"{rng.choice([23, 45, 81, 93, 104, 151, 185])}.{rng.randint(10, 250)}.{rng.randint(10, 250)}.{rng.randint(10, 250)}", "SERVER = ('{}', 8080)"),
    }
    out = []
    for name, (kind, make, tpl) in sorted(makers.items()):
        for _ in range(per_kind):
            value = make()
            out.append((name, kind, value, tpl.format(value)))
    return out


def secret_bench(files: list[tuple[str, str]], per_kind: int, seed: int) -> dict:
    rng = random.Random(seed)
    red = PIIRedactor()
    planted = planted_secrets(rng, per_kind)
    per_kind_hits: dict[str, list[int]] = {}
    for name, kind, value, snippet in planted:
        host_name, host = files[rng.randrange(len(files))]
        lines = host.split("\n")
        pos = rng.randrange(len(lines) + 1)
        text = "\n".join(lines[:pos] + [snippet] + lines[pos:])
        out, _ = red.redact(text, host_name)
        core = value.split("\n")[0]
        hit = core not in out and f"<{kind}>" in out
        per_kind_hits.setdefault(name, []).append(int(hit))
    t0 = time.process_time()
    false_kp = []
    totals: dict[str, int] = {}
    for name, text in files:
        for r in red.find(text, name):
            totals[r.kind] = totals.get(r.kind, 0) + 1
            if r.kind in ("KEY", "PASSWORD"):
                false_kp.append((name, r.kind, r.detector, text[r.start : r.end][:40]))
    cpu = time.process_time() - t0
    return {
        "recall_by_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind_hits.items())},
        "recall": sum(sum(v) for v in per_kind_hits.values()) / sum(len(v) for v in per_kind_hits.values()),
        "planted": len(planted),
        "clean_files": len(files),
        "false_key_password": len(false_kp),
        "false_examples": false_kp[:10],
        "clean_redactions_by_kind": totals,
        "redaction_docs_per_s": len(files) / cpu,
    }


# ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-files", type=int, default=2000)
    ap.add_argument("--planted", type=int, default=200, help="near-duplicate copies to plant")
    ap.add_argument("--secrets-per-kind", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-datasketch", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs per implementation; the fastest counts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    files = stdlib_files(args.max_files)
    texts = [t for _, t in files]
    n_orig = len(texts)
    candidates = [i for i, t in enumerate(texts) if len(shingle_set(t)) >= 50]
    planted_pairs = set()
    for i in rng.sample(candidates, min(args.planted, len(candidates))):
        texts.append(mutate(texts[i], rng, rng.uniform(0.01, 0.06)))
        planted_pairs.add((i, len(texts) - 1))
    shingles = [shingle_set(t) for t in texts]
    planted_true = {p for p in planted_pairs if jaccard(shingles[p[0]], shingles[p[1]]) >= THRESHOLD}
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus: {n_orig} stdlib files + {len(planted_pairs)} planted near-duplicates "
          f"({len(planted_true)} with Jaccard >= {THRESHOLD}), {mb:.1f} MB", file=sys.stderr)

    results = {"corpus": {"stdlib_files": n_orig, "planted": len(planted_pairs), "planted_jaccard_ge_threshold": len(planted_true),
                          "documents": len(texts), "mb": round(mb, 2), "python": sys.version.split()[0]}}
    impls = [("graphtune", run_graphtune)] + ([] if args.skip_datasketch else [("datasketch", run_datasketch)])
    for name, fn in impls:
        runs = [fn(texts) for _ in range(max(1, args.repeat))]
        pairs, cands, _ = runs[0]
        cpu = min(r[2] for r in runs)
        recall = len(planted_true & pairs) / max(1, len(planted_true))
        precise = sum(1 for a, b in pairs if jaccard(shingles[a], shingles[b]) >= THRESHOLD)
        cand_ok = sum(1 for a, b in cands if jaccard(shingles[a], shingles[b]) >= THRESHOLD)
        in_clusters = {x for p in pairs for x in p}
        n_clusters = len({min(p) for p in pairs})  # cluster representative = smallest member
        results[name] = {"cpu_s": round(cpu, 2), "docs_per_s_per_core": round(len(texts) / cpu, 1),
                         "mb_per_s_per_core": round(mb / cpu, 2), "candidate_pairs": len(cands),
                         "candidate_precision": round(cand_ok / max(1, len(cands)), 4),
                         "cluster_pairs": len(pairs), "cluster_pair_precision": round(precise / max(1, len(pairs)), 4),
                         "docs_removed": len(in_clusters) - n_clusters,
                         "planted_recall": round(recall, 4)}
        print(f"{name}: {results[name]}", file=sys.stderr)
    if "datasketch" in results:
        results["speedup"] = round(results["graphtune"]["docs_per_s_per_core"] / results["datasketch"]["docs_per_s_per_core"], 2)
    results["secrets"] = secret_bench(files, args.secrets_per_kind, args.seed)

    g, d = results["graphtune"], results.get("datasketch")
    print("\n| near-dedup (1 core, 256 perm, 25x10, word 5-grams) | docs/s/core | MB/s/core | planted-pair recall | candidate-pair precision | cluster-pair precision | docs removed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in (("graphtune.data (numpy)", g), (f"datasketch {_version('datasketch')}", d)):
        if r:
            print(f"| {label} | {r['docs_per_s_per_core']:.0f} | {r['mb_per_s_per_core']:.2f} | {r['planted_recall']:.3f} | "
                  f"{r['candidate_precision']:.3f} ({r['candidate_pairs']}) | {r['cluster_pair_precision']:.3f} ({r['cluster_pairs']}) | {r['docs_removed']} |")
    if d:
        print(f"\nspeed-up: {results['speedup']:.2f}x")
    s = results["secrets"]
    print("\n| secrets | value |\n|---|---:|")
    print(f"| planted secrets (12 kinds) | {s['planted']} |")
    print(f"| recall (all kinds) | {s['recall']:.3f} |")
    for k, v in s["recall_by_kind"].items():
        print(f"| recall: {k} | {v:.2f} |")
    print(f"| false KEY/PASSWORD redactions on {s['clean_files']} clean stdlib files | {s['false_key_password']} |")
    print(f"| other redactions on clean files (real emails / public IPs) | {', '.join(f'{k}={v}' for k, v in sorted(s['clean_redactions_by_kind'].items()) if k not in ('KEY', 'PASSWORD')) or '0'} |")
    print(f"| redaction throughput (docs/s/core) | {s['redaction_docs_per_s']:.0f} |")
    if s["false_examples"]:
        print("\nfalse KEY/PASSWORD examples:", file=sys.stderr)
        for e in s["false_examples"]:
            print(f"  {e}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def _version(pkg: str) -> str:
    from importlib.metadata import version

    try:
        return version(pkg)
    except Exception:  # pragma: no cover
        return "?"


if __name__ == "__main__":
    main()
