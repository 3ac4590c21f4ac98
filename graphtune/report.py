"""What a pipeline run did to a graph: per-pass counts, refusals with reasons, unmatched modules.

Plain dataclasses so a report prints well, compares in tests and serialises with ``asdict``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Refusal:
    """A site a pass matched structurally but would not rewrite, and why."""

    site: str
    rewrite: str
    reason: str


@dataclasses.dataclass
class PassResult:
    name: str
    count: int = 0
    sites: list[str] = dataclasses.field(default_factory=list)
    by_rewrite: dict[str, int] = dataclasses.field(default_factory=dict)
    refused: list[Refusal] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Unmatched:
    """A module that looks like something a pass handles but that no rewrite touched."""

    module: str
    module_class: str
    expected_pass: str
    reason: str


@dataclasses.dataclass
class Report:
    family: str | None
    family_reason: str
    passes: list[PassResult]
    unmatched: list[Unmatched]
    graph_text: str = ""
    expected_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {p.name: p.count for p in self.passes}

    @property
    def total_rewrites(self) -> int:
        return sum(p.count for p in self.passes)

    def summary(self) -> str:
        """A short human-readable table (what ``make demo`` prints)."""
        lines = [f"family: {self.family or 'unknown'} ({self.family_reason})"]
        width = max([len(p.name) for p in self.passes] + [4])
        for p in self.passes:
            exp = self.expected_counts.get(p.name)
            exp_s = f"  (expected {exp})" if exp is not None else ""
            variants = ", ".join(f"{k}={v}" for k, v in sorted(p.by_rewrite.items()))
            lines.append(f"  {p.name:<{width}}  {p.count:>3} rewritten{exp_s}{'  [' + variants + ']' if variants else ''}")
            for r in p.refused:
                lines.append(f"  {'':<{width}}  refused {r.site}: {r.reason}")
        if self.unmatched:
            lines.append("unmatched modules:")
            for u in self.unmatched:
                lines.append(f"  {u.module} ({u.module_class}) -> {u.expected_pass}: {u.reason}")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
