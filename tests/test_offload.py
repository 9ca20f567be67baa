"""Sequential (layer-by-layer) calibration: the same profile tensors as a whole-model pass, from
hub-layout (per-expert keys) and fused checkpoints in several shards, reading one layer at a time."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import moeprune.testing.tiny as tiny  # noqa: E402
from moeprune import offload
from moeprune.arch import decoder_layers
from moeprune.calibrate import calibrate
from moeprune.checkpoint import Checkpoint
from moeprune.errors import UserError
from moeprune.offload import calibrate_sequential

# gpt_oss: a 4-token window on its sliding layer, so that the two layers get different masks
MODELS = {
    "deepseek_v3": {},  # dense layer 0, MLA, group-limited sigmoid routing
    "qwen3_moe": {},
    "mixtral": {},
    "gpt_oss": {"sliding_window": 4},
}
LENGTHS = [7, 1, 40, 3, 19, 2]
PER_EXPERT = re.compile(r"experts\.\d+\.")


def _seqs(lengths: list[int], seed: int = 0, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model type -> {layout: directory}, each checkpoint in several shards."""
    out: dict[str, dict[str, Path]] = {}
    for model_type, overrides in MODELS.items():
        model = tiny.tiny_model(model_type, **overrides)
        out[model_type] = {}
        for layout, original in (("hub", True), ("fused", False)):
            d = tmp_path_factory.mktemp(f"{model_type}-{layout}")
            model.save_pretrained(d, save_original_format=original, max_shard_size="100KB")
            out[model_type][layout] = d
    return out


def _reference(directory: Path, seqs, dtype=torch.float32, **kwargs) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    return calibrate(model, seqs, **kwargs)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if w.is_floating_point():
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(g, w), name


@pytest.mark.parametrize("layout", ["hub", "fused"])
@pytest.mark.parametrize("model_type", list(MODELS))
def test_equals_whole_model_pass(saved, model_type, layout):
    directory = saved[model_type][layout]
    ckpt = Checkpoint.open(directory)
    assert len(ckpt.shard_files) >= 3
    per_expert = any(PER_EXPERT.search(k) for k in ckpt.tensors)
    if model_type != "gpt_oss":  # gpt-oss stores fused experts in both layouts
        assert per_expert == (layout == "hub")
    seqs = _seqs(LENGTHS)
    kwargs = {"batch_size": 2, "pad_id": 0, "premoe_ka": 3, "per_sample": True}
    _assert_same(calibrate_sequential(directory, seqs, **kwargs), _reference(directory, seqs, **kwargs))


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen3_moe"])
def test_bfloat16(saved, model_type):
    directory = saved[model_type]["hub"]
    seqs = _seqs(LENGTHS, seed=1)
    got = calibrate_sequential(directory, seqs, batch_size=3, dtype=torch.bfloat16)
    _assert_same(got, _reference(directory, seqs, dtype=torch.bfloat16, batch_size=3))


def _layer_of(key: str) -> int | None:
    m = re.search(r"layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def _materialised_layers(model) -> list[int]:
    return [
        i
        for i, layer in enumerate(decoder_layers(model))
        if any(not t.is_meta for t in [*layer.parameters(), *layer.buffers()])
    ]


@pytest.mark.parametrize("model_type", ["deepseek_v3", "mixtral"])
def test_one_layer_at_a_time(saved, model_type, monkeypatch):
    directory = saved[model_type]["hub"]
    loads: list[tuple[set, list[int], list[int]]] = []
    keys_read: list[str] = []
    original = offload._load_tensors

    def spy(model, reader, keys, load_config, *args):
        before = _materialised_layers(model)
        out = original(model, reader, keys, load_config, *args)
        loads.append(({_layer_of(k) for k in keys}, before, _materialised_layers(model)))
        keys_read.extend(keys)
        return out

    monkeypatch.setattr(offload, "_load_tensors", spy)
    calibrate_sequential(directory, _seqs(LENGTHS), batch_size=4)
    n_layers = len(loads) - 1
    # first the text model outside its layers (embedding, norm), then every layer in order
    assert loads[0] == ({None}, [], [])
    for i, (layers_read, before, after) in enumerate(loads[1:]):
        assert layers_read == {i}
        assert before == [] and after == [i]
    assert n_layers == tiny.tiny_config(model_type).num_hidden_layers
    # everything but the LM head was read, each key once
    all_keys = Checkpoint.open(directory).keys()
    assert any(k.startswith("lm_head.") for k in all_keys)
    assert sorted(keys_read) == sorted(k for k in all_keys if not k.startswith("lm_head."))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8])
def test_reader_reads_each_tensor_as_safetensors_does(tmp_path, dtype):
    """`ShardReader.read` (preadv of each byte range, what the prefetch thread runs) gives exactly
    the tensors safetensors gives, in several shards, empty tensors included."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 5), "b": (0, 4), "c": (7,), "d": (2, 3, 4)}
    tensors = {k: (torch.randn(*s, generator=g) * 50).to(dtype) for k, s in shapes.items()}
    save_file({k: tensors[k] for k in "ab"}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in "cd"}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (k in 'cd')}-of-00002.safetensors" for k in shapes}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    got = offload.ShardReader(tmp_path).read(list(shapes))
    assert set(got) == set(shapes)
    for k, want in tensors.items():
        assert got[k].dtype == dtype and torch.equal(got[k], want), k


def test_prefetch_reads_one_layer_ahead_and_changes_nothing(saved, monkeypatch):
    """With PREFETCH layer i+1 is read while layer i computes, never further ahead (submitted
    after layer i is converted); the tensors equal those of lazy reading; timings are reported."""
    directory = saved["deepseek_v3"]["hub"]
    events: list[tuple[str, int | None]] = []
    submit, load = offload._Prefetch.submit, offload._load_tensors

    def spy_submit(self, keys):
        events.append(("read", _layer_of(keys[0])))
        return submit(self, keys)

    def spy_load(model, reader, keys, *args):
        out = load(model, reader, keys, *args)
        events.append(("convert", _layer_of(keys[0])))
        return out

    monkeypatch.setattr(offload._Prefetch, "submit", spy_submit)
    monkeypatch.setattr(offload, "_load_tensors", spy_load)
    seqs, kwargs = _seqs(LENGTHS, seed=2), {"batch_size": 2, "premoe_ka": 3, "per_sample": True}
    timings: dict[str, float] = {}
    ahead = calibrate_sequential(directory, seqs, timings=timings, **kwargs)
    n = tiny.tiny_config("deepseek_v3").num_hidden_layers
    want = [("convert", None), ("read", 0)]
    for i in range(n):
        want += [("convert", i)] + ([("read", i + 1)] if i + 1 < n else [])
    assert events == want
    assert set(timings) == {"read", "wait", "convert", "compute"} and timings["read"] > 0 < timings["compute"]
    monkeypatch.setattr(offload, "PREFETCH", False)
    events.clear()
    lazy = calibrate_sequential(directory, seqs, **kwargs)
    assert [e for e in events if e[0] == "read"] == []
    for name, t in lazy.items():
        assert torch.equal(ahead[name], t), name
    # a host without room for the next layer beside the current one reads lazily after layer 0
    monkeypatch.setattr(offload, "PREFETCH", True)
    monkeypatch.setattr(offload, "available_memory", lambda: 1)
    events.clear()
    tight = calibrate_sequential(directory, seqs, **kwargs)
    assert [e for e in events if e[0] == "read"] == [("read", 0)]
    for name, t in tight.items():
        assert torch.equal(ahead[name], t), name


def test_available_memory_reads_meminfo():
    """The guard reads the kernel's MemAvailable (this suite runs on Linux)."""
    free = offload.available_memory()
    assert isinstance(free, int) and free > 0
    assert offload.room_to_prefetch(int(free * offload.PREFETCH_SHARE))
    assert not offload.room_to_prefetch(free)


def test_stops_after_last_moe_layer(tmp_path, monkeypatch):
    """Layers after the last MoE layer are never read."""
    model = tiny.tiny_model("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[2])
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    read: list[set] = []
    original = offload._load_tensors

    def spy(model, reader, keys, load_config, *args):
        read.append({_layer_of(k) for k in keys})
        return original(model, reader, keys, load_config, *args)

    monkeypatch.setattr(offload, "_load_tensors", spy)
    seqs = _seqs([5, 9, 2])
    got = calibrate_sequential(tmp_path, seqs, batch_size=2)
    assert read == [{None}, {0}, {1}]
    _assert_same(got, _reference(tmp_path, seqs, batch_size=2))


def test_missing_tensor_is_a_user_error(saved, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = saved["qwen3_moe"]["fused"]
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    ckpt = Checkpoint.open(tmp_path)
    key = next(k for k in ckpt.tensors if k.startswith("model.layers.1.self_attn.q_proj"))
    shard = ckpt.info(key).file
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"][key]
    index.write_text(json.dumps(data))
    with pytest.raises(UserError, match="no tensor for 'model.layers.1.self_attn.q_proj"):
        calibrate_sequential(tmp_path, _seqs([4, 6]), batch_size=2)


def test_quantized_checkpoint_is_a_user_error(saved, tmp_path):
    import shutil

    shutil.copytree(saved["qwen3_moe"]["fused"], tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # a float checkpoint labelled fp8 (a dequantized copy that kept the config) is mislabelled
    with pytest.raises(UserError, match="says fp8 but the checkpoint holds no quantized tensor"):
        calibrate_sequential(tmp_path, _seqs([4]), batch_size=1)


def test_extra_layers_in_the_checkpoint_are_a_user_error(saved, tmp_path):
    """Issue 11 #7: a config claiming fewer layers than the checkpoint holds was profiled with
    the extra tensors ignored; refused as moeprune.load refuses it, naming keys."""
    import shutil

    src = saved["qwen3_moe"]["fused"]
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] >= 2
    config["num_hidden_layers"] -= 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    last = config["num_hidden_layers"]
    with pytest.raises(
        UserError, match=rf"does not load exactly: \d+ unexpected keys \(e\.g\. model\.layers\.{last}\."
    ):
        calibrate_sequential(tmp_path, _seqs([4, 6]), batch_size=2)


def test_an_unknown_tensor_in_a_layer_is_a_user_error(saved, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = saved["qwen3_moe"]["fused"]
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    ckpt = Checkpoint.open(tmp_path)
    key = next(k for k in ckpt.tensors if k.startswith("model.layers.0.self_attn.q_proj"))
    shard = ckpt.info(key).file
    tensors = load_file(shard)
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2, 2)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.0.self_attn.extra.weight"] = Path(shard).name
    index.write_text(json.dumps(data))
    with pytest.raises(
        UserError, match=r"1 unexpected keys \(e\.g\. model\.layers\.0\.self_attn\.extra\.weight\)"
    ):
        calibrate_sequential(tmp_path, _seqs([4, 6]), batch_size=2)
