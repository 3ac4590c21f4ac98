"""Shared fixtures of the export tests: tiny tokenizers trained here (no hub), tiny models of every
family (helpers.py), llama.cpp run in a subprocess (``llama_runner.py``).

Tests that need llama.cpp call ``need_llama_cpp()`` (skips cleanly when llama-cpp-python is not
installed; ``make test`` installs it from the cached wheel, see tests/export/install_llama_cpp.sh).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

try:  # the export tests need the 'gguf' extra; without it the folder is skipped, not an error
    import gguf  # noqa: F401
    import safetensors  # noqa: F401
except ImportError:
    collect_ignore_glob = ["test_*.py"]

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(autouse=True, scope="session")
def _private_export_cache(tmp_path_factory):
    """The CLI's export cache (graphtune.export.cache) in a folder of this test session, never the
    user's ~/.cache/graphtune/export."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GRAPHTUNE_EXPORT_CACHE_DIR", str(tmp_path_factory.mktemp("export_cache")))
    yield
    mp.undo()


# -- corpus and tokenizers -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))[:12]
    extra = ("Ünïcödé façade naïve — déjà vu. 日本語のテキストと中文。 Ελληνικά русский 🚀🦙 ✅\n"
             "\t  tabs\tand   runs    of spaces\n\n\n1234567 3.14 I'm you're WE'LL\n") * 30
    text = "".join(f.read_text(encoding="utf-8") for f in files) + extra
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def _bpe(corpus: Path, pre, out: Path, *, ignore_merges=False, normalizer=None, vocab=480):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(corpus)], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    hf.save_pretrained(out)
    return hf


@pytest.fixture(scope="session")
def bpe_tokenizer(corpus, tmp_path_factory):
    """GPT-2-style byte-level BPE (ByteLevel pre-tokenizer with its own regex), ChatML template."""
    from tokenizers import pre_tokenizers

    return _bpe(corpus, pre_tokenizers.ByteLevel(add_prefix_space=False), tmp_path_factory.mktemp("tok_gpt2"))


@pytest.fixture(scope="session")
def llama3_tokenizer(corpus, tmp_path_factory):
    """Llama-3-style: Split(llama3 regex) + ByteLevel, ignore_merges."""
    from tokenizers import Regex, pre_tokenizers

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return _bpe(corpus, pre, tmp_path_factory.mktemp("tok_llama3"), ignore_merges=True)


@pytest.fixture(scope="session")
def qwen2_tokenizer(corpus, tmp_path_factory):
    """Qwen-2-style: NFC normalizer, Split(qwen2 regex: single digits) + ByteLevel."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return _bpe(corpus, pre, tmp_path_factory.mktemp("tok_qwen2"), normalizer=normalizers.NFC())


def _spm(corpus: Path, out: Path, *, dummy_prefix: bool, cls_name: str, vocab=480):
    import sentencepiece as spm
    import transformers

    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "sp"), vocab_size=vocab, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=dummy_prefix,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        minloglevel=2, num_threads=1)
    (out / "sp.model").rename(out / "tokenizer.model")
    (out / "sp.vocab").unlink()
    return getattr(transformers, cls_name).from_pretrained(str(out))


@pytest.fixture(scope="session")
def spm_tokenizer(corpus, tmp_path_factory):
    """Llama-2-style SentencePiece BPE (byte fallback, dummy prefix), loaded by LlamaTokenizer."""
    pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    return _spm(corpus, tmp_path_factory.mktemp("tok_spm"), dummy_prefix=True, cls_name="LlamaTokenizer")


@pytest.fixture(scope="session")
def gemma_tokenizer(corpus, tmp_path_factory):
    """Gemma-style SentencePiece BPE (no dummy prefix), loaded by GemmaTokenizer."""
    pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    return _spm(corpus, tmp_path_factory.mktemp("tok_gemma"), dummy_prefix=False, cls_name="GemmaTokenizer")


