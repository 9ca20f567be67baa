"""What a pruned folder takes from its source, and its model card: only known files are copied,
links never lead out of the model, remote code is named in the card, every string from a file is
inert Markdown, and the Hub's YAML metadata block parses with the expected fields."""

from __future__ import annotations

import json
import os
import re
import shutil
from functools import cache
from pathlib import Path

import yaml

from moeprune import __version__
from moeprune.arch import find_moe_blocks
from moeprune.surgery import rewrite_checkpoint
from moeprune.testing.tiny import tiny_model


@cache
def _model():
    model = tiny_model("qwen3_moe")
    return model, find_moe_blocks(model)


def _source(path: Path) -> tuple[Path, dict[int, list[int]]]:
    model, blocks = _model()
    model.save_pretrained(path)
    kept = {b.layer: list(range(b.num_experts - 2)) for b in blocks}
    return path, kept


def _front_matter(card: str) -> dict:
    m = re.match(r"---\n(.*?)\n---\n", card, flags=re.DOTALL)
    assert m is not None, card[:200]
    data = yaml.safe_load(m.group(1))
    assert isinstance(data, dict)
    return data


def test_copies_only_known_files(tmp_path):
    src, kept = _source(tmp_path / "src")
    known = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "merges.txt", "LICENSE"]
    junk = ["train.log", "optimizer.pt", "pytorch_model.bin", "model.gguf", "extra.safetensors", "notes.py"]
    for name in known + junk:
        (src / name).write_text("x")
    (src / "checkpoint-100").mkdir()
    (src / "checkpoint-100" / "trainer_state.json").write_text("{}")
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool_use.jinja").write_text("t")
    (src / "additional_chat_templates" / "run.sh").write_text("t")
    result = rewrite_checkpoint(src, tmp_path / "out", kept)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    for name in known + ["generation_config.json", "additional_chat_templates"]:
        assert name in names
    assert (tmp_path / "out" / "additional_chat_templates" / "tool_use.jinja").is_file()
    assert not (tmp_path / "out" / "additional_chat_templates" / "run.sh").exists()
    for name in [*junk, "checkpoint-100"]:
        assert name not in names
    skipped = " ".join(result.skipped_files)
    for name in [*junk, "checkpoint-100/", "additional_chat_templates/run.sh"]:
        assert name in skipped


def test_links_out_of_the_model_folder_are_not_followed(tmp_path):
    src, kept = _source(tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy")
    (src / "tokenizer.json").symlink_to(secret)
    (src / "LICENSE").symlink_to("/etc/hostname")
    (src / "vocab.json").write_text("{}")
    (src / "merges.txt").symlink_to("vocab.json")  # inside the folder: followed
    result = rewrite_checkpoint(src, tmp_path / "out", kept)
    out = tmp_path / "out"
    assert not (out / "tokenizer.json").exists() and not (out / "LICENSE").exists()
    assert (out / "merges.txt").read_text() == "{}" and not (out / "merges.txt").is_symlink()
    assert "tokenizer.json (a link out of the model folder" in " ".join(result.skipped_files)
    for path in out.rglob("*"):
        assert not path.is_symlink()
        assert "do not copy" not in path.read_text(errors="replace") if path.is_file() else True


def _hub_cache(tmp_path: Path, src: Path) -> Path:
    """``src`` as the Hugging Face cache stores it: snapshot files are links into ../../blobs."""
    repo = tmp_path / "hub" / "models--acme--tiny-moe"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, path in enumerate(sorted(src.iterdir())):
        blob = blobs / f"blob{i:04d}"
        shutil.copyfile(path, blob)
        (snap / path.name).symlink_to(os.path.relpath(blob, snap))
    return snap


def test_hub_cache_links_into_blobs_are_followed(tmp_path):
    src, kept = _source(tmp_path / "src")
    (src / "tokenizer.json").write_text('{"tok": 1}')
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    snap = _hub_cache(tmp_path, src)
    rewrite_checkpoint(snap, tmp_path / "out", kept)
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == '{"tok": 1}' and not (out / "tokenizer.json").is_symlink()
    assert (out / "README.original.md").read_text().startswith("---\nlicense: apache-2.0")
    meta = _front_matter((out / "README.md").read_text())
    assert meta["base_model"] == "acme/tiny-moe"
    assert meta["license"] == "apache-2.0"


def test_front_matter_parses_with_the_hub_fields(tmp_path):
    src, kept = _source(tmp_path / "src")
    (src / "LICENSE.txt").write_text("terms")
    rewrite_checkpoint(src, tmp_path / "out", kept, plan={"method": "easyep"})
    card = (tmp_path / "out" / "README.md").read_text()
    meta = _front_matter(card)
    assert "base_model" not in meta  # a local folder is no hub id
    assert meta["library_name"] == "transformers"
    assert {"moeprune", "mixture-of-experts"} <= set(meta["tags"])
    assert meta["moeprune"]["version"] == __version__
    assert meta["license"] == "other" and meta["license_link"] == "LICENSE.txt"
    assert "pip install moeprune" not in card


def test_install_text_is_honest_where_moeprune_load_is_needed(tmp_path):
    src, kept = _source(tmp_path / "src")
    kept[next(iter(kept))] = kept[next(iter(kept))][:-1]  # ragged: needs moeprune.load
    rewrite_checkpoint(src, tmp_path / "out", kept)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "moeprune.load" in card
    assert "pip install moeprune" not in card and "pip install -e ." in card


def test_remote_code_is_named_in_the_card(tmp_path):
    src, kept = _source(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny.TinyConfig",
        "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
    }
    (src / "config.json").write_text(json.dumps(config))
    for name in ("configuration_tiny.py", "modeling_tiny.py", "helpers.py"):
        (src / name).write_text("# code\n")
    result = rewrite_checkpoint(src, tmp_path / "out", kept)
    out = tmp_path / "out"
    assert (out / "modeling_tiny.py").is_file() and (out / "configuration_tiny.py").is_file()
    assert not (out / "helpers.py").exists()
    assert sorted(result.source.code_files) == ["configuration_tiny.py", "modeling_tiny.py"]
    assert "auto_map" in json.loads((out / "config.json").read_text())
    card = (out / "README.md").read_text()
    assert "## Remote code" in card and "trust_remote_code=True" in card and "modeling\\_tiny.py" in card


def test_strings_from_files_are_inert_in_the_card(tmp_path):
    src, kept = _source(tmp_path / "src")
    evil = "easyep\n---\nlicense: evil\n<script>alert(1)</script> | `x` [a](javascript:1)\n# Heading"
    plan = {
        "method": evil,
        "settings": {"scope": "layer\n---", "profiles": [{"data": [{"path": "/d/a|b<i>.jsonl"}]}]},
    }
    meta = {"tokens": "7 | <b>x</b>", "data": [{"path": "x\n---\ny.jsonl"}]}
    rewrite_checkpoint(src, tmp_path / "out", kept, plan=plan, metadata=meta)
    card = (tmp_path / "out" / "README.md").read_text()
    fm = _front_matter(card)
    assert "license" not in fm
    assert [line for line in card.splitlines() if line.strip() == "---"] == ["---", "---"]
    assert "<script>" not in card and "<b>" not in card and "<i>" not in card
    assert not any(
        line.startswith("# Heading") or line.startswith("license:") for line in card.splitlines()[3:]
    )
    method_row = next(line for line in card.splitlines() if line.startswith("| scoring method"))
    assert method_row.count("|") - method_row.count("\\|") == 3  # still one row of two cells
    assert re.search(r"(?<!\\)`", method_row) is None  # no code span opened
