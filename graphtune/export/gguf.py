"""GGUF export: lowering passes over the captured graph, then one streaming, atomic write.

``to_gguf(model, tokenizer, path, quant="Q8_0")``:

1. **capture** the model's forward as graphtune sees it (the graph an earlier ``optimize`` already
   captured, or a fresh capture on a 4-token input; by default only the first ``capture_layers``
   decoder layers are traced -- later layers must be instances of the same class with the same
   parameters, which is checked). The family comes from the graph (``Report.family``).
2. **roles**: :func:`graphtune.export.roles.analyze_roles` names every parameter by what it does in
   the graph (q/k feed rope, gate/up feed the gated activation, which norm feeds what, ...).
3. **check**: the family's GGUF lowering (:mod:`graphtune.export.families`) compares the graph's
   structure with what its llama.cpp arch expects (norms and rope nodes per layer, the rms_norm
   offset, biases, fused projections) and the config with the graph (heads, head size, rotary width,
   eps); every model parameter must have a role; the GGUF name from the role must agree with
   gguf-py's ``TensorNameMap`` for the HF name.
4. **plan**: GGUF names, shapes and GGML types (``recipes.plan_types``: llama.cpp's mixtures and
   fallbacks; every fallback is logged and listed in the summary).
5. **write**: header and tensor infos first (they fix every tensor's offset), then each tensor is
   produced on demand -- LoRA merged (``merge.WeightSource``), fixed up by the family (q/k
   permutation, +1 norms, scale folds), quantized (``quants.quantize``) -- and written at its offset,
   one tensor per worker thread (one per core). A checkpoint's bf16/f16 tensor whose fix-up only
   moves values goes to the quantizer as it is (no float32 copy). The file is written under a
   temporary name in the target folder, fsynced and renamed: an interrupted export leaves no
   partial file.

``to_gguf_adapter`` writes the LoRA adapter alone (``general.type = adapter``) for llama.cpp's
``--lora``; the base GGUF for it is ``to_gguf(model, ..., merge_lora=False)``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import logging
import math
import os
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gguf

from graphtune.export import fileio, quants, recipes
from graphtune.export.families import (
    ExportError,
    GGUFFamily,
    ModelSpec,
    UnsupportedFamilyError,
    gguf_family,
)
from graphtune.export.merge import WeightSource, canonical_name
from graphtune.export.roles import GraphRoleError, GraphRoles, ParamRole, analyze_roles

logger = logging.getLogger("graphtune.export")

_ROLE_ORDER = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_q_norm", "attn_k_norm", "attn_output",
               "attn_post_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_gate_up", "ffn_down", "ffn_post_norm")


# -- results ------------------------------------------------------------------------------------
@dataclasses.dataclass
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    type: str
    nbytes: int
    source: str  # parameter FQN, or "computed"
    reason: str | None = None  # why the type differs from the file type's choice (fallbacks)


@dataclasses.dataclass
class ExportSummary:
    """What an export wrote and everything it had to adapt (returned by ``to_gguf``)."""

    path: Path
    kind: str  # "model" | "adapter"
    family: str
    arch: str
    file_type: str
    tensors: list[TensorRecord]
    fallbacks: list[str]
    notes: list[str]
    checks: list[str]
    vocab: dict[str, Any]
    seconds: dict[str, float]

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    @property
    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)

    def types(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type] = out.get(t.type, 0) + 1
        return out

    def summary(self) -> str:
        lines = [f"{self.path} ({self.kind}): {self.family} -> GGUF arch {self.arch!r}, {self.file_type}, "
                 f"{len(self.tensors)} tensors, {self.n_params / 1e6:.2f}M values, {self.nbytes / 2**20:.1f} MiB",
                 "  types: " + ", ".join(f"{k}×{v}" for k, v in sorted(self.types().items()))]
        if self.vocab:
            lines.append("  vocab: " + ", ".join(f"{k}={v}" for k, v in self.vocab.items()))
        lines += [f"  check: {c}" for c in self.checks]
        lines += [f"  fallback: {f}" for f in self.fallbacks]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)

    __str__ = summary


# -- capture ------------------------------------------------------------------------------------
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.ModuleList] | None:
    """(parent module, attribute, ModuleList) of the decoder layers, found by class name."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and all(type(c).__name__.endswith("DecoderLayer") for c in mod):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr, mod
    return None


def _device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# the structural passes the roles are read from (other passes -- LoRA fusion, attention dispatch --
# matter for training, not for naming tensors)
EXPORT_PASSES = ("fuse_rms_norm", "fuse_rope", "fuse_swiglu", "fuse_geglu")


def export_passes() -> list:
    from graphtune.passes import pass_by_name

    return [pass_by_name(n) for n in EXPORT_PASSES]


def _no_gc_after_compile():
    """Dynamo runs ``gc.collect(1)`` after every compile (``run_gc_after_compile``), for training
    jobs that compile again and again. The export compiles once; under ``graphtune export``, whose
    collector is off until the graph is analysed, that collection scans every object allocated since
    start-up (~0.7 s). The capture's garbage is left to the collector's own schedule instead."""
    cfg = torch._dynamo.config
    if hasattr(cfg, "run_gc_after_compile"):
        return cfg.patch(run_gc_after_compile=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _no_bnb_cpu_repacking(model: torch.nn.Module):
    """bitsandbytes' ``Linear4bit.forward`` on a CPU with AVX512-BF16, in eval mode without grad (the
    export's capture), converts its weight in place to a CPU kernel layout with bf16 absmax. Traced,
    that conversion would put ``set_`` on the weights into the graph (the roles then see no
    projection) and leave the model converted. Its per-module switch is off while capturing and
    restored after; a weight converted before (CPU inference) is read in that layout by
    ``merge.dequantize_weight``."""
    switched = [(m, m.support_avx512bf16_for_cpu) for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for m, _ in switched:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m, value in switched:
            m.support_avx512bf16_for_cpu = value


def capture_graph(model: torch.nn.Module, *, capture_layers: int | None = 2):
    """The captured, rewritten graph of ``model`` (graphtune's ``CapturedGraph``) for export.

    Always captures the forward (also for a model ``graphtune.optimize`` ran: its training graph
    holds fused nodes the role analysis does not read) on a 4-token input in eval mode under ``no_grad`` (no compile, static shapes), tracing
    only the first ``capture_layers`` decoder layers (``None``: all of them).
    """
    from graphtune.api import OptimizedForward
    from graphtune.capture import fresh_entry, make_backend

    fwd = model.__dict__.get("forward")
    # an optimized model's own graph is not reused: its training passes (LoRA MLP blocks, grouped
    # projections, fused cross-entropy) hide the per-projection nodes the role analysis reads
    forward = fwd.original_forward if isinstance(fwd, OptimizedForward) else type(model).forward.__get__(model)
    found = _decoder_layers(model)
    restore = None
    if found is not None and capture_layers and len(found[2]) > capture_layers:
        parent, attr, full = found
        setattr(parent, attr, torch.nn.ModuleList(list(full)[:capture_layers]))
        restore = (parent, attr, full)
    was_training = model.training
    got: list = []
    try:
        model.eval()
        backend = make_backend(model, export_passes(), "eager", got.append)
        compiled = torch.compile(fresh_entry(forward), backend=backend, fullgraph=True, dynamic=False)
        emb = _unwrap(model).get_input_embeddings()
        n_vocab = int(emb.weight.shape[0]) if emb is not None else 8
        ids = (torch.arange(4) % max(1, n_vocab)).unsqueeze(0).to(_device(model))
        with torch.no_grad(), _no_gc_after_compile(), _no_bnb_cpu_repacking(model):
            compiled(input_ids=ids, use_cache=False)
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
        from graphtune.errors import CaptureError

        raise CaptureError(f"graphtune could not capture this model's forward as one graph for export: {e}") from e
    finally:
        model.train(was_training)
        if restore is not None:
            setattr(restore[0], restore[1], restore[2])
    if not got:
        raise ExportError("dynamo produced no graph for this model's forward")
    return got[-1]


# -- lowering -----------------------------------------------------------------------------------
@dataclasses.dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    produce: Callable[[], torch.Tensor]
    source: str
    reason: str | None = None
    # the checkpoint tensor this one is made from, and (called lazily) the rows of it the family's
    # transform gathers (None: not a proven row gather); what lets graphtune.export.prequant's
    # speculative quantization of that checkpoint tensor stand for this tensor's bytes
    checkpoint_key: str | None = None
    row_gather: Callable[[], torch.Tensor | None] | None = None

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


class Lowering:
    """A model captured, its parameters named by role, checked against its family's GGUF arch."""

    def __init__(self, model: torch.nn.Module, *, merge_lora: bool = True, capture_layers: int | None = 2,
                 captured: Any = None, config: Any = None, source: Any = None):
        t0 = time.perf_counter()
        self.model = model
        self.captured = captured if captured is not None else capture_graph(model, capture_layers=capture_layers)
        self.seconds = {"capture": time.perf_counter() - t0}
        report = self.captured.report
        if report.family is None:
            gguf_family(None, report.family_reason)  # raises UnsupportedFamilyError
        try:
            roles = analyze_roles(self.captured.gm, self.captured.ctx.param_names)
        except GraphRoleError as e:
            raise ExportError(f"{report.family}: {e}") from e
        family, reason = self._family(report, roles)
        gguf_family(family, reason)  # unsupported family: raises before any other check
        self.source = source if source is not None else WeightSource(model, merge_lora=merge_lora)
        self.model_params = dict(model.named_parameters(remove_duplicate=False))
        self.family_name, self.family_reason = family, reason
        self.checks: list[str] = [f"family {family!r} detected from the graph ({reason})"]
        self.roles = self._extend_layers(roles)
        self._graph_checks = list(self.checks)  # what a cached analysis replays (see to_cache)
        base = _unwrap(model)
        self._finish(config if config is not None else base.config, self._check_coverage())
        self.seconds["analyze"] = time.perf_counter() - t0 - self.seconds["capture"]

    def _finish(self, cfg: Any, coverage: list[str]) -> None:
        """Spec from the config and the roles, the family's checks, and the per-layer summary."""
        if hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()
        self._cfg = cfg
        fam_cls = gguf_family(self.family_name, self.family_reason)
        self.spec = self._spec(cfg)
        self.family: GGUFFamily = fam_cls(self.spec)
        self._check(coverage + self._check_spec(cfg))

    def _check(self, more: list[str]) -> None:
        problems = self.family.check(self.roles) + more
        if problems:
            raise ExportError(f"the {self.family_name} graph does not match GGUF arch {self.family.arch_name!r}:\n  "
                              + "\n  ".join(problems))
        ls = self.roles.layers[0]
        self.checks.append(
            f"graph structure per layer: {ls.norms} norms, {ls.qk_norms} q/k norms, {ls.ropes} rope, {ls.activation}; "
            f"rms_norm offset {sorted(self.roles.norm_offsets)} (eps {self.spec.rms_eps:g}) — as {self.family.arch_name!r} expects")

    # ---- the analysis as a cache entry (graphtune.export.cache; the CLI's checkpoint exports) ----
    def to_cache(self) -> dict:
        """What the graph analysis found, for :meth:`from_cache` (JSON-able), and what the family
        derives from the config: the spec, the metadata ``set_gguf_parameters`` writes, the extra
        tensors, the notes (all fixed by config.json, which is part of the cache key)."""
        from graphtune.export import cache

        fam = type(self.family)(self.spec)  # a fresh instance: notes are appended as they are found
        w = gguf.GGUFWriter(None, self.family.arch_name)
        before = set(w.kv_data[0])
        fam.set_gguf_parameters(w)
        kvs = [[k, cache.plain_value(v.value), int(v.type), None if v.sub_type is None else int(v.sub_type)]
               for k, v in w.kv_data[0].items() if k not in before]
        notes_kv = list(fam.notes)
        extras = [[e.name, list(e.data.shape), e.data.detach().to(torch.float32).reshape(-1).tolist()]
                  for e in fam.extra_tensors()]
        spec = {f.name: getattr(self.spec, f.name) for f in dataclasses.fields(self.spec) if f.name != "config"}
        return {"family": self.family_name, "reason": self.family_reason, "checks": self._graph_checks,
                "roles": cache.roles_to_json(self.roles), "spec": spec, "config": cache.config_to_json(self._cfg),
                "kv": kvs, "extra_tensors": extras, "notes_kv": notes_kv, "notes_extra": fam.notes[len(notes_kv):]}

    @classmethod
    def from_cache(cls, entry: dict, config: Any, source: Any) -> Lowering:
        """A lowering from a cached analysis of the same checkpoint and code: no model, no capture.

        With ``config`` the spec and the family's checks are computed again from it; with
        ``config=None`` (the CLI, which then never imports transformers) the cached spec, metadata
        and extra tensors are replayed and the family's structure checks run on the cached roles.
        """
        from graphtune.export import cache

        self = cls.__new__(cls)
        t0 = time.perf_counter()
        self.model, self.captured, self.source, self.model_params = None, None, source, {}
        self.family_name, self.family_reason = entry["family"], entry["reason"]
        self.roles = cache.roles_from_json(entry["roles"])
        self.checks = list(entry["checks"]) + ["graph roles from the export cache (same config, tensors and code)"]
        self._graph_checks = list(entry["checks"])
        self.seconds = {"capture": 0.0}
        if config is not None:
            self._finish(config, [])
        else:
            self._replay(entry)
        self.seconds["analyze"] = time.perf_counter() - t0
        return self

    def _replay(self, entry: dict) -> None:
        from graphtune.export import cache
        from graphtune.export.families import ExtraTensor, ModelSpec

        fam_cls = gguf_family(self.family_name, self.family_reason)
        self._cfg = cache.ConfigView(entry["config"])
        self.spec = ModelSpec(config=self._cfg, **entry["spec"])
        fam = fam_cls(self.spec)
        kvs = [(k, v, gguf.GGUFValueType(t), None if st is None else gguf.GGUFValueType(st)) for k, v, t, st in entry["kv"]]
        extras = [(name, shape, data) for name, shape, data in entry["extra_tensors"]]

        def set_gguf_parameters(w: gguf.GGUFWriter) -> None:
            for k, v, t, st in kvs:
                w.add_key_value(k, v, t, sub_type=st)
            fam.notes.extend(entry["notes_kv"])

        def extra_tensors() -> list[ExtraTensor]:
            fam.notes.extend(entry["notes_extra"])
            return [ExtraTensor(name, torch.tensor(data, dtype=torch.float32).reshape(shape)) for name, shape, data in extras]

        fam.set_gguf_parameters = set_gguf_parameters  # type: ignore[method-assign]
        fam.extra_tensors = extra_tensors  # type: ignore[method-assign]
        self.family = fam
        self._check([])

    def _family(self, report, roles: GraphRoles) -> tuple[str | None, str]:
        """The report's family, re-detected when the roles see projections the report's features
        miss (bitsandbytes' 4-bit ``gemm_4bit`` ops are not ``linear`` nodes, so a QLoRA Llama
        looks like a fused-qkv graph to a count of ``linear`` children)."""
        from graphtune.patterns import detect_family, extract_features

        counts = {r.name: dict(r.by_rewrite) for r in report.passes}
        features = extract_features(self.captured.gm.graph, counts)
        fused = any(r.role == "attn_qkv" for r in roles.params.values())
        bias = any(r.part == "bias" and r.role in ("attn_q", "attn_k", "attn_v", "attn_qkv") for r in roles.params.values())
        corrected = dataclasses.replace(features, fused_qkv=fused, qkv_bias=bias)
        if corrected == features:
            return report.family, report.family_reason
        fam, why = detect_family(corrected)
        if fam is None:
            return report.family, report.family_reason
        if fam.name != report.family:
            return fam.name, (f"{why}; the graph roles show fused_qkv={fused}, qkv_bias={bias} where the capture "
                              f"report (which counted only `linear` nodes) said {report.family!r}")
        return report.family, report.family_reason

    # ---- layers the truncated capture did not trace --------------------------------------------
    def _extend_layers(self, roles: GraphRoles) -> GraphRoles:
        found = _decoder_layers(self.model)
        captured = [ls.path for ls in roles.layers]
        if found is None:
            return roles
        parent, attr, full = found
        container = captured[0].rsplit(".", 1)[0] if captured else ""
        n_full = len(full)
        k = len(captured)
        if k == n_full:
            self.checks.append(f"all {n_full} decoder layers traced")
            return roles
        if [f"{container}.{i}" for i in range(k)] != captured:
            raise ExportError(f"traced layers {captured} are not the first {k} of {container}")
        template = {bid: [r for r in roles.params.values() if r.bid == bid] for bid in range(k)}
        for bid in range(k, n_full):
            t = bid % k
            if type(full[bid]) is not type(full[t]):
                raise ExportError(f"{container}.{bid} is a {type(full[bid]).__name__}, the traced {container}.{t} a "
                                  f"{type(full[t]).__name__}: capture with capture_layers=None")
            for r in template[t]:
                fqn = r.fqn.replace(f"{container}.{t}.", f"{container}.{bid}.", 1)
                if fqn not in self.source or self.source.shape(fqn) != self.source.shape(r.fqn):
                    raise ExportError(f"{fqn} (the counterpart of the traced {r.fqn}) is missing or has another shape")
                roles.params[fqn] = dataclasses.replace(r, fqn=fqn, bid=bid)
            roles.layers.append(dataclasses.replace(roles.layers[t], path=f"{container}.{bid}"))
        self.checks.append(f"{k} of {n_full} decoder layers traced; layers {k}..{n_full - 1} are the same class "
                           "with the same parameters")
        return roles

    def _check_coverage(self) -> list[str]:
        """Every parameter of the model (LoRA aside) must be exported under some role."""
        base_ids = {id(self.model_params[r.fqn]) for r in self.roles.params.values() if r.fqn in self.model_params}
        lora = getattr(self.source, "lora_fqns", set())
        missing = []
        for fqn, p in self.model.named_parameters():
            if fqn in lora or fqn in self.roles.params or id(p) in base_ids:
                continue
            missing.append(fqn)
        if missing:
            return [f"{len(missing)} parameters have no role in the graph (would be dropped): {', '.join(missing[:6])}"]
        return []

    def _spec(self, cfg: Any) -> ModelSpec:
        roles = self.roles
        emb = self.source.shape(roles.embed_fqn)
        ff_roles = {r.role: r for r in roles.params.values() if r.bid == 0 and r.part == "weight"}
        if "ffn_gate" in ff_roles:
            n_ff = self.source.shape(ff_roles["ffn_gate"].fqn)[0]
        elif "ffn_gate_up" in ff_roles:
            n_ff = self.source.shape(ff_roles["ffn_gate_up"].fqn)[0] // 2
        else:
            raise ExportError("no gate projection found in layer 0")
        ls = roles.layers[0]
        n_head = int(getattr(cfg, "num_attention_heads", None) or ls.q_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
        head_dim = int(getattr(cfg, "head_dim", None) or emb[1] // n_head)
        if len(roles.eps) != 1:
            raise ExportError(f"the graph's rms_norm nodes use several eps values {sorted(roles.eps)}; GGUF has one")
        scales = {ls.attention_scale for ls in roles.layers if ls.attention_scale is not None}
        if len(scales) > 1:
            raise ExportError(f"the graph's layers use different attention scales {sorted(scales)}")
        return ModelSpec(
            config=cfg, n_layers=len(roles.layers), n_embd=int(emb[1]), n_ff=int(n_ff), n_head=n_head, n_head_kv=n_kv,
            head_dim=head_dim, n_rot=int(ls.rotary_dims[0] if ls.rotary_dims else head_dim), n_vocab=int(emb[0]),
            n_ctx=int(getattr(cfg, "max_position_embeddings", None) or 4096), rms_eps=float(next(iter(roles.eps))),
            tied=roles.tied, attention_scale=next(iter(scales)) if scales else None,
        )

    def _check_spec(self, cfg: Any) -> list[str]:
        """The config's hyperparameters against what the graph shows."""
        sp, problems = self.spec, []
        for ls in self.roles.layers[:1]:
            for what, graph_v, cfg_v in (("attention heads", ls.q_heads, sp.n_head), ("kv heads", ls.kv_heads, sp.n_head_kv),
                                         ("head size", ls.head_dim, sp.head_dim)):
                if graph_v is not None and graph_v != cfg_v:
                    problems.append(f"config {what} = {cfg_v}, the graph's rope inputs show {graph_v}")
        cfg_ff = getattr(cfg, "intermediate_size", None)
        if cfg_ff and int(cfg_ff) != sp.n_ff:
            problems.append(f"config intermediate_size = {cfg_ff}, the gate projection has {sp.n_ff} rows")
        if self.family.arch in (gguf.MODEL_ARCH.LLAMA,) and sp.n_rot != sp.head_dim:
            problems.append(f"rotary width {sp.n_rot} != head size {sp.head_dim}: llama.cpp's llama needs full rotary")
        return problems

    # ---- planning -------------------------------------------------------------------------------
    def ordered_roles(self) -> list[ParamRole]:
        def key(r: ParamRole):
            if r.role == "token_embd":
                return (0, 0, 0, 0)
            if r.bid is None:
                return (2, 0, 0 if r.role == "output_norm" else 1, 0)
            return (1, r.bid, _ROLE_ORDER.index(r.role), 0 if r.part == "weight" else 1)

        seen, out = set(), []
        for r in sorted(self.roles.params.values(), key=key):
            if r.role == "output" and self.roles.tied:
                continue
            if (r.role, r.bid, r.part) not in seen:
                seen.add((r.role, r.bid, r.part))
                out.append(r)
        return out

    def names(self) -> list[tuple[ParamRole, str]]:
        out = [(r, self.family.tensor_name(r.role, r.bid, r.part)) for r in self.ordered_roles()]
        tmap = gguf.get_tensor_name_map(self.family.arch, self.spec.n_layers)
        mismatched = []
        for r, name in out:
            hf = canonical_name(r.fqn)
            hit = tmap.get_type_and_name(hf, try_suffixes=(".weight", ".bias"))
            if hit is not None and hit[1] != name:
                mismatched.append(f"{hf}: role {r.role} -> {name}, gguf-py's TensorNameMap -> {hit[1]}")
        if mismatched:
            raise ExportError("graph roles disagree with gguf-py's tensor name map:\n  " + "\n  ".join(mismatched[:8]))
        self.checks.append(f"{len(out)} tensor names from graph roles agree with gguf-py's TensorNameMap")
        return out

    def producer(self, r: ParamRole) -> Callable[[], torch.Tensor]:
        fam, src = self.family, self.source
        native = hasattr(src, "get_native") and fam.accepts_native_dtype(r.role, r.bid, r.part, r.offset)

        def produce() -> torch.Tensor:
            # a bf16 checkpoint tensor whose fix-up only moves values is exported from its own
            # values: the float32 copy would hold exactly the same numbers
            t = src.get_native(r.fqn) if native else None
            if t is None:
                t = src.get(r.fqn)
            return fam.transform(r.role, r.bid, r.part, t, r.offset).contiguous()

        return produce

    def plan(self, file_type: str) -> tuple[list[PlannedTensor], list[str]]:
        items: list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor], str, ParamRole | None]] = []
        named = self.names()
        for r, name in named[:1]:
            items.append((name, self.source.shape(r.fqn), self.producer(r), r.fqn, r))
        for extra in self.family.extra_tensors():
            items.append((extra.name, tuple(extra.data.shape), (lambda d=extra.data: d), "computed", None))
        for r, name in named[1:]:
            items.append((name, self.source.shape(r.fqn), self.producer(r), r.fqn, r))
        choices = recipes.plan_types([(n, s) for n, s, _, _, _ in items], file_type, self.spec.n_layers,
                                     self.family.arch, n_head=self.spec.n_head, n_head_kv=self.spec.n_head_kv)
        planned, fallbacks = [], []
        for (name, shape, produce, src, role), ch in zip(items, choices):
            qtype = ch.type
            reason = ch.reason
            if not quants.can_quantize(shape, qtype):
                reason = (reason + "; " if reason else "") + f"{name}: graphtune cannot write {qtype.name} for {shape} -> F16"
                qtype = gguf.GGMLQuantizationType.F16
            if reason:
                fallbacks.append(reason)
                logger.warning("fallback: %s", reason)
            shape = tuple(int(s) for s in shape)
            key = gather = None
            if role is not None and len(shape) == 2:
                key = canonical_name(role.fqn)
                gather = functools.partial(self.family.transform_row_gather, role.role, role.bid, role.part, shape,
                                           role.offset)
            planned.append(PlannedTensor(name, shape, qtype, produce, src, reason, key, gather))
        return planned, fallbacks


# -- writing ------------------------------------------------------------------------------------
_PAD_KEY = "graphtune.header_padding"


def _header_bytes(arch: str, set_kv: Callable[[gguf.GGUFWriter], None],
                  planned: Sequence[PlannedTensor]) -> tuple[bytes, int]:
    """Header, metadata and tensor infos (in ``planned`` order) as gguf-py writes them, and the
    offset where the key-value section ends."""
    w = gguf.GGUFWriter(None, arch)
    set_kv(w)
    for t in planned:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    buf = io.BytesIO()
    w.fout, w.state = [buf], gguf.gguf_writer.WriterState.EMPTY
    w.write_header_to_file()
    buf.write(kv_bytes(w))
    w.state = gguf.gguf_writer.WriterState.KV_DATA
    kv_end = buf.tell()
    w.write_ti_data_to_file()
    return buf.getvalue(), kv_end


# element type of a metadata array whose items are all exactly of one Python type, as gguf-py's
# GGUFValueType.get_type names it (anything else is packed by gguf-py itself)
_ITEM_TYPES = {str: gguf.GGUFValueType.STRING, float: gguf.GGUFValueType.FLOAT32, bool: gguf.GGUFValueType.BOOL,
               int: gguf.GGUFValueType.INT32}


def kv_bytes(w: gguf.GGUFWriter) -> bytes:
    """The key-value section of ``w`` (one file) byte for byte as ``GGUFWriter.write_kv_data_to_file``
    writes it, with whole arrays packed at once: gguf-py packs an array item by item, which took
    ~0.25 s of an export for a 32k-token vocabulary (tokens, scores, types) and scales with it."""
    if len(w.kv_data) != 1 or w.endianess != gguf.GGUFEndian.LITTLE:
        raise ExportError("graphtune writes single-file little-endian GGUF")
    V = gguf.GGUFValueType
    out = []
    for key, val in w.kv_data[0].items():
        out.append(w._pack_val(key, V.STRING, add_vtype=False))
        items = val.value
        if val.type != V.ARRAY or not isinstance(items, (list, tuple)) or not items:
            out.append(w._pack_val(items, val.type, add_vtype=True, sub_type=val.sub_type))
            continue
        kinds = set(map(type, items))
        ltype = val.sub_type
        if ltype is None and len(kinds) == 1:
            ltype = _ITEM_TYPES.get(next(iter(kinds)))
        fmt = w._simple_value_packing.get(ltype) if ltype is not None else None
        if ltype == V.STRING and kinds == {str}:
            encoded = [s.encode("utf-8") for s in items]
            body = b"".join(struct.pack("<Q", len(e)) + e for e in encoded)
        elif fmt is not None and not kinds & {str, bytes, bytearray, list}:
            body = struct.pack(f"<{len(items)}{fmt}", *items)  # raises where gguf-py's item packing would
        else:
            out.append(w._pack_val(items, val.type, add_vtype=True, sub_type=val.sub_type))
            continue
        out.append(struct.pack("<IIQ", int(V.ARRAY), int(ltype), len(items)) + body)
    return b"".join(out)


_GGUF_N_KV_AT = 16  # GGUF v3: magic (4), version (4), tensor count (8), then the key-value count (8)


def _padded_header(header: bytes, kv_end: int, pad_to: int) -> bytes:
    """``header`` with one more key, ``graphtune.header_padding`` (a string of spaces), so that it
    ends exactly at ``pad_to``: where the data section must begin because tensors were already
    written there (:mod:`graphtune.export.prequant`). llama.cpp ignores keys it does not know."""
    key = _PAD_KEY.encode()
    n = pad_to - len(header) - (8 + len(key) + 4 + 8)
    if n < 0:
        raise ValueError(f"the GGUF header ({len(header)} bytes) does not fit before offset {pad_to}")
    (n_kv,) = struct.unpack_from("<Q", header, _GGUF_N_KV_AT)
    pad = struct.pack("<Q", len(key)) + key + struct.pack("<IQ", int(gguf.GGUFValueType.STRING), n) + b" " * n
    return b"".join((header[:_GGUF_N_KV_AT], struct.pack("<Q", n_kv + 1), header[_GGUF_N_KV_AT + 8:kv_end], pad,
                     header[kv_end:]))


class _Speculation:
    """The tensors a :class:`graphtune.export.prequant.Prequantizer` already wrote into the output's
    temporary file, matched to the plan -- or the reason they cannot be used."""

    def __init__(self, pre: Any, planned: Sequence[PlannedTensor]):
        self.reason: str | None = None
        self.order: list[int] = []
        self.slot_of: dict[int, Any] = {}
        if pre.tmp is None:
            self.reason = "no file was begun"
            return
        by_key: dict[str, list[int]] = {}
        for i, t in enumerate(planned):
            if t.checkpoint_key is not None:
                by_key.setdefault(t.checkpoint_key, []).append(i)
        for slot in pre.slots:
            hits = [i for i in by_key.get(slot.key, ())
                    if planned[i].qtype == slot.qtype and planned[i].nbytes == slot.nbytes]
            if len(hits) != 1:
                self.reason = (f"{slot.key}: {len(hits)} planned tensors of its type and size"
                               + ("" if slot.key in by_key else " (not exported)"))
                return
            self.slot_of[hits[0]] = slot
        self.order = [i for i, _ in sorted(self.slot_of.items(), key=lambda kv: kv[1].offset)]
        self.order += [i for i in range(len(planned)) if i not in self.slot_of]


def write_gguf(path: Path, arch: str, set_kv: Callable[[gguf.GGUFWriter], None], planned: Sequence[PlannedTensor], *,
               progress: bool = True, device: str | None = None, workers: int | None = None,
               speculation: Any = None) -> dict[str, Any]:
    """Write header, metadata and tensors (produced on demand) to ``path`` atomically.

    The header and tensor infos fix every tensor's offset, so ``workers`` threads (default: the
    usable cores, one more with O_DIRECT) each produce, quantize and write whole tensors at their
    offsets (:class:`graphtune.export.fileio.TensorFile`), in any order, largest first; at most
    ``workers + 1`` tensors are in memory at once. Padding between tensors is the zeros of the
    pre-sized file, as gguf-py writes it.

    ``speculation``: a :class:`graphtune.export.prequant.Prequantizer` that quantized checkpoint
    tensors while the graph was captured. Its in-memory results stand for a planned tensor of the
    same type whose transform is a proven row gather (rows reordered, bytes identical). When it
    also began the output file, its slots come first in the data section and the header is padded
    to where they begin; if the plan does not use every slot exactly (type, size) or the header
    does not fit, its file is discarded and the tensors are laid out as usual.

    Returns what the speculation contributed: ``{"layout": "speculative" | "usual", "on_disk": n,
    "from_memory": n, "reason": why the speculative layout was not used (or None)}``.
    """
    path = Path(path)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    bar = out = None
    tmp: Path | None = None
    fd: int | None = None
    try:
        spec = _Speculation(speculation, planned) if speculation is not None else None
        header = None
        if spec is not None and spec.reason is None:
            # the slots are at the start of the file: the header goes in front of them, padded
            # to whole filesystem blocks, which the filesystem inserts without moving the data
            tmp, fd = speculation.claim()
            ordered = [planned[i] for i in spec.order]
            block = max(fileio.PAGE, os.fstat(fd).st_blksize)
            plain, kv_end = _header_bytes(arch, set_kv, ordered)
            data_start = -(-(len(plain) + 64 + len(_PAD_KEY)) // block) * block
            try:
                header = _padded_header(plain, kv_end, data_start)
                fileio.insert_range(fd, 0, data_start)
            except OSError as e:
                spec.reason = f"the header cannot be inserted before the written tensors ({e})"
                header = None
                os.close(fd)
                tmp.unlink(missing_ok=True)
                tmp = fd = None
        stats: dict[str, Any] = {"layout": "usual", "on_disk": 0, "from_memory": 0,
                                 "reason": spec.reason if spec is not None else None}
        if header is not None:
            stats["layout"] = "speculative"
            order = spec.order
        else:
            if spec is not None and speculation.tmp is not None:
                logger.info("speculative tensor layout not used (%s); writing the usual layout", spec.reason)
                speculation.discard_file()
            spec = None
            order = list(range(len(planned)))
            header, _ = _header_bytes(arch, set_kv, planned)
            data_start = gguf.GGUFWriter.ggml_pad(len(header), align)
            tmp, fd = fileio.create_tmp(path)
        offsets: dict[int, int] = {}
        pos = data_start
        for i in order:
            offsets[i] = pos
            pos += gguf.GGUFWriter.ggml_pad(planned[i].nbytes, align)
        os.ftruncate(fd, pos)
        fileio.pwrite(fd, header, 0)
        out = fileio.TensorFile(tmp, fd)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(t.nbytes for t in planned), unit="B", unit_scale=True, desc=f"GGUF {path.name}")

        used: list[str] = []  # appended to from the writer threads

        def from_speculation(t: PlannedTensor, slot: Any, buf: np.ndarray | None) -> np.ndarray | bool | None:
            """True: the slot already holds the bytes; an array: the bytes; None: make them."""
            if speculation is None or t.checkpoint_key is None or t.row_gather is None:
                return None
            index = t.row_gather()
            if index is None:
                return None
            identity = index.numel() == t.shape[0] and bool((index == torch.arange(t.shape[0])).all())
            if slot is not None and identity and speculation.on_disk(t.checkpoint_key):
                used.append("on_disk")
                return True
            raw = speculation.take(t.checkpoint_key, t.qtype)
            if raw is None:
                return None
            used.append("from_memory")
            if identity and raw.shape[0] == t.shape[0]:
                return raw if buf is None else quants._into(raw, buf)
            rows = index.numpy()
            if buf is None:
                return np.take(raw, rows, axis=0)
            view = buf.reshape(-1).view(np.uint8)[:rows.size * raw.shape[1]].reshape(rows.size, raw.shape[1])
            np.take(raw, rows, axis=0, out=view)
            return view

        def job(i: int) -> int:
            t = planned[i]
            buf = out.buffer(offsets[i], t.nbytes)
            arr = from_speculation(t, spec.slot_of.get(i) if spec is not None else None, buf)
            if arr is True:
                return t.nbytes
            if arr is None:
                data = t.produce()
                if tuple(data.shape) != t.shape:
                    raise ExportError(f"{t.name}: produced shape {tuple(data.shape)}, planned {t.shape}")
                # one thread per tensor: the tensors themselves are the parallel work
                arr = quants.quantize(data, t.qtype, device=device, threads=1, out=buf)
                del data
            if arr.nbytes != t.nbytes:
                raise ExportError(f"{t.name}: {t.qtype.name} data is {arr.nbytes} bytes, planned {t.nbytes}")
            if buf is not None and arr.ctypes.data == buf.ctypes.data:
                out.write(arr, offsets[i], direct=True)
            else:
                out.put(arr, offsets[i])
            return t.nbytes

        if out.direct_fd is not None:
            workers += 1  # one more than the cores: a worker waiting for the disk leaves its core to the others
        workers = max(1, min(workers, len(planned)))
        # biggest tensors first, so that the last ones to finish are small
        by_size = sorted(range(len(planned)), key=lambda i: -planned[i].nbytes)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="graphtune-gguf") as pool:
            pending: set = set()
            nxt = 0
            try:
                while nxt < len(by_size) or pending:
                    while nxt < len(by_size) and len(pending) <= workers:
                        pending.add(pool.submit(job, by_size[nxt]))
                        nxt += 1
                    done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    for f in done:
                        n = f.result()
                        if bar is not None:
                            bar.update(n)
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
        out.close()
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, path)
        tmp = None
        try:
            dfd = os.open(path.parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        except OSError:
            pass
        for k in used:
            stats[k] += 1
        return stats
    finally:
        if out is not None:
            out.close()
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if speculation is not None:
            speculation.close()
        if bar is not None:
            bar.close()


def _file_type(quant: str) -> recipes.FileType:
    try:
        return recipes.file_type(quant)
    except ValueError as e:
        raise ExportError(str(e)) from None


# llama.cpp sets token attributes of these by name when general.name contains "phi3"/"phi-3", and
# aborts the load when one of them is not in the vocabulary (llama-vocab.cpp, "per token attributes")
_PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _model_name(model: torch.nn.Module | None, name: str | None, tokens: Sequence[str] | None, notes: list[str]) -> str:
    base = _unwrap(model) if model is not None else None
    src = getattr(getattr(base, "config", None), "_name_or_path", "") or ""
    chosen = name or (Path(src).name if src else "model")
    low = chosen.lower()
    if tokens is not None and ("phi3" in low or "phi-3" in low):
        missing = [t for t in _PHI3_NAME_TOKENS if t not in set(tokens)]
        if missing:
            if name:
                raise ExportError(f"general.name {name!r} makes llama.cpp look up Phi-3's tokens {missing}, which this "
                                  "vocabulary lacks (the load would fail); choose another name")
            notes.append(f"general.name {chosen!r} would make llama.cpp look up Phi-3 tokens {missing} missing from "
                         "this vocabulary; written as 'model'")
            chosen = "model"
    return chosen


def _general(w: gguf.GGUFWriter, name: str, kind: str) -> None:
    w.add_type(kind)
    w.add_name(name)


def to_gguf(model: torch.nn.Module, tokenizer: Any, path: str | os.PathLike, quant: str = "Q8_0", *,
            merge_lora: bool = True, name: str | None = None, progress: bool = True,
            capture_layers: int | None = 2, device: str | None = None, config: Any = None,
            captured: Any = None, source: Any = None, lowering: Lowering | None = None) -> ExportSummary:
    """Export ``model`` (plain or peft-LoRA, LoRA merged unless ``merge_lora=False``) with its
    ``tokenizer`` (HF tokenizer or path, or an already built ``tokenizer.Vocab``) to a GGUF file
    llama.cpp loads.

    ``quant``: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q6_K, Q5_K_S, Q5_K_M (Q5_K), Q4_K_S,
    Q4_K_M (Q4_K). ``device``: where tensors are quantized (e.g. "cuda"). ``captured``: a graph
    from :func:`capture_graph` to reuse (several exports of one model capture once). ``source``: where
    tensor data comes from (default: the model's parameters, see ``merge.WeightSource``; the CLI
    streams from safetensors with ``merge.SafetensorsSource``). ``lowering``: a :class:`Lowering`
    to use instead of analysing ``model`` (the CLI's cached analysis of a checkpoint; ``model`` may
    then be None). Returns an :class:`ExportSummary` (tensors and types, fallbacks, notes, checks,
    timings).
    """
    from graphtune.export.tokenizer import Vocab, build_vocab

    t0 = time.perf_counter()
    ft = _file_type(quant)
    if tokenizer is None:
        raise ExportError("a tokenizer is required: llama.cpp cannot load a GGUF without tokenizer.ggml.* metadata")
    low = lowering if lowering is not None else Lowering(model, merge_lora=merge_lora, capture_layers=capture_layers,
                                                         config=config, captured=captured, source=source)
    planned, fallbacks = low.plan(ft.name)
    t_plan = time.perf_counter()
    vocab = tokenizer if isinstance(tokenizer, Vocab) else build_vocab(tokenizer, low.spec.n_vocab)
    seconds = dict(low.seconds)
    seconds["tokenizer"] = time.perf_counter() - t_plan

    name_notes: list[str] = []
    gname = _model_name(model, name, vocab.tokens, name_notes)

    def set_kv(w: gguf.GGUFWriter) -> None:
        _general(w, gname, gguf.GGUFType.MODEL)
        low.family.set_gguf_parameters(w)
        w.add_file_type(int(ft.llama_file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.write(w)

    t_write = time.perf_counter()
    spec = write_gguf(Path(path), low.family.arch_name, set_kv, planned, progress=progress, device=device,
                      speculation=getattr(low.source, "prequantizer", None))
    seconds["write"] = time.perf_counter() - t_write
    seconds["total"] = time.perf_counter() - t0
    notes = list(low.family.notes) + list(vocab.notes) + name_notes
    if spec["from_memory"] or spec["on_disk"]:
        notes.append(f"{spec['from_memory'] + spec['on_disk']} of {len(planned)} tensors were quantized while the graph "
                     f"was captured ({spec['on_disk']} already written to the file, {spec['layout']} layout)")
    elif spec["reason"]:
        notes.append(f"speculative quantization not used: {spec['reason']}")
    for n in notes:
        logger.info("note: %s", n)
    return ExportSummary(
        path=Path(path), kind="model", family=low.family.name, arch=low.family.arch_name, file_type=ft.name,
        tensors=[TensorRecord(t.name, t.shape, t.qtype.name, t.nbytes, t.source, t.reason) for t in planned],
        fallbacks=fallbacks, notes=notes, checks=low.checks,
        vocab={"model": vocab.model, "pre": vocab.pre, "tokens": len(vocab.tokens), "add_bos": vocab.add_bos,
               "chat_template": bool(vocab.chat_template)},
        seconds=seconds,
    )


def to_gguf_adapter(model: torch.nn.Module, path: str | os.PathLike, *, dtype: str = "F32", progress: bool = False,
                    capture_layers: int | None = 2, name: str | None = None, captured: Any = None) -> ExportSummary:
    """Write the active LoRA adapter(s) of a peft model as a llama.cpp LoRA-adapter GGUF.

    Tensors ``<base name>.lora_a`` ``[r, in]`` and ``.lora_b`` ``[out, r]`` for every adapted
    projection, with the family's row fix-ups applied to B (Llama's q/k permutation, Gemma's q scale
    fold), ``adapter.lora.alpha`` such that llama.cpp's ``alpha / r`` equals peft's scaling. When
    layers use different scalings (or several adapters are active), each scaling is folded into B
    and alpha is 0 (llama.cpp then scales by 1). Apply with ``llama --lora`` / ``Llama(lora_path=)``
    to the GGUF of ``to_gguf(model, ..., merge_lora=False)``.
    """
    t0 = time.perf_counter()
    qt = gguf.GGMLQuantizationType[dtype.upper()]
    if qt not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16,
                  gguf.GGMLQuantizationType.Q8_0):
        raise ExportError(f"adapter dtype must be F32, F16, BF16 or Q8_0, not {dtype}")
    low = Lowering(model, merge_lora=False, capture_layers=capture_layers, captured=captured)
    fam, src = low.family, low.source
    adapted = [(r, n) for r, n in low.names() if r.part == "weight" and r.fqn in src.lora]
    if not adapted:
        raise ExportError("the model has no active, unmerged LoRA adapter on any exported projection")
    for fqn in src.lora:
        if fqn not in low.roles.params:
            raise ExportError(f"{fqn} carries a LoRA adapter but is not exported (no GGUF tensor to adapt)")
    uniform = {round(p.scaling * p.rank, 6) for r, _ in adapted for p in src.lora[r.fqn]}
    single = all(len(src.lora[r.fqn]) == 1 for r, _ in adapted)
    fold = not (single and len(uniform) == 1)
    alpha = 0.0 if fold else float(next(iter(uniform)))
    if any(p.embedding for r, _ in adapted for p in src.lora[r.fqn]):
        raise ExportError("LoRA on the token embedding is not supported in the adapter export")
    planned: list[PlannedTensor] = []

    def pair(r: ParamRole) -> tuple[torch.Tensor, torch.Tensor]:
        parts = src.lora[r.fqn]
        a = torch.cat([p.a.detach().float().cpu() for p in parts], 0)
        b = torch.cat([p.b.detach().float().cpu() * (p.scaling if fold else 1.0) for p in parts], 1)
        if parts[0].fan_in_fan_out:
            raise ExportError(f"{r.fqn}: fan_in_fan_out LoRA is not supported in the adapter export")
        return fam.transform(r.role, r.bid, "lora_a", a).contiguous(), fam.transform(r.role, r.bid, "lora_b", b).contiguous()

    for r, nm in adapted:
        ranks = sum(p.rank for p in src.lora[r.fqn])
        out_f, in_f = src.shape(r.fqn)
        planned.append(PlannedTensor(f"{nm}.lora_a", (ranks, in_f), qt, (lambda r=r: pair(r)[0]), r.fqn))
        planned.append(PlannedTensor(f"{nm}.lora_b", (out_f, ranks), qt, (lambda r=r: pair(r)[1]), r.fqn))
    for t in planned:
        if not quants.can_quantize(t.shape, t.qtype):
            t.reason = f"{t.name}: rows of {t.shape[-1]} cannot be {t.qtype.name} -> F32"
            t.qtype = gguf.GGMLQuantizationType.F32

    gname = _model_name(model, name, None, [])

    def set_kv(w: gguf.GGUFWriter) -> None:
        _general(w, gname, gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)

    write_gguf(Path(path), fam.arch_name, set_kv, planned, progress=progress)
    notes = list(fam.notes)
    if fold:
        notes.append("per-layer LoRA scalings folded into lora_b; adapter.lora.alpha = 0 (scale 1)")
    return ExportSummary(
        path=Path(path), kind="adapter", family=fam.name, arch=fam.arch_name, file_type=qt.name,
        tensors=[TensorRecord(t.name, t.shape, t.qtype.name, t.nbytes, t.source, t.reason) for t in planned],
        fallbacks=[t.reason for t in planned if t.reason], notes=notes, checks=low.checks,
        vocab={}, seconds={"total": time.perf_counter() - t0},
    )


__all__ = ["ExportSummary", "Lowering", "TensorRecord", "capture_graph", "to_gguf", "to_gguf_adapter", "write_gguf",
           "UnsupportedFamilyError", "ExportError"]

