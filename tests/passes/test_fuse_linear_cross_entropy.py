"""fuse_linear_cross_entropy on HF causal LMs: every family plain and LoRA (loss and all trainable
gradients vs eager, fp32 ≤ 1e-5; the logits output is the documented empty tensor), Gemma-2's softcap,
tied embeddings with full fine-tuning, gradient accumulation with ``num_items_in_batch``, and the
refusals (logits used elsewhere, no gradient, autocast) and non-matches (no labels)."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.loss.loss_utils import ForCausalLMLoss

import graphtune
from graphtune.tiny import FAMILIES, tiny_batch, tiny_model
from tests.conftest import rel_err

PASS = "fuse_linear_cross_entropy"
SHAPES = ((2, 8), (3, 11))  # the second has an odd sequence length


def _batch(b: int, s: int, *, masked: int = 3, vocab: int = 256, seed: int | None = None) -> dict[str, torch.Tensor]:
    batch = tiny_batch(b, s, vocab=vocab, seed=s if seed is None else seed)
    batch["labels"][0, :masked] = -100  # a prompt whose tokens are not trained on
    return batch


def _step(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), out.logits, grads


def _compare(ref, opt, batch, tol=1e-5) -> None:
    """Loss and every trainable gradient as eager; the fused graph's logits output is empty."""
    loss_ref, logits_ref, g_ref = _step(ref, batch)
    loss_opt, logits_opt, g_opt = _step(opt, batch)
    assert rel_err(loss_opt, loss_ref) <= tol, (loss_opt, loss_ref)
    assert g_opt.keys() == g_ref.keys()
    worst = max(g_ref, key=lambda n: rel_err(g_opt[n], g_ref[n]))
    assert rel_err(g_opt[worst], g_ref[worst]) <= tol, f"{worst}: {rel_err(g_opt[worst], g_ref[worst]):.3g}"
    assert tuple(logits_opt.shape) == (*logits_ref.shape[:-1], 0) and logits_opt.dtype == logits_ref.dtype


def _twins(family: str, *, lora: bool = False, **kw):
    # one decoder layer: the pass only touches the head, and capture time grows with depth
    kw.setdefault("num_hidden_layers", 1)
    ref, opt = tiny_model(family, lora=lora, **kw), tiny_model(family, lora=lora, **kw)
    ref.train()
    opt.train()
    return ref, opt


def _fused(report) -> object:
    return next(p for p in report.passes if p.name == PASS)


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_eager(family, lora):
    """The pass alone (the graph around it stays HF's), run eagerly, at the odd shape: one rewrite."""
    ref, opt = _twins(family, lora=lora)
    graphtune.optimize(opt, passes=[PASS], compiler="eager")
    _compare(ref, opt, _batch(*SHAPES[1]))
    fused = _fused(graphtune.last_report(opt))
    variant = "hf_mean_softcap" if family == "gemma2" else "hf_mean"  # Gemma-2: final_logit_softcapping=30
    assert fused.by_rewrite == {variant: 1} and fused.refused == []
    assert fused.sites == ["base_model.model.lm_head" if lora else "lm_head"]


def test_default_pipeline_aot_eager():
    """With every other pass and aot_autograd: the op's fake impl, saved gradients and flags hold."""
    ref, opt = _twins("llama", lora=True)
    graphtune.optimize(opt, compiler="aot_eager")
    _compare(ref, opt, _batch(2, 7, seed=3))
    report = graphtune.last_report(opt)
    assert report.counts[PASS] == 1
    # frozen lm_head under LoRA: dH only, no dW
    assert "'mean', None, True, False, False)" in report.graph_text


def test_tied_embeddings_full_finetune():
    """Gemma with tied embeddings, everything trainable: the op's dW adds to the embedding's gradient."""
    ref, opt = _twins("gemma", tie_word_embeddings=True)
    assert opt.lm_head.weight is opt.model.embed_tokens.weight
    graphtune.optimize(opt, passes=[PASS], compiler="aot_eager")
    for b, s in SHAPES:
        _compare(ref, opt, _batch(b, s))
    assert "'mean', None, True, True, False)" in graphtune.last_report(opt).graph_text
    assert len(opt.forward.captures) == 1  # batch and sequence stay dynamic through the op


@pytest.mark.parametrize("as_tensor", [True, False], ids=["tensor", "int"])
def test_gradient_accumulation_num_items_in_batch(as_tensor):
    """Two micro-batches with different numbers of trained tokens, each divided by the total
    (HF Trainer's ``num_items_in_batch``), sum to the gradients of one eager batch of both."""
    ref, opt = _twins("llama", lora=True)
    graphtune.optimize(opt, passes=[PASS], compiler="eager")
    a, b = _batch(2, 9, masked=2, seed=1), _batch(3, 9, masked=7, seed=2)
    b["labels"][2, 4:] = -100
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    # tokens that are trained on: labels shifted by one, the last position of each row dropped
    total = sum(int((m["labels"][:, 1:] != -100).sum()) for m in (a, b))
    assert int((a["labels"][:, 1:] != -100).sum()) != int((b["labels"][:, 1:] != -100).sum())
    loss_ref, _, g_ref = _step(ref, both)
    n_items = torch.tensor(total) if as_tensor else total
    loss_a, _, g_a = _step(opt, {**a, "num_items_in_batch": n_items})
    loss_b, _, g_b = _step(opt, {**b, "num_items_in_batch": n_items})
    assert rel_err(loss_a + loss_b, loss_ref) <= 1e-5
    for name in g_ref:
        assert rel_err(g_a[name] + g_b[name], g_ref[name]) <= 1e-5, name
    fused = _fused(graphtune.last_report(opt))
    assert fused.by_rewrite == {"hf_sum_over_tensor" if as_tensor else "hf_sum_over_number": 1}


class TinyLM(torch.nn.Module):
    """An embedding, an lm_head (with a bias, odd vocab) and HF's own ForCausalLMLoss; optionally
    something else reads the logits."""

    def __init__(self, vocab: int = 1000, hidden: int = 24, bias: bool = True, logits_used: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=bias)
        self.vocab, self.logits_used = vocab, logits_used

    def forward(self, input_ids, labels=None):
        logits = self.lm_head(torch.tanh(self.embed(input_ids)))
        loss = ForCausalLMLoss(logits, labels, self.vocab) if labels is not None else None
        if self.logits_used:
            loss = loss + 1e-3 * logits.float().pow(2).mean()  # an auxiliary z-loss reads the logits
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


def test_bias_and_odd_vocab():
    torch.manual_seed(0)
    ref = TinyLM()
    opt = TinyLM()
    opt.load_state_dict(ref.state_dict())
    graphtune.optimize(opt, passes=[PASS], compiler="aot_eager")
    for b, s in SHAPES:
        _compare(ref, opt, _batch(b, s, vocab=1000))
    assert "'mean', None, True, True, True)" in graphtune.last_report(opt).graph_text


def test_logits_used_elsewhere_is_refused_and_graph_unchanged():
    model = TinyLM(logits_used=True)
    batch = _batch(2, 8, vocab=1000)
    report = graphtune.explain(model, passes=[PASS], **batch)
    fused = _fused(report)
    assert fused.count == 0 and len(fused.refused) == 1
    assert fused.refused[0].site == "lm_head"
    assert "logits are used by" in fused.refused[0].reason and "besides the loss" in fused.refused[0].reason
    assert report.graph_text == graphtune.explain(model, passes=[], **batch).graph_text
    assert [(u.module, u.reason) for u in report.unmatched] == [("lm_head", fused.refused[0].reason)]


def test_eval_and_no_labels_keep_real_logits():
    """Training batch -> fused, empty logits; no gradient (evaluation) -> refused, real logits;
    no labels -> no loss, nothing to match, real logits. Each is its own captured graph."""
    opt = tiny_model("qwen2", num_hidden_layers=1)
    graphtune.optimize(opt, passes=[PASS], compiler="eager")
    batch = _batch(2, 8)
    assert opt(**batch).logits.shape == (2, 8, 0)
    with torch.no_grad():
        assert opt(**batch).logits.shape == (2, 8, 256)
    assert opt(input_ids=batch["input_ids"]).logits.shape == (2, 8, 256)
    train, evaluation, no_labels = (_fused(c.report) for c in opt.forward.captures)
    assert train.count == 1 and train.refused == []
    assert evaluation.count == 0 and "no gradient flows" in evaluation.refused[0].reason
    assert no_labels.count == 0 and no_labels.refused == [] and opt.forward.captures[2].report.unmatched == []


def test_autocast_dtype_mismatch_is_refused():
    model = TinyLM()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = graphtune.explain(model, passes=[PASS], **_batch(2, 8, vocab=1000))
    fused = _fused(report)
    assert fused.count == 0 and "differ in dtype" in fused.refused[0].reason, report.summary()
