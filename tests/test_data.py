"""Calibration data: formats, tokenisation, selection, batching, and the user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeprune.data import (
    Record,
    batches,
    encode_prompt,
    encode_record,
    load_records,
    read_file,
    select_records,
    tokenize_records,
)
from moeprune.errors import UserError

CHAT = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def byte_tokenizer(chat: bool = True):
    """A character-level tokenizer (ids 4..99) with <s> prepended; no download needed."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat:
        tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- reading ------------------------------------------------------------------------------------


def test_jsonl_record_kinds(tmp_path, tok):
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "hello"},
            {"prompt": "1 + 1 = ", "response": "2"},
            {"prompt": "2 + 2 = ", "answer": "4"},
            {"prompt": "q"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        ],
    )
    recs, files = load_records([f])
    assert [r.kind for r in recs] == ["text", "prompt", "prompt", "prompt", "messages"]
    assert files[0].records == 5 and len(files[0].sha256) == 64
    assert recs[1].where == f"{f}:2"
    ids = [encode_record(tok, r) for r in recs]
    assert tok.decode(ids[0]) == "<s>hello"
    assert tok.decode(ids[1]) == "<s>1 + 1 = 2"  # prompt, then response (no second BOS)
    assert ids[1][: len(encode_prompt(tok, recs[1]))] == encode_prompt(tok, recs[1])
    assert tok.decode(ids[2]) == "<s>2 + 2 = 4"
    assert tok.decode(ids[4]) == "user: hi\nassistant: yo\n"
    assert tok.decode(encode_prompt(tok, recs[4])) == "user: hi\nassistant: "


def test_text_field(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"body": "abc", "text": "zzz"}])
    (rec,), _ = load_records([f], text_field="body")
    assert rec.text == "abc"
    with pytest.raises(UserError, match=r"d\.jsonl:1: the record has no field 'content'"):
        load_records([f], text_field="content")


def test_txt_blocks(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("first doc\nline two\n\n\n  \nsecond doc\n\nthird\n")
    recs, _ = load_records([f])
    assert [r.text for r in recs] == ["first doc\nline two", "second doc", "third"]
    assert [r.where for r in recs] == [f"{f}:1", f"{f}:6", f"{f}:8"]


def test_datasets_formats(tmp_path):
    import datasets

    rows = {"text": ["one", "two three"], "other": [1, 2]}
    ds = datasets.Dataset.from_dict(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    (tmp_path / "d.json").write_text(json.dumps([{"text": "one"}, {"text": "two three"}]))
    import pyarrow as pa

    table = pa.table(rows)
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    for name in ("d.parquet", "d.csv", "d.json", "d.arrow"):
        recs, _ = load_records([tmp_path / name])
        assert [r.text for r in recs] == ["one", "two three"], name
        assert recs[1].where.endswith(f"{name}:row 2")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"bad\.parquet: cannot read it as parquet"):
        read_file(bad)


# --- user errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        (['{"text": "ok"}', '{"text": "unterminated'], r"d\.jsonl:2: not valid JSON"),
        (
            ['{"text": "ok"}', "", '{"title": "x"}'],
            r"d\.jsonl:3: the record has no 'text', 'prompt' or 'messages'",
        ),
        (['{"text": 5}'], r"d\.jsonl:1: field 'text' is a int"),
        (["[1, 2]"], r"d\.jsonl:1: a record must be a JSON object"),
        (['{"messages": "hi"}'], r"d\.jsonl:1: 'messages' must be"),
        ([], r"d\.jsonl' holds no records"),
    ],
)
def test_bad_jsonl(tmp_path, rows, pattern):
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match=pattern):
        load_records([f])


def test_bad_paths_and_formats(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_records([tmp_path / "missing.jsonl"])
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(UserError, match=r"unknown format '\.xml'"):
        load_records([tmp_path / "d.xml"])
    with pytest.raises(UserError, match="no calibration data"):
        load_records([])
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(UserError, match="holds no records"):
        load_records([tmp_path / "blank.txt"])
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="not UTF-8"):
        load_records([tmp_path / "bin.jsonl"])


def test_tokenisation_errors_and_truncation(tmp_path, tok):
    recs = [Record(where="f:1", text="   "), Record(where="f:2", text="")]
    with pytest.raises(UserError, match="empty after tokenisation"):
        tokenize_records(tok, recs, 16)
    with pytest.raises(UserError, match="--max-length must be positive"):
        tokenize_records(tok, [Record(where="f:1", text="a")], 0)
    seqs, kept = tokenize_records(
        tok, [Record(where="f:1", text=""), Record(where="f:2", text="abcdefgh")], 4
    )
    assert kept == [1] and seqs == [tok("abc")["input_ids"]]  # BOS + 3 characters
    chat = Record(where="c.jsonl:7", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(UserError, match=r"c\.jsonl:7: .*no(ne)?.*chat template|c\.jsonl:7: a chat"):
        tokenize_records(byte_tokenizer(chat=False), [chat], 16)
    with pytest.raises(UserError, match="--self-generate needs records with a 'prompt'"):
        encode_prompt(tok, Record(where="f:1", text="x"))


class _SpyTokenizer:
    """Wraps a tokenizer and records the longest text it is asked to tokenise."""

    def __init__(self, inner):
        self.inner = inner
        self.longest = 0

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("kind", ["text", "prompt", "messages"])
def test_a_huge_record_is_cut_before_tokenising(tok, kind):
    """A 20 MB line costs memory in proportion to --max-length, not to its own size (issue 11 #13:
    a 100 MB line was tokenised whole, 22 GB)."""
    huge = "abcdefgh " * (20_000_000 // 9)
    rec = {
        "text": Record(where="f:1", text=huge),
        "prompt": Record(where="f:1", prompt=huge, response=huge),
        "messages": Record(where="f:1", messages=[{"role": "user", "content": huge}]),
    }[kind]
    spy = _SpyTokenizer(tok)
    seqs, _ = tokenize_records(spy, [rec], 64)
    assert spy.longest <= 64 * 32 + 64  # the cut, plus the chat template's own text
    # the tokens kept are exactly those of the uncut record
    assert (
        seqs[0]
        == encode_record(
            tok,
            Record(
                where="f:1",
                **{
                    "text": {"text": huge[:5000]},
                    "prompt": {"prompt": huge[:5000]},
                    "messages": {"messages": [{"role": "user", "content": huge[:5000]}]},
                }[kind],
            ),
        )[:64]
    )


@pytest.mark.parametrize(
    "row",
    ['{"text": "abc \\ud800 def"}', '{"messages": [{"role": "user", "content": "x\\udc00"}]}'],
)
def test_a_lone_surrogate_is_a_user_error(tmp_path, row):
    f = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(UserError, match=r"d\.jsonl:1: field '(text|content)' holds a lone surrogate"):
        load_records([f])


def test_deeply_nested_json_line_is_a_user_error(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ['{"text": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"])
    with pytest.raises(UserError, match=r"d\.jsonl:1: the JSON nests too deeply"):
        load_records([f])


# --- selection and batching ---------------------------------------------------------------------


def test_select_records_is_seeded_and_ordered():
    recs = [Record(where=str(i), text=str(i)) for i in range(20)]
    a = select_records(recs, 5, seed=1)
    assert a == select_records(recs, 5, seed=1)
    assert [int(r.text) for r in a] == sorted(int(r.text) for r in a)
    assert select_records(recs, 5, seed=2) != a
    assert select_records(recs, None, 0) == recs and select_records(recs, 50, 0) == recs


def test_batches_right_and_left_padding():
    seqs = [[5, 6], [7, 8, 9, 10], [11], [12, 13, 14]]
    got = list(batches(seqs, 3, pad_id=0))
    assert [b.indices for b in got] == [[1, 3, 0], [2]]  # longest first
    first = got[0]
    assert first.input_ids.tolist() == [[7, 8, 9, 10], [12, 13, 14, 0], [5, 6, 0, 0]]
    assert first.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert first.tokens == 9
    left = next(batches(seqs, 2, pad_id=0, order=[0, 3], left=True))
    assert left.indices == [3, 0]
    assert left.input_ids.tolist() == [[12, 13, 14], [0, 5, 6]]
    assert left.attention_mask.dtype == torch.long
    with pytest.raises(UserError, match="--batch-size"):
        next(batches(seqs, 0, 0))
