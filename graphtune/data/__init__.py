"""graphtune.data: code-corpus curation the way The Stack v2 was built.

Sources (local folders, git repositories, Hugging Face datasets) become deduplicated,
license-filtered, PII-redacted parquet shards plus a manifest that lets anyone rebuild and
verify them byte for byte::

    from graphtune.data import curate, verify, load_curated
    result = curate("config.yaml")          # or a dict / CurateConfig
    ds = load_curated(result.output_dir)    # datasets.Dataset with a "content" column
    assert verify(result.output_dir).ok

The stages run as datatrove pipeline steps (local, Slurm or Ray executors).  Heavy
dependencies are imported lazily so ``import graphtune.data`` stays cheap.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "ConfigError",
    "CurateConfig",
    "load_config",
    "curate",
    "verify",
    "load_curated",
    "CurateResult",
    "VerifyResult",
    "MinHasher",
    "PIIRedactor",
    "detect_language",
    "license_type",
]

if TYPE_CHECKING:  # pragma: no cover
    from graphtune.data.config import ConfigError, CurateConfig, load_config
    from graphtune.data.language import detect_language
    from graphtune.data.licenses import license_type
    from graphtune.data.minhash import MinHasher
    from graphtune.data.pii import PIIRedactor
    from graphtune.data.pipeline import CurateResult, VerifyResult, curate, verify

_LAZY = {
    "ConfigError": "graphtune.data.config",
    "CurateConfig": "graphtune.data.config",
    "load_config": "graphtune.data.config",
    "curate": "graphtune.data.pipeline",
    "verify": "graphtune.data.pipeline",
    "CurateResult": "graphtune.data.pipeline",
    "VerifyResult": "graphtune.data.pipeline",
    "MinHasher": "graphtune.data.minhash",
    "PIIRedactor": "graphtune.data.pii",
    "detect_language": "graphtune.data.language",
    "license_type": "graphtune.data.licenses",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'graphtune.data' has no attribute {name!r}")


def load_curated(output_dir: str | os.PathLike[str], split: str = "train") -> Any:
    """The curated shards as a ``datasets.Dataset`` (shards listed by the manifest, in order).

    Why not glob: the manifest is the source of truth; a stray file in ``data/`` must not
    leak into training.
    """
    import json
    from pathlib import Path

    import datasets

    out = Path(output_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    files = [str(out / s["path"]) for s in manifest["shards"]]
    return datasets.load_dataset("parquet", data_files={split: files}, split=split)
