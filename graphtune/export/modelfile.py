"""Ollama ``Modelfile`` for an exported GGUF: ``FROM``, ``TEMPLATE``, ``PARAMETER stop``.

The chat template is converted by behaviour, not by parsing Jinja: the tokenizer's template is
rendered on probe conversations and compared with the renderings of the chat formats below, each of
which comes with its Ollama (Go template) equivalent. A format that renders identically on every
probe gives the ``TEMPLATE``; otherwise the Modelfile carries no ``TEMPLATE`` and quotes the Jinja
template in comments (Ollama then uses the template stored in the GGUF, ``tokenizer.chat_template``).
Stop tokens: the eos token plus the end-of-turn markers the rendered template uses.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

Message = dict[str, str]


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    name: str
    render: Callable[[list[Message], bool], str]  # (messages, add_generation_prompt) -> text
    go_template: str
    stops: tuple[str, ...]
    bos: str = ""  # the template's own leading text that Ollama adds as BOS


def _chatml(msgs: list[Message], gen: bool) -> str:
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    return out + ("<|im_start|>assistant\n" if gen else "")


def _llama3(msgs: list[Message], gen: bool) -> str:
    out = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in msgs)
    return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if gen else "")


def _phi3(msgs: list[Message], gen: bool) -> str:
    out = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in msgs)
    return out + ("<|assistant|>\n" if gen else "")


def _gemma(msgs: list[Message], gen: bool) -> str:
    out = ""
    for m in msgs:
        role = "model" if m["role"] == "assistant" else "user"
        out += f"<start_of_turn>{role}\n{m['content'].strip()}<end_of_turn>\n"
    return out + ("<start_of_turn>model\n" if gen else "")


FORMATS: tuple[ChatFormat, ...] = (
    ChatFormat("chatml", _chatml, (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ), ("<|im_end|>", "<|im_start|>")),
    ChatFormat("llama3", _llama3, (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ), ("<|eot_id|>", "<|start_header_id|>"), bos="<|begin_of_text|>"),
    ChatFormat("phi3", _phi3, (
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"
    ), ("<|end|>", "<|user|>", "<|assistant|>")),
    ChatFormat("gemma", _gemma, (
        "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"
    ), ("<end_of_turn>", "<start_of_turn>"), bos="<bos>"),
)

_PROBE_CONVERSATIONS: tuple[list[Message], ...] = (
    [{"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
)
_SYSTEM_PROBE = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]


def _render_hf(tokenizer: Any, msgs: list[Message]) -> str | None:
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates raise on conversations they do not accept
        return None


def detect_chat_format(tokenizer: Any) -> ChatFormat | None:
    """The known chat format whose rendering equals the tokenizer's template on every probe."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    bos = getattr(tokenizer, "bos_token", None) or ""
    for fmt in FORMATS:
        ok = True
        convs = list(_PROBE_CONVERSATIONS)
        if fmt.name != "gemma":
            convs.append(_SYSTEM_PROBE)
        for msgs in convs:
            got = _render_hf(tokenizer, msgs)
            if got is None:
                ok = False
                break
            for prefix in {fmt.bos, bos}:
                if prefix and got.startswith(prefix):
                    got = got[len(prefix):]
            if got != fmt.render(msgs, True):
                ok = False
                break
        if ok:
            return fmt
    return None


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError("a Modelfile value cannot contain three double quotes")
    return f'"""{text}"""'


def modelfile_text(tokenizer: Any, gguf_path: str | os.PathLike, *, system: str | None = None,
                   parameters: dict[str, Any] | None = None) -> str:
    """The Modelfile for ``gguf_path`` (written as given: relative paths resolve from the Modelfile)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from graphtune.export.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    lines = [f"FROM {gguf_path}"]
    fmt = detect_chat_format(tokenizer) if tokenizer is not None else None
    stops: list[str] = []
    if fmt is not None:
        lines.append(f"# chat template: {fmt.name} (converted from the tokenizer's Jinja template)")
        lines.append(f"TEMPLATE {_quote(fmt.go_template)}")
        vocab = tokenizer.get_vocab()
        stops += [s for s in fmt.stops if s in vocab]
    else:
        tpl = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if tpl:
            text = tpl if isinstance(tpl, str) else str(tpl)
            lines.append("# The tokenizer's chat template (Jinja) matches no format graphtune converts; it is stored in")
            lines.append("# the GGUF (tokenizer.chat_template), which Ollama reads. Raw template:")
            lines += ["#   " + ln for ln in text.splitlines()]
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    if eos and eos not in stops:
        stops.append(eos)
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    for s in stops:
        lines.append(f'PARAMETER stop "{s}"')
    for k, v in (parameters or {}).items():
        lines.append(f"PARAMETER {k} {v}")
    return "\n".join(lines) + "\n"


def write_modelfile(path: str | os.PathLike, tokenizer: Any, gguf_path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write ``modelfile_text`` to ``path`` (a file, or a folder: ``<folder>/Modelfile``) atomically."""
    path = Path(path)
    if path.is_dir():
        path = path / "Modelfile"
    text = modelfile_text(tokenizer, gguf_path, **kwargs)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
