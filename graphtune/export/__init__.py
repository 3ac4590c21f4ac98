"""Export: GGUF for llama.cpp / Ollama, a LoRA-adapter GGUF, merged safetensors, an Ollama Modelfile.

    from graphtune.export import to_gguf, to_gguf_adapter, save_merged, write_modelfile
    summary = to_gguf(model, tokenizer, "model.Q4_K_M.gguf", quant="Q4_K_M")
    print(summary)                     # tensors, types, fallbacks, notes, checks, timings

The export runs as passes over the graph graphtune captures (see ``graphtune.export.gguf``); the
family comes from the graph, and per-family GGUF rules live in ``graphtune.export.families``.
Needs the ``gguf`` extra (gguf, safetensors, sentencepiece, protobuf).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it, imported on first access: ``graphtune export`` (whose
# module lives in this package) pays for torch, gguf and transformers only where it needs them
_LAZY = {
    "ExportError": "families", "UnsupportedFamilyError": "families", "gguf_families": "families",
    "register_gguf_family": "families",
    "ExportSummary": "gguf", "TensorRecord": "gguf", "capture_graph": "gguf", "to_gguf": "gguf",
    "to_gguf_adapter": "gguf",
    "WeightSource": "merge", "save_merged": "merge",
    "write_modelfile": "modelfile", "modelfile_text": "modelfile",
    "TokenizerError": "tokenizer", "build_vocab": "tokenizer", "identify_pre_tokenizer": "tokenizer",
}

# submodules the eager ``__init__`` used to import
_SUBMODULES = frozenset({"families", "gguf", "merge", "modelfile", "quants", "recipes", "roles", "tokenizer"})

if TYPE_CHECKING:  # static analysers see the eager imports
    from graphtune.export.families import ExportError, UnsupportedFamilyError, gguf_families, register_gguf_family
    from graphtune.export.gguf import ExportSummary, TensorRecord, capture_graph, to_gguf, to_gguf_adapter
    from graphtune.export.merge import WeightSource, save_merged
    from graphtune.export.modelfile import modelfile_text, write_modelfile
    from graphtune.export.tokenizer import TokenizerError, build_vocab, identify_pre_tokenizer

__all__ = [
    "ExportError", "ExportSummary", "TensorRecord", "TokenizerError", "UnsupportedFamilyError", "WeightSource",
    "build_vocab", "capture_graph", "gguf_families", "identify_pre_tokenizer", "modelfile_text",
    "register_gguf_family", "save_merged", "to_gguf", "to_gguf_adapter", "write_modelfile",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # ``graphtune.export.gguf`` etc. without importing them first, as before
        return importlib.import_module(f"graphtune.export.{name}")
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'graphtune.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"graphtune.export.{mod}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
