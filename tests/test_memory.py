"""memory_budget: parsing, the keep / recompute / offload ladder, numerics against eager, HF checkpointing.

Compiles are the slow part on a CPU, so each model is captured once (graphtune.optimize with a
recording compiler: the rewritten dynamo graph and its inputs) and then compiled once per budget
through the policy, which is what ``optimize(memory_budget=...)`` does after capture.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx as fx

import graphtune
import graphtune.memory as memory
from graphtune.memory import MemoryBudget, MemoryPolicy, parse_budget
from graphtune.tiny import tiny_batch, tiny_model
from tests.conftest import rel_err

# 4 layers give the ladder room for intermediate plans; a narrow MLP and no KV-cache outputs keep
# the layers' working set small next to the layer inputs, so that offloading them lowers the
# estimated peak as it does on real models (where the head's logits set the peak at the start of
# the backward, when every layer input is resident unless offloaded)
CFG = dict(num_hidden_layers=4, intermediate_size=64, vocab_size=256, use_cache=False)
CFG2 = dict(CFG, num_hidden_layers=2)  # end-to-end tests through optimize(): capture is the slow part
BATCH = dict(batch=2, seq=16, vocab=256)
# the committed passes: the policy does not depend on which rewrites ran, and this keeps the test
# independent of passes still in development
PASSES = ["fuse_lora", "fuse_rms_norm", "fuse_rope", "fuse_swiglu", "fuse_geglu", "dispatch_attention"]


@pytest.fixture(autouse=True, scope="module")
def _offload_on_cpu():
    """On CPU "offloading" is a copy; allow it (and for tiny tensors) so the ops and the plan are exercised."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memory, "OFFLOAD_CPU_TENSORS", True)
        mp.setattr(memory, "OFFLOAD_MIN_BYTES", 0)
        yield


# -- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, fraction, nbytes",
    [(0.5, 0.5, None), (1, 1.0, None), (0, 0.0, None), ("60%", 0.6, None), (" 100 % ", 1.0, None),
     ("4GiB", None, 4 * 2**30), ("1.5 GB", None, 1_500_000_000), ("512MiB", None, 512 * 2**20), ("2048kb", None, 2_048_000)],
)
def test_parse_budget(value, fraction, nbytes):
    b = parse_budget(value)
    assert (b.fraction, b.nbytes, b.plan) == (fraction, nbytes, None)


@pytest.mark.parametrize("value", ["checkpoint", " Offload "])
def test_parse_named_plans(value):
    b = parse_budget(value)
    assert b.plan == value.strip().lower() and b.fraction is None and b.target(1000) is None


def test_parse_budget_none_is_none():
    assert parse_budget(None) is None


@pytest.mark.parametrize(
    "value, error, match",
    [
        (4, ValueError, "memory_budget='4GiB'"),  # a bare number > 1 is not a size
        (1.5, ValueError, r"\[0, 1\]"),
        (-0.1, ValueError, r"\[0, 1\]"),
        (float("nan"), ValueError, r"\[0, 1\]"),
        ("150%", ValueError, "between 0% and 100%"),
        ("4 parsecs", ValueError, "unknown unit"),
        ("lots", ValueError, "not a percentage"),
        ("0GiB", ValueError, "positive"),
        (True, TypeError, "bool"),
        ([1], TypeError, "list"),
    ],
)
def test_parse_budget_errors(value, error, match):
    with pytest.raises(error, match=match):
        parse_budget(value)


def test_target_bytes():
    assert MemoryBudget(fraction=0.25).target(1000) == 250  # of the free device memory
    assert MemoryBudget(nbytes=123).target(1000) == 123


def test_free_device_memory_and_auto_default():
    assert memory.free_device_memory(torch.device("cpu")) > 0
    assert memory.resolve_default_budget("auto", torch.device("cuda")) == memory.AUTO_FRACTION
    assert memory.resolve_default_budget("auto", torch.device("cpu")) is None
    assert memory.resolve_default_budget(" Auto ", None) is None
    assert memory.resolve_default_budget("4GiB", torch.device("cuda")) == "4GiB"
    assert memory.resolve_default_budget("auto", torch.device("cuda"), aot_compiler=False) is None
    assert memory.resolve_default_budget("auto", torch.device("cuda"), hf_checkpointing=True) is None
    model = graphtune.optimize(tiny_model("llama"), compiler="aot_eager")  # CPU: "auto" bounds nothing
    assert model.forward.memory.budget is None


def test_optimize_validates_budget_and_compiler():
    with pytest.raises(ValueError, match="'4GiB'"):
        graphtune.optimize(tiny_model("llama"), compiler="aot_eager", memory_budget=4)
    with pytest.raises(ValueError, match="needs compiler 'inductor' or 'aot_eager'"):
        graphtune.optimize(tiny_model("llama"), compiler="eager", memory_budget=0.5)


# -- offload ops -------------------------------------------------------------------------------


def test_offload_ops_round_trip_on_cpu():
    x = torch.randn(3, 5)
    host = torch.ops.graphtune.offload(x)
    torch.ops.graphtune.offload_wait(host, x, None)
    back = torch.ops.graphtune.prefetch(host, x.device)
    torch.ops.graphtune.prefetch_wait(back, None)
    assert back.data_ptr() != x.data_ptr()
    torch.testing.assert_close(back, x, rtol=0, atol=0)


def test_offload_ops_pass_opcheck():
    x = torch.randn(4, 6)
    torch.library.opcheck(torch.ops.graphtune.offload.default, (x,))
    torch.library.opcheck(torch.ops.graphtune.prefetch.default, (x.clone(), x.device))
    torch.library.opcheck(torch.ops.graphtune.offload_wait.default, (x.clone(), x, None))
    torch.library.opcheck(torch.ops.graphtune.prefetch_wait.default, (x.clone(), None))


# -- the ladder on captured graphs -------------------------------------------------------------


class Captured:
    """One tiny LoRA model captured and rewritten once, compiled per budget, compared with eager."""

    def __init__(self, family: str):
        self.model = tiny_model(family, lora=True, **CFG)
        self.model.train()
        graphs: list[tuple[fx.GraphModule, list]] = []

        def record(gm, example_inputs):
            graphs.append((gm, list(example_inputs)))
            return gm.forward

        batch = tiny_batch(**BATCH)
        graphtune.optimize(self.model, compiler=record, passes=PASSES)
        self.model(**batch)
        gm, inputs = graphs[-1]
        self.gm = gm
        # the dynamo graph takes symbolic sizes as inputs: at run time they are the batch's ints
        self.args = [int(a) if isinstance(a, torch.SymInt) else a for a in inputs]
        names = [getattr(o, "name", "") for o in gm.graph.find_nodes(op="output")[0].args[0]]
        self.loss_index = next(i for i, n in enumerate(names) if "loss" in n)
        ref = tiny_model(family, lora=True, **CFG)
        ref.train()
        out = ref(**batch)
        out.loss.backward()
        self.ref_loss = out.loss.detach()
        self.ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}

    def compile(self, budget, compiler: str = "aot_eager"):
        """A fraction is of the free device memory; here that memory is pinned to the default plan's
        activation peak, so ``1.0`` is the partitioner's default and ``0.0`` the smallest plan."""
        free = self.default_peak()
        policy = MemoryPolicy(parse_budget(budget))
        gm = fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(memory, "free_device_memory", lambda device: free)
            fn = policy.compile(gm, self.args, compiler)
        return policy, fn

    def default_peak(self) -> int:
        if not hasattr(self, "_default_peak"):
            policy = MemoryPolicy(parse_budget("1TiB"))  # fits: the partitioner's default plan
            policy.compile(fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph)), self.args, "aot_eager")
            self._default_peak = policy.last.default_estimate.peak
        return self._default_peak

    def check_numerics(self, fn, tol: float = 1e-5) -> None:
        self.model.zero_grad(set_to_none=True)
        outs = fn(*self.args)
        loss = outs[self.loss_index]
        loss.backward()
        assert rel_err(loss, self.ref_loss) <= tol
        grads = {n: p.grad for n, p in self.model.named_parameters() if p.requires_grad}
        assert grads.keys() == self.ref_grads.keys()
        for name, g in grads.items():
            assert g is not None, name
            assert rel_err(g, self.ref_grads[name]) <= tol, name


@pytest.fixture(scope="module")
def llama():
    return Captured("llama")


@pytest.fixture(scope="module")
def gemma2():
    return Captured("gemma2")


def _targets(gm: fx.GraphModule, op) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is op)


BUDGETS = (1.0, 0.75, 0.5, 0.4, 0.0)


@pytest.fixture(scope="module")
def llama_ladder(llama):
    """budget -> (decision, compiled fn), aot_eager, compiled once for the module."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in BUDGETS:
            policy, fn = llama.compile(b)
            out[b] = (policy.last, fn)
    return out


def test_shrinking_budget_keeps_then_recomputes_then_offloads(llama_ladder):
    decisions = [llama_ladder[b][0] for b in BUDGETS]
    assert decisions[0].plan == "keep (partitioner default)" and not decisions[0].checkpointed
    saved = [d.estimate.saved_bytes for d in decisions]
    peaks = [d.estimate.peak for d in decisions]
    assert saved == sorted(saved, reverse=True), saved  # monotone non-increasing as the budget shrinks
    assert peaks == sorted(peaks, reverse=True), peaks
    assert saved[-1] < saved[0] / 4 and peaks[-1] < peaks[0] / 2
    n_ckpt = [len(d.checkpointed) for d in decisions]
    assert n_ckpt == sorted(n_ckpt) and 0 < n_ckpt[1] < 4 and n_ckpt[-1] == 4, n_ckpt  # 75%: some layers
    # recomputed layers rerun their forward ops in the backward
    rec = [d.recomputed_ops for d in decisions]
    assert rec[0] < rec[1] < rec[2] and rec == sorted(rec)
    # a budget the ladder can meet is met; below the smallest plan, the smallest plan is used
    smallest = decisions[-1].estimate.peak
    for b, d in zip(BUDGETS, decisions):
        if d.target_bytes >= smallest:
            assert d.fits and d.estimate.peak <= d.target_bytes, (b, d.summary())
    # only the smallest budgets offload: layer inputs on the host, offload/prefetch ops in the graphs
    offloading = [bool(d.offloaded) for d in decisions]
    assert offloading == [False, False, False, True, True], [d.plan for d in decisions]
    for d in decisions:
        n = len(d.offloaded)
        assert d.estimate.offloaded_bytes > 0 if n else d.estimate.offloaded_bytes == 0
        fw, bw = d.forward_graph, d.backward_graph
        assert _targets(fw, memory._OFFLOAD) == n and _targets(fw, memory._OFFLOAD_WAIT) == n
        assert _targets(bw, memory._PREFETCH) == n and _targets(bw, memory._PREFETCH_WAIT) == n
    # what is offloaded are layer inputs: the embedding output and residual-stream adds
    assert decisions[-1].offloaded[0] == "embedding"
    assert all(name.startswith(("embedding", "add")) for name in decisions[-1].offloaded)


@pytest.mark.parametrize("family, compiler, per_layer", [
    ("llama", "aot_eager", 3),  # swiglu and the two norms
    # geglu and the two norms whose outputs a backward reads (the post-attention / post-MLP norms feed
    # only residual adds, so nothing of theirs is saved to recompute)
    pytest.param("gemma2", "inductor", 3, marks=pytest.mark.slow),
])
def test_first_rung_recomputes_only_the_cheap_products(family, compiler, per_layer, request):
    """Just below the default plan's peak, no layer is recomputed: only each layer's GLU product and
    RMSNorm outputs rerun in the backward (their inputs are saved anyway), and the numbers match eager."""
    cap = request.getfixturevalue(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy, fn = cap.compile(0.95, compiler=compiler)
    cap.check_numerics(fn)  # (inductor compiles the backward here)
    d = policy.last
    assert not d.checkpointed and not d.offloaded
    assert d.plan == "recompute the GLU products and norm outputs of 4 layers"
    assert d.estimate.saved_bytes < d.default_estimate.saved_bytes and d.estimate.peak <= d.target_bytes
    rerun = [n for n in d.backward_graph.graph.nodes if n.op == "call_function" and memory._cheap_to_recompute(n)]
    assert len(rerun) == 4 * per_layer
    if compiler == "aot_eager":
        assert d.recomputed_ops == 4 * per_layer  # nothing else reruns


def test_offload_and_prefetch_are_placed_around_the_uses(llama_ladder):
    d = llama_ladder[0.0][0]
    fw, bw = d.forward_graph, d.backward_graph
    order = {n: i for i, n in enumerate(fw.graph.nodes)}
    offloads = [n for n in fw.graph.nodes if n.target is memory._OFFLOAD]
    for i, off in enumerate(offloads):
        src = off.args[0]
        assert order[off] == order[src] + 1  # copy starts as soon as the tensor exists
        (wait,) = [u for u in off.users if u.target is memory._OFFLOAD_WAIT and u.args[0] is off]
        assert wait.args[1] is src  # keeps the device tensor alive until the copy is done
        if i + 1 < len(offloads):
            assert wait.args[2] is offloads[i + 1] and order[wait] > order[offloads[i + 1]]
    border = {n: i for i, n in enumerate(bw.graph.nodes)}
    prefetches = [n for n in bw.graph.nodes if n.target is memory._PREFETCH]
    first_use = []
    for p in prefetches:
        waits = [u for u in p.users if u.target is memory._PREFETCH_WAIT and u.args[0] is p]
        assert len(waits) == 1
        readers = [u for u in p.users if u.target is not memory._PREFETCH_WAIT]
        assert readers and border[waits[0]] < min(border[u] for u in readers)
        assert p.args[0].op == "placeholder" and p.args[0].meta.get("graphtune_offloaded")
        first_use.append(min(border[u] for u in readers))
    # each prefetch (after the first) is issued before the previous offloaded tensor's first use
    by_use = sorted(zip(first_use, prefetches), key=lambda t: t[0])
    for (use_a, _), (_, pb) in zip(by_use, by_use[1:]):
        assert border[pb] < use_a


@pytest.mark.parametrize("budget", BUDGETS)
def test_llama_every_budget_matches_eager(llama, llama_ladder, budget):
    llama.check_numerics(llama_ladder[budget][1])


@pytest.mark.parametrize("budget", [0.0])
def test_gemma2_matches_eager(gemma2, budget):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy, fn = gemma2.compile(budget)
    assert policy.last.checkpointed
    gemma2.check_numerics(fn)


def test_named_plans(llama, llama_ladder):
    """'checkpoint' = every layer recomputed (HF's plan); 'offload' = that + every layer input on the host."""
    ckpt, _ = llama.compile("checkpoint")
    off, fn = llama.compile("offload")
    assert len(ckpt.last.checkpointed) == 4 and not ckpt.last.offloaded
    assert off.last.checkpointed == ckpt.last.checkpointed
    assert off.last.offloaded == ["embedding", "add_2", "add_4", "add_6"]  # the 4 layer inputs
    assert off.last.estimate.saved_bytes < ckpt.last.estimate.saved_bytes
    llama.check_numerics(fn)


def test_too_small_budget_warns_and_uses_the_smallest_plan(llama, llama_ladder):
    with pytest.warns(UserWarning, match="below the smallest plan"):
        policy, _ = llama.compile("1KiB")
    assert policy.last.estimate.peak == llama_ladder[0.0][0].estimate.peak
    assert policy.last.target_bytes == 1024  # a size is absolute
    assert not policy.last.fits and llama_ladder[0.0][0].fits  # 0 asks for the smallest: no warning


@pytest.mark.slow
@pytest.mark.parametrize("family, budget", [("llama", 0.0), ("gemma2", 0.5)])
def test_inductor_with_budget_matches_eager(family, budget, request, caplog):
    from torch._inductor.utils import run_and_get_code

    cap = request.getfixturevalue(family)

    def compile_and_check():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            policy, fn = cap.compile(budget, compiler="inductor")
        cap.check_numerics(fn)  # the backward compiles lazily, inside this call
        return policy

    from torch._dynamo.utils import counters

    counters["inductor"].clear()
    policy, code = run_and_get_code(compile_and_check)
    code = "\n".join(code)
    assert policy.last.checkpointed
    # the partitioner pickles to its uuid for the FX graph cache's key (this graph, compiled outside
    # dynamo, is bypassed for having no shape env, but after the key was pickled)
    assert "Failed to pickle cache key" not in caplog.text
    if policy.last.offloaded:  # the offload ops survive inductor's passes, in both graphs
        for op in ("offload", "offload_wait", "prefetch", "prefetch_wait"):
            assert f"graphtune.{op}.default" in code, op
    assert bool(policy.last.offloaded) == (budget == 0.0)


@pytest.mark.slow
def test_budgeted_inductor_compile_reuses_the_fx_graph_cache():
    """Inductor's FX graph cache keys the partitioned graphs: the same plan compiled again (as by a
    later process) is a cache hit, the plan is still made and recorded, and another plan is a miss."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_inductor_cache

    batch = tiny_batch(**BATCH)
    ref = tiny_model("llama", lora=True, **CFG2)
    ref_loss = ref(**batch).loss

    def train_step(budget):
        torch._dynamo.reset()
        counters["inductor"].clear()
        model = tiny_model("llama", lora=True, **CFG2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graphtune.optimize(model, compiler="inductor", memory_budget=budget)
            loss = model(**batch).loss
            loss.backward()  # the backward compiles lazily, here
        assert rel_err(loss, ref_loss) <= 1e-5
        stats = {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}
        return model.forward.memory.last, stats

    with fresh_inductor_cache():
        first, stats = train_step("checkpoint")
        assert stats == {"fxgraph_cache_miss": 2}, stats  # forward and backward
        again, stats = train_step("checkpoint")
        assert stats == {"fxgraph_cache_hit": 2}, stats
        assert again is not None and again.checkpointed == first.checkpointed and first.checkpointed
        other, stats = train_step(1.0)  # the partitioner's default plan: other graphs
        assert not other.checkpointed
        assert stats == {"fxgraph_cache_miss": 2}, stats


# -- end to end through optimize ---------------------------------------------------------------


def _train_step_errors(model, ref, batch) -> tuple[float, float]:
    out, ref_out = model(**batch), ref(**batch)
    out.loss.backward()
    ref_out.loss.backward()
    grads = [rel_err(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()) if q.requires_grad]
    return rel_err(out.loss, ref_out.loss), max(grads)


def test_hf_gradient_checkpointing_is_taken_over():
    """HF checkpointing (and peft's input-requires-grad hook) would break capture; graphtune recomputes the same layers."""
    model = tiny_model("llama", lora=True, **CFG2)
    ref = tiny_model("llama", lora=True, **CFG2)
    for m in (model, ref):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        m.enable_input_require_grads()  # what peft's prepare_model_for_kbit_training adds
    graphtune.optimize(model, compiler="aot_eager", passes=PASSES)
    loss_err, grad_err = _train_step_errors(model, ref, tiny_batch(**BATCH))
    assert loss_err <= 1e-5 and grad_err <= 1e-5
    d = model.forward.memory.last
    layers = [f"base_model.model.model.layers.{i}" for i in range(2)]
    assert d.checkpointed == layers and d.recomputed_ops > 0
    report = graphtune.last_report(model)
    assert report.counts["fuse_rms_norm"] == 5  # the layers were visible to the passes
    # restored after the call: eager use of the model still checkpoints, the hook is back
    assert all(model.get_base_model().model.layers[i].gradient_checkpointing for i in range(2))
    embed = model.get_base_model().get_input_embeddings()
    assert any(getattr(f, "__name__", "") in memory._INPUT_GRAD_HOOKS for f in embed._forward_hooks.values())
    assert graphtune.explain(model, passes=PASSES, **tiny_batch(**BATCH)).counts["fuse_rms_norm"] == 5


def test_optimize_with_budget_end_to_end():
    """Through optimize(): dynamic batch/sequence dims, offload + recompute, two shapes, one capture."""
    model = tiny_model("llama", lora=True, **CFG2)
    ref = tiny_model("llama", lora=True, **CFG2)
    model.train()
    ref.train()
    graphtune.optimize(model, compiler="aot_eager", memory_budget="0%", passes=PASSES)
    for shape in ((2, 16), (3, 11)):
        batch = tiny_batch(*shape, vocab=BATCH["vocab"], seed=shape[1])
        loss_err, grad_err = _train_step_errors(model, ref, batch)
        assert loss_err <= 1e-5 and grad_err <= 1e-5, shape
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    assert len(model.forward.captures) == 1
    d = model.forward.memory.last
    assert d.checkpointed and d.offloaded and d.fits
    assert "memory budget 0%" in d.summary()


def test_hf_sdpa_attention_is_recomputed_through_rng_functionalization():
    """attention=False keeps HF's SDPA: aten flash attention, tagged random for its dropout. With
    dropout_p=0 a recomputed layer replays it (the partitioner stashes the RNG state), and the
    layer inputs are offloaded around it."""
    model = tiny_model("llama", lora=True, **CFG2)
    ref = tiny_model("llama", lora=True, **CFG2)
    model.train()
    ref.train()
    passes = [p for p in PASSES if p != "dispatch_attention"]
    graphtune.optimize(model, compiler="aot_eager", memory_budget="offload", attention=False, passes=passes)
    loss_err, grad_err = _train_step_errors(model, ref, tiny_batch(**BATCH))
    assert loss_err <= 1e-5 and grad_err <= 1e-5
    d = model.forward.memory.last
    assert len(d.checkpointed) == 2 and len(d.offloaded) == 2 and d.offloaded[0] == "embedding"
    bw_targets = [str(n.target) for n in d.backward_graph.graph.nodes if n.op == "call_function"]
    assert sum("scaled_dot_product_flash_attention_for_cpu_backward" in t for t in bw_targets) == 2
    assert any("run_with_rng_state" in t.lower() or "RunWithRngState" in t for t in bw_targets)


def test_random_ops_are_replayed_only_without_dropout():
    g = fx.Graph()
    q = g.placeholder("q")
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    cases = {
        g.call_function(sdpa, (q, q, q)): True,  # default dropout_p=0
        g.call_function(sdpa, (q, q, q, 0.0)): True,
        g.call_function(sdpa, (q, q, q), {"dropout_p": 0.1}): False,
        g.call_function(torch.ops.aten.native_dropout.default, (q, 0.1, True)): False,
        g.call_function(torch.ops.aten.mul.Tensor, (q, q)): True,
    }
    for node, expected in cases.items():
        assert memory._replayable(node) is expected, node.format_node()

