"""Tokenizer -> GGUF vocabulary (``tokenizer.ggml.*``), chosen from how the tokenizer behaves.

Two kinds llama.cpp implements are written:

* ``gpt2``: byte-level BPE (a ``ByteLevel`` step in the HF pipeline). Tokens, types and merges
  from the tokenizer; the pre-tokenizer **name** (``tokenizer.ggml.pre``) is identified, not
  guessed: for each pre-tokenizer llama.cpp knows, its regex split (llama.cpp applies the regexes
  in sequence and keeps the unmatched gaps) is computed on probe texts and compared with what the
  HF tokenizer's own normalizer + pre-tokenizer produce; the first name that agrees on every probe
  (and on ``ignore_merges``) is used. None agreeing is an error that shows the first difference.
* ``llama``: SentencePiece-style BPE (``▁`` for spaces, byte fallback). Tokens, scores and types
  from the SentencePiece model when the tokenizer has one (``vocab_file``), else from
  ``tokenizer.json`` (score of a token = minus the rank of the merge that makes it).
  ``add_space_prefix`` is read off an encoding.

Both: token strings made unique (a later duplicate becomes an UNUSED placeholder, reported), the
list padded to the embedding rows with ``[PAD{i}]``, bos/eos/unk/pad ids and ``add_bos``/``add_eos``
written explicitly (``add_*`` from what ``tokenizer("...")`` actually adds), the chat template
copied. Unigram, WordPiece and other models raise :class:`TokenizerError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
from gguf import TokenType

from graphtune.export.families import ExportError


LEADING_SPACE_NOTE = (
    "the HF tokenizer adds its \u2581 prefix only to text that does not already start with a space "
    "(Metaspace prepend_scheme 'first'); llama.cpp's SentencePiece tokenizer (add_space_prefix) always adds it, "
    "so text that starts with whitespace tokenizes with one \u2581 more in llama.cpp (as in sentencepiece itself)"
)
AFTER_SPECIAL_NOTE = (
    "the HF tokenizer does not add its \u2581 prefix to text that follows a special token; llama.cpp's "
    "SentencePiece tokenizer does (sentencepiece's 'legacy' behaviour), so text after special tokens "
    "tokenizes with one \u2581 more in llama.cpp"
)


class TokenizerError(ExportError):
    """The tokenizer cannot be represented by a vocabulary type llama.cpp implements."""


# -- llama.cpp's pre-tokenizers: name, regexes applied in sequence, ignore_merges ---------------------
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CASED_WORD = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+%s"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*%s")
_GPT4O = (_CASED_WORD % ((_CONTRACTIONS + "?",) * 2)) + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_TEKKEN = (_CASED_WORD % ("", "")) + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SEED_CODER = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"

KNOWN_PRE_TOKENIZERS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("gpt-2", (_GPT2,), False),
    ("llama-bpe", (_LLAMA3,), True),
    ("qwen2", (_QWEN2,), False),
    ("qwen35", (_QWEN35,), False),
    ("starcoder", (r"\p{N}", _GPT2), False),
    ("gpt-4o", (_GPT4O,), False),
    ("tekken", (_TEKKEN,), True),
    ("seed-coder", (_SEED_CODER,), False),
    ("chatglm-bpe", (_LLAMA3,), False),  # llama3's regex without ignore_merges
    ("deepseek-coder", (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"), False),
    ("falcon", (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"), False),
    ("bloom", (r" ?[^(\s|.,!?…。，、।۔،)]+",), False),
    ("default", (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
)

# texts on which the pre-tokenizers above disagree: digit runs, contractions in both cases,
# newline / tab / space runs, punctuation followed by newlines, letters with marks, CJK, emoji, code
PROBES: tuple[str, ...] = (
    "Hello world! I'm here, you're there; they'll see. WE'RE LOUD, I'VE GOT IT, she'D go.",
    "1 12 123 1234 12345 123456 1234567 3.14159 1,000,000 2024-11-27",
    "def f(x):\n    return x**2  # square\n\n\n\tif x >= 10:\n\t\tprint(\"big\")\r\n",
    "   leading spaces and trailing   \n \n\n  \t ",
    "naïve café — déjà vu; Ünïcödé façade, Ελληνικά, русский текст, हिन्दी",
    "日本語のテキストと中文字符，还有한국어 문장。",
    "emoji 🚀🦙 😶‍🌫️ ✅ ...!!! ??? ---=== ''''' \"\"\" ```",
    "camelCaseWords HTTPServer iPhone XMLHttpRequest snake_case_words kebab-case-words",
    "path/to/file.py: a/b//c ///x\n/* comment */ <tag attr=\"v\">text</tag>",
)


@lru_cache(maxsize=None)
def _compiled(rx: str):
    import regex

    return regex.compile(rx)


def llama_cpp_split(text: str, regexes: tuple[str, ...]) -> list[str]:
    """What llama.cpp's ``unicode_regex_split`` makes of ``text``: each regex splits every piece
    into its matches and the unmatched gaps between them."""
    words = [text]
    for rx in regexes:
        pat = _compiled(rx)
        out = []
        for w in words:
            pos = 0
            for m in pat.finditer(w):
                if m.start() > pos:
                    out.append(w[pos:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                pos = max(pos, m.end())
            if pos < len(w):
                out.append(w[pos:])
        words = out
    return words


def _byte_encoder() -> dict[int, str]:
    return gguf.vocab.bytes_to_unicode()


def _to_byte_level(piece: str) -> str:
    enc = _byte_encoder()
    return "".join(enc[b] for b in piece.encode("utf-8"))


def _has_type(node: Any, name: str) -> bool:
    if isinstance(node, dict):
        if node.get("type") == name:
            return True
        return any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


def _backend(tokenizer: Any):
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"{type(tokenizer).__name__} has no `tokenizers` backend (tokenizer.json); "
                             "load the tokenizer with a fast (tokenizers) backend")
    return backend


class _LazyModelSpec(dict):
    """tokenizer.json's ``model`` section: the scalar settings read off the backend's model object, the
    vocab and merges (the slow part of parsing tokenizer.json: ~0.3 s for a 32k vocabulary) only when a
    key beyond those is asked for."""

    def __init__(self, backend, head: dict[str, Any]) -> None:
        super().__init__(head)
        self._backend = backend
        self._full = False

    def _load(self) -> None:
        if not self._full:
            self._full = True
            self.update(json.loads(self._backend.to_str()).get("model", {}))

    def __missing__(self, key):
        self._load()
        return dict.__getitem__(self, key)

    def __contains__(self, key) -> bool:
        if not dict.__contains__(self, key):
            self._load()
        return dict.__contains__(self, key)

    def get(self, key, default=None):
        return self[key] if key in self else default


def _tokenizer_spec(backend) -> dict[str, Any]:
    """tokenizer.json's sections as ``json.loads(backend.to_str())`` gives them, the model's vocab and
    merges parsed lazily (:class:`_LazyModelSpec`); the whole JSON where the backend's objects do not
    say enough."""
    try:
        model = backend.model
        head = {"type": type(model).__name__}
        for key in ("byte_fallback", "ignore_merges", "unk_token"):
            head[key] = getattr(model, key)

        def section(obj):
            return None if obj is None else json.loads(obj.__getstate__())

        return {"model": _LazyModelSpec(backend, head), "pre_tokenizer": section(backend.pre_tokenizer),
                "decoder": section(backend.decoder), "normalizer": section(backend.normalizer)}
    except (AttributeError, TypeError, ValueError):
        return json.loads(backend.to_str())


def hf_pre_split(backend, text: str) -> list[str]:
    """The HF tokenizer's own normalizer + pre-tokenizer pieces of ``text``."""
    normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
    if backend.pre_tokenizer is None:
        return [normalized]
    return [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]


def identify_pre_tokenizer(tokenizer: Any) -> str:
    """The llama.cpp pre-tokenizer name whose behaviour matches the HF tokenizer on ``PROBES``."""
    backend = _backend(tokenizer)
    spec = json.loads(backend.to_str())
    byte_level = _has_type(spec.get("pre_tokenizer"), "ByteLevel")
    ignore_merges = bool(spec.get("model", {}).get("ignore_merges", False))
    if backend.normalizer is not None:
        for text in PROBES:
            if backend.normalizer.normalize_str(text) != text:
                raise TokenizerError(f"the tokenizer's normalizer ({spec.get('normalizer', {}).get('type')}) changes the "
                                     f"text {text[:40]!r}; llama.cpp's BPE tokenizer does not normalize")
    expected = {text: hf_pre_split(backend, text) for text in PROBES}
    first_diff: dict[str, str] = {}
    for name, regexes, cand_ignore in KNOWN_PRE_TOKENIZERS:
        ok = True
        for text, want in expected.items():
            got = llama_cpp_split(text, regexes)
            if byte_level:
                got = [_to_byte_level(p) for p in got]
            if got != want:
                ok = False
                i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                first_diff[name] = f"on {text[:32]!r}...: piece {i}: llama.cpp {got[i:i + 3]} vs HF {want[i:i + 3]}"
                break
        if ok and cand_ignore != ignore_merges:
            first_diff[name] = f"same splits, but ignore_merges={cand_ignore} vs the tokenizer's {ignore_merges}"
            ok = False
        if ok:
            return name
    pre = spec.get("pre_tokenizer")
    detail = "\n  ".join(f"{n}: {d}" for n, d in first_diff.items())
    raise TokenizerError(
        "the tokenizer's pre-tokenizer matches none of llama.cpp's known pre-tokenizers on the probe texts "
        f"(pre_tokenizer={json.dumps(pre)[:300]}); first differences:\n  {detail}"
    )


@dataclasses.dataclass
class Vocab:
    """Everything ``tokenizer.ggml.*`` holds, plus what the export had to change (``notes``)."""

    model: str  # "gpt2" | "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] = dataclasses.field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: Any = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges:
            w.add_token_merges(self.merges)
        for kind, tid in self.special_ids.items():
            getattr(w, f"add_{kind}_token_id")(int(tid))
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def load_tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def _special_ids(tokenizer: Any, n_vocab: int) -> dict[str, int]:
    out = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            out[kind] = tid
    return out


def _adds_specials(tokenizer: Any, ids: dict[str, int]) -> tuple[bool, bool]:
    with_sp = tokenizer("hello world")["input_ids"]
    without = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    add_bos = len(with_sp) > len(without) and "bos" in ids and with_sp[0] == ids["bos"] and with_sp[1:1 + len(without)] == without
    add_eos = len(with_sp) > len(without) and "eos" in ids and with_sp[-1] == ids["eos"]
    return bool(add_bos), bool(add_eos)


def _chat_template(tokenizer: Any) -> Any:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        return [{"name": k, "template": v} for k, v in tpl.items()]
    return tpl or None


def _merges_from_json(model: dict[str, Any]) -> list[str]:
    merges = model.get("merges") or []
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        else:  # tokenizers >= 0.20 stores pairs; a literal space inside a part is written as U+0120
            out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m))
    return out


def _added_tokens(tokenizer: Any) -> dict[int, Any]:
    return dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})


def _make_unique(tokens: list[str], types: list[int], notes: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in seen:
            placeholder = f"[UNUSED_DUPLICATE_{i}]"
            notes.append(f"token {i} {t!r} duplicates token {seen[t]}; written as {placeholder} (UNUSED)")
            tokens[i] = placeholder
            types[i] = TokenType.UNUSED
        else:
            seen[t] = i


def _pad(tokens: list[str], types: list[int], scores: list[float] | None, n_vocab: int, notes: list[str]) -> None:
    if len(tokens) > n_vocab:
        raise TokenizerError(f"the tokenizer has {len(tokens)} tokens but the embedding has only {n_vocab} rows")
    if len(tokens) < n_vocab:
        notes.append(f"vocabulary padded from {len(tokens)} to the {n_vocab} embedding rows with [PAD{{i}}] tokens")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)


def _gpt2_vocab(tokenizer: Any, spec: dict[str, Any], n_vocab: int, notes: list[str]) -> Vocab:
    backend = _backend(tokenizer)
    vocab = backend.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = _added_tokens(tokenizer)
    size = max(by_id) + 1 if by_id else 0
    tokens, types = [], []
    for i in range(size):
        if i in added:
            tok = added[i]
            tokens.append(tok.content)
            types.append(TokenType.CONTROL if tok.special else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    return Vocab(model="gpt2", pre=identify_pre_tokenizer(tokenizer), tokens=tokens, types=types,
                 merges=_merges_from_json(spec["model"]), notes=notes)


def _spm_model(tokenizer: Any):
    path = getattr(tokenizer, "vocab_file", None)
    if not path or not os.path.isfile(path):
        return None
    try:
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor()
        sp.LoadFromFile(str(path))
        return sp
    except Exception:  # noqa: BLE001 - a vocab_file that is not a SentencePiece model (tiktoken, ...)
        return None


def _spm_vocab(tokenizer: Any, spec: dict[str, Any], notes: list[str]) -> Vocab:
    backend = _backend(tokenizer)
    vocab = backend.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = _added_tokens(tokenizer)
    size = max(by_id) + 1 if by_id else 0
    sp = _spm_model(tokenizer)
    tokens, types, scores = [], [], []
    pieces = [sp.IdToPiece(i) for i in range(sp.vocab_size())] if sp is not None else []
    if sp is not None and all(pieces[i] == by_id.get(i) for i in range(min(len(pieces), size)) if i not in added):
        for i in range(sp.vocab_size()):
            tokens.append(pieces[i])
            scores.append(float(sp.GetScore(i)))
            types.append(TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                         else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i) else TokenType.NORMAL)
        source = "SentencePiece model"
    else:
        model = spec["model"]
        rank: dict[str, int] = {}
        for r, m in enumerate(_merges_from_json(model)):
            a, b = m.split(" ", 1)
            rank.setdefault(a + b, r)
        unk = model.get("unk_token")
        for i in range(size):
            t = by_id.get(i, f"[PAD{i}]")
            tokens.append(t)
            scores.append(-float(rank[t]) if t in rank else 0.0)
            is_byte = len(t) == 6 and t.startswith("<0x") and t.endswith(">")
            types.append(TokenType.BYTE if is_byte else TokenType.UNKNOWN if t == unk
                         else TokenType.UNUSED if i not in by_id else TokenType.NORMAL)
        source = "tokenizer.json merges"
    for i, tok in added.items():
        while i >= len(tokens):
            tokens.append(f"[PAD{len(tokens)}]")
            types.append(TokenType.UNUSED)
            scores.append(-1000.0)
        if types[i] in (TokenType.UNKNOWN, TokenType.CONTROL, TokenType.BYTE) and tokens[i] == tok.content:
            continue  # the model's own <unk>/<s>/</s>: keep its type
        tokens[i] = tok.content if tok.special else tok.content.replace("\u2581", " ")
        types[i] = TokenType.CONTROL if tok.special else TokenType.USER_DEFINED
        scores[i] = -1000.0
    probe = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])
    add_space_prefix = bool(probe) and probe[0].startswith("\u2581")
    notes.append(f"SentencePiece vocabulary from the {source}")
    if add_space_prefix:
        lead = "".join(tokenizer.convert_ids_to_tokens(tokenizer(" a", add_special_tokens=False)["input_ids"]))
        if not lead.startswith("\u2581\u2581"):
            notes.append(LEADING_SPACE_NOTE)
        special = next((t.content for t in added.values() if t.special), None)
        if special is not None:
            after = tokenizer.convert_ids_to_tokens(tokenizer(special + "a", add_special_tokens=False)["input_ids"])
            if len(after) > 1 and not after[1].startswith("\u2581"):
                notes.append(AFTER_SPECIAL_NOTE)
    return Vocab(model="llama", pre="default", tokens=tokens, types=types, scores=scores,
                 add_space_prefix=add_space_prefix, notes=notes)


def build_vocab(tokenizer: Any, n_vocab: int) -> Vocab:
    """The GGUF vocabulary of ``tokenizer`` (an HF tokenizer or a path), padded to ``n_vocab`` rows."""
    tokenizer = load_tokenizer(tokenizer)
    spec = _tokenizer_spec(_backend(tokenizer))
    mtype = spec.get("model", {}).get("type")
    notes: list[str] = []
    byte_level = _has_type(spec.get("pre_tokenizer"), "ByteLevel") or _has_type(spec.get("decoder"), "ByteLevel")
    spm_like = (spec["model"].get("byte_fallback") or _has_type(spec.get("pre_tokenizer"), "Metaspace")
                or _has_type(spec.get("decoder"), "Replace"))
    if mtype == "BPE" and byte_level:
        vocab = _gpt2_vocab(tokenizer, spec, n_vocab, notes)
    elif mtype == "BPE" and spm_like:
        vocab = _spm_vocab(tokenizer, spec, notes)
    else:
        raise TokenizerError(f"tokenizer model {mtype!r} (pre_tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]}) is not "
                             "supported: graphtune writes byte-level BPE ('gpt2') and SentencePiece-style BPE ('llama')")
    _pad(vocab.tokens, vocab.types, vocab.scores, n_vocab, notes)
    _make_unique(vocab.tokens, vocab.types, notes)
    vocab.special_ids = _special_ids(tokenizer, n_vocab)
    vocab.add_bos, vocab.add_eos = _adds_specials(tokenizer, vocab.special_ids)
    vocab.chat_template = _chat_template(tokenizer)
    if vocab.merges is None and vocab.model == "gpt2":
        vocab.merges = _special_vocab_merges(tokenizer, n_vocab)
    return vocab


def _special_vocab_merges(tokenizer: Any, n_vocab: int) -> list[str]:
    """Merges through gguf-py's SpecialVocab (reads tokenizer.json / merges.txt of a saved copy)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return list(gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=n_vocab).merges)
