"""Driver: run the curation stages on a datatrove executor, show progress, summarise, verify.

Why a thin driver: the work happens in the datatrove steps of :mod:`graphtune.data.stages`;
this module only writes the resolved config where the tasks can read it, launches one
executor per stage (each stage depends on the previous one), polls progress files for the
per-stage progress bars, and prints a summary table from the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from graphtune.data.config import ConfigError, CurateConfig, load_config
from graphtune.data.stages import (
    AnnotateStep,
    BucketStep,
    ClusterStep,
    FinalizeStep,
    ManifestStep,
    PlanStep,
    ShardStep,
    _bands_rows,
    write_json,
)

__all__ = ["CurateResult", "VerifyResult", "curate", "verify", "summary_rows", "print_summary"]

_STAGE_TITLES = {
    "plan": "plan (list, licenses, opt-out)",
    "annotate": "annotate (ingest, language, license, quality, decontam, minhash)",
    "buckets": "dedup: LSH buckets",
    "cluster": "dedup: clusters",
    "finalize": "PII / secrets redaction",
    "shards": "write shards",
    "manifest": "manifest",
}


@dataclass
class CurateResult:
    """Where the dataset went and what the manifest says."""

    output_dir: Path
    manifest: dict[str, Any]

    @property
    def shards(self) -> list[Path]:
        """Absolute paths of the parquet shards, in order."""
        return [self.output_dir / s["path"] for s in self.manifest["shards"]]

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Per-stage counters."""
        return self.manifest["counts"]


@dataclass
class VerifyResult:
    """Outcome of a rebuild-and-compare."""

    ok: bool
    mismatches: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rebuilt_fingerprint: str = ""
    expected_fingerprint: str = ""


# ------------------------------------------------------------------------------------------
# executors
# ------------------------------------------------------------------------------------------

@contextmanager
def _quiet_datatrove() -> Iterator[None]:
    """Route datatrove's per-task INFO logs to its log files only (keeps the bars readable).

    datatrove adds a stderr sink per task and re-adds a default INFO sink afterwards; both are
    swapped for WARNING-level ones while a stage runs, then restored.
    """
    from datatrove.executor import base as dt_base
    from datatrove.utils import logging as dt_logging
    from loguru import logger

    orig_add, orig_default = dt_base.add_task_logger, dt_logging.setup_default_logger

    def add(logging_dir: Any, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
        return orig_add(logging_dir, rank, local_rank=1, node_rank=node_rank)

    def default() -> None:
        logger.remove()
        logger.add(sys.stderr, level="WARNING")

    dt_base.add_task_logger, dt_logging.setup_default_logger = add, default
    try:
        yield
    finally:
        dt_base.add_task_logger, dt_logging.setup_default_logger = orig_add, orig_default


def _quiet_local_executor() -> type:
    """LocalPipelineExecutor running under :func:`_quiet_datatrove` (also in worker processes)."""
    from datatrove.executor.local import LocalPipelineExecutor

    class _Local(LocalPipelineExecutor):
        def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
            with _quiet_datatrove():
                return super()._run_for_rank(rank, local_rank, node_rank)

    return _Local


def _make_executor(cfg: CurateConfig, step: Any, tasks: int, logging_dir: Path, depends: Any) -> Any:
    ex = cfg.executor
    if ex.type == "local":
        cls = _quiet_local_executor()
        workers = ex.workers if ex.workers > 0 else min(tasks, os.cpu_count() or 1)
        return cls(pipeline=[step], tasks=tasks, workers=min(workers, tasks), logging_dir=str(logging_dir),
                   skip_completed=True, start_method=ex.start_method)
    if ex.type == "slurm":
        from datatrove.executor.slurm import SlurmPipelineExecutor

        opts = dict(ex.options)
        opts.setdefault("time", "24:00:00")
        if "partition" not in opts:
            raise ConfigError("executor.options.partition is required for the slurm executor")
        return SlurmPipelineExecutor(pipeline=[step], tasks=tasks, logging_dir=str(logging_dir), depends=depends,
                                     job_name=f"graphtune-{step.stage}", **opts)
    if ex.type == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        return RayPipelineExecutor(pipeline=[step], tasks=tasks, logging_dir=str(logging_dir), depends=depends, **dict(ex.options))
    raise ConfigError(f"executor.type: unknown executor {ex.type!r}")  # pragma: no cover


# ------------------------------------------------------------------------------------------
# progress bars
# ------------------------------------------------------------------------------------------

class _ProgressPoller:
    """Sums the per-task progress files of one stage into a tqdm bar, from a thread."""

    def __init__(self, work: Path, stage: str, enabled: bool):
        self.dir = work / "progress" / stage
        self.enabled = enabled
        self.bar: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, desc=_STAGE_TITLES.get(stage, stage), unit="item", file=sys.stderr, leave=True, dynamic_ncols=True)

    def _poll(self) -> None:
        done = total = 0
        for f in self.dir.glob("*.json"):
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            done += int(d.get("done", 0))
            total += int(d.get("total", 0))
        if self.bar is not None:
            if total != self.bar.total:
                self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._poll()

    def __enter__(self) -> "_ProgressPoller":
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.bar is not None:
            self._poll()
            self.bar.close()


# ------------------------------------------------------------------------------------------
# curate
# ------------------------------------------------------------------------------------------

def _as_config(config: CurateConfig | Mapping[str, Any] | str | os.PathLike[str]) -> CurateConfig:
    if isinstance(config, CurateConfig):
        return config
    return load_config(config)


_WORK_MARKER = ".graphtune-data-work"


def _prepare_dirs(work: Path, out: Path) -> None:
    """Fresh work dir and no stale shards, without ever deleting folders we did not create."""
    if work == out or work in out.parents or out in work.parents:
        raise ConfigError(f"work_dir {work} and output_dir {out} must not contain each other")
    if work.exists():
        if any(work.iterdir()) and not (work / _WORK_MARKER).exists():
            raise ConfigError(f"work_dir {work} exists and was not created by graphtune.data; refusing to delete it")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / _WORK_MARKER).write_text("scratch space of graphtune.data; deleted on every run\n")
    for old in sorted((out / "data").glob("train-*-of-*.parquet")) if (out / "data").is_dir() else []:
        old.unlink()
    if (out / "manifest.json").exists():
        (out / "manifest.json").unlink()
    (out / "data").mkdir(parents=True, exist_ok=True)


def curate(
    config: CurateConfig | Mapping[str, Any] | str | os.PathLike[str],
    *,
    tasks: int | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    keep_work: bool = True,
) -> CurateResult:
    """Build the dataset described by ``config`` (a :class:`CurateConfig`, mapping or YAML path).

    ``tasks`` / ``workers`` override ``executor.tasks`` / ``executor.workers``; the output
    bytes do not depend on them.  Returns the output folder and the manifest.  With the
    Slurm / Ray executors the stages are submitted and this returns once they have finished
    (Ray) or been queued (Slurm: the manifest appears when the last job ends).
    """
    cfg = _as_config(config)
    if tasks is not None:
        cfg.executor.tasks = tasks
    if workers is not None:
        cfg.executor.workers = workers
    show = cfg.progress if progress is None else progress
    work = cfg.resolved_work_dir().resolve()
    out = Path(cfg.output_dir).resolve()
    _prepare_dirs(work, out)
    write_json(work / "config.json", cfg.to_dict())

    bands, _ = _bands_rows(cfg)
    t = cfg.executor.tasks
    bucket_tasks = cfg.executor.bucket_tasks or max(1, min(t, bands + 1))
    plan = [
        ("plan", PlanStep(str(work)), 1),
        ("annotate", AnnotateStep(str(work)), t),
        ("buckets", BucketStep(str(work)), bucket_tasks),
        ("cluster", ClusterStep(str(work)), 1),
        ("finalize", FinalizeStep(str(work)), t),
        ("shards", ShardStep(str(work), str(out)), cfg.output.num_shards),
        ("manifest", ManifestStep(str(work), str(out)), 1),
    ]
    if not (cfg.dedup.exact or cfg.dedup.near):
        plan = [p for p in plan if p[0] not in ("buckets", "cluster")]

    if cfg.executor.type == "local":
        for stage, step, n in plan:
            ex = _make_executor(cfg, step, n, work / "logs" / stage, None)
            with _ProgressPoller(work, stage, show), _quiet_datatrove():
                ex.run()
            if len(ex.get_incomplete_ranks(skip_completed=True)):
                raise RuntimeError(f"stage {stage} did not complete; see {work / 'logs' / stage}")
    else:
        prev = None
        for stage, step, n in plan:
            prev = _make_executor(cfg, step, n, work / "logs" / stage, prev)
        assert prev is not None
        prev.run()
        if not (out / "manifest.json").exists():
            return CurateResult(out, {})

    manifest = json.loads((out / "manifest.json").read_text())
    if show:
        print_summary(manifest)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return CurateResult(out, manifest)


# ------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------

def summary_rows(manifest: Mapping[str, Any]) -> list[tuple[str, int, int, str]]:
    """(stage, files in, files out, details) rows of the end-of-run summary."""
    c = manifest["counts"]
    plan, ann, clu, fin, sh = (c.get(k, {}) for k in ("plan", "annotate", "cluster", "finalize", "shards"))

    def detail(d: Mapping[str, int], prefix: str) -> str:
        items = [f"{k[len(prefix):]}={v}" for k, v in sorted(d.items()) if k.startswith(prefix) and k != prefix.rstrip("_")]
        return ", ".join(items)

    rows = []
    listed = plan.get("listed", 0)
    rows.append(("opt-out", listed, plan.get("planned", 0), f"repos={plan.get('optout_repos', 0)}, files={plan.get('optout_files', 0)}"))
    decoded = ann.get("decoded", 0)
    rows.append(("ingest", ann.get("files_in", 0), decoded,
                 f"binary={ann.get('skipped_binary', 0)}, undecodable={ann.get('skipped_undecodable', 0)}, oversized={ann.get('skipped_oversized', 0)}"))
    after_lang = decoded - ann.get("dropped_language", 0)
    rows.append(("language", decoded, after_lang, f"dropped={ann.get('dropped_language', 0)}"))
    after_lic = after_lang - ann.get("dropped_license", 0)
    rows.append(("license", after_lang, after_lic, detail(ann, "dropped_license_") or "dropped=0"))
    after_q = after_lic - ann.get("filtered", 0)
    rows.append(("quality", after_lic, after_q, detail(ann, "filtered_") or "dropped=0"))
    after_d = after_q - ann.get("decontaminated", 0)
    rows.append(("decontamination", after_q, after_d, detail(ann, "decontaminated_") or "dropped=0"))
    removed = clu.get("removed", 0)
    rows.append(("dedup", after_d, after_d - removed,
                 f"exact={clu.get('removed_exact', 0)}, near={clu.get('removed_near', 0)}, clusters={clu.get('clusters', 0)}"))
    pii = ", ".join(f"{k[4:]}={v}" for k, v in sorted(fin.items()) if k.startswith("pii_")) or "none"
    rows.append(("pii", fin.get("rows", 0), fin.get("rows", 0), f"files={fin.get('files_redacted', 0)}, {pii}"))
    rows.append(("output", sh.get("rows", 0), manifest.get("rows", 0), f"shards={len(manifest.get('shards', []))}"))
    return rows


def print_summary(manifest: Mapping[str, Any], file: Any = None) -> None:
    """Print the per-stage summary table (rich if available)."""
    rows = summary_rows(manifest)
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="graphtune data curate")
        for col, just in (("stage", "left"), ("in", "right"), ("out", "right"), ("details", "left")):
            table.add_column(col, justify=just)  # type: ignore[arg-type]
        for stage, a, b, d in rows:
            table.add_row(stage, str(a), str(b), d)
        table.caption = f"fingerprint {manifest.get('fingerprint', '')[:16]}"
        Console(file=file or sys.stderr).print(table)
    except ImportError:  # pragma: no cover
        f = file or sys.stderr
        for stage, a, b, d in rows:
            print(f"{stage:16s} {a:>8d} {b:>8d}  {d}", file=f)


# ------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------

def verify(target: str | os.PathLike[str], *, tasks: int | None = None, progress: bool = False, rebuild: bool = True) -> VerifyResult:
    """Check the published shards against the manifest's sha256, then (``rebuild=True``)
    rebuild the dataset from the manifest (same parameters, same git commits) into a scratch
    folder and compare shard hashes and per-stage counts."""
    p = Path(target)
    manifest_path = p / "manifest.json" if p.is_dir() else p
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no manifest at {manifest_path}")
    expected = json.loads(manifest_path.read_text())
    mismatches: list[str] = []
    from graphtune.data.stages import sha256_file

    published = manifest_path.parent
    for s in expected["shards"]:
        f = published / s["path"]
        if not f.is_file():
            mismatches.append(f"published shard {s['path']} is missing")
        elif sha256_file(f) != s["sha256"]:
            mismatches.append(f"published shard {s['path']} does not match the manifest's sha256")
    if not rebuild:
        return VerifyResult(not mismatches, mismatches, [], "", expected.get("fingerprint", ""))
    params = json.loads(json.dumps(expected["parameters"]))
    for src, info in zip(params["sources"], expected["sources"]):
        if src["type"] == "git" and info.get("commit"):
            src["rev"] = info["commit"]  # rebuild exactly the recorded commit
    with tempfile.TemporaryDirectory(prefix="graphtune-verify-") as tmp:
        params["output_dir"] = str(Path(tmp) / "out")
        params["work_dir"] = str(Path(tmp) / "work")
        params["executor"] = {"tasks": tasks or 1}
        params["progress"] = progress
        result = curate(load_config(params, base_dir="/"))
        rebuilt = result.manifest
    exp_shards = {s["path"]: s["sha256"] for s in expected["shards"]}
    got_shards = {s["path"]: s["sha256"] for s in rebuilt["shards"]}
    for path in sorted(set(exp_shards) | set(got_shards)):
        if exp_shards.get(path) != got_shards.get(path):
            mismatches.append(f"shard {path}: expected {exp_shards.get(path)}, rebuilt {got_shards.get(path)}")
    if expected["counts"] != rebuilt["counts"]:
        for stage in sorted(set(expected["counts"]) | set(rebuilt["counts"])):
            if expected["counts"].get(stage) != rebuilt["counts"].get(stage):
                mismatches.append(f"counts[{stage}] differ: {expected['counts'].get(stage)} vs {rebuilt['counts'].get(stage)}")
    warnings = []
    if expected.get("tool") != rebuilt.get("tool"):
        warnings.append(f"tool versions differ (bytes may legitimately change): {expected.get('tool')} vs {rebuilt.get('tool')}")
    return VerifyResult(not mismatches, mismatches, warnings, rebuilt.get("fingerprint", ""), expected.get("fingerprint", ""))
