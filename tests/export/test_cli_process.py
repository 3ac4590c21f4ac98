"""``graphtune export`` as its own process: light package imports, the collector off during the
graph analysis (``run_and_exit``), and the same bytes as the in-process CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.export.helpers import make_model

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **env}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_package_imports_are_lazy_and_the_api_is_unchanged():
    """``import graphtune`` / ``graphtune.export`` / the export CLI module load neither torch nor the
    kernels; every public name still resolves (and ``graphtune.kernels`` registers the ops)."""
    got = json.loads(_python(
        "import json, sys\n"
        "import graphtune, graphtune.export, graphtune.export.cli\n"
        "light = sorted(m for m in ('torch', 'transformers', 'gguf', 'triton', 'graphtune.kernels', 'graphtune.api')"
        " if m in sys.modules)\n"
        "import torch\n"
        "before = hasattr(torch.ops.graphtune, 'rms_norm')\n"
        "graphtune.kernels\n"
        "after = callable(torch.ops.graphtune.rms_norm)\n"
        "names = {n: type(getattr(graphtune, n)).__name__ for n in graphtune.__all__}\n"
        "export = {n: type(getattr(graphtune.export, n)).__name__ for n in graphtune.export.__all__}\n"
        "print(json.dumps({'light': light, 'names': names, 'export': export, 'ops': [before, after],\n"
        "                  'dir': set(graphtune.__all__) <= set(dir(graphtune)),\n"
        "                  'submodules': [graphtune.passes.__name__, graphtune.export.gguf.__name__]}))\n"))
    assert got["light"] == []
    assert got["names"] == {"optimize": "function", "explain": "function", "restore": "function",
                            "last_report": "function", "Report": "type", "GraphtuneError": "type",
                            "CaptureError": "type", "VerificationError": "type", "__version__": "str"}
    assert set(got["export"]) == {"ExportError", "ExportSummary", "TensorRecord", "TokenizerError",
                                  "UnsupportedFamilyError", "WeightSource", "build_vocab", "capture_graph",
                                  "gguf_families", "identify_pre_tokenizer", "modelfile_text",
                                  "register_gguf_family", "save_merged", "to_gguf", "to_gguf_adapter",
                                  "write_modelfile"}
    assert got["ops"] == [False, True] and got["dir"]
    assert got["submodules"] == ["graphtune.passes", "graphtune.export.gguf"]


def test_export_process_writes_the_bytes_of_the_in_process_cli(tmp_path, bpe_tokenizer, capsys):
    """``python -m graphtune export`` (collector off until the analysis is done, no interpreter
    teardown) and ``main()`` in this process give the same file, first export and cached re-export."""
    from graphtune.export.cli import main

    model = make_model("llama", hidden=64, lora=False).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    bpe_tokenizer.save_pretrained(tmp_path / "ckpt")
    ref = tmp_path / "ref.gguf"
    assert main([str(tmp_path / "ckpt"), str(ref), "--quant", "Q4_K_M", "--no-progress", "--no-cache"]) == 0
    capsys.readouterr()
    env = {"GRAPHTUNE_EXPORT_CACHE_DIR": str(tmp_path / "cache")}
    for run in ("first", "again"):
        out = tmp_path / f"{run}.gguf"
        proc = subprocess.run([sys.executable, "-m", "graphtune", "export", str(tmp_path / "ckpt"), str(out),
                               "--quant", "Q4_K_M", "--no-progress", "--json"], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, **env}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        js = json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1])
        assert any("export cache" in c for c in js["gguf"]["checks"]) == (run == "again")
        assert out.read_bytes() == ref.read_bytes()
