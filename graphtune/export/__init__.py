"""Export: GGUF for llama.cpp / Ollama, a LoRA-adapter GGUF, merged safetensors, an Ollama Modelfile.

    from graphtune.export import to_gguf, to_gguf_adapter, save_merged, write_modelfile
    summary = to_gguf(model, tokenizer, "model.Q4_K_M.gguf", quant="Q4_K_M")
    print(summary)                     # tensors, types, fallbacks, notes, checks, timings

The export runs as passes over the graph graphtune captures (see ``graphtune.export.gguf``); the
family comes from the graph, and per-family GGUF rules live in ``graphtune.export.families``.
Needs the ``gguf`` extra (gguf, safetensors, sentencepiece, protobuf).
"""

from graphtune.export.families import ExportError, UnsupportedFamilyError, gguf_families, register_gguf_family
from graphtune.export.gguf import ExportSummary, TensorRecord, capture_graph, to_gguf, to_gguf_adapter
from graphtune.export.merge import WeightSource, save_merged
from graphtune.export.modelfile import write_modelfile, modelfile_text
from graphtune.export.tokenizer import TokenizerError, build_vocab, identify_pre_tokenizer

__all__ = [
    "ExportError", "ExportSummary", "TensorRecord", "TokenizerError", "UnsupportedFamilyError", "WeightSource",
    "build_vocab", "capture_graph", "gguf_families", "identify_pre_tokenizer", "modelfile_text",
    "register_gguf_family", "save_merged", "to_gguf", "to_gguf_adapter", "write_modelfile",
]
