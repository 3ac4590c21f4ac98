"""Configuration of a curation run (``graphtune data curate config.yaml``).

Why strict: a typo in a YAML key (``treshold``) silently falling back to a default would
produce a different dataset than the one the author thinks they built.  Every unknown key,
wrong type or missing path is reported as a :class:`ConfigError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

__all__ = [
    "ConfigError",
    "SourceConfig",
    "IngestConfig",
    "LanguageConfig",
    "LicenseConfig",
    "OptOutConfig",
    "FilterConfig",
    "DedupConfig",
    "PIIConfig",
    "DecontamConfig",
    "OutputConfig",
    "ExecutorConfig",
    "CurateConfig",
    "load_config",
    "DEFAULT_PERMISSIVE",
]


class ConfigError(ValueError):
    """A curation config is invalid; the message names the key or path at fault."""


# SPDX ids treated as permissive unless the config overrides ``licenses.permissive``.
DEFAULT_PERMISSIVE: tuple[str, ...] = (
    "0BSD", "AFL-1.1", "AFL-1.2", "AFL-2.0", "AFL-2.1", "AFL-3.0", "Apache-1.0", "Apache-1.1",
    "Apache-2.0", "Artistic-2.0", "BSD-1-Clause", "BSD-2-Clause", "BSD-2-Clause-Patent",
    "BSD-3-Clause", "BSD-3-Clause-Clear", "BSD-4-Clause", "BSL-1.0", "CC-BY-3.0", "CC-BY-4.0",
    "CC0-1.0", "ECL-2.0", "EFL-2.0", "ISC", "MIT", "MIT-0", "MS-PL", "NCSA", "PHP-3.01",
    "PostgreSQL", "PSF-2.0", "Python-2.0", "Unicode-DFS-2016", "Unlicense", "UPL-1.0", "W3C",
    "WTFPL", "X11", "Zlib", "ZPL-2.1", "curl", "libpng-2.0",
)

LONG_LINE_EXEMPT: tuple[str, ...] = ("HTML", "JSON", "Markdown", "Roff", "TeX", "Text", "XML")


@dataclass
class SourceConfig:
    """One input: a local folder, a git repository, or a Hugging Face dataset."""

    type: Literal["local", "git", "hf"]
    path: str
    name: str | None = None  # repository name; default: folder name / origin / dataset name
    repo_depth: int = 0  # local: leading path parts forming the repo name (0: whole folder)
    license: str | None = None  # declared repository license (SPDX), like GitHub's license field
    date: str | None = None  # ISO date ranking "newest" when no commit date is known
    rev: str = "HEAD"  # git: revision to read
    # hf only
    data_files: list[str] | str | None = None
    split: str = "train"
    content_column: str = "content"
    path_column: str | None = None
    repo_column: str | None = None
    license_column: str | None = None
    date_column: str | None = None
    builder: str | None = None  # e.g. "json", "parquet"; default: let datasets infer


@dataclass
class IngestConfig:
    """What counts as a readable text file."""

    max_file_size: int = 10_000_000  # Stack v2 skips files >= 10 MB
    encoding_fallback: bool = False  # try charset detection when UTF-8 decoding fails
    include: list[str] = field(default_factory=lambda: ["**"])
    exclude: list[str] = field(default_factory=list)


@dataclass
class LanguageConfig:
    """Languages to keep (go-enry names); empty keeps every language."""

    keep: list[str] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)
    drop_unknown: bool = False


@dataclass
class LicenseConfig:
    """License policy: which SPDX ids are permissive and which license types are kept."""

    permissive: list[str] = field(default_factory=lambda: list(DEFAULT_PERMISSIVE))
    allow: list[Literal["permissive", "no_license", "non_permissive"]] = field(
        default_factory=lambda: ["permissive", "no_license"]
    )


@dataclass
class OptOutConfig:
    """Repositories (names or fnmatch globs) removed from every build."""

    repos: list[str] = field(default_factory=list)
    file: str | None = None  # one name/glob per line, '#' comments


@dataclass
class FilterConfig:
    """Quality filters (The Stack / StarCoder2 defaults)."""

    max_line_length: int = 1000
    mean_line_length: float = 100.0
    alphanum_fraction: float = 0.25
    max_lines: int = 100_000
    min_size: int = 1
    max_size: int = 1_000_000
    long_line_exempt: list[str] = field(default_factory=lambda: list(LONG_LINE_EXEMPT))
    drop_generated: bool = True
    drop_vendored: bool = False
    drop_minified: bool = True
    encoded_max_fraction: float = 0.5
    encoded_max_match: int = 1024


@dataclass
class DedupConfig:
    """Exact (content hash) and near (MinHash LSH) deduplication."""

    exact: bool = True
    near: bool = True
    num_perm: int = 256
    ngram: int = 5
    threshold: float = 0.7
    bands: int | None = None  # default: optimal for threshold/num_perm (25 x 10)
    rows: int | None = None
    seed: int = 42


@dataclass
class PIIConfig:
    """Redaction of emails, public IPs and secrets."""

    enabled: bool = True
    emails: bool = True
    ip_addresses: bool = True
    secrets: bool = True
    min_entropy: float = 3.0  # bits/char a generic secret must reach to be redacted


@dataclass
class DecontamConfig:
    """Benchmark decontamination."""

    files: list[str] = field(default_factory=list)  # .txt (one text) / .jsonl / .json files or dirs
    fields: list[str] = field(default_factory=lambda: ["prompt", "canonical_solution", "text", "code", "question"])
    strings: list[str] = field(default_factory=list)
    substring: bool = True
    min_substring_length: int = 20
    ngram: int = 0  # >0: also flag files sharing a word n-gram of this size with a benchmark
    min_ngram_overlap: int = 1


@dataclass
class OutputConfig:
    """Parquet shards."""

    num_shards: int = 1
    compression: str = "zstd"
    row_group_size: int = 10_000


@dataclass
class ExecutorConfig:
    """Which datatrove executor runs the stages."""

    type: Literal["local", "slurm", "ray"] = "local"
    tasks: int = 1
    workers: int = -1  # local: simultaneous tasks (-1: min(tasks, cpu count))
    bucket_tasks: int | None = None  # near-dedup bucket stage (default: min(tasks, bands))
    start_method: str = "fork"
    options: dict[str, Any] = field(default_factory=dict)  # passed to Slurm/Ray executors


@dataclass
class CurateConfig:
    """A whole curation run."""

    output_dir: str
    sources: list[SourceConfig]
    work_dir: str | None = None
    ingest: IngestConfig = field(default_factory=IngestConfig)
    languages: LanguageConfig = field(default_factory=LanguageConfig)
    licenses: LicenseConfig = field(default_factory=LicenseConfig)
    optout: OptOutConfig = field(default_factory=OptOutConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    decontamination: DecontamConfig = field(default_factory=DecontamConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    progress: bool = True

    # ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON/YAML serialisable)."""
        return dataclasses.asdict(self)

    def build_parameters(self) -> dict[str, Any]:
        """The parameters that determine the output bytes (no paths of outputs, no task counts)."""
        d = self.to_dict()
        for k in ("output_dir", "work_dir", "executor", "progress"):
            d.pop(k, None)
        return d

    def resolved_work_dir(self) -> Path:
        """Scratch directory for intermediate files (``<output_dir>.work`` by default)."""
        if self.work_dir:
            return Path(self.work_dir)
        out = Path(self.output_dir)
        return out.with_name(out.name + ".work")


# ------------------------------------------------------------------------------------------
# strict dict -> dataclass conversion
# ------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _from_mapping(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and where.endswith((".date", ".license")):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _from_mapping(cls: type, data: Any, where: str) -> Any:
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s} (allowed here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ConfigError(f"missing required key {key}")
    return cls(**kwargs)


def _validate(cfg: CurateConfig, base: Path) -> CurateConfig:
    """Semantic checks and path resolution relative to the config file's folder."""

    def resolve(p: str) -> str:
        q = Path(os.path.expanduser(p))
        return str(q if q.is_absolute() else (base / q))

    cfg.output_dir = resolve(cfg.output_dir)
    if cfg.work_dir:
        cfg.work_dir = resolve(cfg.work_dir)
    if not cfg.sources:
        raise ConfigError("sources: at least one source is required")
    for i, s in enumerate(cfg.sources):
        where = f"sources[{i}]"
        if s.type == "git" and "://" in s.path:
            pass  # remote URL, cloned at plan time
        else:
            s.path = resolve(s.path)
            if not Path(s.path).exists():
                raise ConfigError(f"{where}.path: {s.path} does not exist")
        if s.type == "local" and not Path(s.path).is_dir():
            raise ConfigError(f"{where}.path: {s.path} is not a directory")
        if s.type == "git" and "://" not in s.path and not (
            (Path(s.path) / ".git").exists() or (Path(s.path) / "HEAD").is_file()
        ):
            raise ConfigError(f"{where}.path: {s.path} is not a git repository")
        if s.repo_depth < 0:
            raise ConfigError(f"{where}.repo_depth: must be >= 0")
        if s.type != "hf":
            for k in ("data_files", "path_column", "repo_column", "license_column", "date_column", "builder"):
                if getattr(s, k) is not None:
                    raise ConfigError(f"{where}.{k}: only valid for type 'hf'")
        if s.data_files is not None:
            files = [s.data_files] if isinstance(s.data_files, str) else list(s.data_files)
            s.data_files = [resolve(f) for f in files]
    if cfg.optout.file:
        cfg.optout.file = resolve(cfg.optout.file)
        if not Path(cfg.optout.file).is_file():
            raise ConfigError(f"optout.file: {cfg.optout.file} does not exist")
    for i, f in enumerate(cfg.decontamination.files):
        cfg.decontamination.files[i] = resolve(f)
        if not Path(cfg.decontamination.files[i]).exists():
            raise ConfigError(f"decontamination.files[{i}]: {cfg.decontamination.files[i]} does not exist")
    d = cfg.dedup
    if not 0.0 < d.threshold < 1.0:
        raise ConfigError("dedup.threshold: must be in (0, 1)")
    if (d.bands is None) != (d.rows is None):
        raise ConfigError("dedup.bands and dedup.rows must be given together")
    if d.bands is not None and d.rows is not None and d.bands * d.rows > d.num_perm:
        raise ConfigError(f"dedup.bands * dedup.rows = {d.bands * d.rows} exceeds dedup.num_perm = {d.num_perm}")
    if d.num_perm < 1 or d.ngram < 1:
        raise ConfigError("dedup.num_perm and dedup.ngram must be >= 1")
    if cfg.output.num_shards < 1:
        raise ConfigError("output.num_shards: must be >= 1")
    if cfg.executor.tasks < 1:
        raise ConfigError("executor.tasks: must be >= 1")
    if not 0.0 <= cfg.filters.alphanum_fraction <= 1.0:
        raise ConfigError("filters.alphanum_fraction: must be in [0, 1]")
    if cfg.ingest.max_file_size < 1:
        raise ConfigError("ingest.max_file_size: must be >= 1")
    return cfg


def load_config(source: str | os.PathLike[str] | Mapping[str, Any], base_dir: str | os.PathLike[str] | None = None) -> CurateConfig:
    """Load and validate a config from a YAML file or a mapping.

    Relative paths are resolved against the YAML file's folder (or ``base_dir`` / the current
    directory for a mapping).  Raises :class:`ConfigError` naming the key at fault.
    """
    if isinstance(source, Mapping):
        data: Any = source
        base = Path(base_dir) if base_dir else Path.cwd()
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        base = Path(base_dir) if base_dir else path.resolve().parent
    if not isinstance(data, Mapping):
        raise ConfigError("config: top level must be a mapping")
    cfg = _from_mapping(CurateConfig, data, "")
    return _validate(cfg, base)
