"""Decontamination matching and strict config validation."""

from __future__ import annotations

import json

import pytest

from graphtune.data.cli import main
from graphtune.data.config import ConfigError, DecontamConfig, load_config
from graphtune.data.decontam import Decontaminator, load_benchmark_texts

HUMANEVAL_LIKE = {
    "prompt": 'def below_zero(operations: List[int]) -> bool:\n    """ You\'re given a list of deposit and withdrawal operations on a bank account that starts with\n    zero balance. Your task is to detect if at any point the balance of account falls below zero."""\n',
    "canonical_solution": "    balance = 0\n    for op in operations:\n        balance += op\n        if balance < 0:\n            return True\n    return False\n",
}


def test_substring_and_ngram_decontamination(tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps(HUMANEVAL_LIKE) + "\n")
    d = Decontaminator(DecontamConfig(files=[str(bench)]))
    assert d.active and d.num_items == 2
    # reformatted copy (different whitespace / case) of the prompt is caught
    copy = "# my file\n" + HUMANEVAL_LIKE["prompt"].upper().replace("    ", "\t") + "\npass\n"
    assert d.reason(copy) == "substring"
    assert d.reason("def unrelated():\n    return 42\n") is None
    d2 = Decontaminator(DecontamConfig(strings=["completely different text " * 3], substring=False, ngram=6))
    assert d2.reason("x = 1 # completely different text completely different text here") == "ngram"
    assert d2.reason("completely different") is None


def test_load_benchmark_texts_from_dir(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "one.txt").write_text("alpha beta")
    (tmp_path / "b" / "two.json").write_text(json.dumps([{"question": "what is gamma"}, "delta"]))
    assert load_benchmark_texts([str(tmp_path / "b")], ["question"]) == ["alpha beta", "what is gamma", "delta"]


def _base(tmp_path):
    (tmp_path / "src").mkdir(exist_ok=True)
    return {"output_dir": str(tmp_path / "out"), "sources": [{"type": "local", "path": str(tmp_path / "src")}]}


def test_valid_config_defaults(tmp_path):
    cfg = load_config(_base(tmp_path))
    assert cfg.dedup.num_perm == 256 and cfg.dedup.threshold == 0.7 and cfg.dedup.ngram == 5
    assert cfg.filters.max_line_length == 1000 and cfg.filters.alphanum_fraction == 0.25
    assert cfg.licenses.allow == ["permissive", "no_license"]
    assert cfg.resolved_work_dir().name == "out.work"


@pytest.mark.parametrize("patch,message", [
    ({"dedup": {"treshold": 0.8}}, "unknown key dedup.treshold"),
    ({"colour": "blue"}, "unknown key colour"),
    ({"sources": [{"type": "local", "path": "/nonexistent/x"}]}, "sources[0].path: /nonexistent/x does not exist"),
    ({"sources": [{"type": "svn", "path": "."}]}, "sources[0].type"),
    ({"sources": [{"type": "local", "pth": "."}]}, "unknown key sources[0].pth"),
    ({"sources": [{"type": "local"}]}, "missing required key sources[0].path"),
    ({"dedup": {"threshold": 1.5}}, "dedup.threshold"),
    ({"dedup": {"bands": 30, "rows": 10}}, "exceeds dedup.num_perm"),
    ({"dedup": {"bands": 30}}, "dedup.bands and dedup.rows"),
    ({"filters": {"max_line_length": "long"}}, "filters.max_line_length: expected an integer"),
    ({"pii": {"enabled": "yes"}}, "pii.enabled: expected true/false"),
    ({"licenses": {"allow": ["permissive", "maybe"]}}, "licenses.allow[1]"),
    ({"optout": {"file": "/nonexistent/optout.txt"}}, "optout.file"),
    ({"decontamination": {"files": ["/nonexistent/bench.jsonl"]}}, "decontamination.files[0]"),
    ({"sources": []}, "at least one source"),
])
def test_bad_configs_name_the_problem(tmp_path, patch, message):
    data = _base(tmp_path)
    data.update(patch)
    with pytest.raises(ConfigError) as e:
        load_config(data)
    assert message in str(e.value)


def test_git_source_must_be_a_repository(tmp_path):
    data = _base(tmp_path)
    data["sources"] = [{"type": "git", "path": str(tmp_path / "src")}]
    with pytest.raises(ConfigError, match="not a git repository"):
        load_config(data)
    data["sources"] = [{"type": "local", "path": str(tmp_path / "src"), "content_column": "x", "path_column": "p"}]
    with pytest.raises(ConfigError, match="path_column: only valid for type 'hf'"):
        load_config(data)


def test_yaml_relative_paths_and_cli_check(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: built\nsources:\n  - type: local\n    path: corpus\n")
    c = load_config(cfg)
    assert c.output_dir == str(tmp_path / "built") and c.sources[0].path == str(tmp_path / "corpus")
    assert main(["check", str(cfg)]) == 0
    cfg.write_text("output_dir: built\nsources:\n  - type: local\n    path: corpus\nfilter: {}\n")
    assert main(["check", str(cfg)]) == 2
    assert "unknown key filter" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "missing.yaml")]) == 2
    cfg.write_text("output_dir: [unclosed\n")
    assert main(["check", str(cfg)]) == 2
