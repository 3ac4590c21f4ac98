"""Language detection with go-enry semantics (filename, extension, shebang, content).

Why go-enry: The Stack v2 labels languages with go-enry (a port of GitHub linguist), so the
same names ("Python", "C++", "Jupyter Notebook", ...) and the same vendored / generated
flags make datasets comparable.  The ``enry-python`` binding is used when installed; a small
extension/shebang table keeps the module usable (and tests meaningful) without it.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

__all__ = ["LanguageInfo", "detect_language", "enry_available"]

try:  # pragma: no cover - exercised when the binding is installed
    import enry as _enry

    _ENRY = True
except Exception:  # pragma: no cover
    _enry = None
    _ENRY = False


def enry_available() -> bool:
    """Whether the go-enry binding is importable (otherwise a fallback table is used)."""
    return _ENRY


@dataclass(frozen=True)
class LanguageInfo:
    """Language of one file plus the linguist flags the filters use."""

    language: str  # "" when unknown
    is_vendor: bool
    is_generated: bool


_FALLBACK_EXT = {
    ".py": "Python", ".pyi": "Python", ".js": "JavaScript", ".mjs": "JavaScript", ".ts": "TypeScript",
    ".go": "Go", ".rs": "Rust", ".c": "C", ".h": "C", ".cc": "C++", ".cpp": "C++", ".hpp": "C++",
    ".java": "Java", ".rb": "Ruby", ".sh": "Shell", ".md": "Markdown", ".json": "JSON",
    ".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".html": "HTML", ".css": "CSS", ".xml": "XML",
    ".txt": "Text", ".kt": "Kotlin", ".swift": "Swift", ".php": "PHP", ".cs": "C#", ".scala": "Scala",
    ".lua": "Lua", ".r": "R", ".sql": "SQL", ".tex": "TeX",
}
_FALLBACK_NAMES = {"Makefile": "Makefile", "Dockerfile": "Dockerfile", "LICENSE": "Text", "COPYING": "Text"}
_SHEBANG = re.compile(rb"^#!\s*(?:/usr/bin/env\s+)?(?:\S*/)?(python|bash|sh|node|ruby|perl)[0-9.]*")
_SHEBANG_LANG = {b"python": "Python", b"bash": "Shell", b"sh": "Shell", b"node": "JavaScript", b"ruby": "Ruby", b"perl": "Perl"}
_VENDOR = re.compile(r"(^|/)(node_modules|vendor|third[-_]?party|bower_components|\.yarn)/|\.min\.(js|css)$")
_GENERATED_NAME = re.compile(r"(\.pb\.go|_pb2\.py|\.designer\.cs|package-lock\.json|\.lock)$")


def _fallback(path: str, content: bytes) -> LanguageInfo:
    base = posixpath.basename(path)
    lang = _FALLBACK_NAMES.get(base, "")
    if not lang:
        lang = _FALLBACK_EXT.get(posixpath.splitext(base)[1].lower(), "")
    if not lang:
        m = _SHEBANG.match(content[:128])
        if m:
            lang = _SHEBANG_LANG[m.group(1)]
    return LanguageInfo(lang, bool(_VENDOR.search(path)), bool(_GENERATED_NAME.search(path)))


def detect_language(path: str, content: bytes) -> LanguageInfo:
    """Language (go-enry name, "" if unknown) and vendored/generated flags of one file.

    ``path`` is the repository-relative path: enry uses the filename, extension and
    directories (``node_modules/``, ``vendor/``) as well as the content (shebang, heuristics).
    """
    if not _ENRY:  # pragma: no cover
        return _fallback(path, content)
    try:
        lang = _enry.get_language(path, content) or ""
        vendor = bool(_enry.is_vendor(path))
        generated = bool(_enry.is_generated(path, content))
    except Exception:  # pragma: no cover - binding errors must not kill a run
        return _fallback(path, content)
    return LanguageInfo(lang, vendor, generated)
