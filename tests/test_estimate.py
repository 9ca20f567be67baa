"""Dry runs (moeprune.estimate): `prune --dry-run` sizes exactly what `prune` writes, without
reading tensor data; `profile --dry-run` sizes the profile; the full-size layouts plan as the
published models would; a mistake is one line and exit code 2."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from _cli import assert_user_error, run_cli
from moeprune import api
from moeprune.arch import find_moe_blocks
from moeprune.estimate import measure_bandwidth, profile_bytes
from moeprune.modelio import build_on_meta, load_config
from moeprune.plan import Plan
from moeprune.profile import fingerprint_fields, model_fingerprint
from moeprune.testing.layouts import LAYOUTS, headers_only_copy, layout_tensors, write_layout
from moeprune.testing.quantized import quantized_tiny

CHECKPOINTS = ("deepseek-fp8", "gpt-oss-mxfp4", "qwen3-bf16")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """name -> a small real checkpoint: DeepSeek-V3 fp8 (hub per-expert keys, with an MTP layer
    added as DeepSeek publishes it), gpt-oss mxfp4, Qwen3-MoE unquantized (one file)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in made:
            return made[name]
        base = tmp_path_factory.mktemp(name)
        if name == "deepseek-fp8":
            src = quantized_tiny(
                "deepseek_v3", base / "m", "fp8", model_kwargs={"num_hidden_layers": 3}, block_size=(16, 16)
            )
            _add_mtp_layer(src)
        elif name == "gpt-oss-mxfp4":
            src = quantized_tiny("gpt_oss", base / "m", "mxfp4")
        else:
            from moeprune.testing.tiny import tiny_model

            src = base / "m"
            tiny_model("qwen3_moe").save_pretrained(src)
        made[name] = src
        return src

    return get


def _add_mtp_layer(src: Path) -> None:
    """Copy the last decoder layer as layer 61, DeepSeek-V3/R1's MTP layer (transformers ignores
    ``model.layers.61`` by that name)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    n = config["num_hidden_layers"]
    index = json.loads((src / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    tensors = load_file(str(src / last))
    everything = {}
    for shard in sorted(set(index["weight_map"].values())):
        everything.update(load_file(str(src / shard)))
    mtp = {
        k.replace(f".layers.{n - 1}.", ".layers.61."): v
        for k, v in everything.items()
        if f".layers.{n - 1}." in k
    }
    save_file({**tensors, **mtp}, str(src / last), metadata={"format": "pt"})
    index["weight_map"].update(dict.fromkeys(mtp, last))
    index["metadata"]["total_size"] += sum(v.numel() * v.element_size() for v in mtp.values())
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    config["num_nextn_predict_layers"] = 1
    (src / "config.json").write_text(json.dumps(config))


def _plan(src: Path, drop: int = 2) -> Plan:
    """Every layer keeps all but ``drop`` experts, the same number per routing group, different
    ones per layer."""
    config = load_config(str(src))
    blocks = find_moe_blocks(build_on_meta(config))
    kept = {}
    for b in blocks:
        groups = max(b.spec.n_group, 1)
        size = b.num_experts // groups
        ids = []
        for g in range(groups):
            gone = {(b.layer + g + i) % size for i in range(drop // groups)}
            ids += [g * size + i for i in range(size) if i not in gone]
        kept[b.layer] = ids
    return Plan(
        model_fingerprint=model_fingerprint(fingerprint_fields(config, blocks)),
        model_type=str(config.model_type),
        layers=sorted(kept),
        num_experts=blocks[0].num_experts,
        top_k=blocks[0].top_k,
        method="frequency",
        kept=kept,
    )


def _files(out: Path) -> list[tuple[str, int]]:
    return sorted((p.name, p.stat().st_size) for p in out.glob("*.safetensors"))


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_dry_run_sizes_what_prune_writes(ckpt, tmp_path, name):
    """Every output shard's name and size, the tensor bytes and the bytes written are exactly the
    rewrite's (a shard limit that makes several shards)."""
    src = ckpt(name)
    plan = _plan(src)
    est = api.estimate_prune(src, plan, max_shard_size="40KB", bandwidth="1GB/s")
    result = api.prune(src, plan, tmp_path / "out", max_shard_size="40KB")
    out = tmp_path / "out"
    assert len(result.shards) > 1
    assert sorted((s.name, s.bytes) for s in est.shards) == _files(out)
    assert est.output_tensor_bytes == result.bytes_out
    assert est.source_tensor_bytes == result.bytes_in
    index = out / "model.safetensors.index.json"
    assert est.bytes_written == sum(size for _, size in _files(out)) + index.stat().st_size
    assert est.dropped_mtp == result.dropped_mtp
    assert (est.dropped_mtp > 0) == (name == "deepseek-fp8")
    assert est.seconds == pytest.approx((est.bytes_read + est.bytes_written) / 1e9)
    # the bytes read: the kept byte ranges, which are the output's tensor data, and the headers
    headers = sum(p.stat().st_size for p in src.glob("*.safetensors")) - est.source_tensor_bytes
    assert est.bytes_read == est.output_tensor_bytes + headers


@pytest.mark.parametrize("name", ["deepseek-fp8", "qwen3-bf16"])
def test_dry_run_reads_no_tensor_data(ckpt, tmp_path, name):
    """The same estimate from a copy whose tensor data are holes: the data play no part."""
    src = ckpt(name)
    copy = headers_only_copy(src, tmp_path / "holes")
    a = api.estimate_prune(src, keep=6, bandwidth=1e9)
    b = api.estimate_prune(copy, keep=6, bandwidth=1e9)
    assert [(s.name, s.bytes) for s in a.shards] == [(s.name, s.bytes) for s in b.shards]
    assert (a.bytes_read, a.bytes_written) == (b.bytes_read, b.bytes_written)
    pa = api.estimate_profile(src, offload="sequential", bandwidth=1e9)
    pb = api.estimate_profile(copy, offload="sequential", bandwidth=1e9)
    assert (pa.profile_bytes, pa.bytes_read, pa.memory) == (pb.profile_bytes, pb.bytes_read, pb.memory)


def test_uniform_keep_sizes_as_any_plan_with_that_count(ckpt):
    """--keep K in every layer gives the output's bytes of any plan keeping K (every expert of a
    layer has the same bytes); only where the shard boundaries fall may move by a tensor, since
    the output keeps the source's tensor order."""
    src = ckpt("deepseek-fp8")
    by_plan = api.estimate_prune(src, _plan(src), bandwidth=1e9)
    by_keep = api.estimate_prune(src, keep=6, bandwidth=1e9)
    assert by_keep.kept == [6] and by_plan.kept == [6]
    assert by_keep.output_tensor_bytes == by_plan.output_tensor_bytes
    assert by_keep.bytes_read == by_plan.bytes_read
    assert len(by_keep.shards) == len(by_plan.shards)
    assert abs(by_keep.bytes_written - by_plan.bytes_written) < 0.01 * by_plan.bytes_written
    assert api.estimate_prune(src, keep="0.75", bandwidth=1e9).kept == [6]


def test_novice_dry_run_sizes_what_prune_writes(ckpt, tmp_path):
    """Novice mode: the novice vectors' storage is sized from their count and width."""
    import torch

    from moeprune.surgery import rewrite_checkpoint

    src = ckpt("qwen3-bf16")
    plan = _plan(src)
    est = api.estimate_prune(src, plan, mode="novice", bandwidth=1e9)
    hidden = int(load_config(str(src)).get_text_config().hidden_size)
    novices = {layer: torch.randn(len(ids), hidden) for layer, ids in plan.replaced.items()}
    rewrite_checkpoint(src, tmp_path / "out", plan.kept, mode="novice", novices=novices)
    assert sorted((s.name, s.bytes) for s in est.shards) == _files(tmp_path / "out")


def test_profile_size_estimate(tmp_path):
    """The profile's size estimate against a real profile of the testbed model (tokens counted
    with its tokenizer), and the token count."""
    from moeprune.testbed import MODEL_DIR, data_file

    data = tmp_path / "d.jsonl"
    lines = data_file("numbers", "calib").read_text().splitlines()[:6]
    data.write_text("\n".join(lines) + "\n")
    est = api.estimate_profile(MODEL_DIR, [data], max_length=64, bandwidth=1e9)
    prof = api.profile(MODEL_DIR, [data], out=tmp_path / "p.profile.safetensors", max_length=64, device="cpu")
    assert est.records == 6 and est.tokens == int(prof["tokens"][0])
    real = (tmp_path / "p.profile.safetensors").stat().st_size
    assert abs(est.profile_bytes - real) < 0.02 * real, (est.profile_bytes, real)
    assert est.per_sample is True


def test_profile_bytes_follow_the_format():
    """Per-token PreMoe entries grow with the tokens; sample_gate with the samples."""
    base, shapes = profile_bytes(4, 8, 16, 10, 1000, 2, per_sample=False, exact=False)
    exact, _ = profile_bytes(4, 8, 16, 10, 1000, 2, per_sample=False, exact=True)
    samples, _ = profile_bytes(4, 8, 16, 10, 1000, 2, per_sample=True, exact=False)
    assert shapes["mone_mean"] == (4, 8, 16) and shapes["premoe_hist_f"] == (4, 8, 1024)
    assert exact - base == pytest.approx(3 * 4 * 1000 * 2 * 4, abs=1000)  # + their header entries
    assert samples - base == pytest.approx(10 * 4 * 8 * 4, abs=1000)


def test_bandwidth_is_measured_on_data_not_holes(tmp_path):
    dense = tmp_path / "dense.safetensors"
    dense.write_bytes(b"\1" * (4 * 2**20))
    bw = measure_bandwidth([dense])
    assert bw.bytes_per_s is not None and bw.bytes_per_s > 0 and "measured" in bw.source
    sparse = tmp_path / "sparse.safetensors"
    sparse.write_bytes(b"")
    sparse.open("r+b").truncate(2**30)
    bw = measure_bandwidth([sparse])
    assert bw.bytes_per_s is None and "--bandwidth" in bw.source


# --- the full-size layouts -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    base = tmp_path_factory.mktemp("big")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = write_layout(name, base / name)
        return made[name]

    return get


def _expected_output_bytes(name: str, keep: int, groups: int) -> int:
    """The pruned checkpoint's tensor bytes, computed from the layout's tensor list alone: keep the
    first keep/groups experts of every routing group, slice router rows and fused expert tensors,
    leave out the MTP layer (DeepSeek-R1's layer 61)."""
    config = LAYOUTS[name].config
    n_layers = config["num_hidden_layers"]
    experts = config.get("n_routed_experts") or config.get("num_experts") or config["num_local_experts"]
    size = experts // groups
    kept = {g * size + j for g in range(groups) for j in range(keep // groups)}
    total = 0
    for key, dtype, shape in layout_tensors(name):
        nbytes = math.prod(shape) * (1 if dtype in ("F8_E4M3", "U8") else 2 if dtype == "BF16" else 4)
        m = re.search(r"layers\.(\d+)\.", key)
        if m and int(m.group(1)) >= n_layers:
            continue  # the MTP layer
        e = re.search(r"\.experts\.(\d+)\.", key)
        if e:
            total += nbytes if int(e.group(1)) in kept else 0
        elif re.search(r"\.(gate|router)\.(weight|bias|e_score_correction_bias)$|\.experts\.", key):
            total += nbytes // experts * keep  # router rows, selection bias, fused expert tensors
        else:
            total += nbytes
    return total


@pytest.mark.parametrize(
    "name,keep,groups,n_layers,mtp",
    [("deepseek-r1", 128, 8, 58, 1564), ("qwen3-235b-a22b", 64, 1, 94, 0), ("gpt-oss-120b", 64, 1, 36, 0)],
)
def test_full_size_prune_plan(big, name, keep, groups, n_layers, mtp):
    d = big(name)
    est = api.estimate_prune(d, keep=0.5, bandwidth="1GB/s")
    assert est.kept == [keep] and est.layers == n_layers and est.dropped_mtp == mtp
    assert est.output_tensor_bytes == _expected_output_bytes(name, keep, groups)
    assert est.bytes_written > est.output_tensor_bytes
    assert sum(s.bytes for s in est.shards) < est.bytes_written < sum(s.bytes for s in est.shards) + 10**7
    limit = max(p.stat().st_size for p in d.glob("*.safetensors"))
    assert all(s.bytes <= limit + 10**6 for s in est.shards)
    assert est.seconds == pytest.approx((est.bytes_read + est.bytes_written) / 1e9)
    assert est.peak_memory < 3e9  # the rewrite streams: nothing near the checkpoint's size


def test_full_size_r1_offloaded_profile(big):
    """DeepSeek-R1 with --offload sequential: the largest layer holds its 256 routed experts as
    stored (fp8 and float32 scales, 11.3 GB), not dequantized; the pass reads every layer up to
    60 and the embedding, never the LM head nor the MTP layer."""
    d = big("deepseek-r1")
    est = api.estimate_profile(d, offload="sequential", dtype="bfloat16", device="cpu", bandwidth="2GB/s")
    tensors = layout_tensors("deepseek-r1")
    stored = sum(
        math.prod(s) * (1 if t == "F8_E4M3" else 4)
        for k, t, s in tensors
        if k.startswith("model.layers.3.mlp.experts.")
    )
    assert (
        dict(est.memory)["decoder layer 3: routed experts as stored (fp8 (e4m3, 128x128 blocks))"] == stored
    )
    read = sum(
        math.prod(s) * {"F8_E4M3": 1, "BF16": 2, "F32": 4}[t]
        for k, t, s in tensors
        if not k.startswith(("lm_head", "model.layers.61."))
    )
    assert est.bytes_read == read
    assert est.layers == 58 and est.records == 128 and est.tokens == 128 * 2048
    assert 15e9 < est.peak_memory < 60e9
    assert est.read_seconds == pytest.approx(read / 2e9)
    # in memory on CPU the whole model is dequantized: far beyond one layer
    whole = api.estimate_profile(d, dtype="bfloat16", device="cpu", bandwidth="2GB/s")
    assert whole.peak_memory > 1.2e12


# --- the command line ----------------------------------------------------------------------------


def test_cli_dry_run_table_and_json(big, capsys):
    d = big("gpt-oss-120b")
    rc, out, err = run_cli(capsys, "prune", d, "--keep", "64", "--dry-run", "--bandwidth", "1GB/s")
    assert rc == 0, err
    assert "keep 64/128 experts in 36 MoE layers" in out and "model-00001-of-" in out
    rc, out, err = run_cli(capsys, "prune", d, "--keep", "64", "--dry-run", "--json", "--bandwidth", "1GB/s")
    assert rc == 0, err
    data = json.loads(out)
    assert data["kept"] == [64] and len(data["shards"]) == len({s["name"] for s in data["shards"]})
    assert data["bytes_written"] >= data["output_file_bytes"] > data["output_tensor_bytes"]
    rc, out, err = run_cli(
        capsys, "profile", d, "--dry-run", "--offload", "sequential", "--json", "--bandwidth", "1e9"
    )
    assert rc == 0, err
    data = json.loads(out)
    assert data["offload"] == "sequential" and data["peak_memory"] == sum(data["memory"].values())


@pytest.mark.parametrize(
    "args,words",
    [
        (["prune", "{m}", "--dry-run"], ["needs the experts to keep", "--keep"]),
        (["prune", "{m}", "--dry-run", "--keep", "3", "--plan", "{plan}"], ["--plan and --keep"]),
        (["prune", "{m}", "--dry-run", "--keep", "0"], ["cannot keep 0 experts"]),
        (["prune", "{m}", "--dry-run", "--keep", "half"], ["--keep 'half' is not a number"]),
        (["prune", "{m}", "--dry-run", "--keep", "3", "--bandwidth", "fast"], ["--bandwidth 'fast'"]),
        (["prune", "{m}", "--dry-run", "--keep", "3", "--mode", "swap"], ["unknown --mode 'swap'"]),
        (["prune", "{m}", "--keep", "3", "--json"], ["only apply with --dry-run"]),
        (["prune", "{m}", "--plan", "{plan}"], ["no output folder given", "--dry-run"]),
        (["prune", "{nowhere}", "--dry-run", "--keep", "3"], ["nowhere"]),
        (["profile", "{m}"], ["no calibration data given", "--dry-run"]),
        (["profile", "{m}", "--data", "{plan}"], ["no output profile given"]),
        (["profile", "{m}", "--dry-run", "--offload", "disk"], ["unknown --offload 'disk'"]),
        (["profile", "{m}", "--dry-run", "--max-length", "0"], ["--max-length must be positive"]),
    ],
)
def test_cli_mistakes_are_one_line(ckpt, tmp_path, capsys, args, words):
    src = ckpt("qwen3-bf16")
    plan = tmp_path / "plan.json"
    plan.write_text(_plan(src).dumps())
    fill = {"m": src, "plan": plan, "nowhere": tmp_path / "nowhere"}
    capsys.readouterr()  # the fixture's own output (transformers' saving bar)
    rc, _, err = run_cli(capsys, *(a.format(**fill) for a in args))
    assert_user_error(rc, err, *words)


def test_cli_one_shot_dry_run_sizes_the_rewrite(ckpt, tmp_path, capsys):
    """`prune --data ... --method M --keep K --dry-run`: the rewrite sized for K in every layer,
    nothing profiled or written, and the way to size the calibration pass said."""
    src = ckpt("qwen3-bf16")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    capsys.readouterr()
    out = tmp_path / "out"
    rc, stdout, err = run_cli(
        capsys, "prune", src, "--data", data, "--method", "easyep", "--keep", "6", "--out", out, "--dry-run"
    )
    assert rc == 0, err
    assert "keep 6/8 experts" in stdout and "profile MODEL --data ... --dry-run" in stdout
    assert not out.exists()
