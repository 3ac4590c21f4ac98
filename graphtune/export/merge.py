"""LoRA / QLoRA merge one tensor at a time, and ``save_merged`` (HF-loadable safetensors).

:class:`WeightSource` serves a model's parameters by FQN as float32 CPU tensors. With
``merge_lora=True`` a peft LoRA layer's base weight comes back as ``W + scaling * B @ A`` (every
active, unmerged adapter), computed in float32 when the tensor is requested; a bitsandbytes 4-bit
(QLoRA) or 8-bit base weight is dequantized first. Nothing is merged in place and no second copy
of the model exists: the exporter asks for one tensor, writes it and drops it.

Not supported (a clear error names the module): DoRA (``use_dora``), LoRA variants other than
``Linear``/``Embedding`` (conv, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from graphtune.export.families import ExportError

_PEFT_PREFIX = re.compile(r"^(base_model\.model\.)")
# dtypes the quantizers read exactly as they are (see WeightSource.get_native)
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def canonical_name(fqn: str) -> str:
    """peft FQN -> the HF checkpoint name (``base_model.model.`` and ``.base_layer`` removed)."""
    return _PEFT_PREFIX.sub("", fqn).replace(".base_layer.", ".")


@dataclasses.dataclass
class LoraPart:
    """One active adapter of one layer: ``delta = scaling * B @ A`` (``[out, r] @ [r, in]``)."""

    adapter: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> torch.Tensor:
        if self.embedding:  # peft Embedding: A [r, num_embeddings], B [dim, r] -> [num_embeddings, dim]
            return (self.b.float() @ self.a.float()).T * self.scaling
        d = (self.b.float() @ self.a.float()) * self.scaling
        return d.T if self.fan_in_fan_out else d


def _is_lora_layer(module: torch.nn.Module) -> bool:
    return hasattr(module, "base_layer") and (hasattr(module, "lora_A") or hasattr(module, "lora_embedding_A"))


def dequantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """A base weight as float32 CPU: bitsandbytes 4-bit (``Params4bit``) / 8-bit (``Int8Params``) aware."""
    cls = type(weight).__name__
    if cls == "Params4bit" or getattr(weight, "quant_state", None) is not None:
        # graphtune's own dequantization (equal to bitsandbytes' value for value, tests/kernels), not
        # bitsandbytes.functional.dequantize_4bit: bitsandbytes 0.50.2's CPU kernel gives wrong values on
        # AVX-512 hosts where a block spans rows (blocksize > in_features)
        from graphtune.kernels.dequant_4bit import dequantize_4bit

        qs = weight.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            packed, absmax = _from_bnb_cpu_layout(weight.data, qs)
            return dequantize_4bit(packed, absmax, tuple(qs.shape), qs.blocksize, qs.quant_type, torch.float32).cpu()
        nested = dict(absmax2=qs.state2.absmax, code2=qs.state2.code, offset=qs.offset,
                      blocksize2=qs.state2.blocksize) if qs.nested else {}
        dense = dequantize_4bit(weight.data, qs.absmax, tuple(qs.shape), qs.blocksize, qs.quant_type, qs.dtype, **nested)
        return dense.float().cpu()
    if cls == "Int8Params" and getattr(weight, "SCB", None) is not None:
        return (weight.data.float() * weight.SCB.float().unsqueeze(1) / 127.0).cpu()
    return weight.detach().float().cpu()


def _from_bnb_cpu_layout(data: torch.Tensor, qs: Any, block_n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(standard packed bytes, fp32 absmax) of a 4-bit weight in bitsandbytes' CPU kernel layout.

    bitsandbytes converts a ``Linear4bit`` weight to that layout on its first CPU inference with
    AVX512-BF16: the nibbles of each group of ``block_n`` rows are interleaved ([N, K/2] bytes, the
    low nibbles of 32 values then their high nibbles), and absmax becomes bf16, shaped
    [K / blocksize, N] (double quantization undone). The values that model computes with are
    those codes times that bf16 absmax, which this recovers exactly: the nibble order is
    inverted, and the absmax is widened from bf16, with no re-quantization."""
    n, k = (int(v) for v in qs.shape)
    if data.dtype != torch.uint8 or tuple(data.shape) != (n, k // 2) or n % block_n or k % 2:
        raise ValueError(f"a bitsandbytes CPU-layout 4-bit weight of shape {tuple(qs.shape)} should be [{n}, {k // 2}] uint8, "
                         f"not {tuple(data.shape)} {data.dtype}")
    bytes_ = data.reshape(-1, block_n)
    groups = torch.cat([bytes_ & 0xF, bytes_ >> 4], dim=-1)  # [-1, 2 * block_n] codes, in the kernel's order
    codes = groups.reshape(n // block_n, k // 2, block_n, 2).transpose(1, 2).reshape(-1)  # row-major [N, K]
    packed = (codes[0::2] << 4) | codes[1::2]
    absmax = qs.absmax.float().T.reshape(-1).contiguous()
    return packed.to(torch.uint8).contiguous(), absmax


def weight_shape(weight: torch.Tensor) -> tuple[int, ...]:
    qs = getattr(weight, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return tuple(int(s) for s in qs.shape)
    return tuple(int(s) for s in weight.shape)


class WeightSource:
    """Parameters of a plain or peft-wrapped model by FQN, merged with LoRA on request."""

    def __init__(self, model: torch.nn.Module, *, merge_lora: bool = True):
        self.model = model
        self.merge_lora = merge_lora
        self.params: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
        self.params.update(dict(model.named_buffers(remove_duplicate=False)))
        self.lora: dict[str, list[LoraPart]] = {}  # base weight FQN -> adapters
        self.lora_fqns: set[str] = set()
        for name, mod in model.named_modules():
            if not _is_lora_layer(mod):
                continue
            parts = self._lora_parts(name, mod)
            if parts:
                self.lora[f"{name}.base_layer.weight"] = parts
            for pname, _ in mod.named_parameters(prefix=name):
                if ".lora_" in pname:
                    self.lora_fqns.add(pname)

    def _lora_parts(self, name: str, mod: torch.nn.Module) -> list[LoraPart]:
        active = getattr(mod, "active_adapters", None) or []
        if isinstance(active, str):
            active = [active]
        merged = set(getattr(mod, "merged_adapters", []) or [])
        parts = []
        for ad in active:
            if ad in merged:
                continue  # already inside the base weight
            if getattr(mod, "use_dora", {}).get(ad, False):
                raise ExportError(f"{name}: DoRA adapter {ad!r} cannot be merged by graphtune (only plain LoRA)")
            scaling = float(mod.scaling[ad]) if ad in getattr(mod, "scaling", {}) else 1.0
            if hasattr(mod, "lora_A") and ad in mod.lora_A:
                a, b = mod.lora_A[ad], mod.lora_B[ad]
                if not isinstance(a, torch.nn.Linear) or not isinstance(b, torch.nn.Linear):
                    raise ExportError(f"{name}: LoRA on {type(mod.base_layer).__name__} ({type(a).__name__}) is not supported")
                parts.append(LoraPart(ad, a.weight, b.weight, scaling, bool(getattr(mod, "fan_in_fan_out", False))))
            elif hasattr(mod, "lora_embedding_A") and ad in mod.lora_embedding_A:
                parts.append(LoraPart(ad, mod.lora_embedding_A[ad], mod.lora_embedding_B[ad], scaling, embedding=True))
        return parts

    def __contains__(self, fqn: str) -> bool:
        return fqn in self.params

    def shape(self, fqn: str) -> tuple[int, ...]:
        return weight_shape(self.params[fqn])

    def dtype(self, fqn: str) -> torch.dtype:
        w = self.params[fqn]
        qs = getattr(w, "quant_state", None)
        return (getattr(qs, "dtype", None) or torch.float32) if qs is not None else w.dtype

    def get_native(self, fqn: str) -> torch.Tensor | None:
        """``fqn`` as stored (a plain float32/bf16/f16 tensor, on the CPU), when that is its exported
        value: no LoRA to merge, not bitsandbytes-quantized. None otherwise (then use ``get``)."""
        w = self.params[fqn]
        if (self.merge_lora and fqn in self.lora) or getattr(w, "quant_state", None) is not None \
                or type(w).__name__ in ("Params4bit", "Int8Params") or w.dtype not in _NATIVE_DTYPES:
            return None
        return w.detach().cpu()

    def get(self, fqn: str, *, merge: bool | None = None) -> torch.Tensor:
        """float32 CPU tensor of ``fqn``; LoRA merged when ``merge`` (default: the source's setting)."""
        w = dequantize_weight(self.params[fqn])
        if (self.merge_lora if merge is None else merge) and fqn in self.lora:
            for part in self.lora[fqn]:
                w = w + part.delta().to(w.device)
        return w


class SafetensorsSource:
    """Tensors of an HF checkpoint folder (``*.safetensors``), read lazily by checkpoint name.

    Used with a skeleton model on the meta device: the graph is captured without weights and each
    tensor is read (memory-mapped) only when it is written.
    """

    def __init__(self, directory: str | os.PathLike, *, prequantizer: Any = None):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.prequantizer = prequantizer  # graphtune.export.prequant.Prequantizer started on this folder
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ExportError(f"no *.safetensors files in {self.directory}")
        self._files = {f: safe_open(str(f), framework="pt") for f in files}
        self._where: dict[str, Any] = {}
        for handle in self._files.values():
            for key in handle.keys():
                self._where[key] = handle
        self.lora_fqns: set[str] = set()

    def _key(self, fqn: str) -> str:
        key = canonical_name(fqn)
        if key not in self._where:
            raise ExportError(f"{key} is not in the checkpoint {self.directory}")
        return key

    def __contains__(self, fqn: str) -> bool:
        return canonical_name(fqn) in self._where

    def shape(self, fqn: str) -> tuple[int, ...]:
        key = self._key(fqn)
        return tuple(int(s) for s in self._where[key].get_slice(key).get_shape())

    def signature(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every tensor's (shape, dtype) by checkpoint name, from the safetensors headers."""
        out = {}
        for key, handle in self._where.items():
            sl = handle.get_slice(key)
            out[key] = (tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype()))
        return out

    def get_native(self, fqn: str) -> torch.Tensor | None:
        """``fqn`` in the checkpoint's dtype (float32/bf16/f16; None for other dtypes)."""
        key = self._key(fqn)
        t = self._where[key].get_tensor(key)
        return t if t.dtype in _NATIVE_DTYPES else None

    def get(self, fqn: str, *, merge: bool | None = None) -> torch.Tensor:
        key = self._key(fqn)
        return self._where[key].get_tensor(key).float()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _shards(source: WeightSource, names: list[tuple[str, str]], dtype: torch.dtype, max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for fqn, key in names:
        t = source.get(fqn).to(dtype).contiguous()
        if shard and size + t.numel() * t.element_size() > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[key] = t
        size += t.numel() * t.element_size()
    if shard:
        yield shard


def save_merged(model: torch.nn.Module, directory: str | os.PathLike, tokenizer: Any = None, *,
                dtype: torch.dtype | None = None, max_shard_size: int = 4 << 30, progress: bool = True) -> Path:
    """Write the LoRA-merged model as an HF checkpoint (``config.json`` + safetensors) loadable with
    ``AutoModelForCausalLM.from_pretrained(directory)``.

    Tensors are merged one at a time (QLoRA: dequantized, merged in float32) and cast back to
    ``dtype`` (default: the base model's floating dtype; the compute dtype for a 4-bit model).
    At most one shard (``max_shard_size`` bytes) is held in memory; each file is written to a
    temporary name, fsynced and renamed, so an interrupted save leaves no partial file.
    """
    from safetensors.torch import save as st_save

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    base = _unwrap(model)
    source = WeightSource(model, merge_lora=True)
    config = base.config
    if dtype is None:
        qcfg = getattr(config, "quantization_config", None)
        compute = getattr(qcfg, "bnb_4bit_compute_dtype", None) if qcfg is not None else None
        if isinstance(qcfg, dict):
            compute = qcfg.get("bnb_4bit_compute_dtype")
        if isinstance(compute, str):
            compute = getattr(torch, compute.replace("torch.", ""), None)
        floats = [p.dtype for n, p in source.params.items() if p.is_floating_point() and n not in source.lora_fqns]
        dtype = compute or (floats[0] if floats else torch.float32)
    persistent = {canonical_name(k) for k in base.state_dict().keys()}
    seen_ids: set[int] = set()
    names: list[tuple[str, str]] = []
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        out_emb = base.get_output_embeddings()
        if out_emb is not None:
            tied = {n for n, p in base.named_parameters(remove_duplicate=False) if p is out_emb.weight}
    for fqn, p in source.params.items():
        if fqn in source.lora_fqns or id(p) in seen_ids:
            continue
        key = canonical_name(fqn)
        if key not in persistent or key in tied:
            continue
        seen_ids.add(id(p))
        names.append((fqn, key))
    shard_list = []
    index: dict[str, str] = {}
    it = _shards(source, names, dtype, max_shard_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="save_merged", unit="shard")
    tmp_names = []
    for i, shard in enumerate(it):
        fname = f"model-{i + 1:05d}.safetensors.part"
        tmp_names.append(fname)
        data = st_save(shard, metadata={"format": "pt"})
        _atomic_write_bytes(out / fname, lambda f, d=data: f.write(d))
        shard_list.append(list(shard))
    n = len(shard_list)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp_name, name, keys in zip(tmp_names, final, shard_list):
        os.replace(out / tmp_name, out / name)
        index.update({k: name for k in keys})
    if n > 1:
        total = sum(math.prod(source.shape(f)) for f, _ in names) * torch.finfo(dtype).bits // 8
        body = json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=2)
        _atomic_write_bytes(out / "model.safetensors.index.json", lambda f: f.write(body.encode()))
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = str(dtype).replace("torch.", "")
    body = json.dumps(cfg, indent=2, sort_keys=True, default=str)
    _atomic_write_bytes(out / "config.json", lambda f: f.write(body.encode()))
    gen = getattr(base, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(out)
        except Exception:  # noqa: BLE001 - a generation config that does not validate is not essential
            pass
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
