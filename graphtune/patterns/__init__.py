"""Architecture registry: one file per model family, registered by decorator.

A family is recognised from the captured graph -- the passes that fired, the structure they found
(norms per layer, q/k norms, fused projections, biases) and the module classes recorded in the
graph's ``nn_module_stack`` -- never from ``config.model_type``. A family file declares:

* ``structure``: the features its graph must show (see :class:`GraphFeatures`);
* ``decoder_layer_class``: the class that disambiguates structurally identical families (Llama and
  Mistral have the same graph);
* ``rewrites``: extra pattern variants it contributes to passes (Gemma's ``(1 + w)`` norm,
  Phi-3's partial rotary), keyed by pass name;
* ``expected_counts(layers)``: the exact number of rewrites per pass, checked after every capture.

Adding a family is one new file here plus its import in ``_FAMILY_MODULES``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch.fx as fx

from graphtune.passes.base import Rewrite, module_stack
from graphtune.passes.fuse_qlora import GEMM_4BIT, is_bnb_4bit_node, resolve_bnb_4bit
from graphtune.passes.group_lora import grouped_member_bias

_FAMILY_MODULES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")

_REGISTRY: dict[str, type[Family]] = {}


@dataclasses.dataclass(frozen=True)
class GraphFeatures:
    """Structure read off a rewritten graph; what families are matched against."""

    layers: int
    decoder_layer_classes: frozenset[str]
    norm_style: str | None  # "llama" | "gemma" | None (from the rms_norm variants that fired)
    norms_per_layer: int  # RMSNorms per decoder layer, excluding q/k norms
    qk_norm: bool
    activation: str | None  # "swiglu" | "geglu" | None
    fused_qkv: bool  # one projection feeds q, k and v (sliced)
    qkv_bias: bool

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decoder_layer_classes"] = sorted(self.decoder_layer_classes)
        return d


class Family:
    """Base class of a model family; subclasses are registered with :func:`register_family`."""

    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]] = ()  # HF ``architectures`` names, for export
    decoder_layer_class: ClassVar[str]
    structure: ClassVar[dict[str, Any]] = {}
    rewrites: ClassVar[dict[str, tuple[Rewrite, ...]]] = {}

    @classmethod
    def expected_counts(cls, layers: int) -> dict[str, int]:
        raise NotImplementedError

    @classmethod
    def matches_structure(cls, features: GraphFeatures) -> bool:
        return all(getattr(features, key) == value for key, value in cls.structure.items())


def register_family(cls: type[Family]) -> type[Family]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"family {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def families() -> dict[str, type[Family]]:
    for mod in _FAMILY_MODULES:
        importlib.import_module(f"graphtune.patterns.{mod}")
    return dict(_REGISTRY)


def family_rewrites(pass_name: str) -> list[Rewrite]:
    """Every variant any family contributes to ``pass_name``, deduplicated, in registry order."""
    out: list[Rewrite] = []
    for fam in families().values():
        for rw in fam.rewrites.get(pass_name, ()):
            if rw not in out:
                out.append(rw)
    return out


def _layer_paths(graph: fx.Graph) -> dict[str, str]:
    layers: dict[str, str] = {}
    for node in graph.nodes:
        for path, cls in module_stack(node):
            if cls.endswith("DecoderLayer"):
                layers[path] = cls
    return layers


def _projection_bias(node: fx.Node) -> tuple[bool, Any]:
    """(is ``node`` a projection, its bias argument): a linear, a fused LoRA linear, or a bitsandbytes
    4-bit linear (bare ``gemm_4bit``, ``MatMul4Bit``'s autograd node, or ``graphtune::lora_linear_4bit``),
    or one member's output of a ``graphtune::lora_linear_group`` (the group node itself is not one)."""
    if node.op != "call_function":
        return False, None
    target = str(node.target)
    if getattr(node.target, "__name__", "") == "linear":
        index = 2
    elif target.startswith("graphtune.lora_linear_4bit"):
        index = 7
    elif target.startswith("graphtune.lora_linear_group"):
        return False, None  # its members are the projections: the getitem nodes, below
    elif target.startswith("graphtune.lora_linear"):
        index = 3
    elif target == GEMM_4BIT:
        index = 6
    elif is_bnb_4bit_node(node):  # autograd_function_apply: the bias is one of its operands
        call = resolve_bnb_4bit(next(iter(node.users)))
        return True, call.bias
    else:
        return grouped_member_bias(node)  # one member's output of a lora_linear_group, or no projection
    return True, node.args[index] if len(node.args) > index else node.kwargs.get("bias")


def extract_features(graph: fx.Graph, counts: dict[str, dict[str, int]]) -> GraphFeatures:
    """Read the structural features of a graph after the rewrite passes ran.

    ``counts`` maps pass name -> {rewrite variant -> count}.
    """
    layers = _layer_paths(graph)
    n_layers = len(layers)
    qk_norms = 0
    fused_qkv = False
    qkv_bias = False
    attn_children: dict[str, set[str]] = {}
    for node in graph.nodes:
        stack = module_stack(node)
        if node.meta.get("graphtune_pass") == "fuse_rms_norm" and node.op == "call_function":
            if any(cls.endswith("Attention") for _, cls in stack):
                qk_norms += 1
        is_projection, bias = _projection_bias(node)
        if is_projection:
            attn = [p for p, cls in stack if cls.endswith("Attention")]
            if attn:
                child = stack[[p for p, _ in stack].index(attn[-1]) + 1][0] if len(stack) > 1 else ""
                # the projection module directly under the attention module (peft's base_layer
                # and lora_A/B sit deeper and collapse onto their projection)
                attn_children.setdefault(attn[-1], set()).add(child)
                if bias is not None and "o_proj" not in child:
                    qkv_bias = True
    if attn_children:
        per_attn = min(len(v) for v in attn_children.values())
        fused_qkv = per_attn <= 2
    rms = counts.get("fuse_rms_norm", {})
    norm_style = None
    if rms:
        norm_style = max(rms, key=rms.get)
    total_rms = sum(rms.values())
    act = None
    if sum(counts.get("fuse_geglu", {}).values()):
        act = "geglu"
    elif sum(counts.get("fuse_swiglu", {}).values()):
        act = "swiglu"
    norms_per_layer = (total_rms - qk_norms - 1) // n_layers if n_layers else 0
    return GraphFeatures(
        layers=n_layers,
        decoder_layer_classes=frozenset(layers.values()),
        norm_style=norm_style,
        norms_per_layer=norms_per_layer,
        qk_norm=qk_norms > 0,
        activation=act,
        fused_qkv=fused_qkv,
        qkv_bias=qkv_bias,
    )


def detect_family(features: GraphFeatures) -> tuple[type[Family] | None, str]:
    """The family whose structure (and decoder-layer class, to break ties) the graph shows."""
    structural = [f for f in families().values() if f.matches_structure(features)]
    if not structural:
        by_class = [f for f in families().values() if f.decoder_layer_class in features.decoder_layer_classes]
        if by_class:
            fam = by_class[0]
            diffs = ", ".join(
                f"{k}={getattr(features, k)!r} (expected {v!r})" for k, v in fam.structure.items() if getattr(features, k) != v
            )
            return fam, f"{fam.decoder_layer_class} matches but the rewritten graph's structure differs: {diffs}"
        return None, f"no registered family has this structure: {features.as_dict()}"
    exact = [f for f in structural if f.decoder_layer_class in features.decoder_layer_classes]
    if len(exact) == 1:
        return exact[0], f"structure and {exact[0].decoder_layer_class} match"
    if len(structural) == 1:
        return structural[0], "structure matches (decoder-layer class not registered)"
    names = ", ".join(f.name for f in structural)
    return structural[0], f"structure matches {names}; decoder-layer class did not disambiguate, using {structural[0].name}"


Callable  # re-exported for family files' type hints
