"""GGUF lowering rules, one file per model family, registered by decorator.

A :class:`GGUFFamily` turns the roles the graph analysis found (:mod:`graphtune.export.roles`) into
llama.cpp's tensors and metadata. Names and keys come from gguf-py (``MODEL_ARCH``,
``MODEL_TENSOR``, ``TENSOR_NAMES``, ``GGUFWriter.add_*``), never from string literals. A family
declares:

* ``arch``: the gguf-py architecture (``gguf.MODEL_ARCH.LLAMA`` ...);
* ``structure``: what its graph must show per decoder layer (norms outside attention, q/k norms,
  rope nodes, activation, fused projections, the rms_norm offset) -- checked before writing;
* ``role_tensors``: overrides of the role -> ``MODEL_TENSOR`` map (Gemma-2's pre-FFN norm);
* hooks, overridden only where the family needs them: ``set_gguf_parameters(writer)``,
  ``transform(role, bid, part, tensor)`` (the data fix-ups: Llama's q/k permutation, scale folds),
  ``extra_tensors()`` (Llama-3's ``rope_freqs``, Phi-3's long-rope factors) and ``check(roles)``.

Adding a family is one file here (``@register_gguf_family("name")`` on the class) plus its module
name in ``_FAMILY_MODULES``; the name is the graphtune family detected from the graph.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

import gguf
from gguf import MODEL_TENSOR as T

from graphtune.errors import GraphtuneError

_FAMILY_MODULES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")
_REGISTRY: dict[str, type[GGUFFamily]] = {}


class ExportError(GraphtuneError):
    """The model, tokenizer or requested type cannot be exported; the message names what is missing."""


class UnsupportedFamilyError(ExportError):
    """No GGUF lowering is registered for the family detected from the graph."""


def register_gguf_family(name: str) -> Callable[[type[GGUFFamily]], type[GGUFFamily]]:
    """Class decorator: register the GGUF lowering of the graphtune family ``name``."""

    def deco(cls: type[GGUFFamily]) -> type[GGUFFamily]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"GGUF family {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def gguf_families() -> dict[str, type[GGUFFamily]]:
    for mod in _FAMILY_MODULES:
        importlib.import_module(f"graphtune.export.families.{mod}")
    return dict(_REGISTRY)


def gguf_family(name: str | None, reason: str = "") -> type[GGUFFamily]:
    fams = gguf_families()
    if name not in fams:
        detected = f"detected family {name!r}" if name else "no family was detected from the graph"
        raise UnsupportedFamilyError(
            f"cannot export to GGUF: {detected}{f' ({reason})' if reason else ''}; "
            f"GGUF lowerings exist for: {', '.join(sorted(fams))}"
        )
    return fams[name]


# role (graphtune.export.roles.ROLES) -> gguf-py tensor kind
DEFAULT_ROLE_TENSORS: dict[str, T] = {
    "token_embd": T.TOKEN_EMBD, "output_norm": T.OUTPUT_NORM, "output": T.OUTPUT,
    "attn_norm": T.ATTN_NORM, "attn_q": T.ATTN_Q, "attn_k": T.ATTN_K, "attn_v": T.ATTN_V,
    "attn_qkv": T.ATTN_QKV, "attn_output": T.ATTN_OUT, "attn_q_norm": T.ATTN_Q_NORM,
    "attn_k_norm": T.ATTN_K_NORM, "attn_post_norm": T.ATTN_POST_NORM, "ffn_norm": T.FFN_NORM,
    "ffn_gate": T.FFN_GATE, "ffn_up": T.FFN_UP, "ffn_gate_up": T.FFN_UP, "ffn_down": T.FFN_DOWN,
    "ffn_post_norm": T.FFN_POST_NORM,
}
NORM_ROLES = frozenset({"attn_norm", "ffn_norm", "attn_post_norm", "ffn_post_norm", "attn_q_norm", "attn_k_norm", "output_norm"})


@dataclasses.dataclass
class ModelSpec:
    """Hyperparameters of the exported model: from the HF config, cross-checked with the graph."""

    config: Any  # the (text) PretrainedConfig
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    n_vocab: int
    n_ctx: int
    rms_eps: float
    tied: bool
    attention_scale: float | None  # from the graph (eager attention literal or sdpa's scale=), if seen

    def cfg(self, *names: str, default: Any = None) -> Any:
        for n in names:
            v = getattr(self.config, n, None)
            if v is not None:
                return v
        return default

    def rope_parameters(self, layer_type: str | None = None) -> dict[str, Any]:
        """transformers 5 ``rope_parameters`` (per layer type for Gemma-3), with a 4.x fallback."""
        rp = getattr(self.config, "rope_parameters", None)
        if isinstance(rp, dict) and layer_type and isinstance(rp.get(layer_type), dict):
            return dict(rp[layer_type])
        if isinstance(rp, dict) and ("rope_type" in rp or "rope_theta" in rp):
            return dict(rp)
        out = dict(getattr(self.config, "rope_scaling", None) or {})
        out.setdefault("rope_theta", getattr(self.config, "rope_theta", 10000.0))
        out.setdefault("rope_type", out.get("type", "default"))
        return out


@dataclasses.dataclass
class ExtraTensor:
    """A tensor the GGUF needs that is no model parameter (``rope_freqs``...): F32, computed."""

    name: str
    data: torch.Tensor


class GGUFFamily:
    """Base lowering: Llama-shaped decoder, NEOX rope, no weight fix-ups."""

    name: ClassVar[str]
    arch: ClassVar[gguf.MODEL_ARCH]
    structure: ClassVar[dict[str, Any]] = dict(norms=2, qk_norms=0, ropes=1, activation="swiglu", norm_offset=0.0)
    role_tensors: ClassVar[dict[str, T]] = {}
    allowed_bias_roles: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.notes: list[str] = []  # what the export could not represent exactly, for the summary

    # -- names -----------------------------------------------------------------------------------
    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def tensor_kind(self, role: str) -> T:
        return {**DEFAULT_ROLE_TENSORS, **self.role_tensors}[role]

    def tensor_name(self, role: str, bid: int | None, part: str = "weight") -> str:
        kind = self.tensor_kind(role)
        if kind not in gguf.MODEL_TENSORS[self.arch]:
            raise ExportError(f"GGUF architecture {self.arch_name!r} has no {gguf.TENSOR_NAMES[kind]!r} tensor "
                              f"for the graph role {role!r}")
        return gguf.TENSOR_NAMES[kind].format(bid=bid) + "." + part

    # -- checks ----------------------------------------------------------------------------------
    def check(self, roles) -> list[str]:
        """Problems that make the graph disagree with this architecture (empty: fine)."""
        problems = []
        s = self.structure
        for ls in roles.layers:
            got = dict(norms=ls.norms, qk_norms=ls.qk_norms, ropes=ls.ropes, activation=ls.activation)
            for key in ("norms", "qk_norms", "ropes", "activation"):
                if got[key] != s[key]:
                    problems.append(f"{ls.path}: {key}={got[key]!r}, GGUF arch {self.arch_name!r} expects {s[key]!r}")
        if roles.norm_offsets - {s["norm_offset"]}:
            problems.append(f"rms_norm offsets {sorted(roles.norm_offsets)} in the graph, "
                            f"{self.arch_name!r} expects {s['norm_offset']} (x*(w+{s['norm_offset']:g}))")
        for r in roles.params.values():
            if r.part == "bias" and r.role not in self.allowed_bias_roles:
                problems.append(f"{r.fqn}: a bias on {r.role}, which GGUF arch {self.arch_name!r} does not load")
        if not roles.tied and T.OUTPUT not in gguf.MODEL_TENSORS[self.arch]:
            problems.append(f"the lm_head is not tied to the token embedding, but GGUF arch {self.arch_name!r} "
                            "always uses token_embd as the output matrix")
        return problems

    # -- metadata --------------------------------------------------------------------------------
    def set_gguf_parameters(self, w: gguf.GGUFWriter) -> None:
        sp = self.spec
        w.add_context_length(sp.n_ctx)
        w.add_embedding_length(sp.n_embd)
        w.add_block_count(sp.n_layers)
        w.add_feed_forward_length(sp.n_ff)
        w.add_head_count(sp.n_head)
        w.add_head_count_kv(sp.n_head_kv)
        w.add_key_length(sp.head_dim)
        w.add_value_length(sp.head_dim)
        w.add_rope_dimension_count(sp.n_rot)
        w.add_layer_norm_rms_eps(sp.rms_eps)
        w.add_vocab_size(sp.n_vocab)
        rope = self.rope()
        w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        self.add_rope_scaling(w, rope)

    def rope(self) -> dict[str, Any]:
        """The rope parameters of the (global-attention) layers."""
        return self.spec.rope_parameters()

    def add_rope_scaling(self, w: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind == "default":
            return
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        elif kind == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rope["factor"]))
            orig = rope.get("original_max_position_embeddings") or self.spec.cfg("original_max_position_embeddings")
            if orig:
                w.add_rope_scaling_orig_ctx_len(int(orig))
            for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast), ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
                if rope.get(key) is not None:
                    add(float(rope[key]))
        elif kind == "llama3":
            pass  # carried by the rope_freqs tensor (extra_tensors)
        else:
            raise ExportError(f"rope scaling {kind!r} is not supported for GGUF arch {self.arch_name!r}")

    # -- tensors ---------------------------------------------------------------------------------
    def transform(self, role: str, bid: int | None, part: str, t: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
        """Data fix-ups of one float32 tensor; ``part`` is "weight", "bias", "lora_a" or "lora_b".

        The base folds the graph's rms_norm offset into norm weights (Gemma: ``x*(1+w)`` -> ``w+1``).
        Transforms of output rows (permutations, scales) must also apply to ``lora_b`` and biases.
        """
        if role in NORM_ROLES and part == "weight" and offset:
            t = t + offset
        return t

    def transform_moves_only(self, role: str, bid: int | None, part: str, offset: float = 0.0) -> bool:
        """True when ``transform`` only moves this tensor's values (permutes, slices; no arithmetic):
        then the exporter may hand it the checkpoint's own bf16/f16 tensor instead of a float32 copy
        (the quantizers read those dtypes exactly). A family that overrides ``transform`` must
        override this too, or its tensors always come as float32 (see ``accepts_native_dtype``)."""
        return not (role in NORM_ROLES and part == "weight" and offset)

    def accepts_native_dtype(self, role: str, bid: int | None, part: str, offset: float = 0.0) -> bool:
        """``transform_moves_only``, trusted only when declared by the class whose ``transform``
        runs (or a subclass of it): a ``transform`` override that does not vouch for itself gets
        float32 tensors."""
        mro = type(self).__mro__
        t_owner = next(c for c in mro if "transform" in c.__dict__)
        m_owner = next(c for c in mro if "transform_moves_only" in c.__dict__)
        return issubclass(m_owner, t_owner) and self.transform_moves_only(role, bid, part, offset)

    def transform_row_gather(self, role: str, bid: int | None, part: str, shape: tuple[int, ...],
                             offset: float = 0.0) -> torch.Tensor | None:
        """Where ``transform`` of a ``[rows, cols]`` tensor only reorders (or selects) whole rows:
        ``index`` such that ``transform(t) == t[index]``; None where it does anything else.

        Why: ggml's block quantization is row-local, so the checkpoint tensor's quantized rows,
        gathered by ``index``, are the exported tensor's bytes (:mod:`graphtune.export.prequant`).
        Proven on this exact shape with two index probes, and only for a transform that vouches it
        moves values (:meth:`accepts_native_dtype`), i.e. whose movement does not depend on them:
        the row probe must come back constant along each row, the column probe unchanged.
        """
        if len(shape) != 2 or not self.accepts_native_dtype(role, bid, part, offset):
            return None
        rows, cols = (int(s) for s in shape)
        if rows * cols >= 2**31:
            return None
        row_probe = torch.arange(rows, dtype=torch.int32)[:, None].expand(rows, cols)
        col_probe = torch.arange(cols, dtype=torch.int32)[None, :].expand(rows, cols)
        by_row = self.transform(role, bid, part, row_probe, offset)
        by_col = self.transform(role, bid, part, col_probe, offset)
        if by_row is row_probe and by_col is col_probe:
            return torch.arange(rows)
        if (by_row.dim() != 2 or by_row.shape != by_col.shape or by_row.shape[1] != cols
                or by_row.dtype != torch.int32 or by_col.dtype != torch.int32):
            return None
        if not bool((by_col == col_probe[:1]).all()) or not bool((by_row == by_row[:, :1]).all()):
            return None
        return by_row[:, 0].to(torch.int64)

    def extra_tensors(self) -> Iterable[ExtraTensor]:
        return ()

    # -- shared helpers for family files ------------------------------------------------------------
    def llama_cpp_attention_scale(self) -> float:
        """The q.k scale llama.cpp's graph uses for this arch (its default: 1/sqrt(head_dim))."""
        return 1.0 / math.sqrt(self.spec.head_dim)

    def attention_scale_fold(self) -> float:
        """Factor to fold into q so that llama.cpp's fixed attention scale gives the graph's scale."""
        graph_scale = self.spec.attention_scale
        if graph_scale is None:
            return 1.0
        ratio = graph_scale / self.llama_cpp_attention_scale()
        return 1.0 if abs(ratio - 1.0) < 1e-6 else ratio


def permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate_half layout -> llama.cpp's adjacent-pair (LLAMA_ROPE_TYPE_NORM) layout, per head.

    Rows of each head ``[x0..x(d/2-1), y0..y(d/2-1)]`` become ``[x0, y0, x1, y1, ...]``; works on
    weights ``[out, in]``, biases ``[out]`` and LoRA B ``[out, r]`` alike.
    """
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def layer_types(spec: ModelSpec) -> list[str] | None:
    lt = spec.cfg("layer_types")
    return list(lt) if lt else None


def sliding_pattern(spec: ModelSpec) -> list[bool] | None:
    """Per-layer sliding-window flags from the config's ``layer_types``."""
    lt = layer_types(spec)
    if lt is None:
        return None
    return [t == "sliding_attention" for t in lt[: spec.n_layers]]
