"""Which GGML type each tensor gets for a GGUF file type, chosen the way llama.cpp chooses.

The float file types (F32/F16/BF16) and Q8_0 follow ``convert_hf_to_gguf.py``: 1-D tensors, norms
and a few small special tensors stay F32, every other matrix gets the file type. The other
quantized file types follow ``llama-quantize`` (``llama_tensor_get_type`` in
``src/llama-quant.cpp``) run on such a file: the same mixture rules (Q4_K_M/Q5_K_M give attn_v
and ffn_down Q6_K on the layers ``use_more_bits`` picks, output.weight — or token_embd.weight
when the embeddings are tied — Q6_K, ...) and the same fallbacks when a row length is not a
multiple of the block size (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16).

``tensor_type`` decides one tensor from its name (the layer index comes from ``blk.N.``);
``plan_types`` decides a whole model in file order with llama.cpp's counters (and detects tied
embeddings from the absence of ``output.weight``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

__all__ = [
    "FILE_TYPES",
    "FileType",
    "TensorChoice",
    "file_type",
    "file_type_names",
    "plan_types",
    "tensor_type",
]

QT = GGMLQuantizationType


@dataclass(frozen=True)
class FileType:
    name: str                      # llama.cpp's name, e.g. "Q4_K_M"
    llama_file_type: LlamaFileType  # value of general.file_type
    default_type: GGMLQuantizationType
    mixture: bool                  # llama-quantize mixture rules apply (all quantized types)


def _ft(name: str, lft: LlamaFileType, default: GGMLQuantizationType) -> FileType:
    return FileType(name, lft, default, default not in (QT.F32, QT.F16, QT.BF16))


FILE_TYPES: dict[str, FileType] = {ft.name: ft for ft in (
    _ft("F32", LlamaFileType.ALL_F32, QT.F32),
    _ft("F16", LlamaFileType.MOSTLY_F16, QT.F16),
    _ft("BF16", LlamaFileType.MOSTLY_BF16, QT.BF16),
    _ft("Q8_0", LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
    _ft("Q4_0", LlamaFileType.MOSTLY_Q4_0, QT.Q4_0),
    _ft("Q4_1", LlamaFileType.MOSTLY_Q4_1, QT.Q4_1),
    _ft("Q5_0", LlamaFileType.MOSTLY_Q5_0, QT.Q5_0),
    _ft("Q5_1", LlamaFileType.MOSTLY_Q5_1, QT.Q5_1),
    _ft("Q6_K", LlamaFileType.MOSTLY_Q6_K, QT.Q6_K),
    _ft("Q5_K_S", LlamaFileType.MOSTLY_Q5_K_S, QT.Q5_K),
    _ft("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, QT.Q5_K),
    _ft("Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, QT.Q4_K),
    _ft("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, QT.Q4_K),
)}

# llama-quantize's aliases
_ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "FP16": "F16", "FP32": "F32"}


def file_type_names() -> tuple[str, ...]:
    return tuple(FILE_TYPES)


def file_type(name: str | FileType | LlamaFileType) -> FileType:
    """Look a file type up by llama.cpp name (case-insensitive; ``Q4_K``/``Q5_K`` mean ``_M``)
    or by ``LlamaFileType``. ``file_type(x).llama_file_type`` is the ``general.file_type`` value."""
    if isinstance(name, FileType):
        return name
    if isinstance(name, LlamaFileType):
        for ft in FILE_TYPES.values():
            if ft.llama_file_type == name:
                return ft
        raise ValueError(f"unsupported GGUF file type {name.name}; supported: {', '.join(FILE_TYPES)}")
    key = str(name).strip().upper().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in FILE_TYPES:
        raise ValueError(f"unknown GGUF file type {name!r}; supported: {', '.join(FILE_TYPES)}")
    return FILE_TYPES[key]


def _arch_name(arch) -> str:
    if isinstance(arch, gguf.MODEL_ARCH):
        return gguf.MODEL_ARCH_NAMES[arch]
    return str(arch or "").lower()


# ---- convert_hf_to_gguf.py's float policy ------------------------------------------------

# tensors convert keeps in F32 whatever the file type (by GGUF name pattern)
_CONVERT_F32_TENSORS = tuple(
    gguf.TENSOR_NAMES[t] for t in (
        gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP,
        gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES,
        gguf.MODEL_TENSOR.SSM_CONV1D, gguf.MODEL_TENSOR.SHORTCONV_CONV,
        gguf.MODEL_TENSOR.TIME_MIX_FIRST, gguf.MODEL_TENSOR.TIME_MIX_W1, gguf.MODEL_TENSOR.TIME_MIX_W2,
        gguf.MODEL_TENSOR.TIME_MIX_DECAY_W1, gguf.MODEL_TENSOR.TIME_MIX_DECAY_W2,
        gguf.MODEL_TENSOR.TIME_MIX_LERP_FUSED, gguf.MODEL_TENSOR.POSNET_NORM1, gguf.MODEL_TENSOR.POSNET_NORM2,
        gguf.MODEL_TENSOR.ALTUP_CORRECT_COEF, gguf.MODEL_TENSOR.ALTUP_PREDICT_COEF,
    ) if t in gguf.TENSOR_NAMES
)
_CONVERT_F32_RE = tuple(
    re.compile("^" + re.escape(p).replace(re.escape("{bid}"), r"\d+") + r"\.weight$") for p in _CONVERT_F32_TENSORS
)


def _always_f32(name: str, shape: Sequence[int]) -> bool:
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return True
    if name[-7:] not in (".weight", ".lora_a", ".lora_b"):
        return True
    return any(r.match(name) for r in _CONVERT_F32_RE)


# ---- llama-quantize's rules ----------------------------------------------------------------

def _ggml_n_dims(shape: Sequence[int]) -> int:
    # ggml counts dimensions up to the last ne[i] != 1; ne is the numpy shape reversed
    ne = list(reversed([int(s) for s in shape]))
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] != 1:
            return i + 1
    return 1


_NOT_QUANTIZED_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)


def _allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """llama-quant.cpp tensor_allows_quantization (default params)."""
    if _ggml_n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(s in name for s in _NOT_QUANTIZED_SUBSTRINGS)


def _category(name: str) -> str:
    """llama-quant.cpp tensor_get_category."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _is_attn_v_like(cat: str) -> bool:
    return cat in ("attn_v", "attn_qkv", "attn_kv_b")


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _blck(t: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[t][0]


_LAYER_RE = re.compile(r"(?:^|\.)blk\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _is_70b(arch: str, n_layers: int, n_head: int | None, n_head_kv: int | None, n_expert: int) -> bool:
    # llama.cpp's LLM_TYPE_70B (models/llama.cpp, models/qwen2.cpp): 80 layers, llama with GQA
    if n_layers != 80:
        return False
    if arch == "qwen2":
        return True
    if arch == "llama" and n_expert != 8:
        return n_head is None or n_head_kv is None or n_head != n_head_kv
    return False


@dataclass
class _State:
    n_layers: int
    n_attention_wv: int
    tied: bool
    arch: str
    n_expert: int
    is_70b: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0


def _mixture(ft: FileType, name: str, shape: Sequence[int], new: GGMLQuantizationType, st: _State,
             i_wv: int, i_down: int) -> GGMLQuantizationType:
    """llama_tensor_get_type_impl for the file types graphtune writes (no imatrix, default params)."""
    f = ft.name
    cat = _category(name)
    falcon = st.arch == "falcon"
    nx = int(shape[-1])
    if cat == "output" or (st.tied and cat == "token_embd"):
        if falcon or nx % _blck(new) != 0:
            return QT.Q8_0
        return QT.Q6_K if new != QT.Q8_0 else new
    if cat == "token_embd":
        return new
    if _is_attn_v_like(cat):
        if f in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_wv, st.n_attention_wv):
            new = QT.Q6_K
        elif f == "Q4_K_S" and i_wv < 4:
            new = QT.Q5_K
        if st.is_70b and new in (QT.Q3_K, QT.Q4_K):
            new = QT.Q5_K
        if st.n_expert == 8:
            new = QT.Q8_0
        return new
    if cat == "attn_k":
        return QT.Q8_0 if st.n_expert == 8 else new
    if cat == "ffn_down":
        n = st.n_layers
        i = i_down
        if st.n_expert > 1:
            layer = _layer_of(name)
            if layer is None:
                raise ValueError(f"Failed to determine layer for tensor {name}")
            i = layer
        if f == "Q4_K_M":
            if falcon:
                new = QT.Q6_K if i < n // 16 else QT.Q5_K if _use_more_bits(i, n) else QT.Q4_K
            elif _use_more_bits(i, n):
                new = QT.Q6_K
        elif f == "Q5_K_M" and _use_more_bits(i, n):
            new = QT.Q6_K
        elif f == "Q4_K_S" and not falcon and i < n // 8:
            new = QT.Q5_K
        return new
    if cat == "attn_output":
        if not falcon and st.n_expert == 8 and f in ("Q4_K_S", "Q4_K_M"):
            new = QT.Q5_K
        return new
    return new


_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


def _fallback(name: str, shape: Sequence[int], target: GGMLQuantizationType) -> tuple[GGMLQuantizationType, str | None]:
    """llama-quant.cpp tensor_type_fallback."""
    ncols = int(shape[-1])
    qk = _blck(target)
    if ncols % qk == 0:
        return target, None
    ret = _FALLBACK.get(target, target)
    if qk > 32 and target not in _FALLBACK:
        raise ValueError(f"no tensor type fallback is defined for type {target.name}")
    chain = [target] if ret == target else [target, ret]
    if ncols % _blck(ret) != 0:
        ret = QT.F16
        chain.append(ret)
    dims = "×".join(str(int(s)) for s in shape)
    why = (f"{name}: rows of {ncols} (shape {dims}) are not a multiple of the {target.name} block ({qk}), "
           f"{' → '.join(t.name for t in chain)} as llama.cpp does")
    return ret, why


@dataclass(frozen=True)
class TensorChoice:
    name: str
    type: GGMLQuantizationType
    reason: str | None


def _decide(name: str, shape: Sequence[int], ft: FileType, st: _State, i_wv: int, i_down: int
            ) -> tuple[GGMLQuantizationType, str | None]:
    shape = tuple(int(s) for s in shape)
    if ft.default_type == QT.F32 or _always_f32(name, shape):
        return QT.F32, None
    if not ft.mixture:
        return ft.default_type, None
    if ft.name == "Q8_0" or not _allows_quantization(name, shape):
        # convert_hf_to_gguf.py's Q8_0 (same result as llama-quantize: no mixture rule touches
        # Q8_0 here), or a tensor llama-quantize would copy from the F16 file it starts from
        if ft.name == "Q8_0":
            return _fallback(name, shape, QT.Q8_0)
        return QT.F16, None
    new = _mixture(ft, name, shape, ft.default_type, st, i_wv, i_down)
    return _fallback(name, shape, new)


def tensor_type(gguf_name: str, shape: Sequence[int], file_type_name: str | FileType | LlamaFileType,
                n_layers: int, arch: str | gguf.MODEL_ARCH = "llama", *, tied_embeddings: bool = False,
                n_expert: int = 1, n_head: int | None = None, n_head_kv: int | None = None,
                n_attention_wv: int | None = None) -> tuple[GGMLQuantizationType, str | None]:
    """The GGML type llama.cpp would give tensor ``gguf_name`` (numpy/torch ``shape``, rows last)
    in a ``file_type_name`` file, and a human-readable reason when a row length forced a fallback
    (``None`` otherwise).

    Layer-dependent choices (attn_v/ffn_down in Q4_K_M/Q5_K_M/Q4_K_S) take the layer from
    ``blk.N.`` in the name, which is what llama.cpp's counters give for one attn_v/ffn_down per
    layer written in layer order. ``tied_embeddings``: the file has no ``output.weight``, so
    ``token_embd.weight`` is quantized like the output. ``n_attention_wv`` defaults to n_layers.
    """
    ft = file_type(file_type_name)
    arch_name = _arch_name(arch)
    st = _State(n_layers=int(n_layers), n_attention_wv=int(n_attention_wv or n_layers), tied=bool(tied_embeddings),
                arch=arch_name, n_expert=max(1, int(n_expert)),
                is_70b=_is_70b(arch_name, int(n_layers), n_head, n_head_kv, max(1, int(n_expert))))
    layer = _layer_of(gguf_name)
    i = layer if layer is not None else 0
    return _decide(gguf_name, shape, ft, st, i, i)


def plan_types(tensors: Iterable[tuple[str, Sequence[int]]], file_type_name: str | FileType | LlamaFileType,
               n_layers: int, arch: str | gguf.MODEL_ARCH = "llama", *, n_expert: int = 1,
               n_head: int | None = None, n_head_kv: int | None = None) -> list[TensorChoice]:
    """``tensor_type`` for every ``(gguf_name, shape)`` of a model (results in the given order),
    with llama-quantize's state: attn_v-like and ffn_down tensors are counted in llama.cpp's
    loader order (by layer), and the embeddings count as tied when no ``output.weight`` is
    present."""
    tensors = [(str(n), tuple(int(s) for s in shp)) for n, shp in tensors]
    ft = file_type(file_type_name)
    arch_name = _arch_name(arch)
    n_wv = sum(1 for n, _ in tensors if _is_attn_v_like(_category(n)))
    st = _State(n_layers=int(n_layers), n_attention_wv=n_wv,
                tied=not any(n == "output.weight" for n, _ in tensors), arch=arch_name,
                n_expert=max(1, int(n_expert)),
                is_70b=_is_70b(arch_name, int(n_layers), n_head, n_head_kv, max(1, int(n_expert))))
    out: list[TensorChoice | None] = [None] * len(tensors)
    # llama.cpp walks the tensors in its loader's order (weights_map: non-layer tensors first,
    # then by layer number, by name within a layer), whatever the order in the file
    for k in sorted(range(len(tensors)), key=lambda k: _loader_order(tensors[k][0])):
        name, shape = tensors[k]
        cat = _category(name)
        qt, why = _decide(name, shape, ft, st, st.i_attention_wv, st.i_ffn_down)
        # llama.cpp advances its counters only for tensors that reach the mixture rules
        if ft.mixture and ft.name != "Q8_0" and not _always_f32(name, shape) and _allows_quantization(name, shape):
            if _is_attn_v_like(cat):
                st.i_attention_wv += 1
            if cat == "ffn_down":
                st.i_ffn_down += 1
        out[k] = TensorChoice(name, qt, why)
    return out  # type: ignore[return-value]


_LOADER_LAYER_RE = re.compile(r"blk\.([+-]?\d+)")


def _loader_order(name: str) -> tuple[int, str]:
    """llama_model_loader::weight_name_comparer: sscanf(name, "blk.%d.") layer (-1 if none), then name."""
    m = _LOADER_LAYER_RE.match(name)
    return (int(m.group(1)) if m else -1, name)
