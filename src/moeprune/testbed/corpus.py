"""Deterministic multi-domain corpus for the moeprune testbed MoE.

Domains
-------
Exact-match tasks (records ``{"prompt": str, "answer": str}``):

* ``numbers`` -- spell out an integer 0-9999 in English words (American style,
  no "and", hyphenated tens).  Prompt ``"Number 4217 in English: "``, answer
  ``"four thousand two hundred seventeen"``.  (An earlier testbed used multi-digit
  addition/subtraction; a model of this size did not learn it in the training
  budget -- 14% -- so it was replaced by a task it can learn exactly.)
* ``reverse`` -- reverse a random string of 3-5 lowercase letters written
  space-separated.  Prompt ``"reverse: k q z m r\\n=> "``, answer ``"r m z q k"``.
  (With 3-7 letters a testbed trained in the same budget reversed 3-5 letters
  always but 6 letters half the time and 7 letters almost never: 71% overall.)
* ``dates`` -- rewrite an ISO date (years 1900-2099) in words (month-name
  lookup, day without leading zero).  Prompt ``"Date 2019-03-07 in words: "``,
  answer ``"7 March 2019"``.

Natural-text domains (records ``{"text": str}``), all from material that ships
with CPython (the interpreter's own standard library, ``sysconfig.get_path("stdlib")``;
the packaged data was built from CPython 3.11.7):

* ``python`` -- Python source code: the top-level ``*.py`` modules of the
  standard library, cut into chunks at line boundaries.
* ``prose`` -- English prose: the help texts of ``pydoc_data/topics.py``
  (the Python language reference topics used by ``help()``), cut into chunks
  at line boundaries.

Text sources are split by *document* (module file / help topic) into
train / calib / eval with a fixed hash (``zlib.crc32`` of the document name),
so held-out text never shares a document with training or calibration text.
Task splits are disjoint by prompt: eval records are drawn first (seed
``EVAL_SEED``), calibration records are drawn with ``CALIB_SEED`` excluding the
eval prompts, and training examples with ``TRAIN_SEED`` excluding both.

Evaluation protocol (``moeprune eval`` implements exactly this)
---------------------------------------------------------------
Exact match: the prompt is tokenized with ``tokenizer(prompt)`` (default
``add_special_tokens=True``; the testbed tokenizer's post-processor prepends its
BOS token, and a tokenizer that defines a BOS token which ``add_special_tokens``
does not add gets it prepended explicitly).  Generation is greedy, stopping at
EOS, or as soon as the decoded continuation contains ``"\\n"``, or after
``max_new_tokens=24``.  The prediction is the decoded continuation up to the
first ``"\\n"``, stripped; the record is correct iff
``prediction == answer.strip()``.  Training sequences are accordingly
``tokenizer(prompt) + tokens(answer + "\\n") + [eos]`` with prompt and answer
tokenized separately, so the prompt tokens seen in training are exactly those
seen at evaluation.

Perplexity: ``[bos] + tokens(text)``; mean token negative log-likelihood over
all predicted positions (every text token, conditioned on BOS and the tokens
before it), pooled over all records of the domain; ``exp`` of that mean.
"""

from __future__ import annotations

import calendar
import random
import sysconfig
import zlib
from collections.abc import Iterable
from pathlib import Path

TASKS: tuple[str, ...] = ("numbers", "reverse", "dates")
TEXT_DOMAINS: tuple[str, ...] = ("python", "prose")
DOMAINS: tuple[str, ...] = TASKS + TEXT_DOMAINS

EVAL_SEED = 1001
CALIB_SEED = 2002
TRAIN_SEED = 3003

N_TASK_EVAL = 200
N_TASK_CALIB = 100
N_TEXT_EVAL = 50
N_TEXT_CALIB = 50

#: target length in characters of a held-out / calibration text record (~100-150 tokens)
TEXT_RECORD_CHARS = 480

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip


# ---------------------------------------------------------------------------
# exact-match tasks
# ---------------------------------------------------------------------------


_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen",
]  # fmt: skip
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

#: the numbers task draws from 0..NUMBERS_MAX
NUMBERS_MAX = 9999


def number_words(n: int) -> str:
    """``n`` (0..999999) in English words: 4217 -> "four thousand two hundred seventeen"."""
    if not 0 <= n <= 999_999:
        raise ValueError(n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    return f"{number_words(thousands)} thousand" + (f" {number_words(rest)}" if rest else "")


def make_numbers(rng: random.Random) -> dict[str, str]:
    n = rng.randint(0, NUMBERS_MAX)
    return {"prompt": f"Number {n} in English: ", "answer": number_words(n)}


def make_reverse(rng: random.Random) -> dict[str, str]:
    n = rng.randint(3, 5)
    letters = [rng.choice(_LETTERS) for _ in range(n)]
    return {"prompt": f"reverse: {' '.join(letters)}\n=> ", "answer": " ".join(reversed(letters))}


def make_dates(rng: random.Random) -> dict[str, str]:
    year = rng.randint(1900, 2099)
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    return {
        "prompt": f"Date {year:04d}-{month:02d}-{day:02d} in words: ",
        "answer": f"{day} {_MONTHS[month - 1]} {year}",
    }


_TASK_MAKERS = {"numbers": make_numbers, "reverse": make_reverse, "dates": make_dates}
#: how many distinct prompts a task has (train takes at most what the held-out splits leave)
_TASK_SPACE = {"numbers": NUMBERS_MAX + 1}


def task_records(task: str, n: int, seed: int, exclude: Iterable[str] = ()) -> list[dict[str, str]]:
    """``n`` records of ``task`` with distinct prompts, none of them in ``exclude``."""
    make = _TASK_MAKERS[task]
    rng = random.Random(f"{task}:{seed}")
    seen = set(exclude)
    out: list[dict[str, str]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"cannot draw {n} distinct {task} records")
        rec = make(rng)
        if rec["prompt"] in seen:
            continue
        seen.add(rec["prompt"])
        out.append(rec)
    return out


def task_splits(task: str, n_train: int = 0) -> dict[str, list[dict[str, str]]]:
    """The eval / calib / train records of ``task``; prompts are disjoint across splits."""
    ev = task_records(task, N_TASK_EVAL, EVAL_SEED)
    ca = task_records(task, N_TASK_CALIB, CALIB_SEED, exclude=[r["prompt"] for r in ev])
    held = [r["prompt"] for r in ev + ca]
    n_train = min(n_train, _TASK_SPACE.get(task, n_train + len(held)) - len(held))
    tr = task_records(task, n_train, TRAIN_SEED, exclude=held) if n_train else []
    return {"eval": ev, "calib": ca, "train": tr}


# ---------------------------------------------------------------------------
# natural text
# ---------------------------------------------------------------------------


def stdlib_dir() -> Path:
    return Path(sysconfig.get_path("stdlib"))


def _python_documents() -> list[tuple[str, str]]:
    docs = []
    for path in sorted(stdlib_dir().glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append((path.name, text))
    return docs


def _prose_documents() -> list[tuple[str, str]]:
    import ast

    src = (stdlib_dir() / "pydoc_data" / "topics.py").read_text(encoding="utf-8")
    # the module is a single assignment ``topics = {...}``; parse it without importing
    tree = ast.parse(src)
    topics = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "topics":
            topics = ast.literal_eval(node.value)
    if not isinstance(topics, dict):
        raise RuntimeError("pydoc_data/topics.py has no topics dict")
    return sorted(topics.items())


def text_documents(domain: str) -> list[tuple[str, str]]:
    if domain == "python":
        return _python_documents()
    if domain == "prose":
        return _prose_documents()
    raise KeyError(domain)


def document_split(name: str) -> str:
    """Fixed split of a source document: 10% eval, 10% calib, 80% train."""
    h = zlib.crc32(name.encode("utf-8")) % 10
    return "eval" if h == 0 else "calib" if h == 1 else "train"


def _clean_lines(text: str) -> list[str]:
    lines = [ln.rstrip() for ln in text.replace("\t", "    ").splitlines()]
    # collapse runs of blank lines
    out: list[str] = []
    for ln in lines:
        if not ln and (not out or not out[-1]):
            continue
        out.append(ln)
    return out


def chunk_document(text: str, target_chars: int) -> list[str]:
    """Cut a document at line boundaries into chunks of about ``target_chars`` characters.

    Chunks shorter than half the target (document tails) are dropped; overlong
    lines are cut.
    """
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    for ln in _clean_lines(text):
        ln = ln[:target_chars]
        if size + len(ln) + 1 > target_chars and cur:
            chunks.append("\n".join(cur).strip("\n"))
            cur, size = [], 0
        if not cur and not ln.strip():
            continue
        cur.append(ln)
        size += len(ln) + 1
    if cur:
        chunks.append("\n".join(cur).strip("\n"))
    return [c for c in chunks if len(c) >= target_chars // 2]


def text_chunks(domain: str, split: str, target_chars: int) -> list[str]:
    """All chunks of the documents of ``domain`` that belong to ``split``, in document order."""
    out: list[str] = []
    for name, text in text_documents(domain):
        if document_split(name) == split:
            out.extend(chunk_document(text, target_chars))
    return out


def text_records(domain: str, split: str, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` chunks of ~``TEXT_RECORD_CHARS`` characters drawn without replacement from ``split``."""
    chunks = sorted(set(text_chunks(domain, split, TEXT_RECORD_CHARS)))
    rng = random.Random(f"{domain}:{split}:{seed}")
    if len(chunks) < n:
        raise RuntimeError(f"{domain}/{split}: only {len(chunks)} chunks, need {n}")
    return [{"text": t} for t in rng.sample(chunks, n)]


def text_splits(domain: str) -> dict[str, list[dict[str, str]]]:
    """Held-out eval and calibration records of a text domain (documents disjoint from training)."""
    return {
        "eval": text_records(domain, "eval", N_TEXT_EVAL, EVAL_SEED),
        "calib": text_records(domain, "calib", N_TEXT_CALIB, CALIB_SEED),
    }


def format_example(record: dict[str, str]) -> str:
    """Full training text of a task record (the EOS token follows it)."""
    return record["prompt"] + record["answer"] + "\n"
