"""License detection: license files and SPDX headers -> SPDX ids -> license_type.

Why: a code dataset is only as usable as its licensing record.  Following The Stack v2, the
license is decided per repository first (a declared license such as GitHub's ``license``
field), otherwise from the license files found in the repository, each applying to the
directory that holds it and everything below, plus ``SPDX-License-Identifier`` headers in
the file itself.  The result is a list of SPDX ids and a ``license_type`` of
``permissive`` / ``no_license`` / ``non_permissive`` decided by a configurable permissive list.

Detection is a signature matcher over normalised license texts (distinctive clauses of each
license), which is fast, deterministic and dependency-free; an unrecognised text in a file
named like a license yields ``LicenseRef-graphtune-unknown`` (treated as non-permissive),
never "no license".
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

__all__ = [
    "UNKNOWN_LICENSE",
    "is_license_file",
    "detect_license_text",
    "spdx_header_licenses",
    "parse_spdx_expression",
    "license_type",
    "licenses_for_path",
    "RepoLicenses",
]

UNKNOWN_LICENSE = "LicenseRef-graphtune-unknown"

# go-license-detector style file names: LICENSE, LICENCE.md, COPYING.LESSER, UNLICENSE,
# LICENSE-MIT, MIT-LICENSE, NOTICE, README (README only counts through its License section).
_LICENSE_NAME = re.compile(
    r"^(?:(?:un)?li[cs]en[cs]e|copying|copyright|notice|legal)(?:[-_. ][\w.-]*)?$"
    r"|^[\w.-]*[-_.](?:li[cs]en[cs]e|copying)(?:\.\w+)?$"
    r"|^(?:mit|apache|bsd|gpl|lgpl|agpl|mpl)(?:[-_.][\w.-]*)?(?:\.(?:txt|md|rst))?$",
    re.IGNORECASE,
)
_README_NAME = re.compile(r"^readme(?:\.(?:md|markdown|rst|txt))?$", re.IGNORECASE)
_STRONG_NAME = re.compile(r"^(?:un)?li[cs]en[cs]e|^copying|li[cs]en[cs]e(?:\.\w+)?$", re.IGNORECASE)


def is_license_file(path: str) -> bool:
    """Whether a repository path names a license-bearing file (LICENSE, COPYING, README, ...)."""
    base = posixpath.basename(path)
    if base.lower().endswith((".py", ".js", ".go", ".c", ".h", ".java", ".rs", ".json", ".html", ".svg", ".png")):
        return False
    return bool(_LICENSE_NAME.match(base) or _README_NAME.match(base))


def _norm(text: str) -> str:
    text = text.lower().replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = re.sub(r"[*#>/\\]+", " ", text)  # comment decorations
    return re.sub(r"\s+", " ", text)


# Each entry: SPDX id, clauses that must all occur (a tuple = any one of its alternatives),
# clauses that must not occur.  Texts are lowercased and whitespace-collapsed first.
_V3 = ("version 3, 29 june 2007", "either version 3 of the license", "version 3 of the license, or")
_SIGNATURES: list[tuple[str, tuple[str | tuple[str, ...], ...], tuple[str, ...]]] = [
    ("AGPL-3.0", ("gnu affero general public license", _V3), ()),
    ("LGPL-3.0", ("gnu lesser general public license", _V3), ()),
    ("LGPL-2.1", ("gnu lesser general public license", ("version 2.1, february 1999", "either version 2.1 of the license")), ()),
    ("LGPL-2.0", ("gnu library general public license", ("version 2, june 1991", "either version 2 of the license")), ()),
    ("GPL-3.0", ("gnu general public license", _V3), ("lesser general public", "affero", "library general public")),
    ("GPL-2.0", ("gnu general public license", ("version 2, june 1991", "either version 2 of the license", "version 2 of the license, or")), ("lesser general public", "library general public")),
    ("MPL-2.0", ("mozilla public license", "2.0"), ()),
    ("MPL-1.1", ("mozilla public license", "1.1"), ("2.0",)),
    ("EPL-2.0", ("eclipse public license", "2.0"), ()),
    ("EPL-1.0", ("eclipse public license", "1.0"), ("2.0",)),
    ("EUPL-1.2", ("european union public licence", "1.2"), ()),
    ("SSPL-1.0", ("server side public license",), ()),
    ("BUSL-1.1", ("business source license",), ()),
    ("Apache-2.0", ("apache license", "version 2.0"), ()),
    ("Apache-1.1", ("apache software license", "version 1.1"), ()),
    ("MIT-0", ("permission is hereby granted, free of charge, to any person obtaining a copy",), ("the above copyright notice and this permission notice shall be included",)),
    ("MIT", ("permission is hereby granted, free of charge, to any person obtaining a copy", "the above copyright notice and this permission notice shall be included"), ()),
    ("BSD-3-Clause", ("redistribution and use in source and binary forms", "neither the name"), ("all advertising materials",)),
    ("BSD-4-Clause", ("redistribution and use in source and binary forms", "all advertising materials"), ()),
    ("BSD-2-Clause", ("redistribution and use in source and binary forms", "redistributions in binary form must reproduce"), ("neither the name", "all advertising materials", "the names of its contributors may not be used")),
    ("0BSD", ("permission to use, copy, modify, and/or distribute this software for any purpose with or without fee is hereby granted", "the software is provided \"as is\" and the author disclaims all warranties"), ("above copyright notice and this permission notice appear in all copies",)),
    ("ISC", ("permission to use, copy, modify, and/or distribute this software for any purpose with or without fee is hereby granted", "above copyright notice and this permission notice appear in all copies"), ()),
    ("Unlicense", ("this is free and unencumbered software released into the public domain",), ()),
    ("CC0-1.0", ("cc0 1.0 universal",), ()),
    ("BSL-1.0", ("boost software license", "version 1.0"), ()),
    ("Zlib", ("this software is provided 'as-is', without any express or implied warranty", "altered source versions must be plainly marked"), ()),
    ("WTFPL", ("do what the fuck you want to public license",), ()),
    ("Python-2.0", ("python software foundation license version 2",), ()),
    ("PostgreSQL", ("permission to use, copy, modify, and distribute this software and its documentation for any purpose, without fee, and without a written agreement",), ()),
    ("CC-BY-NC-4.0", ("attribution-noncommercial 4.0 international",), ()),
    ("CC-BY-SA-4.0", ("attribution-sharealike 4.0 international",), ()),
    ("CC-BY-4.0", ("creative commons attribution 4.0 international",), ("noncommercial", "sharealike", "noderivatives")),
    ("UPL-1.0", ("universal permissive license",), ()),
]

# Short references ("Licensed under the MIT License") used in README license sections and
# in file headers that carry no SPDX tag.
_REFERENCES: list[tuple[str, re.Pattern[str]]] = [
    ("Apache-2.0", re.compile(r"apache license,? (?:version )?2\.0|apache-2\.0|apache 2(?:\.0)? license")),
    ("MIT", re.compile(r"\bmit license\b|\blicensed under (?:the )?mit\b|\bmit licensed\b|\(mit\)")),
    ("BSD-3-Clause", re.compile(r"\bbsd[- ]3[- ]clause\b|\b3-clause bsd\b|\bnew bsd license\b")),
    ("BSD-2-Clause", re.compile(r"\bbsd[- ]2[- ]clause\b|\b2-clause bsd\b|\bsimplified bsd license\b")),
    ("GPL-3.0", re.compile(r"\bgpl-?v?3\b|\bgnu gpl v?3\b|gnu general public license v(?:ersion )?3")),
    ("GPL-2.0", re.compile(r"\bgpl-?v?2\b|\bgnu gpl v?2\b|gnu general public license v(?:ersion )?2")),
    ("LGPL-3.0", re.compile(r"\blgpl-?v?3\b")),
    ("AGPL-3.0", re.compile(r"\bagpl-?v?3\b")),
    ("MPL-2.0", re.compile(r"\bmpl-?2\.0\b|mozilla public license,? v(?:ersion )?\.? ?2\.0")),
    ("ISC", re.compile(r"\bisc license\b")),
    ("Unlicense", re.compile(r"\bthe unlicense\b")),
]

_SPDX_HEADER = re.compile(r"SPDX-License-Identifier:\s*([^\n\r]*)")
_SPDX_TOKEN = re.compile(r"\(|\)|[A-Za-z0-9][A-Za-z0-9.+\-]*")


def detect_license_text(text: str, readme: bool = False) -> list[str]:
    """SPDX ids found in a license file's text (sorted, unique).

    For READMEs only the License section and short references count, to avoid reading
    every mention of a dependency's license as the project's own.
    """
    found: set[str] = set()
    found.update(spdx_header_licenses(text))
    if readme:
        m = re.search(r"^\s{0,3}(?:#{1,6}\s*|)(?:licen[cs]e|licensing|copyright)\b[^\n]*\n(.*?)(?=^\s{0,3}#{1,6}\s|\Z)", text, re.IGNORECASE | re.MULTILINE | re.DOTALL)
        if not m:
            return sorted(found)
        text = m.group(1)
    norm = _norm(text)
    for spdx, must, must_not in _SIGNATURES:
        if all((p in norm) if isinstance(p, str) else any(q in norm for q in p) for p in must) and not any(p in norm for p in must_not):
            found.add(spdx)
    # a GPL family hit subsumes its own version clause matches
    if "LGPL-2.1" in found or "LGPL-3.0" in found or "AGPL-3.0" in found:
        found.discard("GPL-2.0")
        found.discard("GPL-3.0")
    if "GPL-3.0" in found and "GPL-2.0" in found:
        found.discard("GPL-2.0")
    if not found and (readme or len(norm) < 2000):
        for spdx, rx in _REFERENCES:
            if rx.search(norm):
                found.add(spdx)
    return sorted(found)


def parse_spdx_expression(expr: str) -> list[str]:
    """License ids (no operators) of an SPDX expression like ``(MIT OR Apache-2.0)``."""
    out = []
    for tok in _SPDX_TOKEN.findall(expr):
        if tok in ("(", ")") or tok.upper() in ("AND", "OR", "WITH"):
            continue
        out.append(tok)
    return out


def _expression_permissive(expr: str, permissive: frozenset[str]) -> bool:
    """Evaluate an SPDX expression: OR needs one permissive branch, AND needs all."""
    toks = [t for t in _SPDX_TOKEN.findall(expr)]
    pos = 0

    def atom() -> bool:
        nonlocal pos
        if pos >= len(toks):
            return False
        t = toks[pos]
        pos += 1
        if t == "(":
            v = disj()
            if pos < len(toks) and toks[pos] == ")":
                pos += 1
            return v
        ok = t in permissive
        if pos < len(toks) and toks[pos].upper() == "WITH":
            pos += 2  # exceptions (e.g. LLVM-exception) keep the base license's nature
        return ok

    def conj() -> bool:
        nonlocal pos
        v = atom()
        while pos < len(toks) and toks[pos].upper() == "AND":
            pos += 1
            v = atom() and v
        return v

    def disj() -> bool:
        nonlocal pos
        v = conj()
        while pos < len(toks) and toks[pos].upper() == "OR":
            pos += 1
            v = conj() or v
        return v

    return disj()


def spdx_header_licenses(text: str, max_chars: int = 4000) -> list[str]:
    """SPDX expressions declared by ``SPDX-License-Identifier:`` lines near the top of a file."""
    out = []
    for m in _SPDX_HEADER.finditer(text[:max_chars]):
        expr = re.split(r"\*/|-->|\"|'", m.group(1))[0].strip()
        if expr:
            out.append(expr)
    return out


def license_type(detected: Sequence[str], permissive: Iterable[str], declared: str | None = None) -> str:
    """``permissive`` / ``no_license`` / ``non_permissive`` (Stack v2 ``get_license_type``).

    A declared repository license decides alone when present; otherwise every detected
    license (SPDX expressions allowed) must be permissive, and no license at all gives
    ``no_license``.
    """
    allowed = frozenset(permissive)
    if declared and declared.upper() not in ("NOASSERTION", "OTHER", "NONE", ""):
        return "permissive" if _expression_permissive(declared, allowed) else "non_permissive"
    if not detected:
        return "no_license"
    return "permissive" if all(_expression_permissive(d, allowed) for d in detected) else "non_permissive"


@dataclass
class RepoLicenses:
    """License files of one repository: directory ('' = root) -> SPDX ids found there."""

    by_dir: dict[str, list[str]]

    def to_json(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in sorted(self.by_dir.items())}

    @classmethod
    def from_json(cls, data: Mapping[str, Sequence[str]]) -> "RepoLicenses":
        return cls({k: list(v) for k, v in data.items()})

    @classmethod
    def from_files(cls, files: Iterable[tuple[str, str]]) -> "RepoLicenses":
        """Build from ``(repo-relative path, text)`` pairs of license-bearing files."""
        by_dir: dict[str, set[str]] = {}
        for path, text in files:
            if not text.strip():
                continue  # an empty LICENSE file grants nothing and restricts nothing
            base = posixpath.basename(path)
            readme = bool(_README_NAME.match(base))
            ids = detect_license_text(text, readme=readme)
            if not ids and not readme and _STRONG_NAME.search(base):
                ids = [UNKNOWN_LICENSE]
            if ids:
                by_dir.setdefault(posixpath.dirname(path), set()).update(ids)
        return cls({k: sorted(v) for k, v in by_dir.items()})

    @property
    def root(self) -> list[str]:
        """Licenses declared at the repository root."""
        return list(self.by_dir.get("", []))


def licenses_for_path(repo: RepoLicenses, path: str, header: Sequence[str] = ()) -> list[str]:
    """Licenses applying to ``path``: license files of every ancestor dir plus its own header."""
    found: set[str] = set(header)
    d = posixpath.dirname(path)
    while True:
        found.update(repo.by_dir.get(d, ()))
        if not d:
            break
        d = posixpath.dirname(d)
    return sorted(found)
