"""PII and secret redaction: emails, public IPs, API keys / tokens / private keys, passwords.

Why: code corpora leak credentials and personal addresses; a model trained on them can
regurgitate them.  Detected spans are replaced with fixed placeholders (``<EMAIL>``,
``<IP_ADDRESS>``, ``<KEY>``, ``<PASSWORD>``) so the output is deterministic and the count per
kind can be reported.

* emails: an RFC-ish regex with a real TLD;
* IP addresses: IPv4/IPv6 candidates validated by :mod:`ipaddress`; only *global* addresses
  are redacted (private, loopback, link-local, reserved stay), and version-like strings
  (``version 1.2.3.4``, ``1.2.3.4.5``, all-single-digit quads such as ``1.1.1.1``) are kept;
* secrets: the detect-secrets plugins (AWS, GitHub, GitLab, Slack, Stripe, JWT, OpenAI, ...,
  keyword assignments, basic-auth URLs, high-entropy strings) run on the lines a cheap
  prefilter marks, then generic hits (keyword / high-entropy) must pass detect-secrets'
  heuristic filters, a hash-context check and a Shannon-entropy check; private-key blocks
  are redacted from ``BEGIN`` to ``END``.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from graphtune.data.config import PIIConfig

__all__ = ["PIIRedactor", "Redaction", "PLACEHOLDERS", "shannon_entropy"]

PLACEHOLDERS = {"EMAIL": "<EMAIL>", "IP_ADDRESS": "<IP_ADDRESS>", "KEY": "<KEY>", "PASSWORD": "<PASSWORD>"}

_EMAIL = re.compile(
    r"(?<![\w.+%-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w])(?!\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
_EMAIL_ANCHOR = (re.compile(r"@"), 66, 260)
_IPV4_ANCHOR = (re.compile(r"\d\.\d{1,3}\.\d"), 5, 12)
_IPV6_ANCHOR = (re.compile(r":[0-9a-f]{0,4}:"), 42, 42)
_VERSION_BEFORE = re.compile(r"\b(?:version|ver|release|rev|build|v)\s*[:=]?\s*['\"]?\s*$", re.IGNORECASE)
_WELL_KNOWN_DNS = {"8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9", "208.67.222.222", "208.67.220.220"}
_PRIVATE_KEY_BLOCK = re.compile(
    r"(-----BEGIN[A-Z0-9 _-]*PRIVATE KEY(?: BLOCK)?-----)(.*?)(-----END[A-Z0-9 _-]*PRIVATE KEY(?: BLOCK)?-----|\Z)",
    re.DOTALL,
)
_HASH_CONTEXT = re.compile(r"sha|md5|hash|checksum|digest|integrity|crc", re.IGNORECASE)
_PLACEHOLDER_VALUE = re.compile(r"example|xxxx|your[_-]?|placeholder|changeme|dummy|\*\*\*|<|>|\.\.\.", re.IGNORECASE)
_COMMON_VALUES = re.compile(r"(?:pass(?:word|wd)?|pwd|secret|test(?:ing)?|admin|user(?:name)?|guest|root|foo|bar|baz|none|null|empty|token|key|value)\d{0,3}", re.IGNORECASE)
_PASSWORD_WORDS = re.compile(r"pass|pwd|contrase", re.IGNORECASE)
_GENERIC_PLUGINS = {"KeywordDetector", "Base64HighEntropyString", "HexHighEntropyString"}
_SKIPPED_PLUGINS = {"PrivateKeyDetector", "IPPublicDetector"}  # handled by dedicated logic


def shannon_entropy(s: str) -> float:
    """Shannon entropy in bits per character of ``s``."""
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


@dataclass(frozen=True)
class Redaction:
    """One redacted span of the original text."""

    start: int
    end: int
    kind: str  # EMAIL / IP_ADDRESS / KEY / PASSWORD
    detector: str


def _load_plugins() -> list[Any]:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    plugins = []
    for _, cls in sorted(get_mapping_from_secret_type_to_class().items()):
        if cls.__name__ in _SKIPPED_PLUGINS:
            continue
        try:
            plugins.append(cls())
        except TypeError:  # pragma: no cover - plugin needing arguments
            continue
    return plugins


class PIIRedactor:
    """Find and replace PII/secrets in source files (stateless between calls, deterministic)."""

    def __init__(self, cfg: PIIConfig | None = None):
        self.cfg = cfg or PIIConfig()
        self._plugins: list[Any] = []
        if self.cfg.secrets:
            from detect_secrets.plugins.keyword import DENYLIST

            self._plugins = _load_plugins()
            self._keyword_rx = re.compile("|".join(DENYLIST))

    # ------------------------------------------------------------------------------------
    def find(self, text: str, path: str = "file.txt") -> list[Redaction]:
        """All spans to redact in ``text`` (non-overlapping, sorted)."""
        if not self.cfg.enabled:
            return []
        spans: list[Redaction] = []
        low: str | None = text.lower()
        if len(low) != len(text):
            low = None
        if self.cfg.secrets:
            spans += self._private_keys(text)
            spans += self._secrets(text, path, low)
        secret_spans = sorted((r.start, r.end) for r in spans)
        others: list[Redaction] = []
        if self.cfg.emails:
            others += [Redaction(m.start(), m.end(), "EMAIL", "email") for m in _windowed(_EMAIL, text, _intervals(text, low, _EMAIL_ANCHOR))]
        if self.cfg.ip_addresses:
            others += self._ips(text, low)
        # secrets win over emails / IPs they overlap (``user:pass@host`` is not an email)
        for r in others:
            i = bisect.bisect_left(secret_spans, (r.end, -1))
            if i > 0 and secret_spans[i - 1][1] > r.start:
                continue
            spans.append(r)
        # resolve overlaps: earlier start first, longer first; drop spans overlapping a kept one
        spans.sort(key=lambda r: (r.start, -(r.end - r.start), r.kind))
        out: list[Redaction] = []
        for r in spans:
            if out and r.start < out[-1].end:
                continue
            out.append(r)
        return out

    def redact(self, text: str, path: str = "file.txt") -> tuple[str, dict[str, int]]:
        """``text`` with every finding replaced by its placeholder, and counts per kind."""
        found = self.find(text, path)
        if not found:
            return text, {}
        pieces = []
        pos = 0
        counts: dict[str, int] = {}
        for r in found:
            pieces.append(text[pos : r.start])
            pieces.append(PLACEHOLDERS[r.kind])
            pos = r.end
            counts[r.kind] = counts.get(r.kind, 0) + 1
        pieces.append(text[pos:])
        return "".join(pieces), counts

    # ------------------------------------------------------------------------------------
    @staticmethod
    def _private_keys(text: str) -> list[Redaction]:
        if "PRIVATE KEY" not in text:
            return []
        out = []
        for m in _PRIVATE_KEY_BLOCK.finditer(text):
            body_start, body_end = m.start(2), m.end(2)
            # keep the BEGIN/END lines, redact the key material between them
            while body_start < body_end and text[body_start] in "\r\n":
                body_start += 1
            while body_end > body_start and text[body_end - 1] in "\r\n \t":
                body_end -= 1
            if body_end > body_start:
                out.append(Redaction(body_start, body_end, "KEY", "PrivateKey"))
        return out

    def _ips(self, text: str, low: str | None) -> list[Redaction]:
        out = []
        for m in _windowed(_IPV4, text, _intervals(text, low, _IPV4_ANCHOR)):
            s = m.group(0)
            if s in _WELL_KNOWN_DNS or all(len(o) == 1 for o in s.split(".")):
                continue
            if _VERSION_BEFORE.search(text[max(0, m.start() - 24) : m.start()]):
                continue
            try:
                if not ipaddress.IPv4Address(s).is_global:
                    continue
            except ValueError:
                continue
            out.append(Redaction(m.start(), m.end(), "IP_ADDRESS", "ipv4"))
        if ":" in text:
            for m in _windowed(_IPV6, text, _intervals(text, low, _IPV6_ANCHOR)):
                s = m.group(0)
                if s.count(":") < 2 or len(s) < 6:
                    continue
                try:
                    addr = ipaddress.IPv6Address(s)
                except ValueError:
                    continue
                if addr.is_global and addr.ipv4_mapped is None:
                    out.append(Redaction(m.start(), m.end(), "IP_ADDRESS", "ipv6"))
        return out

    def _keep_generic(self, secret: str, line: str, plugin: Any) -> bool:
        """Filters for keyword / high-entropy hits, which are the false-positive-prone ones."""
        from detect_secrets.filters import heuristic as h

        if len(secret) < 6 or _PLACEHOLDER_VALUE.search(secret) or _COMMON_VALUES.fullmatch(secret):
            return False
        if (
            h.is_templated_secret(secret)
            or h.is_prefixed_with_dollar_sign(secret)
            or h.is_sequential_string(secret)
            or h.is_potential_uuid(secret)
            or h.is_indirect_reference(line)
            or h.is_likely_id_string(secret, line, plugin)
            or h.is_not_alphanumeric_string(secret)
        ):
            return False
        if re.fullmatch(r"[0-9a-fA-F]{32}|[0-9a-fA-F]{40}|[0-9a-fA-F]{64}|[0-9a-fA-F]{128}", secret) and _HASH_CONTEXT.search(line):
            return False
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", secret) and ("." in secret or "_" in secret or secret.islower()):
            return False  # identifiers / dotted names (``settings.SECRET_KEY``)
        return shannon_entropy(secret) >= self.cfg.min_entropy

    def _secrets(self, text: str, path: str, low: str | None) -> list[Redaction]:
        out: list[Redaction] = []
        windows: dict[int, list[tuple[int, int]]] = {}
        line_starts: list[int] | None = None

        def line_of(pos: int) -> tuple[int, int]:
            nonlocal line_starts
            if line_starts is None:
                line_starts = [0] + [m.end() for m in _NEWLINE.finditer(text)]
            i = bisect.bisect_right(line_starts, pos) - 1
            end = line_starts[i + 1] - 1 if i + 1 < len(line_starts) else len(text)
            return line_starts[i], end

        for plugin in self._plugins:
            name = type(plugin).__name__
            if name == "KeywordDetector":
                out += self._keyword_hits(plugin, text, path, line_of, low)
            elif name in _GENERIC_PLUGINS:  # high-entropy quoted strings
                # entropy > limit needs more than 2**limit distinct characters
                min_len = int(2**plugin.entropy_limit) + 1
                for m in plugin.regex.finditer(text):
                    secret = m.group(2)
                    if len(secret) < min_len:
                        continue
                    ls, le = line_of(m.start(2))
                    if not _SECRET_CONTEXT.search(text, max(ls, m.start() - 80), m.start()):
                        continue  # bare high-entropy literals are mostly hashes / test vectors
                    if plugin.calculate_shannon_entropy(secret) <= plugin.entropy_limit:
                        continue
                    line = text[ls:le]
                    if self._keep_generic(secret, line, plugin):
                        out.append(Redaction(m.start(2), m.end(2), "KEY", name))
            else:  # format-specific detectors: AWS, GitHub, Slack, Stripe, JWT, basic auth, ...
                anchor = _ANCHORS.get(name)
                iv = None
                if anchor is not None:
                    if id(anchor) not in windows:
                        windows[id(anchor)] = _intervals(text, low, anchor)
                    iv = windows[id(anchor)]
                for rx in getattr(plugin, "denylist", ()) or ():
                    for m in _windowed(rx, text, iv):
                        s0, s1 = _secret_span(m, name)
                        if name != "BasicAuthDetector":
                            s1 = _extend_token(text, s1, name)
                        secret = text[s0:s1]
                        if len(secret) < 6 or _PLACEHOLDER_VALUE.search(secret) or _COMMON_VALUES.fullmatch(secret):
                            continue
                        try:
                            if not any(True for _ in plugin.analyze_string(text[m.start() : max(m.end(), s1)])):
                                continue
                        except Exception:  # pragma: no cover
                            continue
                        kind = "PASSWORD" if name == "BasicAuthDetector" else "KEY"
                        out.append(Redaction(s0, s1, kind, name))
        return out

    def _keyword_hits(self, plugin: Any, text: str, path: str, line_of: Any, low: str | None) -> list[Redaction]:
        """``password = "..."``-style assignments, on the lines mentioning a secret keyword."""
        out = []
        seen: set[int] = set()
        hits = self._keyword_rx.finditer(low) if low is not None else re.compile(self._keyword_rx.pattern, re.IGNORECASE).finditer(text)
        for m in hits:
            ls, le = line_of(m.start())
            if ls in seen or le - ls > 2000:
                continue
            seen.add(ls)
            line = text[ls:le]
            try:
                found = plugin.analyze_line(filename=path, line=line, line_number=0)
            except Exception:  # pragma: no cover
                continue
            for ps in found:
                secret = ps.secret_value
                if not secret or not self._keep_generic(secret, line, plugin):
                    continue
                pos = line.find(secret)
                if pos < 0:
                    continue
                kind = "PASSWORD" if _PASSWORD_WORDS.search(line[:pos]) else "KEY"
                while pos >= 0:
                    out.append(Redaction(ls + pos, ls + pos + len(secret), kind, "KeywordDetector"))
                    pos = line.find(secret, pos + len(secret))
        return out


_NEWLINE = re.compile(r"\n")
# Cheap anchors for the slow detector regexes: the full regex only runs in a window around
# each anchor hit (before, after chars), which keeps secret scanning linear and fast.
# assignment-style detectors (``cloudant_password = "<64 hex>"``) anchor on the long value
_KEYWORD_ANCHOR = (re.compile(r"[0-9a-z_\-]{24,}"), 120, 8)
_ANCHORS: dict[str, tuple[re.Pattern[str], int, int]] = {
    "AWSKeyDetector": (re.compile(r"a3t|abia|acca|akia|asia|aws"), 80, 160),
    "ArtifactoryDetector": (re.compile(r"akc|ap[0-9a-f]"), 2, 400),
    "CloudantDetector": _KEYWORD_ANCHOR,
    "IbmCosHmacDetector": _KEYWORD_ANCHOR,
    "IbmCloudIamDetector": _KEYWORD_ANCHOR,
    "SoftlayerDetector": _KEYWORD_ANCHOR,
    "MailchimpDetector": (re.compile(r"-us\d"), 40, 8),
    "SlackDetector": (re.compile(r"xox|hooks\.slack\.com"), 2, 400),
    "TelegramBotTokenDetector": (re.compile(r"\d:[0-9a-z_-]"), 12, 48),
}


def _intervals(text: str, low: str | None, anchor: tuple[re.Pattern[str], int, int]) -> list[tuple[int, int]]:
    """Merged windows ``[hit - before, hit + after)`` around the anchor's hits.

    Anchors are lowercase patterns run on the lowercased text (fast, no IGNORECASE) when
    lowercasing kept the length, else case-insensitively on the original.
    """
    arx, before, after = anchor
    hits = arx.finditer(low) if low is not None else re.compile(arx.pattern, re.IGNORECASE).finditer(text)
    intervals: list[tuple[int, int]] = []
    lo = hi = -1
    n = len(text)
    for a in hits:
        s0, s1 = max(0, a.start() - before), min(n, a.end() + after)
        if s0 <= hi:
            hi = max(hi, s1)
        else:
            if hi > lo:
                intervals.append((lo, hi))
            lo, hi = s0, s1
    if hi > lo:
        intervals.append((lo, hi))
    return intervals


def _windowed(rx: re.Pattern[str], text: str, intervals: list[tuple[int, int]] | None) -> list[re.Match[str]]:
    """Matches of ``rx`` in ``text``, or only inside ``intervals`` when given."""
    if intervals is None:
        return list(rx.finditer(text))
    out: list[re.Match[str]] = []
    for lo, hi in intervals:
        out.extend(rx.finditer(text, lo, hi))
    return out
_SECRET_CONTEXT = re.compile(r"key|secret|token|passw|pwd|auth|credential|api|private|signature|bearer", re.IGNORECASE)
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-+/=]*")
_JWT_CHARS = re.compile(r"[A-Za-z0-9_\-+/=.]*")


def _secret_span(m: re.Match[str], plugin: str) -> tuple[int, int]:
    """Span of the secret inside a detector match: the capture group holding it if any."""
    if plugin == "BasicAuthDetector" and m.lastindex:
        return m.span(1)
    for g in range(m.lastindex or 0, 0, -1):
        if m.group(g) and m.end(g) - m.start(g) >= 8:
            return m.span(g)
    return m.span(0)


def _extend_token(text: str, end: int, plugin: str) -> int:
    """Extend a lazily matched token (JWT signature, longer keys) to its last character."""
    rx = _JWT_CHARS if plugin == "JwtTokenDetector" else _TOKEN_CHARS
    m = rx.match(text, end)
    return m.end() if m else end
