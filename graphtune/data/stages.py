"""The curation stages as datatrove pipeline steps.

Why datatrove: the same step objects run under ``LocalPipelineExecutor`` (here, CI), and
under datatrove's Slurm / Ray executors on a cluster, with its task sharding, completion
markers and logs; nothing here schedules work itself.

Stage layout (``tasks`` = ``executor.tasks``), following datatrove's multi-stage MinHash
pattern (signatures per task -> buckets -> single-task clustering -> filter):

====  ============  ==============  ==============================================================
 #    stage         tasks           does
====  ============  ==============  ==============================================================
 0    plan          1               list every source, read license files, apply the opt-out list
 1    annotate      tasks           read, decode, language, license, quality, decontam, MinHash
 2    buckets       bucket_tasks    per LSH band (and content hash): equal keys -> candidate edges
 3    cluster       1               union-find over edges; keep the best-ranked file per cluster
 4    finalize      tasks           drop duplicates, redact PII/secrets, route rows to shards
 5    shards        num_shards      sort each shard and write the parquet file
 6    manifest      1               counts, parameters, provenance, sha256 of every shard
====  ============  ==============  ==============================================================

Every stage reads only files written by earlier stages and its own ``rank``; results never
depend on the number of tasks (stable ids, order-independent clustering, sorted shards).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from datatrove.pipeline.base import PipelineStep

__all__ = [
    "PlanStep",
    "AnnotateStep",
    "BucketStep",
    "ClusterStep",
    "FinalizeStep",
    "ShardStep",
    "ManifestStep",
    "STAGES",
    "OUTPUT_SCHEMA_FIELDS",
]

LICENSE_RANK = {"permissive": 0, "no_license": 1, "non_permissive": 2}

OUTPUT_SCHEMA_FIELDS: list[tuple[str, str]] = [
    ("content", "string"),
    ("doc_id", "string"),
    ("source", "string"),
    ("source_uri", "string"),
    ("repo_name", "string"),
    ("path", "string"),
    ("commit", "string"),
    ("revision_date", "string"),
    ("blob_id", "string"),
    ("content_sha256", "string"),
    ("language", "string"),
    ("extension", "string"),
    ("is_vendor", "bool"),
    ("is_generated", "bool"),
    ("detected_licenses", "list<string>"),
    ("license_type", "string"),
    ("src_encoding", "string"),
    ("length_bytes", "int64"),
    ("redactions", "int32"),
]


def _schema(fields: list[tuple[str, str]]) -> Any:
    import pyarrow as pa

    types = {"string": pa.string(), "bool": pa.bool_(), "int64": pa.int64(), "int32": pa.int32(),
             "uint64": pa.uint64(), "uint8": pa.uint8(), "list<string>": pa.list_(pa.string())}
    return pa.schema([(n, types[t]) for n, t in fields])


def output_schema() -> Any:
    """pyarrow schema of the published shards."""
    return _schema(OUTPUT_SCHEMA_FIELDS)


def _doc_schema() -> Any:
    return _schema(OUTPUT_SCHEMA_FIELDS[1:] + [("content", "string"), ("source_index", "int32")])


# ------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------

class Counter(dict):
    """Named integer counters of one task (merged by summing)."""

    def add(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically with sorted keys (deterministic bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_counts(work: Path, stage: str) -> dict[str, int]:
    """Sum of the counters every task of ``stage`` wrote."""
    total: dict[str, int] = {}
    d = work / "counts" / stage
    if d.is_dir():
        for f in sorted(d.glob("*.json")):
            for k, v in json.loads(f.read_text()).items():
                total[k] = total.get(k, 0) + int(v)
    return dict(sorted(total.items()))


class Progress:
    """Per-task progress file polled by the driver's progress bars (cheap, throttled)."""

    def __init__(self, work: Path, stage: str, rank: int, total: int):
        self.path = work / "progress" / stage / f"{rank:05d}.json"
        self.total = total
        self.done = 0
        self._last = 0.0
        self._write()

    def _write(self) -> None:
        write_json(self.path, {"done": self.done, "total": self.total})

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last > 0.25:
            self._last = now
            self._write()

    def close(self) -> None:
        self.done = max(self.done, self.total)
        self._write()


def _write_parquet(table: Any, path: Path, compression: str = "zstd", row_group_size: int = 10_000) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression=compression, row_group_size=row_group_size, write_statistics=True)
    os.replace(tmp, path)


def _read_parquet(paths: Iterable[Path], columns: list[str] | None = None) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p, columns=columns) for p in paths]
    if not tables:
        return None
    return pa.concat_tables(tables)


def _slice(n: int, rank: int, world: int) -> tuple[int, int]:
    return n * rank // world, n * (rank + 1) // world


# ------------------------------------------------------------------------------------------
# base step
# ------------------------------------------------------------------------------------------

class _Step(PipelineStep):
    """Base of the graphtune stages: no document stream, files in ``work_dir`` instead."""

    type = "graphtune.data"
    stage = "base"

    def __init__(self, work_dir: str):
        super().__init__()
        self.work_dir = work_dir

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"graphtune.data.{self.stage}"

    @property
    def work(self) -> Path:
        return Path(self.work_dir)

    def config(self) -> Any:
        from graphtune.data.config import load_config

        data = json.loads((self.work / "config.json").read_text())
        return load_config(data, base_dir="/")

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Any:
        counts = Counter()
        self.process(rank, world_size, counts)
        write_json(self.work / "counts" / self.stage / f"{rank:05d}.json", dict(sorted(counts.items())))
        for k, v in counts.items():
            self.stat_update(k, value=v)
        return
        yield  # pragma: no cover - makes this a generator for datatrove

    def process(self, rank: int, world: int, counts: Counter) -> None:  # pragma: no cover
        raise NotImplementedError


# ------------------------------------------------------------------------------------------
# 0. plan
# ------------------------------------------------------------------------------------------

class PlanStep(_Step):
    """List all sources, detect repository licenses, drop opted-out repositories."""

    stage = "plan"

    def process(self, rank: int, world: int, counts: Counter) -> None:
        import pyarrow as pa

        from graphtune.data.licenses import RepoLicenses, is_license_file
        from graphtune.data.quality import OptOut
        from graphtune.data.sources import list_files, read_files

        cfg = self.config()
        cache = self.work / "cache"
        optout = OptOut.from_config(cfg.optout)
        all_refs = []
        infos = []
        repo_licenses: dict[str, dict[str, list[str]]] = {}
        optout_repos: set[str] = set()
        for i, src in enumerate(cfg.sources):
            refs, info = list_files(i, src, cfg.ingest, cache)
            counts.add("listed", len(refs))
            kept = []
            for r in refs:
                if optout.matches(r.repo):
                    optout_repos.add(r.repo)
                    counts.add("optout_files")
                else:
                    kept.append(r)
            # license files of each repository (read here once, applied per file later)
            lic_refs = [r for r in kept if is_license_file(r.path)]
            per_repo: dict[str, list[tuple[str, str]]] = defaultdict(list)
            for r, data in read_files(src, lic_refs, cache, 1_000_000):
                if data is None:
                    continue
                text = data if isinstance(data, str) else data.decode("utf-8", "replace")
                per_repo[r.repo].append((r.path, text))
            for repo in sorted({r.repo for r in kept}):
                repo_licenses[f"{i}\t{repo}"] = RepoLicenses.from_files(per_repo.get(repo, [])).to_json()
            info.files = len(kept)
            info.repos = len({r.repo for r in kept})
            infos.append(info.__dict__)
            all_refs.extend(kept)
        counts.add("optout_repos", len(optout_repos))
        counts.add("planned", len(all_refs))
        table = pa.table({
            "source": pa.array([r.source for r in all_refs], pa.int32()),
            "repo": pa.array([r.repo for r in all_refs], pa.string()),
            "path": pa.array([r.path for r in all_refs], pa.string()),
            "size": pa.array([r.size for r in all_refs], pa.int64()),
            "locator": pa.array([r.locator for r in all_refs], pa.string()),
            "commit": pa.array([r.commit for r in all_refs], pa.string()),
            "date": pa.array([r.date for r in all_refs], pa.string()),
            "declared_license": pa.array([r.declared_license for r in all_refs], pa.string()),
        })
        _write_parquet(table, self.work / "plan" / "files.parquet")
        write_json(self.work / "plan" / "plan.json", {
            "sources": infos,
            "repo_licenses": repo_licenses,
            "optout": {"patterns": optout.patterns, "matched_repos": sorted(optout_repos)},
        })


def _load_plan_refs(work: Path, lo: int | None = None, hi: int | None = None) -> list[Any]:
    import pyarrow.parquet as pq

    from graphtune.data.sources import FileRef

    t = pq.read_table(work / "plan" / "files.parquet")
    if lo is not None:
        t = t.slice(lo, hi - lo)
    cols = t.to_pydict()
    return [
        FileRef(cols["source"][i], cols["repo"][i], cols["path"][i], cols["size"][i], cols["locator"][i],
                cols["commit"][i], cols["date"][i], cols["declared_license"][i])
        for i in range(t.num_rows)
    ]


def _plan_rows(work: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(work / "plan" / "files.parquet").metadata.num_rows


# ------------------------------------------------------------------------------------------
# 1. annotate
# ------------------------------------------------------------------------------------------

def _decode(data: bytes, fallback: bool) -> tuple[str | None, str]:
    try:
        return data.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError:
        if not fallback:
            return None, ""
    try:
        from charset_normalizer import from_bytes
    except ImportError:  # pragma: no cover
        return None, ""
    best = from_bytes(data).best()
    if best is None:
        return None, ""
    return str(best), str(best.encoding)


class AnnotateStep(_Step):
    """Read and decode files, detect language and license, apply quality and decontamination
    filters, and compute content hashes and MinHash band keys for deduplication."""

    stage = "annotate"

    def process(self, rank: int, world: int, counts: Counter) -> None:
        import posixpath

        import pyarrow as pa

        from graphtune.data.decontam import Decontaminator
        from graphtune.data.language import detect_language
        from graphtune.data.licenses import (
            RepoLicenses,
            license_type,
            licenses_for_path,
            spdx_header_licenses,
        )
        from graphtune.data.minhash import MinHasher, band_hashes
        from graphtune.data.quality import quality_reason
        from graphtune.data.sources import git_blob_id, read_files

        cfg = self.config()
        plan = json.loads((self.work / "plan" / "plan.json").read_text())
        lo, hi = _slice(_plan_rows(self.work), rank, world)
        refs = _load_plan_refs(self.work, lo, hi)
        progress = Progress(self.work, self.stage, rank, len(refs))
        decontam = Decontaminator(cfg.decontamination)
        bands, rows = _bands_rows(cfg)
        hasher = MinHasher(num_perm=cfg.dedup.num_perm, ngram=cfg.dedup.ngram, seed=cfg.dedup.seed)
        keep_langs = set(cfg.languages.keep)
        drop_langs = set(cfg.languages.drop)
        allow_types = set(cfg.licenses.allow)
        permissive = cfg.licenses.permissive
        repo_lic_cache: dict[str, RepoLicenses] = {}

        docs: dict[str, list[Any]] = defaultdict(list)
        sig_ids: list[int] = []
        sig_rows: list[np.ndarray] = []
        sig_valid: list[bool] = []
        meta: dict[str, list[Any]] = defaultdict(list)

        by_source: dict[int, list[Any]] = defaultdict(list)
        for r in refs:
            by_source[r.source].append(r)
        for si in sorted(by_source):
            src = cfg.sources[si]
            for ref, data in read_files(src, by_source[si], self.work / "cache", cfg.ingest.max_file_size):
                progress.step()
                counts.add("files_in")
                if data is None:
                    counts.add("skipped_oversized")
                    continue
                if isinstance(data, str):
                    raw = data.encode("utf-8", "surrogatepass")
                    if "\0" in data:
                        counts.add("skipped_binary")
                        continue
                    text, enc = data, "UTF-8"
                else:
                    raw = data
                    if b"\0" in raw:
                        counts.add("skipped_binary")
                        continue
                    text, enc = _decode(raw, cfg.ingest.encoding_fallback)
                    if text is None:
                        counts.add("skipped_undecodable")
                        continue
                if len(raw) > cfg.ingest.max_file_size:
                    counts.add("skipped_oversized")
                    continue
                counts.add("decoded")
                # language
                lang = detect_language(ref.path, raw)
                if (keep_langs and lang.language not in keep_langs) or lang.language in drop_langs or (
                    cfg.languages.drop_unknown and not lang.language
                ):
                    counts.add("dropped_language")
                    continue
                # license
                key = f"{ref.source}\t{ref.repo}"
                if key not in repo_lic_cache:
                    repo_lic_cache[key] = RepoLicenses.from_json(plan["repo_licenses"].get(key, {}))
                detected = licenses_for_path(repo_lic_cache[key], ref.path, spdx_header_licenses(text))
                ltype = license_type(detected, permissive, ref.declared_license or None)
                if ltype not in allow_types:
                    counts.add("dropped_license")
                    counts.add(f"dropped_license_{ltype}")
                    continue
                # quality
                reason = quality_reason(text, ref.path, lang.language, len(raw), lang.is_vendor, lang.is_generated, cfg.filters)
                if reason:
                    counts.add("filtered")
                    counts.add(f"filtered_{reason}")
                    continue
                # decontamination
                dreason = decontam.reason(text)
                if dreason:
                    counts.add("decontaminated")
                    counts.add(f"decontaminated_{dreason}")
                    continue
                counts.add("kept")
                doc_id = ref.doc_id
                sha = hashlib.sha256(raw).hexdigest()
                docs["doc_id"].append(doc_id)
                docs["source"].append(src.type)
                docs["source_uri"].append(src.path)
                docs["repo_name"].append(ref.repo)
                docs["path"].append(ref.path)
                docs["commit"].append(ref.commit)
                docs["revision_date"].append(ref.date)
                docs["blob_id"].append(git_blob_id(raw))
                docs["content_sha256"].append(sha)
                docs["language"].append(lang.language)
                docs["extension"].append(posixpath.splitext(ref.path)[1].lstrip("."))
                docs["is_vendor"].append(lang.is_vendor)
                docs["is_generated"].append(lang.is_generated)
                docs["detected_licenses"].append(detected)
                docs["license_type"].append(ltype)
                docs["src_encoding"].append(enc)
                docs["length_bytes"].append(len(raw))
                docs["redactions"].append(0)
                docs["content"].append(text)
                docs["source_index"].append(ref.source)
                # dedup keys
                sig = hasher.signature(text) if cfg.dedup.near else None
                sig_ids.append(int(doc_id, 16))
                sig_valid.append(sig is not None)
                sig_rows.append(sig if sig is not None else np.zeros(cfg.dedup.num_perm, dtype=np.uint32))
                meta["license_rank"].append(LICENSE_RANK[ltype])
                meta["date"].append(ref.date)
                meta["sort_key"].append(f"{ref.source:05d}\0{ref.repo}\0{ref.path}")
                meta["h1"].append(int(sha[:16], 16))
                meta["h2"].append(int(sha[16:32], 16))
        progress.close()
        out = self.work / "annotate"
        table = pa.Table.from_pydict({k: docs.get(k, []) for k in _doc_schema().names}, schema=_doc_schema())
        _write_parquet(table, out / "docs" / f"{rank:05d}.parquet")
        cols: dict[str, Any] = {
            "doc_id": pa.array(sig_ids, pa.uint64()),
            "has_sig": pa.array(sig_valid, pa.bool_()),
            "license_rank": pa.array(meta["license_rank"], pa.uint8()),
            "date": pa.array(meta["date"], pa.string()),
            "sort_key": pa.array(meta["sort_key"], pa.string()),
            "h1": pa.array(meta["h1"], pa.uint64()),
            "h2": pa.array(meta["h2"], pa.uint64()),
        }
        if bands:
            keys = band_hashes(np.stack(sig_rows), bands, rows) if sig_rows else np.empty((0, bands), np.uint64)
            for b in range(bands):
                cols[f"b{b:03d}"] = pa.array(keys[:, b], pa.uint64())
        _write_parquet(pa.table(cols), out / "sigs" / f"{rank:05d}.parquet")


def _bands_rows(cfg: Any) -> tuple[int, int]:
    """(bands, rows) of the LSH; (0, 0) when near dedup is off."""
    if not cfg.dedup.near:
        return 0, 0
    if cfg.dedup.bands:
        return cfg.dedup.bands, cfg.dedup.rows
    from graphtune.data.minhash import optimal_param

    return optimal_param(cfg.dedup.threshold, cfg.dedup.num_perm)


# ------------------------------------------------------------------------------------------
# 2. buckets
# ------------------------------------------------------------------------------------------

def _group_edges(keys: list[np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Star edges (first id of group, other id) for every group of equal key tuples."""
    if ids.size < 2:
        return np.empty((0, 2), dtype=np.uint64)
    order = np.lexsort([ids] + list(reversed(keys)))
    sk = [k[order] for k in keys]
    sid = ids[order]
    same = np.ones(ids.size - 1, dtype=bool)
    for k in sk:
        same &= k[1:] == k[:-1]
    new_group = np.concatenate([[True], ~same])
    idx = np.arange(ids.size)
    first = np.maximum.accumulate(np.where(new_group, idx, 0))
    members = ~new_group
    return np.stack([sid[first[members]], sid[members]], axis=1)


class BucketStep(_Step):
    """LSH buckets: documents sharing a band key (or the content hash) become candidate pairs."""

    stage = "buckets"

    def process(self, rank: int, world: int, counts: Counter) -> None:
        import pyarrow as pa

        cfg = self.config()
        bands, _ = _bands_rows(cfg)
        sig_files = sorted((self.work / "annotate" / "sigs").glob("*.parquet"))
        jobs = [b for b in range(bands) if b % world == rank]
        exact = cfg.dedup.exact and rank == 0
        progress = Progress(self.work, self.stage, rank, len(jobs) + int(exact))
        edges = []
        if exact:
            t = _read_parquet(sig_files, ["doc_id", "h1", "h2"])
            if t is not None and t.num_rows:
                e = _group_edges([t["h1"].to_numpy(), t["h2"].to_numpy()], t["doc_id"].to_numpy())
                counts.add("exact_pairs", len(e))
                edges.append(e)
            progress.step()
        for b in jobs:
            t = _read_parquet(sig_files, ["doc_id", "has_sig", f"b{b:03d}"])
            if t is not None and t.num_rows:
                valid = t["has_sig"].to_numpy(zero_copy_only=False)
                ids = t["doc_id"].to_numpy()[valid]
                e = _group_edges([t[f"b{b:03d}"].to_numpy()[valid]], ids)
                counts.add("band_pairs", len(e))
                edges.append(e)
            progress.step()
        progress.close()
        e = np.concatenate(edges) if edges else np.empty((0, 2), dtype=np.uint64)
        _write_parquet(pa.table({"u": pa.array(e[:, 0], pa.uint64()), "v": pa.array(e[:, 1], pa.uint64())}),
                       self.work / "buckets" / f"{rank:05d}.parquet")


# ------------------------------------------------------------------------------------------
# 3. cluster
# ------------------------------------------------------------------------------------------

class ClusterStep(_Step):
    """Union-find over all candidate edges; one file per cluster survives, chosen by rank key
    (permissive < no_license < non_permissive, then newest revision date, then stable id)."""

    stage = "cluster"

    def process(self, rank: int, world: int, counts: Counter) -> None:
        import pyarrow as pa

        from graphtune.data.minhash import connected_components

        sig_files = sorted((self.work / "annotate" / "sigs").glob("*.parquet"))
        meta = _read_parquet(sig_files, ["doc_id", "license_rank", "date", "sort_key", "h1", "h2"])
        edge_t = _read_parquet(sorted((self.work / "buckets").glob("*.parquet")), ["u", "v"])
        progress = Progress(self.work, self.stage, rank, 1 if meta is None else meta.num_rows)
        remove_ids = np.empty(0, dtype=np.uint64)
        keeper_ids = np.empty(0, dtype=np.uint64)
        if meta is not None and meta.num_rows and edge_t is not None and edge_t.num_rows:
            ids = meta["doc_id"].to_numpy()
            order = np.argsort(ids, kind="stable")
            sorted_ids = ids[order]
            if np.any(sorted_ids[1:] == sorted_ids[:-1]):
                dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0]
                raise RuntimeError(f"duplicate document id {int(dup):016x}: a file is listed twice in one source")
            u = order[np.searchsorted(sorted_ids, edge_t["u"].to_numpy())]
            v = order[np.searchsorted(sorted_ids, edge_t["v"].to_numpy())]
            labels = connected_components(len(ids), np.stack([u, v], axis=1))
            sizes = np.bincount(labels, minlength=len(ids))
            in_cluster = sizes[labels] > 1
            lic = meta["license_rank"].to_numpy()
            _, date_rank = np.unique(np.asarray(meta["date"].to_pylist(), dtype=object).astype(str), return_inverse=True)
            _, key_rank = np.unique(np.asarray(meta["sort_key"].to_pylist(), dtype=object).astype(str), return_inverse=True)
            # best first: lowest license rank, newest date, smallest stable key
            best = np.lexsort((key_rank, -date_rank.astype(np.int64), lic, labels))
            first_of_label = np.ones(best.size, dtype=bool)
            first_of_label[1:] = labels[best][1:] != labels[best][:-1]
            keeper_of_label = np.full(len(ids), -1, dtype=np.int64)
            keeper_of_label[labels[best][first_of_label]] = best[first_of_label]
            keeper = keeper_of_label[labels]
            removed = in_cluster & (keeper != np.arange(len(ids)))
            remove_ids = ids[removed]
            keeper_ids = ids[keeper[removed]]
            # exact vs near: a cluster of n files with d distinct contents removes n-d exact copies
            h1, h2 = meta["h1"].to_numpy(), meta["h2"].to_numpy()
            cl = np.flatnonzero(in_cluster)
            if cl.size:
                trip = np.stack([labels[cl].astype(np.uint64), h1[cl], h2[cl]], axis=1)
                distinct = np.unique(trip, axis=0)
                n_clusters = np.unique(labels[cl]).size
                exact_removed = cl.size - distinct.shape[0]
                near_removed = distinct.shape[0] - n_clusters
                counts.add("clusters", int(n_clusters))
                counts.add("clustered_files", int(cl.size))
                counts.add("removed_exact", int(exact_removed))
                counts.add("removed_near", int(near_removed))
        counts.add("removed", int(remove_ids.size))
        progress.close()
        order = np.argsort(remove_ids, kind="stable")
        _write_parquet(pa.table({"doc_id": pa.array(remove_ids[order], pa.uint64()),
                                 "keeper_id": pa.array(keeper_ids[order], pa.uint64())}),
                       self.work / "cluster" / "remove.parquet")


# ------------------------------------------------------------------------------------------
# 4. finalize
# ------------------------------------------------------------------------------------------

def shard_of(repo_key: str, num_shards: int) -> int:
    """Output shard of a repository (whole repositories stay in one shard)."""
    return int(hashlib.sha256(repo_key.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16) % num_shards


class FinalizeStep(_Step):
    """Drop deduplicated files, redact PII and secrets, and route rows to output shards."""

    stage = "finalize"

    def process(self, rank: int, world: int, counts: Counter) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from graphtune.data.pii import PIIRedactor

        cfg = self.config()
        docs_path = self.work / "annotate" / "docs" / f"{rank:05d}.parquet"
        table = pq.read_table(docs_path)
        remove_path = self.work / "cluster" / "remove.parquet"
        if remove_path.exists():
            removed = pq.read_table(remove_path)["doc_id"].to_numpy()
            ids = np.array([int(x, 16) for x in table["doc_id"].to_pylist()], dtype=np.uint64)
            keep = ~np.isin(ids, removed)
            table = table.filter(pa.array(keep))
        progress = Progress(self.work, self.stage, rank, table.num_rows)
        redactor = PIIRedactor(cfg.pii)
        cols = table.to_pydict()
        n = table.num_rows
        for i in range(n):
            if cfg.pii.enabled:
                new, c = redactor.redact(cols["content"][i], cols["path"][i])
                if c:
                    cols["content"][i] = new
                    cols["redactions"][i] = sum(c.values())
                    counts.add("files_redacted")
                    for kind, k in c.items():
                        counts.add(f"pii_{kind}", k)
            progress.step()
        counts.add("rows", n)
        shards: dict[int, list[int]] = defaultdict(list)
        for i in range(n):
            shards[shard_of(f"{cols['source_index'][i]}\0{cols['repo_name'][i]}", cfg.output.num_shards)].append(i)
        schema = output_schema()
        for s, rows in sorted(shards.items()):
            part = {k: [cols[k][i] for i in rows] for k in schema.names}
            part["_sort_source"] = [cols["source_index"][i] for i in rows]
            t = pa.Table.from_pydict(part, schema=schema.append(pa.field("_sort_source", pa.int32())))
            _write_parquet(t, self.work / "finalize" / f"shard_{s:05d}" / f"{rank:05d}.parquet")
        progress.close()


# ------------------------------------------------------------------------------------------
# 5. shards
# ------------------------------------------------------------------------------------------

def shard_name(index: int, total: int) -> str:
    """File name of output shard ``index`` (datasets recognises the ``train-`` prefix)."""
    return f"train-{index:05d}-of-{total:05d}.parquet"


class ShardStep(_Step):
    """Write one output shard: rows sorted by (repository, path, source), no timestamps."""

    stage = "shards"

    def __init__(self, work_dir: str, output_dir: str):
        super().__init__(work_dir)
        self.output_dir = output_dir

    def process(self, rank: int, world: int, counts: Counter) -> None:
        cfg = self.config()
        parts = sorted((self.work / "finalize" / f"shard_{rank:05d}").glob("*.parquet"))
        table = _read_parquet(parts)
        schema = output_schema()
        import pyarrow as pa

        if table is None:
            table = schema.empty_table()
        else:
            keys = list(zip(table["repo_name"].to_pylist(), table["path"].to_pylist(),
                            table["_sort_source"].to_pylist(), table["doc_id"].to_pylist()))
            order = sorted(range(table.num_rows), key=keys.__getitem__)
            table = table.take(pa.array(order, pa.int64())).select(schema.names).cast(schema)
        progress = Progress(self.work, self.stage, rank, table.num_rows)
        out = Path(self.output_dir) / "data" / shard_name(rank, cfg.output.num_shards)
        _write_parquet(table, out, compression=cfg.output.compression, row_group_size=cfg.output.row_group_size)
        counts.add("rows", table.num_rows)
        counts.add("shards", 1)
        progress.close()


# ------------------------------------------------------------------------------------------
# 6. manifest
# ------------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    """Versions of the packages that influence output bytes."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("graphtune", "numpy", "pyarrow", "datatrove", "detect-secrets", "enry-python", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    from graphtune.data import __version__

    out["graphtune.data"] = __version__
    return out


class ManifestStep(_Step):
    """Gather counts, parameters, provenance and shard hashes into ``manifest.json``."""

    stage = "manifest"

    def __init__(self, work_dir: str, output_dir: str):
        super().__init__(work_dir)
        self.output_dir = output_dir

    def process(self, rank: int, world: int, counts: Counter) -> None:
        import pyarrow.parquet as pq

        from graphtune.data.decontam import Decontaminator

        cfg = self.config()
        progress = Progress(self.work, self.stage, rank, cfg.output.num_shards)
        plan = json.loads((self.work / "plan" / "plan.json").read_text())
        out = Path(self.output_dir)
        shards = []
        for i in range(cfg.output.num_shards):
            p = out / "data" / shard_name(i, cfg.output.num_shards)
            shards.append({"path": f"data/{p.name}", "rows": pq.ParquetFile(p).metadata.num_rows,
                           "bytes": p.stat().st_size, "sha256": sha256_file(p)})
        bands, rows = _bands_rows(cfg)
        stage_counts = {s: read_counts(self.work, s) for s in ("plan", "annotate", "buckets", "cluster", "finalize", "shards")}
        fingerprint = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()
        manifest = {
            "format": "graphtune.data.manifest/1",
            "tool": tool_versions(),
            "parameters": cfg.build_parameters(),
            "derived": {"lsh_bands": bands, "lsh_rows": rows,
                        "decontamination_sha256": Decontaminator(cfg.decontamination).fingerprint()},
            "sources": plan["sources"],
            "optout": plan["optout"],
            "counts": stage_counts,
            "shards": shards,
            "rows": sum(s["rows"] for s in shards),
            "fingerprint": fingerprint,
        }
        write_json(out / "manifest.json", manifest)
        counts.add("shards", len(shards))
        progress.close()


STAGES = ("plan", "annotate", "buckets", "cluster", "finalize", "shards", "manifest")
