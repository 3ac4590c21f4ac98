"""On-disk cache of what an export of a checkpoint folder derives from its structure and tokenizer.

Exporting the same checkpoint again (another quant type, a re-run) repeats two slow steps whose
results depend only on files and code: the graph analysis (building a meta-device skeleton,
capturing its forward with dynamo, reading the roles off the graph: several seconds) and the
tokenizer conversion (loading the HF tokenizer, probing its pre-tokenizer). ``graphtune export``
keeps both as JSON under ``$GRAPHTUNE_CACHE`` (default ``~/.cache/graphtune``)``/export/``:

* ``lowering-<key>.json``: family, detection reason, checks and every parameter's graph role;
  the key covers ``config.json``, every checkpoint tensor's name, shape and dtype, the number
  of traced layers, and the code (the graphtune sources the analysis runs -- capture, family
  detection, the structural passes, ``graphtune.export`` -- and the torch / transformers / gguf
  versions) -- anything else is a new capture.
* ``vocab-<key>.json``: the GGUF vocabulary; the key covers the tokenizer folder's files (weights
  aside), the vocabulary size and the same code fingerprint.

Only the CLI (checkpoint folders) uses the cache; ``to_gguf(model, ...)`` on a live model always
captures its graph. ``GRAPHTUNE_EXPORT_CACHE=0`` (or ``graphtune export --no-cache``) turns it off.
Entries are written atomically; an unreadable entry is a miss.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphtune.export.roles import GraphRoles

FORMAT = 2
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")


def enabled() -> bool:
    return os.environ.get("GRAPHTUNE_EXPORT_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """``$GRAPHTUNE_EXPORT_CACHE_DIR``, else ``$GRAPHTUNE_CACHE/export`` (``~/.cache/graphtune/export``)."""
    if os.environ.get("GRAPHTUNE_EXPORT_CACHE_DIR"):
        return Path(os.environ["GRAPHTUNE_EXPORT_CACHE_DIR"])
    return Path(os.environ.get("GRAPHTUNE_CACHE") or Path.home() / ".cache" / "graphtune") / "export"


# the graphtune code an export's analysis runs: capture, family detection, the structural passes,
# the roles, the families, the tokenizer conversion (the training passes and kernels do not take part)
_ANALYSIS_SOURCES = ("export", "patterns", "capture.py", "canonical.py", "report.py", "errors.py", "passes/base.py",
                     "passes/_guards.py", "passes/fuse_rms_norm.py", "passes/fuse_rope.py", "passes/fuse_swiglu.py",
                     "passes/fuse_geglu.py")


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of the graphtune sources of the analysis and the versions of the libraries it uses."""
    from importlib import metadata

    import graphtune

    h = hashlib.sha256(f"format {FORMAT} graphtune {graphtune.__version__}".encode())
    root = Path(graphtune.__file__).parent
    files = []
    for rel in _ANALYSIS_SOURCES:
        p = root / rel
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.exists() else []
    for f in files:
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    for dist in ("torch", "transformers", "gguf", "tokenizers", "sentencepiece", "peft"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=-".encode())
    return h.hexdigest()


def _digest(*parts: Any) -> str:
    h = hashlib.sha256(code_fingerprint().encode())
    for p in parts:
        h.update(b"\0")
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def lowering_key(model_dir: str | os.PathLike, tensors: dict[str, tuple[tuple[int, ...], str]],
                 capture_layers: int | None) -> str:
    """Key of a checkpoint's graph analysis: config.json, the tensors (name, shape, dtype), the
    traced layer count and the code."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return _digest("lowering", config, sorted((k, list(s), d) for k, (s, d) in tensors.items()), capture_layers)


def vocab_key(tokenizer_dir: str | os.PathLike, n_vocab: int) -> str:
    """Key of a tokenizer folder's GGUF vocabulary: its files (weights aside) and the rows."""
    files = []
    for f in sorted(Path(tokenizer_dir).iterdir()):
        if f.is_file() and not f.name.endswith(_SKIP_SUFFIXES) and f.stat().st_size < (64 << 20):
            files.append((f.name, hashlib.sha256(f.read_bytes()).hexdigest()))
    return _digest("vocab", files, n_vocab)


def load(kind: str, key: str) -> dict | None:
    path = cache_dir() / f"{kind}-{key}.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("format") == FORMAT else None


def store(kind: str, key: str, entry: dict) -> None:
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{kind}-{key}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(json.dumps({"format": FORMAT, **entry}), encoding="utf-8")
        os.replace(tmp, d / f"{kind}-{key}.json")
    except OSError:
        pass  # a cache that cannot be written is only slower


# -- (de)serialization ---------------------------------------------------------------------------
def _plain(obj: Any) -> Any:
    if isinstance(obj, set):
        return {"set": sorted(obj)}
    if isinstance(obj, tuple):
        return {"tuple": [_plain(v) for v in obj]}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _restore(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"set"}:
            return set(obj["set"])
        if set(obj) == {"tuple"}:
            return tuple(_restore(v) for v in obj["tuple"])
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    return obj


def _fields(dc: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(dc, f.name)) for f in dataclasses.fields(dc)}


def roles_to_json(roles: GraphRoles) -> dict:
    return {
        "params": [_fields(r) for r in roles.params.values()],
        "layers": [_fields(ls) for ls in roles.layers],
        "embed_fqn": roles.embed_fqn, "output_fqn": roles.output_fqn,
        "eps": _plain(roles.eps), "norm_offsets": _plain(roles.norm_offsets),
    }


def roles_from_json(d: dict) -> GraphRoles:
    from graphtune.export.roles import GraphRoles, LayerStructure, ParamRole  # torch: not for the CLI's first look

    params = [ParamRole(**_restore(p)) for p in d["params"]]
    return GraphRoles(
        params={p.fqn: p for p in params}, layers=[LayerStructure(**_restore(ls)) for ls in d["layers"]],
        embed_fqn=d["embed_fqn"], output_fqn=d["output_fqn"], eps=_restore(d["eps"]),
        norm_offsets=_restore(d["norm_offsets"]),
    )


def plain_value(v: Any) -> Any:
    """A metadata value as JSON (numpy scalars and arrays as Python numbers and lists)."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [plain_value(x) for x in v]
    return v


def config_to_json(config: Any) -> dict:
    return json.loads(config.to_json_string(use_diff=False)) if hasattr(config, "to_json_string") else dict(vars(config))


class ConfigView:
    """Read-only attributes from a cached ``config.to_dict()`` (a replayed export's ``spec.config``:
    the family's config-dependent output is replayed, this only serves other reads)."""

    def __init__(self, values: dict):
        self.__dict__.update(values)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def vocab_to_json(vocab: Any) -> dict:
    return _fields(vocab)


def vocab_from_json(d: dict) -> Any:
    from graphtune.export.tokenizer import Vocab

    return Vocab(**_restore(d))
