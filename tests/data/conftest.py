"""Shared fixtures for graphtune.data tests: small corpora built in tmp_path."""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("graphtune") is None:  # not installed: import from the checkout
    sys.path.insert(0, str(_ROOT))



@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Dataset sources are read from local files only; never reach for the Hub."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

MIT = """MIT License

Copyright (c) 2024 Test Author

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction.

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.
"""

APACHE = """
                                 Apache License
                           Version 2.0, January 2004
                        http://www.apache.org/licenses/

   TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION
"""

GPL3 = """                    GNU GENERAL PUBLIC LICENSE
                       Version 3, 29 June 2007

 Copyright (C) 2007 Free Software Foundation, Inc. <https://fsf.org/>
 Everyone is permitted to copy and distribute verbatim copies
"""

BSD3 = """Copyright (c) 2024, Someone
Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:
1. Redistributions of source code must retain the above copyright notice.
2. Redistributions in binary form must reproduce the above copyright notice.
3. Neither the name of the copyright holder nor the names of its contributors
   may be used to endorse or promote products derived from this software.
"""

_WORDS = (
    "alpha beta gamma delta epsilon zeta theta iota kappa lambda sigma omega "
    "parse render encode decode fetch store update merge split join count index "
    "buffer stream socket cache queue worker task node graph tree leaf edge path "
    "token record field value table column schema batch chunk frame packet"
).split()


def make_code(seed: int, n_funcs: int = 25) -> str:
    """Deterministic, realistic-looking Python with seed-specific identifiers."""
    rng = random.Random(seed)
    out = [f'"""Module {seed}: helpers for {rng.choice(_WORDS)} processing."""', "", "import os", "import sys", ""]
    for i in range(n_funcs):
        a, b, c = (rng.choice(_WORDS) for _ in range(3))
        name = f"{a}_{b}_{seed}_{i}"
        out += [
            f"def {name}({c}, limit={rng.randint(1, 99)}):",
            f'    """Return the {a} of {c} after {b} (variant {rng.randint(0, 9999)})."""',
            "    total = 0",
            f"    for item in {c}[:limit]:",
            f"        if item.{b}_{rng.choice(_WORDS)}() > {rng.randint(0, 500)}:",
            f"            total += item.{rng.choice(_WORDS)}({rng.randint(0, 50)})",
            f"    return total * {rng.randint(2, 9)}",
            "",
        ]
    return "\n".join(out) + "\n"


def mutate(text: str, seed: int, fraction: float = 0.03) -> str:
    """A near-duplicate: a few lines edited."""
    rng = random.Random(seed)
    lines = text.split("\n")
    for _ in range(max(1, int(len(lines) * fraction))):
        i = rng.randrange(len(lines))
        lines[i] = lines[i] + f"  # edit {rng.randint(0, 10**6)}"
    return "\n".join(lines)


def git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com", GIT_AUTHOR_DATE="2024-05-01T12:00:00+00:00",
               GIT_COMMITTER_DATE="2024-05-01T12:00:00+00:00")
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout.strip()


def make_git_repo(path: Path, files: dict[str, str | bytes]) -> str:
    """A git repository with one commit holding ``files``; returns the commit id."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    for rel, content in files.items():
        p = path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "init")
    return git(path, "rev-parse", "HEAD")


def write_files(root: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.fixture(scope="session")
def data_helpers():
    """Access to the corpus helpers from test modules."""
    return sys.modules[__name__]
