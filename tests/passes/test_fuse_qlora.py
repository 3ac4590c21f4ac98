"""fuse_qlora on bitsandbytes-4-bit peft models vs peft eager on the SAME quantized weights.

Models are one-layer tiny configs of every family (a capture costs ~10 s of CPU per layer-ish; one
layer holds every projection kind), loaded through transformers' ``BitsAndBytesConfig`` (the real
QLoRA path: peft wraps them in its ``bnb.Linear4bit``), with the MLP re-quantized in another format so
that one capture covers two: NF4 + double quant (blocksize 64) for attention and FP4 (blocksize 128)
for the MLP here, FP4 + double quant and NF4 (blocksize 128) in the aot_autograd test. LoRA r=8 on
every projection, fp32 compute; the input embeddings are trainable so their gradient checks ``dx``
through the 4-bit projections. Tolerance: fp32, relative error <= 1e-5 on loss, logits and all
trainable grads.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

import transformers as tf  # noqa: E402

import graphtune  # noqa: E402
from graphtune.passes.fuse_qlora import resolve_bnb_4bit  # noqa: E402
from graphtune.tiny import DEFAULT_LORA_TARGETS, FAMILIES, LORA_TARGETS, randomize_lora_b, tiny_batch, tiny_model  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.helpers import batches, compare_step  # noqa: E402

# the passes family detection reads, and ours (the default pipeline is checked separately)
PASSES = ["fuse_qlora", "fuse_rms_norm", "fuse_rope", "fuse_swiglu", "fuse_geglu"]
MIXED = (("nf4", True, 64), ("fp4", False, 128))  # (quant_type, double quant, blocksize) of attention, MLP


# Every projection's in_features (hidden, ffn, heads x head_dim) a multiple of the largest blocksize used
# here (256), so that no 4-bit block spans two rows. Why: the reference is peft eager on bitsandbytes, whose
# 0.50.2 CPU dequantization is wrong for such blocks on AVX-512 hosts (graphtune's is not; the row-spanning
# case is covered against bitsandbytes' flat call in tests/kernels/test_dequant_4bit.py).
QLORA_SIZES = dict(hidden_size=256, intermediate_size=512)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> a saved tiny checkpoint (from_pretrained is what quantizes)."""
    paths = {}

    def get(family: str):
        if family not in paths:
            paths[family] = tmp_path_factory.mktemp(family)
            tiny_model(family, num_hidden_layers=1, **QLORA_SIZES).save_pretrained(paths[family])
        return paths[family]

    return get


def _requantize(module, quant_type: str, double_quant: bool, blocksize: int, quant_storage=torch.uint8) -> None:
    dense = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    module.weight = bnb.nn.Params4bit(
        dense, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant, blocksize=blocksize,
        quant_storage=quant_storage, module=module,
    ).to(dense.device)


def _lora(model, family, lora_dropout=0.0, train_embeddings=True):
    torch.manual_seed(0)
    targets = LORA_TARGETS.get(family, DEFAULT_LORA_TARGETS)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout, target_modules=targets))
    randomize_lora_b(model, 1)
    model.get_input_embeddings().weight.requires_grad_(train_embeddings)
    model.train()
    return model


def qlora_model(path, family, *, formats=MIXED, compute_dtype=torch.float32, model_dtype=torch.float32, **lora_kw):
    """transformers' 4-bit load of ``path`` in the attention format, the MLP re-quantized in the other."""
    (quant_type, double_quant, _), mlp_format = formats
    config = tf.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = tf.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=model_dtype)
    if formats[0] != (quant_type, double_quant, 64):  # transformers always quantizes in blocks of 64
        raise ValueError("the attention format's blocksize must be 64")
    for layer in model.model.layers:
        for m in layer.mlp.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                _requantize(m, *mlp_format)
    return _lora(model, family, **lora_kw)


def manual_qlora_model(family, *, quant_type="fp4", double_quant=True, blocksize=256, quant_storage=torch.bfloat16):
    """nn.Linear -> bnb.nn.Linear4bit by hand: peft then wraps them in its generic ``lora.Linear``."""
    model = tiny_model(family, num_hidden_layers=1, **QLORA_SIZES)
    for module in list(model.model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=torch.float32)
                q.weight = bnb.nn.Params4bit(
                    child.weight.data.clone(), requires_grad=False, quant_type=quant_type, compress_statistics=double_quant,
                    blocksize=blocksize, quant_storage=quant_storage, module=q,
                )
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(module, name, q.to("cpu"))  # quantizes
    return _lora(model, family)


def _projections(family: str) -> int:
    return 4 if family == "phi3" else 7  # one layer: q, k, v, o, gate, up, down; Phi-3 fuses qkv and gate_up


def _check_report(report, family: str, rewrite: str = "peft_bnb_linear4bit") -> None:
    qlora = next(p for p in report.passes if p.name == "fuse_qlora")
    assert qlora.by_rewrite == {rewrite: _projections(family)}, report.summary()
    assert report.family == family, report.family_reason
    assert report.unmatched == [] and report.warnings == [], report.summary()
    assert not any(p.refused for p in report.passes), report.summary()
    assert "torch.ops.graphtune.lora_linear_4bit" in report.graph_text
    for gone in ("gemm_4bit", "autograd_function_apply", "dequantize_4bit"):
        assert gone not in report.graph_text, gone


# ----------------------------------------------------------------------------------------------
# Equivalence with peft eager
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_families_match_peft_eager(family, checkpoint):
    """Every family: NF4+double-quant layer and FP4 layer, loss / logits / LoRA and embedding grads."""
    ref, opt = qlora_model(checkpoint(family), family), qlora_model(checkpoint(family), family)
    graphtune.optimize(opt, passes=PASSES, compiler="eager")  # the rewritten graph, run by autograd
    compare_step(ref, opt, tiny_batch(2, 9))
    _check_report(graphtune.last_report(opt), family)


def test_aot_autograd_two_shapes_frozen_embeddings(checkpoint):
    """aot_autograd (fake tensors, functionalized backward), the other two formats, and frozen
    embeddings: layer 0's q/k/v inputs need no grad, so bitsandbytes records a bare ``gemm_4bit``
    there (no autograd function) -- also rewritten."""
    formats = (("fp4", True, 64), ("nf4", False, 128))
    ref = qlora_model(checkpoint("llama"), "llama", formats=formats, train_embeddings=False)
    opt = qlora_model(checkpoint("llama"), "llama", formats=formats, train_embeddings=False)
    # without fuse_qlora: un-rewritten 4-bit projections still count as projections for family detection
    before = graphtune.explain(opt, passes=["fuse_rms_norm", "fuse_rope", "fuse_swiglu"], **tiny_batch())
    assert before.family == "llama", before.family_reason
    assert before.graph_text.count("call_function torch.ops.bitsandbytes.gemm_4bit") == 3
    assert before.graph_text.count("call_function torch.ops.higher_order.autograd_function_apply") == 4
    graphtune.optimize(opt, passes=PASSES, compiler="aot_eager")
    for batch in batches():
        compare_step(ref, opt, batch)
    assert len(opt.forward.captures) == 1
    _check_report(graphtune.last_report(opt), "llama")


def test_default_pipeline_with_dropout_uses_peft_mask(checkpoint):
    """The default pipeline (family detection included) and lora_dropout > 0: the op reads peft's
    dropout node; same seed, same mask, same loss and grads."""
    ref = qlora_model(checkpoint("qwen2"), "qwen2", lora_dropout=0.3)
    opt = qlora_model(checkpoint("qwen2"), "qwen2", lora_dropout=0.3)
    graphtune.optimize(opt, compiler="eager")
    batch = tiny_batch(2, 9)
    torch.manual_seed(123)
    out_ref = ref(**batch)
    torch.manual_seed(123)
    out_opt = opt(**batch)
    out_ref.loss.backward()
    out_opt.loss.backward()
    report = graphtune.last_report(opt)
    assert report.family == "qwen2", report.family_reason
    assert report.counts["fuse_qlora"] == 7 and report.counts["fuse_lora"] == 0, report.summary()
    assert report.warnings == [], report.summary()
    assert rel_err(out_opt.loss, out_ref.loss) <= 1e-5
    for (name, a), (_, b) in zip(opt.named_parameters(), ref.named_parameters()):
        if b.requires_grad:
            assert rel_err(a.grad, b.grad) <= 1e-5, name


def test_peft_linear_over_hand_quantized_linear4bit():
    """bnb.nn.Linear4bit swapped in by hand (peft's generic ``lora.Linear`` on top), bf16 quant_storage,
    blocksize 256, q/k/v biases (Qwen-2): the second pattern."""
    ref, opt = manual_qlora_model("qwen2"), manual_qlora_model("qwen2")
    graphtune.optimize(opt, passes=PASSES, compiler="eager")
    compare_step(ref, opt, tiny_batch(3, 7))
    _check_report(graphtune.last_report(opt), "qwen2", rewrite="peft_linear_over_linear4bit")


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------
def _qlora_result(report):
    return next(p for p in report.passes if p.name == "fuse_qlora")


def test_compute_dtype_differing_from_lora_dtype_is_refused(checkpoint):
    """bnb_4bit_compute_dtype=bf16 under an fp32 model and fp32 LoRA: bitsandbytes casts x to bf16 for
    the base only; the op (one compute dtype) refuses, and every site is reported. The refused
    projections stay bitsandbytes nodes, whose q/k/v biases family detection still finds (Qwen-2)."""
    model = qlora_model(checkpoint("qwen2"), "qwen2", compute_dtype=torch.bfloat16)
    # bitsandbytes casts the bias by assigning ``bias.data`` on the first call, which dynamo cannot
    # trace (a graph break, whatever graphtune does); later calls find it cast
    model(**tiny_batch())
    report = graphtune.explain(model, passes=PASSES, **tiny_batch())
    result = _qlora_result(report)
    assert result.count == 0 and len(result.refused) == 7
    assert all("differ in dtype" in r.reason for r in result.refused), result.refused[0].reason
    unmatched = [u for u in report.unmatched if u.expected_pass == "fuse_qlora"]
    assert len(unmatched) == 7 and "differ in dtype" in unmatched[0].reason
    assert report.family == "qwen2", report.family_reason


def test_bf16_model_with_fp32_adapters_is_fused(checkpoint):
    """The usual QLoRA setup: bf16 model and compute dtype, peft's fp32 adapters (autocast_adapter_dtype).
    peft casts x to fp32 for the adapters and their output back to bf16 before the add; the op does the
    same, so loss and LoRA grads match eager to bf16 rounding."""
    ref = qlora_model(checkpoint("llama"), "llama", compute_dtype=torch.bfloat16, model_dtype=torch.bfloat16)
    opt = qlora_model(checkpoint("llama"), "llama", compute_dtype=torch.bfloat16, model_dtype=torch.bfloat16)
    assert {p.dtype for n, p in opt.named_parameters() if "lora_" in n} == {torch.float32}
    batch = tiny_batch(2, 9)
    for m in (ref, opt):
        m(**batch)  # bitsandbytes casts its bias / state on the first eager call (see below)
        m.zero_grad(set_to_none=True)
    graphtune.optimize(opt, passes=PASSES, compiler="eager")
    out_ref, out = ref(**batch), opt(**batch)
    out_ref.loss.backward()
    out.loss.backward()
    assert _qlora_result(graphtune.last_report(opt)).count == _projections("llama")
    assert rel_err(out.loss, out_ref.loss) <= 1e-2
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), opt.named_parameters()):
        if p_ref.requires_grad and "lora_" in name:
            assert rel_err(p.grad, p_ref.grad) <= 3e-2, name


def test_trainable_packed_weight_is_refused():
    """A float ``quant_storage`` lets the packed weight require grad; the op gives it none: refuse."""
    model = manual_qlora_model("llama", quant_storage=torch.float32)
    model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.requires_grad_(True)
    report = graphtune.explain(model, passes=["fuse_qlora"], **tiny_batch())
    result = _qlora_result(report)
    assert result.count == 6 and len(result.refused) == 1, report.summary()
    assert result.refused[0].site.endswith("layers.0.mlp.up_proj")
    assert "requires grad" in result.refused[0].reason


def _graph(fn) -> fx.Graph:
    return fx.symbolic_trace(fn).graph


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.op == "output").args[0]


@pytest.mark.parametrize(
    "fn, reason",
    [
        # a quant type bitsandbytes does not have
        (lambda x, b, absmax: torch.ops.bitsandbytes.gemm_4bit.default(x, b, [8, 16], absmax, 64, "int4"), "quant_type 'int4'"),
        # a blocksize outside bitsandbytes' set
        (lambda x, b, absmax: torch.ops.bitsandbytes.gemm_4bit.default(x, b, [8, 16], absmax, 48, "nf4"), "blocksize 48"),
        # the weight shape computed at run time
        (lambda x, b, absmax: torch.ops.bitsandbytes.gemm_4bit.default(x, b, [x.shape[0], 16], absmax, 64, "nf4"), "not a literal"),
        # double-quantized absmax without its code and offset
        (lambda x, b, absmax: torch.ops.bitsandbytes.gemm_4bit.default(x, b, [8, 16], absmax, 64, "nf4", absmax_8bit=absmax), "without its code"),
        # a plain linear
        (lambda x, b, absmax: torch.nn.functional.linear(x, b), "not a bitsandbytes 4-bit dequantization"),
        # nested absmax in blocks other than 256 (bitsandbytes < 0.50 spelling)
        (
            lambda x, b, absmax: torch.nn.functional.linear(x, torch.ops.bitsandbytes.dequantize_4bit.default(
                b, operator.iadd(torch.ops.bitsandbytes.dequantize_blockwise.default(b, absmax, absmax, 128, torch.float32), absmax),
                64, "nf4", [8, 16], torch.float32)),
            "blocksize 128",
        ),
        # bitsandbytes < 0.50 dequantizing to fp16, then casting
        (
            lambda x, b, absmax: torch.nn.functional.linear(x, torch.ops.bitsandbytes.dequantize_4bit.default(
                b, absmax, 64, "nf4", [8, 16], torch.float16).t().to(torch.float32).t()),
            "two roundings",
        ),
    ],
    ids=["quant_type", "blocksize", "shape", "nested_incomplete", "plain_linear", "nested_blocksize", "double_rounding"],
)
def test_unsupported_quant_states_are_refused_with_a_reason(fn, reason):
    got = resolve_bnb_4bit(_output_node(_graph(fn)))
    assert isinstance(got, str) and reason in got, got


def test_resolver_reads_both_bitsandbytes_spellings():
    """bitsandbytes >= 0.50 (gemm_4bit with the nested absmax as arguments) and < 0.50 (linear over
    dequantize_4bit with dequantize_blockwise + offset): the same operands come out."""

    def new(x, b, absmax_u8, absmax2, code2, offset):
        return torch.ops.bitsandbytes.gemm_4bit.default(
            x, b.view(-1, 1), [8, 16], absmax2, 64, "fp4", bias=None, absmax_8bit=absmax_u8, absmax_code=code2, absmax_offset=offset
        )

    def old(x, b, absmax_u8, absmax2, code2, offset):
        absmax = operator.iadd(torch.ops.bitsandbytes.dequantize_blockwise.default(absmax_u8, absmax2, code2.to("cpu"), 256, torch.float32), offset)
        w = torch.ops.bitsandbytes.dequantize_4bit.default(b.t(), absmax, 64, "fp4", [8, 16], torch.float32)
        return torch.nn.functional.linear(x, w.t().to(torch.float32).t(), None)

    for fn in (new, old):
        graph = _graph(fn)
        ph = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        call = resolve_bnb_4bit(_output_node(graph))
        assert not isinstance(call, str), call
        assert (call.x, call.packed, call.absmax, call.absmax2, call.code2, call.offset) == tuple(
            ph[k] for k in ("x", "b", "absmax_u8", "absmax2", "code2", "offset")
        )
        assert (call.out_features, call.in_features, call.blocksize, call.quant_type) == (8, 16, 64, "fp4")


def test_cuda_default_refuses_mixed_precision_with_its_reason(checkpoint):
    """default_passes("cuda") leaves peft's fp32 adapters on a bf16 compute dtype to bitsandbytes + the compiler
    (the LoRA op was measured slower there); every projection is refused with that reason, none silently."""
    from graphtune.passes.fuse_qlora import MIXED_PRECISION_LEFT_TO_COMPILER, FuseQLoRA

    model = qlora_model(checkpoint("llama"), "llama", compute_dtype=torch.bfloat16, model_dtype=torch.bfloat16)
    model(**tiny_batch(2, 9))
    report = graphtune.explain(model, passes=[FuseQLoRA(fuse_mixed_precision=False)], **tiny_batch(2, 9))
    result = _qlora_result(report)
    assert result.count == 0
    assert len({r.site for r in result.refused}) == _projections("llama")
    assert {r.reason for r in result.refused} == {MIXED_PRECISION_LEFT_TO_COMPILER}


def test_matmul4bit_body_output_nesting():
    """bitsandbytes' MatMul4Bit body returns its output first, then what it saves; torch 2.13 nests it as
    ((out,), saved...), torch 2.11 differently. The resolver reads the first output leaf, so a flat
    (out, saved...) resolves to the same operands, and a body whose first leaf is not the 4-bit call is refused."""
    from graphtune.capture import capture

    model = manual_qlora_model("llama")
    batch = tiny_batch(2, 9)
    captured, _ = capture(model, type(model).forward.__get__(model), (), batch, [])
    gm = captured.gm
    afa = next(n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == "autograd_function_apply")
    base = next(u for u in afa.users if u.target is operator.getitem and u.args[1] == 0)
    expected = resolve_bnb_4bit(base)
    assert not isinstance(expected, str), expected
    body = getattr(gm, afa.args[0].target)
    out_node = next(n for n in body.graph.nodes if n.op == "output")
    result = out_node.args[0]
    assert isinstance(result[0], (tuple, list)) and len(result[0]) == 1  # torch 2.13's nesting
    out_node.args = ((result[0][0], *result[1:]),)  # the flat nesting
    flat = resolve_bnb_4bit(base)
    assert not isinstance(flat, str), flat
    assert (flat.x, flat.packed, flat.absmax, flat.out_features, flat.blocksize) == (
        expected.x, expected.packed, expected.absmax, expected.out_features, expected.blocksize)
    first_input = next(n for n in body.graph.nodes if n.op == "placeholder")
    out_node.args = ((first_input, *result[1:]),)  # first leaf is not the 4-bit call: refused, not guessed
    assert isinstance(resolve_bnb_4bit(base), str)
