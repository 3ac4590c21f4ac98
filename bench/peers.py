"""LoRA / QLoRA training speed and peak memory: graphtune against its peers, one process per config.

Configs (each runs in its own subprocess, so one library's patches never leak into another's timing):

  A   HF transformers + peft, bf16, SDPA, HF gradient checkpointing          (LoRA)
  B   A + Liger-Kernel (rope, rms_norm, swiglu, fused linear cross-entropy)  (LoRA)
  C   unsloth FastLanguageModel, use_gradient_checkpointing="unsloth"        (LoRA)
  F   A + torch.compile(whole PeftModel)                                      (LoRA)
  G   graphtune.optimize(HF + peft model), default memory budget               (LoRA)
  GC  graphtune.optimize(..., memory_budget="checkpoint")                      (LoRA)
  D   HF + bitsandbytes NF4 (double quant, bf16 compute) + peft               (QLoRA)
  E   unsloth load_in_4bit=True                                               (QLoRA)
  Q   graphtune.optimize(D's model), default memory budget                     (QLoRA)
  QC  graphtune.optimize(D's model, memory_budget="checkpoint")                (QLoRA)

Every model is a random-init Llama shape (Llama-3.2-1B for LoRA, Llama-3.1-8B for QLoRA) saved under
/tmp; LoRA r=16, alpha=16, dropout 0 on q,k,v,o,gate,up,down; the model is put in train mode before
timing; random token ids with labels = input ids; AdamW on the LoRA parameters; warm-up steps, then
timed steps between CUDA events. graphtune does not use HF's gradient checkpointing: its memory budget
(``GRAPHTUNE_MEMORY_BUDGET``, passed to ``optimize(memory_budget=...)`` when set; ``"checkpoint"`` for
GC/QC) decides what to keep.

    python bench/peers.py all lora OUTDIR        # A B C F G on 2x2048 and 1x8192, then the table
    python bench/peers.py all qlora OUTDIR       # D E Q
    python bench/peers.py all verdict OUTDIR     # G, F (2x2048), C, GC: the 1B ratios in one device call
    python bench/peers.py one G /tmp/bench_llama_1b 2x2048,1x8192
    python bench/peers.py table LOG [LOG ...]   # one table from the RESULT lines of several ``one`` runs
                                                # (configs spread over several GPUs of one host)

The table reports tokens/s, peak GiB and, per shape, graphtune's ratio to the best peer (speed: higher
is better; memory: lower is better). A failed config is a row with its error, never a silent gap.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 128256
MODEL_SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, tie_word_embeddings=False),
}
GRAPHTUNE = {"G", "GC", "Q", "QC"}
QUANTIZED = {"D", "E", "Q", "QC"}
CHECKPOINTED = {"GC", "QC"}  # graphtune recomputes every decoder layer, as the peers' checkpointing does
UNSLOTH = {"C", "E"}
GROUPS = {  # config, model size, shapes, timeout (s)
    "lora": [("G", "1b", "2x2048,1x8192", 240), ("GC", "1b", "2x2048,1x8192", 200), ("A", "1b", "2x2048,1x8192", 120), ("B", "1b", "2x2048,1x8192", 120),
             ("C", "1b", "2x2048,1x8192", 200), ("F", "1b", "2x2048,1x8192", 240)],
    "qlora": [("Q", "8b", "2x2048,1x8192", 300), ("QC", "8b", "2x2048,1x8192", 240), ("D", "8b", "2x2048,1x8192", 240), ("E", "8b", "2x2048,1x8192", 300)],
    # the configs that decide the 1B ratios, in the order that settles them first within one device call
    # (~10 min on an H100): graphtune, the fastest 2x2048 peer, the fastest/leanest peer, then GC
    "verdict": [("G", "1b", "2x2048,1x8192", 240), ("F", "1b", "2x2048", 170), ("C", "1b", "2x2048,1x8192", 200),
                ("GC", "1b", "2x2048,1x8192", 200)],
    "graphtune": [("G", "1b", "2x2048,1x8192", 240), ("GC", "1b", "2x2048,1x8192", 200),
                  ("Q", "8b", "2x2048,1x8192", 300), ("QC", "8b", "2x2048,1x8192", 240)],
}
WARM = int(os.environ.get("BENCH_WARM", 3))
ITERS = int(os.environ.get("BENCH_ITERS", 10))


def model_dir(size: str) -> str:
    return f"/tmp/bench_llama_{size}"


def word_tokenizer():
    """A 128256-entry word-level tokenizer with Llama-3's special ids (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, 128000)}}
    names = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>"}
    vocab.update({names.get(i, f"<|reserved_special_token_{i - 128000}|>"): i for i in range(128000, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|finetune_right_pad_id|>", unk_token="<unk>", model_max_length=131072)


def prepare(size: str) -> None:
    """Save a random-init bf16 Llama of ``size`` once (reused by every config)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = model_dir(size)
    if os.path.exists(os.path.join(d, "config.json")):
        return
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000,
                      eos_token_id=128001, pad_token_id=128004, hidden_act="silu", use_cache=False, **MODEL_SHAPES[size])
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(d, max_shard_size="5GB")
    word_tokenizer().save_pretrained(d)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")


def load_hf(cfg: str, d: str, device_map: dict | str | None = None):
    """HF (+Liger, +bnb) + peft; the peers get HF gradient checkpointing, graphtune does not."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = dict(dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0} if device_map is None else device_map)
    if cfg == "B":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
    if cfg in QUANTIZED:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(d, **kw)
    if cfg not in GRAPHTUNE:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config())
    model.train()  # from_pretrained gives eval mode; checkpointing and Liger's fused CE act only in train mode
    step = model
    info: dict = {"attn": model.config._attn_implementation}
    if cfg == "F":
        step = torch.compile(model)
    elif cfg in GRAPHTUNE:
        import graphtune

        kw = {}
        if cfg in CHECKPOINTED:
            kw["memory_budget"] = info["memory_budget"] = "checkpoint"
        elif os.environ.get("GRAPHTUNE_MEMORY_BUDGET"):
            budget = os.environ["GRAPHTUNE_MEMORY_BUDGET"]
            kw["memory_budget"] = float(budget) if budget.replace(".", "", 1).isdigit() else budget
            info["memory_budget"] = budget
        step = graphtune.optimize(model, **kw)
        info["graphtune"] = True
    return model, step, info


def load_unsloth(cfg: str, d: str, max_len: int):
    import unsloth  # noqa: F401  (unsloth must be imported before transformers and peft)
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=d, max_seq_length=max_len, dtype=torch.bfloat16,
                                                 load_in_4bit=cfg in QUANTIZED, use_exact_model_name=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, target_modules=TARGETS, bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=0, max_seq_length=max_len)
    model.train()
    return model, model, {"attn": getattr(model.config, "_attn_implementation", "?")}


def run_one(cfg: str, d: str, shapes: str) -> None:
    """Time ``cfg`` on each shape; one ``RESULT {json}`` line per shape (errors included)."""
    if cfg in GRAPHTUNE:
        sys.path.insert(0, str(ROOT))
    import torch

    sizes = [tuple(int(v) for v in s.split("x")) for s in shapes.split(",")]
    t0 = time.time()
    model, step, info = load_unsloth(cfg, d, max(t for _, t in sizes)) if cfg in UNSLOTH else load_hf(cfg, d)
    load_s = time.time() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    info["trainable_M"] = round(sum(p.numel() for p in params) / 1e6, 3)
    for b, t in sizes:
        res = dict(cfg=cfg, model=os.path.basename(d), B=b, L=t, load_s=round(load_s, 1), **info)
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            res["static_GiB"] = round(torch.cuda.memory_allocated() / 2**30, 3)
            gen = torch.Generator(device="cuda").manual_seed(1234)
            x = torch.randint(0, 128000, (b, t), device="cuda", generator=gen)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(ITERS + 1)]
            losses = []
            tw = time.time()
            for i in range(WARM + ITERS):
                if i == WARM:
                    torch.cuda.synchronize()
                    res["warmup_s"] = round(time.time() - tw, 1)
                    events[0].record()
                loss = step(input_ids=x, labels=x).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= WARM:
                    events[i - WARM + 1].record()
                losses.append(loss.detach())
            torch.cuda.synchronize()
            total_ms = events[0].elapsed_time(events[ITERS])
            res.update(ms_step=round(total_ms / ITERS, 1), tok_s=round(b * t * ITERS / (total_ms / 1000)),
                       peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                       loss_first=round(float(losses[0]), 4), loss_last=round(float(losses[-1]), 4),
                       ok=all(math.isfinite(float(v)) for v in losses))
            if cfg in GRAPHTUNE:
                import graphtune

                rep = graphtune.last_report(model)
                res["passes"] = {r.name: r.count for r in rep.passes} if rep is not None else None
            del x, loss
        except Exception as e:  # noqa: BLE001 - one shape's failure is reported and the next shape runs
            import traceback

            traceback.print_exc()
            res.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            torch.cuda.empty_cache()
        print("RESULT " + json.dumps(res), flush=True)


def run_group(group: str, outdir: str, budget_s: float) -> None:
    os.makedirs(outdir, exist_ok=True)
    start = time.time()
    log = open(os.path.join(outdir, f"log_{group}.txt"), "a")
    for size in sorted({s for _, s, _, _ in GROUPS[group]}):
        p = subprocess.run([sys.executable, __file__, "prep", size], capture_output=True, text=True, timeout=300)
        log.write(f"==== prep {size} rc={p.returncode}\n{p.stdout}\n{p.stderr[-5000:]}\n")
    results = []
    for cfg, size, shapes, timeout in GROUPS[group]:
        left = budget_s - (time.time() - start)
        if left < 40:
            results.append(dict(cfg=cfg, model=size, ok=False, error="skipped: out of time budget"))
            continue
        timeout = int(min(timeout, left - 15))
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "one", cfg, model_dir(size), shapes], capture_output=True,
                               text=True, timeout=timeout)
            out, err, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out, err, rc = _text(e.stdout), _text(e.stderr), f"timeout {timeout}s"
        got = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
        if not got:
            tail = [line for line in err.strip().splitlines() if line.strip()][-3:]
            got = [dict(cfg=cfg, model=size, ok=False, error=f"rc={rc}: " + " | ".join(tail)[-400:])]
        for r in got:
            r["wall_s"] = round(time.time() - t0, 1)
        results += got
        log.write(f"==== {cfg} {size} {shapes} rc={rc}\n{out}\n--- stderr\n{err[-20000:]}\n")
        log.flush()
        print(f"{cfg} {size} {shapes}: rc={rc} {time.time() - t0:.0f}s", flush=True)
    with open(os.path.join(outdir, f"results_{group}.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    table = format_table(results)
    Path(outdir, f"table_{group}.md").write_text(table)
    print(table)


def _text(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else (v or "")


def format_table(results: list[dict]) -> str:
    """Per shape: every config's tok/s and peak GiB, and graphtune's ratios to the best peer."""
    lines = ["| config | model | B×T | tok/s | peak GiB | ms/step | loss first→last | note |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("tok_s") is None:
            lines.append(f"| {r['cfg']} | {r.get('model')} | {r.get('B', '')}×{r.get('L', '')} | FAIL | | | | "
                         f"{str(r.get('error', ''))[:160].replace('|', '/')} |")
        else:
            lines.append(f"| {r['cfg']} | {r['model']} | {r['B']}×{r['L']} | {r['tok_s']} | {r['peak_GiB']} | {r['ms_step']} | "
                         f"{r['loss_first']}→{r['loss_last']} | {r.get('attn', '')} |")
    lines += ["", "| shape | graphtune config | tok/s | best peer tok/s | speed ratio | peak GiB | lowest peer GiB | memory ratio |",
              "|---|---|---|---|---|---|---|---|"]
    ok = [r for r in results if r.get("tok_s")]
    for key in sorted({(r["model"], r["B"], r["L"]) for r in ok}):
        same = [r for r in ok if (r["model"], r["B"], r["L"]) == key]
        peers = [r for r in same if r["cfg"] not in GRAPHTUNE]
        if not peers:
            continue
        fast = max(peers, key=lambda r: r["tok_s"])
        lean = min(peers, key=lambda r: r["peak_GiB"])
        for g in (r for r in same if r["cfg"] in GRAPHTUNE):
            lines.append(f"| {key[0]} {key[1]}×{key[2]} | {g['cfg']} | {g['tok_s']} | {fast['tok_s']} ({fast['cfg']}) | "
                         f"{g['tok_s'] / fast['tok_s']:.2f}× | {g['peak_GiB']} | {lean['peak_GiB']} ({lean['cfg']}) | "
                         f"{g['peak_GiB'] / lean['peak_GiB']:.2f}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("prep", "one", "all", "table"):
        sys.exit(__doc__)
    if sys.argv[1] == "prep":
        prepare(sys.argv[2])
    elif sys.argv[1] == "table":
        rows = [json.loads(line[7:]) for f in sys.argv[2:] for line in Path(f).read_text(errors="replace").splitlines()
                if line.startswith("RESULT ")]
        print(format_table(rows))
    elif sys.argv[1] == "one":
        run_one(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        run_group(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "/tmp/peers_out", float(os.environ.get("BENCH_BUDGET_S", "560")))
