"""The calibration pass and the profile: exactness against a naive float64 reference, independence
from batching and record split (merge), padding, the file format, the CLI, distributed runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moeprune.testing.tiny as tiny  # noqa: E402
from _cli import assert_user_error, run_cli
from _reference import assert_same, bounded, naive_stats
from moeprune.arch import find_moe_blocks
from moeprune.calibrate import Accumulator, calibrate
from moeprune.cli import main
from moeprune.errors import UserError
from moeprune.profile import FORMAT, Profile, atomic_write
from moeprune.testing.tiny import byte_tokenizer

# phimoe: sparsemixer; dbrx: 2D experts; llama4: the gate scales the experts' input
MODEL_TYPES = ("deepseek_v3", "qwen3_moe", "phimoe", "dbrx", "llama4")
LENGTHS = [7, 1, 40, 3, 19, 2, 28]  # very different lengths: batches carry a lot of padding


def _seqs(lengths: list[int], seed: int = 0, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=MODEL_TYPES)
def model(request):
    return tiny.tiny_model(request.param)


# --- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("slot_kernels", ["grouped", "loop"])
@pytest.mark.parametrize("moments_by_loop", [True, False])
def test_statistics_match_naive_float64_reference(model, monkeypatch, slot_kernels, moments_by_loop):
    """Every way of computing the per-slot outputs (grouped kernels: rows grouped by expert; the
    per-expert loop) and the moments (per-expert blocks; large kernels), padding included."""
    from moeprune.arch import experts

    monkeypatch.setattr(experts, "SLOT_KERNELS", slot_kernels)
    monkeypatch.setattr(Accumulator, "moments_by_loop", moments_by_loop)
    seqs = _seqs(LENGTHS)
    ka = 3
    got = calibrate(model, seqs, batch_size=3, premoe_ka=ka, per_sample=True, premoe_exact=True)
    ref = naive_stats(model, seqs, ka)
    assert got["tokens"].dtype == torch.float64 and got["mone_mean"].dtype == torch.float32
    assert got["premoe_idx"].dtype == torch.int32 and got["sample_gate"].dtype == torch.float32
    assert_same(got, ref)
    # the default keeps nothing per token: the same statistics without the per-token entries
    assert_same(calibrate(model, seqs, batch_size=3, premoe_ka=ka, per_sample=True), bounded(ref))
    # MoNE: experts that were never selected hold zeros, the others the true mean
    assert int(got["count"].sum()) == sum(LENGTHS) * find_moe_blocks(model)[0].top_k * len(
        find_moe_blocks(model)
    )


def test_early_flush_gives_the_statistics_of_one_flush(model, monkeypatch):
    """The statistics of a batch's layers wait for one flush; flushed after every layer instead
    (the pending memory bound hit at once), they are the same."""
    from moeprune import calibrate as calib

    seqs = _seqs(LENGTHS, seed=2)
    seen: list[int] = []
    flush = calib.Accumulator._flush

    def counting_flush(self):
        seen.append(len(self._pending))
        flush(self)

    monkeypatch.setattr(calib.Accumulator, "_flush", counting_flush)
    once = calibrate(model, seqs, batch_size=3, premoe_ka=2, per_sample=True, premoe_exact=True)
    assert max(seen) == len(find_moe_blocks(model))  # all layers of a batch at once
    seen.clear()
    monkeypatch.setattr(calib, "PENDING_MAX_BYTES", 0)
    early = calibrate(model, seqs, batch_size=3, premoe_ka=2, per_sample=True, premoe_exact=True)
    assert max(seen) == 1  # every layer on its own
    assert_same(early, once, rtol=1e-6, atol=1e-9)


def test_one_rows_buffer_gives_the_profile_of_a_tensor_per_call(model, monkeypatch):
    """Calibration writes every experts call's per-slot rows into one buffer (the observer is done
    with them when it returns): the profile is the one of a new tensor per call, bit for bit."""
    from moeprune.arch import experts
    from moeprune.arch.patch import PatchSession

    monkeypatch.setattr(experts, "SLOT_KERNELS", "loop")
    seqs = _seqs(LENGTHS, seed=3)
    given: list = []
    rows_buffer = PatchSession.rows_buffer

    def spy(self, n, like):
        buf = rows_buffer(self, n, like)
        given.append(buf is not None)
        return buf

    monkeypatch.setattr(PatchSession, "rows_buffer", spy)
    shared = calibrate(model, seqs, batch_size=3, per_sample=True, premoe_exact=True)
    # Llama-4's input-gated experts hand over [T, k, H] outputs of their own
    assert all(given) and bool(given) == (model.config.model_type != "llama4_text")
    monkeypatch.setattr(PatchSession, "rows_buffer", lambda self, n, like: None)
    fresh = calibrate(model, seqs, batch_size=3, per_sample=True, premoe_exact=True)
    assert shared.keys() == fresh.keys()
    for name in shared:
        assert torch.equal(shared[name], fresh[name]), name


def test_batch_size_and_padding_do_not_matter(model, monkeypatch):
    seqs = _seqs(LENGTHS, seed=1)
    with monkeypatch.context() as m:  # the per-expert loop used for large batches on CPU
        m.setattr(Accumulator, "moments_by_loop", True)
        one = calibrate(model, seqs, batch_size=1, per_sample=True, premoe_exact=True)
    three = calibrate(model, seqs, batch_size=3, per_sample=True, premoe_exact=True)
    everything = calibrate(model, seqs, batch_size=len(seqs), per_sample=True, premoe_exact=True)
    assert_same(one, three)
    assert_same(one, everything)
    assert one["premoe_q"].shape[1] == sum(LENGTHS)


def _profile(model, seqs, name: str, per_sample: bool = True, exact: bool = False) -> Profile:
    blocks = find_moe_blocks(model)
    t = calibrate(model, seqs, blocks=blocks, batch_size=2, per_sample=per_sample, premoe_exact=exact)
    return Profile.build(
        t,
        model="tiny",
        config=model.config,
        blocks=blocks,
        samples=len(seqs),
        data=[{"path": name, "sha256": "0" * 64, "records": len(seqs)}],
        settings={"per_sample": per_sample},
    )


def test_merge_equals_profile_of_the_union(model, tmp_path):
    seqs = _seqs(LENGTHS, seed=2)
    a, b = seqs[:3], seqs[3:]
    union = _profile(model, seqs, "ab")
    pa, pb = _profile(model, a, "a"), _profile(model, b, "b")
    pa.save(tmp_path / "a.profile.safetensors")
    pb.save(tmp_path / "b.profile.safetensors")
    merged = Profile.merge(
        [Profile.load(tmp_path / "a.profile.safetensors"), Profile.load(tmp_path / "b.profile.safetensors")]
    )
    assert_same(merged.tensors, union.tensors)
    assert merged.tokens == union.tokens == sum(LENGTHS)
    assert merged.samples == len(seqs)
    assert [d["path"] for d in merged.meta["data"]] == ["a", "b"]
    # three-way merge in another grouping gives the same
    pc = _profile(model, b[:2], "c")
    pd = _profile(model, b[2:], "d")
    assert_same(Profile.merge([pa, pc, pd]).tensors, union.tensors)
    # exact profiles merge exactly too (entries concatenate); with a bounded one, the entries go
    exact = [_profile(model, part, n, exact=True) for part, n in ((a, "a"), (b, "b"))]
    assert_same(Profile.merge(exact).tensors, _profile(model, seqs, "ab", exact=True).tensors)
    assert_same(Profile.merge([exact[0], pb]).tensors, union.tensors)


def test_accumulator_can_be_fed_layer_by_layer(model):
    """The seam for other drivers: events of all batches of one layer, then the next layer."""
    from moeprune.arch import patch_moe
    from moeprune.data import batches

    seqs = _seqs(LENGTHS[:4], seed=3)
    blocks = find_moe_blocks(model)
    seen: list = []
    events: list[tuple[list[int], torch.Tensor, object]] = []
    with torch.no_grad(), patch_moe(model, blocks, observer=seen.append) as session:
        for batch in batches(seqs, 2, 0):
            session.token_mask = batch.attention_mask.reshape(-1).bool()
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            events += [(batch.indices, batch.attention_mask, ev) for ev in seen]
            seen.clear()
    acc = Accumulator(
        blocks, model.config.get_text_config().hidden_size, [len(s) for s in seqs], per_sample=True
    )
    acc.moments_by_loop = False  # the large-kernel path (GPUs, small batches)
    for b in reversed(blocks):  # layer by layer, in any order
        for indices, mask, ev in events:
            if ev.block.index == b.index:
                acc.set_batch(indices, mask)
                acc.observe(ev)
    acc.reduce()
    assert_same(acc.tensors(), calibrate(model, seqs, batch_size=1, per_sample=True))
    assert "premoe_q" not in acc.tensors()


# --- the file ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds_model():
    return tiny.tiny_model("deepseek_v3")


def test_save_load_roundtrip_and_format(ds_model, tmp_path):
    p = _profile(ds_model, _seqs([5, 9]), "x")
    path = tmp_path / "x.profile.safetensors"
    p.save(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        names = set(f.keys())
    assert meta["format"] == FORMAT
    for key in (
        "tool_version",
        "model",
        "model_fingerprint",
        "model_type",
        "architecture",
        "layers",
        "num_experts",
        "top_k",
        "hidden_size",
        "tokens",
        "samples",
        "data",
        "settings",
    ):
        assert key in meta
    assert meta["layers"] == [1] and meta["tokens"] == 14 and meta["samples"] == 2
    assert names == {
        "tokens",
        "count",
        "gate",
        "gate_sq",
        "novice_lsq",
        "prob",
        "reap_sum",
        "easyep",
        "premoe_v1",
        "premoe_hist_f",
        "premoe_hist_qf",
        "premoe_hist_n",
        "premoe_edges",
        "premoe_qmax",
        "premoe_ka",
        "mone_mean",
        "mone_m2",
        "sample_gate",
        "sample_tokens",
        "sample_premoe",
    }
    assert p["sample_tokens"].tolist() == [5, 9]  # one entry per record, in order
    q = Profile.load(path)
    assert_same(q.tensors, p.tensors, rtol=0, atol=0)
    assert q.meta == json.loads(json.dumps(p.meta))
    assert sorted(os.listdir(tmp_path)) == ["x.profile.safetensors"]  # no temp file left


def test_load_rejects_corrupted_and_foreign_files(ds_model, tmp_path):
    from safetensors.torch import save_file

    p = _profile(ds_model, _seqs([5]), "x")
    good = tmp_path / "good.profile.safetensors"
    p.save(good)
    data = good.read_bytes()
    truncated = tmp_path / "trunc.profile.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="trunc.profile.safetensors"):
        Profile.load(truncated)
    garbage = tmp_path / "garbage.profile.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        Profile.load(garbage)
    foreign = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(UserError, match="not a moeprune profile"):
        Profile.load(foreign)
    # right metadata, wrong tensor shape
    t = dict(p.tensors)
    t["gate"] = torch.zeros(3, 3, dtype=torch.float64)
    bad = tmp_path / "bad.profile.safetensors"
    _write_raw(bad, t, p.meta)
    with pytest.raises(UserError, match="corrupted: tensor 'gate' has shape"):
        Profile.load(bad)
    with pytest.raises(UserError, match="does not exist"):
        Profile.load(tmp_path / "missing.profile.safetensors")


def _write_raw(path: Path, tensors: dict[str, torch.Tensor], meta: dict, checksum: bool = True) -> None:
    """A profile file with these tensors and meta as given (no validation), with valid checksums."""
    from safetensors.torch import save_file

    from moeprune.profile import checksums

    text = json.dumps(meta, sort_keys=True)
    header = {"meta": text}
    if checksum:
        header["sha256"] = json.dumps(checksums(tensors, text))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=header)


def test_checksum_catches_a_flipped_bit(ds_model, tmp_path):
    p = _profile(ds_model, _seqs([5, 9]), "x")
    good = tmp_path / "good.profile.safetensors"
    p.save(good)
    Profile.load(good)
    data = bytearray(good.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    for offset, what in ((len(data) - 3, "does not match its checksum"), (8 + header_len // 2, "")):
        flipped = bytearray(data)
        flipped[offset] ^= 0x10  # one bit: in the last tensor's bytes, then inside the JSON header
        bad = tmp_path / "flipped.profile.safetensors"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(UserError, match=f"flipped.profile.safetensors.*{what}"):
            Profile.load(bad)
    # a checksum list that does not cover the tensors, or none at all in a current profile
    _write_raw(bad, p.tensors, {**p.meta, "format": FORMAT}, checksum=False)
    with pytest.raises(UserError, match="checksums are missing"):
        Profile.load(bad)


def test_old_profile_without_checksum_is_read_with_a_warning(ds_model, tmp_path, capsys):
    p = _profile(ds_model, _seqs([5, 9]), "x", exact=True)
    old = tmp_path / "old.profile.safetensors"
    _write_raw(old, bounded_to_v1(p.tensors), {**p.meta, "format": "moeprune-profile/1"}, checksum=False)
    q = Profile.load(old)
    assert "has no checksum" in capsys.readouterr().err
    assert q.premoe_exact and q.premoe_ka == p.premoe_ka
    from moeprune.score import score_premoe

    torch.testing.assert_close(score_premoe(q), score_premoe(p), rtol=0, atol=0)
    # merging rewrites it in the current format, with checksums and histograms
    merged = Profile.merge([q, q])
    merged.save(tmp_path / "new.profile.safetensors")
    assert "premoe_hist_f" in Profile.load(tmp_path / "new.profile.safetensors").tensors


def bounded_to_v1(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a format-1 profile had: per-token entries, no histograms."""
    drop = {"premoe_hist_f", "premoe_hist_qf", "premoe_hist_n", "premoe_edges", "premoe_qmax", "premoe_ka",
            "sample_premoe"}  # fmt: skip
    return {k: v for k, v in t.items() if k not in drop}


@pytest.mark.parametrize(
    ("name", "change", "words"),
    [
        ("count", lambda x: x.sub_(x.max() + 1), ("'count'", "negative", "MoE layer 1, expert 0")),
        ("count", lambda x: x.add_(0.5), ("'count'", "non-integral")),
        ("count", lambda x: x.add_(1000), ("'count'", "exceeds")),
        ("mone_mean", lambda x: x[0, 3].fill_(float("nan")), ("'mone_mean'", "NaN", "MoE layer 1, expert 3")),
        ("easyep", lambda x: x[0, 5].fill_(float("inf")), ("'easyep'", "infinite", "expert 5")),
        ("mone_m2", lambda x: x[0, 2, 1].fill_(-1.0), ("'mone_m2'", "negative", "expert 2")),
        ("premoe_hist_n", lambda x: x[0, 0, 0].add_(1), ("'premoe_hist_n'", "entries per layer")),
    ],
)
def test_load_rejects_impossible_values(ds_model, tmp_path, name, change, words):
    p = _profile(ds_model, _seqs([5, 9]), "x")
    t = {k: v.clone() for k, v in p.tensors.items()}
    change(t[name])
    bad = tmp_path / "bad.profile.safetensors"
    _write_raw(bad, t, {**p.meta, "format": FORMAT})  # valid checksums: the values themselves are wrong
    with pytest.raises(UserError) as exc:
        Profile.load(bad)
    msg = str(exc.value)
    assert "corrupted" in msg and all(w in msg for w in words), msg


def test_calibration_stops_at_the_first_non_finite_statistic(tmp_path, capsys):
    model = tiny.tiny_model("qwen3_moe")
    blocks = find_moe_blocks(model)
    experts = blocks[1].experts(model)
    with torch.no_grad():
        for param in experts.parameters():
            param[3].fill_(float("nan"))  # expert 3 of the second MoE layer
    with pytest.raises(UserError) as exc:
        calibrate(model, _seqs(LENGTHS), batch_size=3)
    msg = str(exc.value)
    assert f"MoE layer {blocks[1].layer}" in msg and "expert 3" in msg and "NaN" in msg, msg
    # the same through the command: one line, exit 2, no profile written
    d = tmp_path / "nan-model"
    model.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "some text " * n}) + "\n" for n in (3, 9, 20)))
    out = tmp_path / "p.profile.safetensors"
    capsys.readouterr()  # drop the saving progress bar
    rc, _, err = run_cli(capsys, "profile", d, "--data", data, "--out", out, "-q")
    assert_user_error(rc, err, f"MoE layer {blocks[1].layer}", "expert 3", "NaN")
    assert not out.exists()


def test_check_model_refuses_another_model(ds_model):
    p = _profile(ds_model, _seqs([4]), "x")
    p.check_model(ds_model.config)  # same layout: fine (from the config alone, meta device)
    other = tiny.tiny_config("qwen3_moe")
    with pytest.raises(UserError) as exc:
        p.check_model(other, model_name="qwen-tiny")
    msg = str(exc.value)
    assert "deepseek_v3" in msg and "qwen3_moe" in msg and "qwen-tiny" in msg
    wider = tiny.tiny_config("deepseek_v3", n_routed_experts=16)
    with pytest.raises(UserError, match="16 experts"):
        p.check_model(wider)


def test_merge_refuses_different_models(ds_model):
    other = tiny.tiny_model("qwen3_moe")
    a = _profile(ds_model, _seqs([4]), "a")
    b = _profile(other, _seqs([4]), "b")
    assert a.meta["model_fingerprint"] != b.meta["model_fingerprint"]
    with pytest.raises(UserError, match="different models"):
        Profile.merge([a, b])


def test_atomic_write_removes_temp_on_interrupt(tmp_path):
    target = tmp_path / "p.profile.safetensors"

    def boom(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, boom)
    assert os.listdir(tmp_path) == []


# --- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, ds_model):
    d = tmp_path_factory.mktemp("tiny-dsv3")
    ds_model.config.eos_token_id, ds_model.config.pad_token_id, ds_model.config.bos_token_id = 2, 0, 1
    ds_model.generation_config.eos_token_id = 2
    ds_model.generation_config.pad_token_id = 0
    ds_model.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    words = ["alpha", "beta", "x = 1", "print(2)", "gamma ray", "def f():", "42"]
    g = torch.Generator().manual_seed(0)
    with open(d / "a.jsonl", "w") as f:
        for n in (3, 30, 1, 12):
            f.write(
                json.dumps({"text": " ".join(words[int(i)] for i in torch.randint(0, 7, (n,), generator=g))})
                + "\n"
            )
    with open(d / "b.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"{i} + {3 * i} = ", "answer": str(4 * i)}) + "\n")
    return d


def _run(*args: str) -> int:
    return main([str(a) for a in args])


def test_cli_profile_and_merge(model_dir, data_files, tmp_path):
    a, b = data_files / "a.jsonl", data_files / "b.jsonl"
    out = tmp_path / "out"
    assert (
        _run(
            "profile",
            model_dir,
            "--data",
            a,
            "--data",
            b,
            "--out",
            out / "ab.profile.safetensors",
            "--per-sample",
            "--batch-size",
            "3",
            "--quiet",
        )
        == 0
    )
    assert (
        _run("profile", model_dir, "--data", a, "--out", out / "a.profile.safetensors", "--per-sample", "-q")
        == 0
    )
    assert (
        _run(
            "profile",
            "create",
            model_dir,
            "--data",
            b,
            "--out",
            out / "b.profile.safetensors",
            "--per-sample",
            "--batch-size",
            "1",
            "-q",
        )
        == 0
    )
    assert (
        _run(
            "profile",
            "merge",
            out / "a.profile.safetensors",
            out / "b.profile.safetensors",
            "--out",
            out / "m.profile.safetensors",
            "-q",
        )
        == 0
    )
    ab, m = Profile.load(out / "ab.profile.safetensors"), Profile.load(out / "m.profile.safetensors")
    assert_same(ab.tensors, m.tensors)
    assert ab.samples == m.samples == 8
    assert [d["records"] for d in ab.meta["data"]] == [4, 4]
    assert ab.meta["data"] == m.meta["data"]
    assert ab.meta["settings"]["max_length"] == 2048 and ab.meta["settings"]["premoe_ka"] == 2
    ab.check_model(__import__("moeprune.modelio", fromlist=["load_config"]).load_config(str(model_dir)))
    assert sorted(p.name for p in out.iterdir()) == [
        "a.profile.safetensors",
        "ab.profile.safetensors",
        "b.profile.safetensors",
        "m.profile.safetensors",
    ]


def test_cli_user_errors_write_nothing(model_dir, data_files, tmp_path, capsys):
    out = tmp_path / "x.profile.safetensors"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    assert _run("profile", model_dir, "--data", bad, "--out", out, "-q") == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert (
        _run("profile", model_dir, "--data", data_files / "a.jsonl", "--out", out, "--max-length", "0") == 2
    )
    assert "--max-length" in capsys.readouterr().err
    assert (
        _run("profile", model_dir, "--data", data_files / "a.jsonl", "--out", out, "--premoe-ka", "99", "-q")
        == 2
    )
    assert "--premoe-ka" in capsys.readouterr().err
    other = tmp_path / "p.profile.safetensors"
    assert _run("profile", "merge", other, other, "--out", out) == 2
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_interrupt_leaves_no_partial_profile(model_dir, data_files, tmp_path, monkeypatch):
    import safetensors.torch

    from moeprune.calibrate import Accumulator as Acc
    from moeprune.profiling import run_profile

    out = tmp_path / "x.profile.safetensors"
    kwargs = {
        "model": str(model_dir),
        "data": [str(data_files / "b.jsonl")],
        "out": out,
        "quiet": True,
        "self_generate": 2,
    }

    def interrupted_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", interrupted_save)
        with pytest.raises(KeyboardInterrupt):
            run_profile(**kwargs)
    assert os.listdir(tmp_path) == []  # neither the profile, nor its temp file, nor the demos

    def interrupted_observe(self, event):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Acc, "observe", interrupted_observe)
        with pytest.raises(KeyboardInterrupt):
            run_profile(**kwargs)
    assert os.listdir(tmp_path) == []


def test_cli_self_generate(model_dir, data_files, tmp_path, ds_model):
    from moeprune.calibrate import self_generate

    out = tmp_path / "g.profile.safetensors"
    assert (
        _run(
            "profile",
            model_dir,
            "--data",
            data_files / "b.jsonl",
            "--out",
            out,
            "--self-generate",
            "5",
            "--batch-size",
            "3",
            "-q",
        )
        == 0
    )
    demos = [json.loads(line) for line in (tmp_path / "g.demos.jsonl").read_text().splitlines()]
    assert [d["prompt"] for d in demos] == [f"{i} + {3 * i} = " for i in range(4)]
    assert all(set(d) == {"prompt", "response"} for d in demos)
    tok = byte_tokenizer()
    prompts = [tok(d["prompt"])["input_ids"] for d in demos]
    answers = self_generate(ds_model, tok, prompts, 5, batch_size=3)  # left-padded batches
    for p, a in zip(prompts, answers, strict=True):  # equals an unbatched greedy loop
        ids = torch.tensor([p])
        ref: list[int] = []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(ds_model(input_ids=ids).logits[0, -1].argmax())
                if nxt == 2:
                    break
                ref.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert a == ref
    prof = Profile.load(out)
    assert prof.tokens == sum(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    assert prof.meta["settings"]["self_generate"] == 5


def test_cli_distributed_matches_single_process(model_dir, data_files, tmp_path):
    """torchrun with 2 CPU processes (gloo): the same profile as one process."""
    single = tmp_path / "one.profile.safetensors"
    dual = tmp_path / "two.profile.safetensors"
    args = [
        "--data",
        str(data_files / "a.jsonl"),
        "--data",
        str(data_files / "b.jsonl"),
        "--per-sample",
        "--batch-size",
        "2",
        "-q",
    ]
    assert _run("profile", model_dir, *args, "--out", single) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "moeprune",
            "profile",
            str(model_dir),
            *args,
            "--out",
            str(dual),
            "--device",
            "cpu",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = Profile.load(single), Profile.load(dual)
    assert_same(one.tensors, two.tensors)
    assert two.meta["settings"]["world_size"] == 2
    assert (one.tokens, one.samples) == (two.tokens, two.samples)


def test_bfloat16_model_calibrates():
    model = tiny.tiny_model("qwen3_moe").to(torch.bfloat16)
    seqs = _seqs([6, 3])
    got = calibrate(model, seqs, batch_size=2, per_sample=True)
    assert got["mone_mean"].dtype == torch.float32 and got["count"].dtype == torch.float64
    assert int(got["count"].sum()) == 9 * 2 * 2  # tokens x top-k x layers
    assert all(bool(torch.isfinite(v.double()).all()) for v in got.values())


def test_cli_auto_dtype_is_recorded_and_bf16_stays_close(model_dir, data_files, tmp_path, monkeypatch):
    """`--dtype auto` on a CPU with bf16 units calibrates a model wide enough in bfloat16 and says so
    in the profile, a narrower one in float32; the statistics (summed in float64) stay close to the
    float32 profile's; float32 is recorded as such."""
    a = data_files / "a.jsonl"
    f32, bf16 = tmp_path / "f32.profile.safetensors", tmp_path / "bf16.profile.safetensors"
    import moeprune.device as device

    assert _run("profile", model_dir, "--data", a, "--out", f32, "-q") == 0  # conftest: auto = float32
    monkeypatch.setenv("MOEPRUNE_CPU_BF16", "1")
    # this tiny model is narrower than CPU_BF16_MIN_HIDDEN: float32 even with bf16 units...
    narrow = tmp_path / "narrow.profile.safetensors"
    assert _run("profile", model_dir, "--data", a, "--out", narrow, "-q") == 0
    assert Profile.load(narrow).meta["settings"]["dtype"] == "float32"
    # ...and bfloat16 once models that wide count as wide enough
    monkeypatch.setattr(device, "CPU_BF16_MIN_HIDDEN", 1)
    assert _run("profile", model_dir, "--data", a, "--out", bf16, "-q") == 0
    p32, p16 = Profile.load(f32), Profile.load(bf16)
    assert p32.meta["settings"]["dtype"] == "float32" and p16.meta["settings"]["dtype"] == "bfloat16"
    assert p16.tokens == p32.tokens
    for name in ("gate", "easyep", "reap_sum"):
        x, y = p32.tensors[name], p16.tensors[name]
        assert y.dtype == torch.float64 and not torch.equal(x, y)  # computed in bf16, summed in float64
        assert torch.allclose(x, y, rtol=0.2, atol=0.05 * float(x.abs().max())), name


def test_cli_sequential_offload_gives_the_same_profile(model_dir, data_files, tmp_path):
    """`--offload sequential` (one decoder layer in memory at a time) writes the same profile."""
    a = data_files / "a.jsonl"
    full, seq = tmp_path / "full.profile.safetensors", tmp_path / "seq.profile.safetensors"
    assert _run("profile", model_dir, "--data", a, "--out", full, "--per-sample", "-q") == 0
    assert (
        _run("profile", model_dir, "--data", a, "--out", seq, "--per-sample", "--offload", "sequential", "-q")
        == 0
    )
    p_full, p_seq = Profile.load(full), Profile.load(seq)
    assert_same(p_full.tensors, p_seq.tensors)
    assert p_seq.meta["settings"]["offload"] == "sequential"
    routing = p_seq.meta["routing"]
    assert routing["score_fn"] == "sigmoid" and routing["top_k"] == p_seq.top_k


def test_cli_offload_rejects_bad_values(model_dir, data_files, tmp_path, capsys):
    out = tmp_path / "x.profile.safetensors"
    a = data_files / "a.jsonl"
    assert _run("profile", model_dir, "--data", a, "--out", out, "--offload", "disk") == 2
    assert (
        _run(
            "profile", model_dir, "--data", a, "--out", out, "--offload", "sequential", "--self-generate", "4"
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("moeprune: error:") for line in err)
    assert not out.exists()


def test_cli_per_sample_data_by_default_within_a_size_bound(model_dir, data_files, tmp_path, capsys, monkeypatch):
    """The README's plain profile line gives `moeprune report` its few-shot stability; beyond the
    size bound the default leaves the per-sample sums out and says so; the flags decide either way."""
    import moeprune.calibrate as calibrate_module

    a = data_files / "a.jsonl"
    base = ["profile", model_dir, "--data", a, "--batch-size", "4"]
    assert _run(*base, "--out", tmp_path / "plain", "-q") == 0
    plain = Profile.load(tmp_path / "plain")
    assert plain.tensors["sample_gate"].shape[0] == 4 and plain.meta["settings"]["per_sample"] is True
    assert _run(*base, "--out", tmp_path / "off", "--no-per-sample", "-q") == 0
    assert "sample_gate" not in Profile.load(tmp_path / "off").tensors
    capsys.readouterr()
    code = _run("report", tmp_path / "plain", "--out", tmp_path / "rep")
    assert code == 0 and "no few-shot stability" not in capsys.readouterr().err
    assert "no per-sample data" not in (tmp_path / "rep" / "index.html").read_text()
    code = _run("report", tmp_path / "off", "--out", tmp_path / "rep2")
    assert code == 0 and "no few-shot stability for off" in capsys.readouterr().err

    layers, experts = len(plain.layers), plain.num_experts
    # one sample fewer than the 4 of a.jsonl fits: the default leaves them out, and says why
    monkeypatch.setattr(calibrate_module, "PER_SAMPLE_MAX_BYTES", 3 * layers * experts * 8)
    assert _run(*base, "--out", tmp_path / "big") == 0
    assert "sample_gate" not in Profile.load(tmp_path / "big").tensors
    assert "per-sample gate sums left out: 4 samples" in capsys.readouterr().err
    assert _run(*base, "--out", tmp_path / "forced", "--per-sample", "-q") == 0
    assert "sample_gate" in Profile.load(tmp_path / "forced").tensors


def test_self_generate_cuts_a_huge_prompt_before_tokenising(model_dir, ds_model, tmp_path, monkeypatch):
    """Issue 11 #13: --self-generate tokenised each prompt whole (a 20 MB line: gigabytes) and
    generated from all of it; it is cut by characters, then tokens, as calibration records are."""
    import moeprune.calibrate
    from moeprune.profiling import run_profile

    class Spy:
        def __init__(self, inner):
            self.inner, self.longest = inner, 0

        def __call__(self, text, **kwargs):
            self.longest = max(self.longest, len(text))
            return self.inner(text, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    seen: list[list[int]] = []

    def fake_generate(lm, tok, prompts, n, **kwargs):
        seen.extend(prompts)
        return [[5] * n for _ in prompts]

    monkeypatch.setattr(moeprune.calibrate, "self_generate", fake_generate)
    data = tmp_path / "huge.jsonl"
    huge = "abcdefgh " * (2_000_000 // 9)
    data.write_text(json.dumps({"prompt": huge}) + "\n" + json.dumps({"prompt": "1 + 1 = "}) + "\n")
    spy = Spy(byte_tokenizer())
    prof = run_profile(
        model=str(model_dir), data=[str(data)], out=None, max_length=16, self_generate=3, quiet=True,
        loaded=(ds_model, spy),
    )  # fmt: skip
    assert spy.longest <= 16 * 32
    assert [len(p) for p in seen] == [16, len(byte_tokenizer()("1 + 1 = ")["input_ids"])]
    assert seen[0] == byte_tokenizer()(huge[:100])["input_ids"][:16]  # the prompt's own start
    assert prof.tokens == 16 + len(seen[1]) + 3


def test_self_generate_into_its_own_data_file_is_one_clear_line(model_dir, data_files, tmp_path, capsys):
    """Profiling a demos file again with --self-generate: the answers would go beside --out into the
    very file being read; the error names --out and why (it named only the demos file before)."""
    import shutil

    data = tmp_path / "run.demos.jsonl"
    shutil.copy(data_files / "b.jsonl", data)
    out = tmp_path / "run.profile.safetensors"
    rc, _, err = run_cli(capsys, "profile", model_dir, "--data", data, "--out", out, "--self-generate", "4")
    assert_user_error(rc, err, "--self-generate", "run.profile.safetensors", "data file being read", "another --out")
    assert not out.exists()


def test_easyep_factor_in_float32_keeps_small_factors():
    """1 − cos(h, h + r) in float32 via ‖ĥ − ĥ′‖²/2 agrees with float64 even where the factor is far
    below float32's epsilon (where 1 − cos computed directly in float32 is all rounding), and a zero
    vector counts as cos 0."""
    from moeprune.calibrate import easyep_factor

    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 256, generator=g)
    h0 = h.clone()
    for scale in (1.0, 1e-2, 1e-4):
        r = torch.randn(64, 256, generator=g) * scale
        h64, n64 = h.double(), h.double() + r.double()
        ref = 1 - torch.nn.functional.cosine_similarity(h64, n64, dim=-1)
        got = easyep_factor(h, r)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=2e-3, atol=0)
        if scale == 1e-4:  # the naive float32 form cannot resolve it
            naive = 1 - torch.nn.functional.cosine_similarity(h, h + r, dim=-1).double()
            assert float(((naive - ref).abs() / ref).max()) > 0.1
    # bfloat16 inputs are read as they are (no rounding of the sum to bfloat16)
    hb, rb = h.bfloat16(), (torch.randn(64, 256, generator=g) * 0.1).bfloat16()
    ref = 1 - torch.nn.functional.cosine_similarity(hb.double(), hb.double() + rb.double(), dim=-1)
    torch.testing.assert_close(easyep_factor(hb, rb).double(), ref, rtol=1e-4, atol=1e-9)
    z = torch.zeros(2, 256)
    z[1] = 1.0
    torch.testing.assert_close(easyep_factor(z, -z), torch.ones(2))  # h = 0; h + r = 0
    assert torch.equal(h, h0)  # the inputs are not modified (float32: no copy would be in place)
