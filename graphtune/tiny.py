"""Tiny random-init models of every supported family, for tests, golden graphs and the offline demo.

Why here and not in tests: ``make demo`` and the golden-graph generator use the same configs, and
they must not need a network or a hub download.
"""

from __future__ import annotations

from typing import Any

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


_OWN_HEAD_DIM = ("qwen3", "gemma", "gemma2", "gemma3")


def tiny_config(family: str, **overrides: Any):
    """A transformers config for ``family`` small enough to run on a CPU in milliseconds."""
    import transformers as tf

    kw = dict(_COMMON)
    if family == "llama":
        cls = tf.LlamaConfig
    elif family == "mistral":
        cls = tf.MistralConfig
        kw.update(sliding_window=None)
    elif family == "qwen2":
        cls = tf.Qwen2Config
    elif family == "qwen3":
        cls = tf.Qwen3Config
    elif family == "gemma":
        cls = tf.GemmaConfig
        kw.update(hidden_activation="gelu_pytorch_tanh")
    elif family == "gemma2":
        cls = tf.Gemma2Config
        kw.update(sliding_window=8, hidden_activation="gelu_pytorch_tanh")
    elif family == "gemma3":
        cls = tf.Gemma3TextConfig
        kw.update(sliding_window=8, hidden_activation="gelu_pytorch_tanh")
    elif family == "phi3":
        cls = tf.Phi3Config
        kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    kw.update(overrides)
    if family in _OWN_HEAD_DIM and "head_dim" not in overrides:
        # these configs default head_dim to a full-size constant (128 / 256) instead of deriving it
        kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
    return cls(**kw)


LORA_TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(family: str, *, lora: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A random-init causal LM of ``family`` (optionally peft-LoRA wrapped with non-zero B)."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if lora:
        import peft

        targets = LORA_TARGETS.get(family, DEFAULT_LORA_TARGETS)
        lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
        model = peft.get_peft_model(model, lcfg)
        randomize_lora_b(model, seed + 1)
    return model


def randomize_lora_b(model: torch.nn.Module, generator_seed: int) -> None:
    """Give every peft ``lora_B`` small random values (peft starts them at zero, which would hide
    a wrong LoRA gradient path: with B = 0, dA is zero whatever the pass does)."""
    g = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, device="cpu") * 0.05)


def tiny_batch(batch: int = 2, seq: int = 8, vocab: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids and labels for a tiny model (labels are a distinct tensor: dynamo dedups aliases)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g, device="cpu").to(torch.get_default_device())
    return {"input_ids": ids, "labels": ids.clone()}
