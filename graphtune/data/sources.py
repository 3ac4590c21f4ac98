"""Ingest: list and read files from local folders, git repositories and Hugging Face datasets.

Why a two-step design (``list_files`` then ``read_files``): listing is cheap and done once
(plan stage) so every file gets a stable id, a repository name and provenance before any
work is split into tasks; reading happens inside the tasks, each on its own slice, so the
split can change (1 task, N tasks, a Slurm array) without changing any result.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from graphtune.data.config import ConfigError, IngestConfig, SourceConfig

__all__ = ["FileRef", "SourceInfo", "list_files", "read_files", "doc_id_for", "git_blob_id"]


@dataclass
class FileRef:
    """One listed file with its provenance (repo, path, commit)."""

    source: int  # index into config.sources
    repo: str
    path: str  # repository-relative, '/'-separated
    size: int  # bytes; -1 when unknown before reading (datasets)
    locator: str  # absolute path (local), blob sha (git), row index (hf)
    commit: str = ""
    date: str = ""
    declared_license: str = ""

    @property
    def doc_id(self) -> str:
        return doc_id_for(self.source, self.repo, self.path)


@dataclass
class SourceInfo:
    """Provenance of one source, recorded in the manifest."""

    index: int
    type: str
    uri: str
    name: str
    commit: str = ""
    date: str = ""
    files: int = 0
    repos: int = 0


def doc_id_for(source: int, repo: str, path: str) -> str:
    """Stable 16-hex-digit id of a file: independent of task split and listing order."""
    h = hashlib.sha256(f"{source}\0{repo}\0{path}".encode("utf-8", "surrogatepass")).hexdigest()
    return h[:16]


def git_blob_id(data: bytes) -> str:
    """git / Software Heritage content id (sha1 of ``blob <len>\\0`` + bytes)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _included(rel: str, ingest: IngestConfig) -> bool:
    if ingest.include and not any(fnmatch.fnmatch(rel, p) or p in ("**", "*") for p in ingest.include):
        return False
    return not any(fnmatch.fnmatch(rel, p) for p in ingest.exclude)


# ------------------------------------------------------------------------------------------
# git helpers
# ------------------------------------------------------------------------------------------

def _git(repo: str, *args: str, input: bytes | None = None) -> bytes:
    try:
        return subprocess.run(["git", "-C", repo, *args], input=input, check=True, capture_output=True).stdout
    except FileNotFoundError as e:  # pragma: no cover
        raise RuntimeError("git is required for git sources but was not found on PATH") from e
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {e.stderr.decode(errors='replace').strip()}") from e


def _git_repo_name(repo: str) -> str:
    try:
        url = _git(repo, "config", "--get", "remote.origin.url").decode().strip()
    except RuntimeError:
        url = ""
    if url:
        parts = url.rstrip("/").removesuffix(".git").replace(":", "/").split("/")
        if len(parts) >= 2:
            return f"{parts[-2]}/{parts[-1]}"
    return Path(repo).resolve().name


def _clone_if_remote(src: SourceConfig, cache_dir: Path) -> str:
    if "://" not in src.path:
        return src.path
    dest = cache_dir / hashlib.sha256(src.path.encode()).hexdigest()[:16]
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "--bare", "--quiet", src.path, str(dest)], check=True)
    return str(dest)


# ------------------------------------------------------------------------------------------
# Hugging Face datasets helpers
# ------------------------------------------------------------------------------------------

def _load_hf(src: SourceConfig, cache_dir: Path) -> Any:
    """The dataset split of an ``hf`` source, from local files (no network needed)."""
    import datasets

    p = Path(src.path)
    if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[src.split]
        return ds
    kwargs: dict[str, Any] = {"split": src.split, "cache_dir": str(cache_dir)}
    if src.data_files:
        builder = src.builder
        files = list(src.data_files) if not isinstance(src.data_files, str) else [src.data_files]
        if builder is None:
            ext = Path(files[0]).suffix.lower()
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".arrow": "arrow"}.get(ext)
            if builder is None:
                raise ConfigError(f"sources: cannot infer the builder for {files[0]}; set 'builder'")
        return datasets.load_dataset(builder, data_files=files, **kwargs)
    if src.builder:
        return datasets.load_dataset(src.builder, data_dir=src.path, **kwargs)
    return datasets.load_dataset(src.path, **kwargs)


# ------------------------------------------------------------------------------------------
# listing
# ------------------------------------------------------------------------------------------

def list_files(index: int, src: SourceConfig, ingest: IngestConfig, cache_dir: Path) -> tuple[list[FileRef], SourceInfo]:
    """Every candidate file of one source, sorted by (repo, path), with provenance."""
    refs: list[FileRef] = []
    if src.type == "local":
        root = Path(src.path)
        default_repo = src.name or root.resolve().name
        info = SourceInfo(index, "local", str(root), default_repo, date=src.date or "")
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if d != ".git")
            for fn in sorted(filenames):
                full = Path(dirpath) / fn
                rel = full.relative_to(root).as_posix()
                if full.is_symlink() or not full.is_file() or not _included(rel, ingest):
                    continue
                parts = rel.split("/")
                if src.repo_depth and len(parts) > src.repo_depth:
                    repo = "/".join(parts[: src.repo_depth])
                    if src.name:
                        repo = f"{src.name}/{repo}"
                    path = "/".join(parts[src.repo_depth :])
                else:
                    repo, path = default_repo, rel
                refs.append(FileRef(index, repo, path, full.lstat().st_size, str(full), "", src.date or "", src.license or ""))
    elif src.type == "git":
        repo_dir = _clone_if_remote(src, cache_dir)
        commit = _git(repo_dir, "rev-parse", "--verify", f"{src.rev}^{{commit}}").decode().strip()
        date = _git(repo_dir, "show", "-s", "--format=%cI", commit).decode().strip()
        name = src.name or _git_repo_name(repo_dir)
        info = SourceInfo(index, "git", src.path, name, commit=commit, date=date)
        out = _git(repo_dir, "ls-tree", "-r", "-l", "-z", "--full-tree", commit)
        for entry in out.split(b"\0"):
            if not entry:
                continue
            meta, _, p = entry.partition(b"\t")
            mode, otype, sha, size = meta.split()
            path = p.decode("utf-8", "surrogateescape")
            if otype != b"blob" or mode == b"120000" or not _included(path, ingest):
                continue  # submodules and symlinks are not file contents
            refs.append(FileRef(index, name, path, int(size), sha.decode(), commit, date, src.license or ""))
    elif src.type == "hf":
        ds = _load_hf(src, cache_dir)
        for col, what in ((src.content_column, "content_column"), (src.path_column, "path_column"), (src.repo_column, "repo_column"), (src.license_column, "license_column"), (src.date_column, "date_column")):
            if col and col not in ds.column_names:
                raise ConfigError(f"sources[{index}].{what}: column {col!r} not in dataset (columns: {', '.join(ds.column_names)})")
        name = src.name or Path(src.path).name
        info = SourceInfo(index, "hf", src.path, name)
        n = len(ds)
        cols = {k: (ds[k] if k else None) for k in (src.path_column, src.repo_column, src.license_column, src.date_column) if k}
        for i in range(n):
            path = str(cols[src.path_column][i]) if src.path_column else f"row-{i:09d}"
            repo = str(cols[src.repo_column][i]) if src.repo_column else name
            lic = str(cols[src.license_column][i] or "") if src.license_column else (src.license or "")
            date = str(cols[src.date_column][i] or "") if src.date_column else (src.date or "")
            if src.path_column and not _included(path, ingest):
                continue
            refs.append(FileRef(index, repo, path, -1, str(i), "", date, lic))
    else:  # pragma: no cover - rejected by config validation
        raise ConfigError(f"sources[{index}].type: unknown type {src.type!r}")
    refs.sort(key=lambda r: (r.repo, r.path))
    info.files = len(refs)
    info.repos = len({r.repo for r in refs})
    return refs, info


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------

def read_files(src: SourceConfig, refs: Sequence[FileRef], cache_dir: Path, max_size: int) -> Iterator[tuple[FileRef, bytes | str | None]]:
    """Contents of ``refs`` (all from ``src``), in order; ``None`` for files over ``max_size``.

    Local and git sources yield bytes; dataset sources yield the column value (str or bytes).
    """
    if src.type == "local":
        for r in refs:
            if r.size > max_size:
                yield r, None
                continue
            with open(r.locator, "rb") as f:
                yield r, f.read()
    elif src.type == "git":
        repo_dir = _clone_if_remote(src, cache_dir)
        wanted = [r for r in refs if r.size <= max_size]
        blobs: dict[str, bytes] = {}
        if wanted:
            proc = subprocess.Popen(["git", "-C", repo_dir, "cat-file", "--batch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert proc.stdin is not None and proc.stdout is not None
            try:
                for r in wanted:
                    if r.locator in blobs:
                        continue
                    proc.stdin.write(r.locator.encode() + b"\n")
                    proc.stdin.flush()
                    header = proc.stdout.readline().split()
                    if len(header) < 3 or header[1] != b"blob":
                        raise RuntimeError(f"git cat-file: unexpected answer {header!r} for {r.path}")
                    size = int(header[2])
                    data = proc.stdout.read(size)
                    proc.stdout.read(1)  # trailing newline
                    blobs[r.locator] = data
            finally:
                proc.stdin.close()
                proc.wait()
        for r in refs:
            yield r, blobs.get(r.locator) if r.size <= max_size else None
    elif src.type == "hf":
        ds = _load_hf(src, cache_dir)
        col = ds[src.content_column] if len(refs) > 0.5 * len(ds) else None
        for r in refs:
            i = int(r.locator)
            value = col[i] if col is not None else ds[i][src.content_column]
            if value is None:
                yield r, b""
                continue
            size = len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else len(value)
            yield r, (None if size > max_size else value)
    else:  # pragma: no cover
        raise ConfigError(f"unknown source type {src.type!r}")
