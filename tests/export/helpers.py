"""Helpers of the export tests: tiny models with non-trivial weights, HF logits, llama.cpp in a
subprocess, and HF run on the weights dequantized from a GGUF file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from graphtune.tiny import FAMILIES, tiny_model

RUNNER = Path(__file__).with_name("llama_runner.py")
GELU_FAMILIES = {"gemma", "gemma2", "gemma3"}
# F32 logits vs HF: ggml-cpu computes GELU through an fp16 table (GGML_GELU_FP16), hence the looser bound
F32_TOL = {f: (3e-3 if f in GELU_FAMILIES else 1e-4) for f in FAMILIES}
PROBE_TEXT = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # naïve recursion, 🚀 fast?"


def need_llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test installs it)")


# -- models -----------------------------------------------------------------------------------------
def family_overrides(family: str, hidden: int = 256, **extra) -> dict:
    kw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=512, max_position_embeddings=256)
    if family in ("gemma", "gemma2"):
        kw["tie_word_embeddings"] = True  # llama.cpp's gemma/gemma2 always use token_embd as output
    if family == "qwen2":
        kw["attention_bias"] = True
    kw.update(extra)
    return kw


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that layout mistakes show: matrices N(0, 0.08), biases N(0, 0.05), norm
    weights around their neutral value (1 for x*w, 0 for Gemma's x*(1+w))."""
    g = torch.Generator().manual_seed(seed)
    gemma = "Gemma" in type(model).__name__ or any("Gemma" in type(m).__name__ for m in model.modules())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise * 0.08)
            elif "norm" in name:
                p.copy_(noise * 0.2 + (0.0 if gemma else 1.0))
            else:
                p.copy_(noise * 0.05)
    return model


def make_model(family: str, *, lora: bool = True, hidden: int = 256, seed: int = 0, **extra):
    model = tiny_model(family, lora=lora, seed=seed, **family_overrides(family, hidden, **extra))
    return randomize(model, seed).eval()


def hf_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


# -- llama.cpp in a subprocess ------------------------------------------------------------------------
def run_llama(jobs: list[dict], workdir: Path) -> dict[str, np.ndarray]:
    need_llama_cpp()
    workdir.mkdir(parents=True, exist_ok=True)
    jobs_path, out_path = workdir / "jobs.json", workdir / "out.npz"
    jobs_path.write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(RUNNER), str(jobs_path), str(out_path)], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"llama.cpp runner failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    with np.load(out_path) as z:
        return {k: z[k] for k in z.files}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def dequantized_reference(lowering, gguf_path: Path, *, emulate_activations: bool = True) -> torch.nn.Module:
    """A plain HF model whose weights are the GGUF file's tensors, dequantized and mapped back
    through the inverse of the family's fix-ups: HF run on exactly what llama.cpp runs.

    With ``emulate_activations`` each projection's input is also rounded the way ggml-cpu rounds
    it before a dot product with that weight type (its ``vec_dot_type``: F16/BF16 rounding, Q8_0
    blocks of 32 for the 32-wide formats, Q8_K blocks of 256 for the K-quants), so what remains
    is accumulation order: a layout error stands out by orders of magnitude.
    """
    import gguf
    from transformers import AutoModelForCausalLM

    from graphtune.export import quants
    from graphtune.export.merge import canonical_name

    roles = {name: r for r, name in lowering.names()}
    reader = gguf.GGUFReader(str(gguf_path))
    state, wtype = {}, {}
    for t in reader.tensors:
        r = roles.get(t.name)
        if r is None:
            continue
        qt = gguf.GGMLQuantizationType(t.tensor_type)
        shape = lowering.source.shape(r.fqn)
        y = torch.from_numpy(np.array(quants.dequantize(np.array(t.data), qt))).reshape(shape)
        key = canonical_name(r.fqn)
        state[key] = invert_transform(lowering.family, r, y)
        wtype[key] = qt.name
    base = lowering.model.get_base_model() if hasattr(lowering.model, "get_base_model") else lowering.model
    ref = AutoModelForCausalLM.from_config(base.config)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    if lowering.roles.tied:
        ref.tie_weights()
        wtype["lm_head.weight"] = wtype["model.embed_tokens.weight"]
    if emulate_activations:
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and f"{name}.weight" in wtype:
                mod.register_forward_pre_hook(lambda m, args, t=wtype[f"{name}.weight"]: (ggml_activation(args[0], t),))
    return ref.eval()


def ggml_activation(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """x rounded to the ``vec_dot_type`` ggml-cpu converts activations to for ``weight_type``."""
    if weight_type == "F32":
        return x
    if weight_type == "F16":
        return x.half().float()
    if weight_type == "BF16":
        return x.bfloat16().float()
    block = 256 if weight_type.endswith("_K") else 32
    shape = x.shape
    xb = x.float().reshape(-1, block)
    if block == 256:  # quantize_row_q8_K: scale from the signed value of largest magnitude
        amax = torch.gather(xb, 1, xb.abs().argmax(1, keepdim=True))
        iscale = torch.where(amax == 0, torch.zeros_like(amax), -127.0 / amax)
        q = torch.round(xb * iscale).clamp(max=127)
        return (q / torch.where(iscale == 0, torch.ones_like(iscale), iscale)).reshape(shape)
    d = xb.abs().amax(1, keepdim=True) / 127.0  # q8_0 / q8_1
    d16 = d.half().float()
    q = torch.round(xb / torch.where(d == 0, torch.ones_like(d), d))
    return (q * d16).reshape(shape)


def invert_transform(family, r, y: torch.Tensor) -> torch.Tensor:
    """Undo ``family.transform`` (an affine map per element for vectors, a row map for matrices)."""
    y = y.double()
    if y.dim() == 1:
        zero = family.transform(r.role, r.bid, r.part, torch.zeros_like(y), r.offset).double()
        one = family.transform(r.role, r.bid, r.part, torch.ones_like(y), r.offset).double()
        return ((y - zero) / (one - zero)).float()
    eye = torch.eye(y.shape[0], dtype=torch.float64)
    rows = family.transform(r.role, r.bid, r.part, eye, r.offset).double()  # y = rows @ x
    return torch.linalg.solve(rows, y).float()


def memorize(model: torch.nn.Module, ids: list[int], steps: int = 20, lr: float = 3e-3, min_margin: float = 2.0,
             max_steps: int = 200) -> torch.nn.Module:
    """Fine-tune every weight briefly on one sequence, like a (tiny) trained model, until every
    position's top-1 logit leads the runner-up by ``min_margin``: argmax comparisons then test the
    export, not near-ties of random logits. ``ids[-1]`` is only a target."""
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    x = torch.tensor([ids])
    torch.manual_seed(0)
    done = 0
    while done < max_steps:
        model.train()
        for _ in range(steps):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        done += steps
        model.eval()
        top = torch.topk(torch.from_numpy(hf_logits(model, ids[:-1])), 2, dim=-1).values
        if float((top[:, 0] - top[:, 1]).min()) >= min_margin:
            break
    for p in params:
        p.requires_grad_(False)
    return model.eval()
