"""Reading the JSON/YAML files moeprune is given: every broken or hostile file is one clear line
(issue 11 #11, #19; issue 12 §5 "malformed-JSON errors are cut mid-sentence")."""

from __future__ import annotations

import json

import pytest

from moeprune.errors import UserError
from moeprune.fileio import read_json, read_yaml
from moeprune.modelio import load_config
from moeprune.plan import Plan
from moeprune.recipe import load_recipe

DEEP_JSON = "[" * 100_000 + "]" * 100_000


def _err(fn, *args) -> str:
    with pytest.raises(UserError) as exc:
        fn(*args)
    line = str(exc.value)
    assert "\n" not in line
    return line


def test_malformed_json_says_where_and_what(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('{"a": 1,\n "b": }')
    line = _err(Plan.load, f)
    assert f"plan file '{f}' is not valid JSON: Expecting value at line 2, column 7" in line
    assert line.endswith("make it again with `moeprune plan`.")


def test_deep_nesting_is_refused_before_the_parser(tmp_path):
    (tmp_path / "p.json").write_text(DEEP_JSON)
    assert "nests deeper than 64 levels" in _err(Plan.load, tmp_path / "p.json")
    (tmp_path / "r.yaml").write_text("model: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert "nests deeper than" in _err(load_recipe, tmp_path / "r.yaml")
    (tmp_path / "b.yaml").write_text("a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 3000)))
    assert "nests deeper than" in _err(read_yaml, tmp_path / "b.yaml", "recipe", "fix it")
    # brackets inside strings do not count
    (tmp_path / "s.json").write_text(json.dumps({"s": "[" * 1000}))
    assert read_json(tmp_path / "s.json", "x", "y") == {"s": "[" * 1000}


def test_config_not_utf8_or_too_deep(tmp_path):
    (tmp_path / "config.json").write_bytes(b'\xff\xfe{"model_type": "qwen3_moe"}')
    assert "is not UTF-8 text" in _err(load_config, str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe", "x": ' + DEEP_JSON + "}")
    assert "nests deeper than 64 levels" in _err(load_config, str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    assert "has no model_type" in _err(load_config, str(tmp_path))


def test_duplicate_yaml_keys_are_refused(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model: a\ndata: [d.jsonl]\nmethod: easyep\nkeep: 2\nout: o\nkeep: 4\n")
    line = _err(load_recipe, f)
    assert "key 'keep' is given twice at line 6, column 1" in line
    f.write_text("a:\n  b: 1\n  b: 2\n")
    assert "key 'b' is given twice" in _err(read_yaml, f, "recipe", "fix it")
    f.write_text("a: 1\nb: {c: 1}\n")
    assert read_yaml(f, "recipe", "fix it") == {"a": 1, "b": {"c": 1}}


def test_too_large_or_unreadable(tmp_path):
    f = tmp_path / "p.json"
    f.write_text("[" + "1," * 100 + "1]")
    assert "more than such a file can be" in _err(read_json, f, "plan file", "fix", 64)
    assert "cannot read plan file" in _err(read_json, tmp_path, "plan file", "fix")
