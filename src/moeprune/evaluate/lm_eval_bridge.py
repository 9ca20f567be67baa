"""Bridge to EleutherAI's lm-evaluation-harness (optional extra ``moeprune[lmeval]``).

:func:`run_lm_eval` wraps an already-loaded model (a pruned checkpoint loads like any HF model)
in lm-eval's ``HFLM`` and calls ``lm_eval.simple_evaluate``. Local task YAMLs are found through
``include_path``. lm-eval hands a YAML's ``dataset_kwargs.data_files`` straight to
``datasets.load_dataset``, which resolves relative paths against the *current directory*; so that
a local task directory is self-contained, the run happens with the include directory as the
current directory (relative ``data_files`` are relative to it, absolute ones work anywhere).
lm-eval runs offline (the Hub and datasets offline modes are on for the run, and restored after):
moeprune never downloads unless asked (``allow_download=True``, ``eval --allow-download`` or
``MOEPRUNE_ALLOW_DOWNLOAD=1``). Tasks run one at a time, so that a task whose dataset is not in
the local cache is named in one :class:`LmEvalDataMissing` error that carries the results of the
tasks that did run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moeprune.errors import UserError

__all__ = [
    "ALLOW_DOWNLOAD_ENV",
    "LmEvalDataMissing",
    "check_lm_eval",
    "offline",
    "parse_task_names",
    "prepare_lm_eval",
    "run_lm_eval",
]

ALLOW_DOWNLOAD_ENV = "MOEPRUNE_ALLOW_DOWNLOAD"
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
# module constants read at import time: patched too when the module is already imported
_OFFLINE_CONSTANTS = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
)


class LmEvalDataMissing(UserError):
    """An lm-eval task's dataset is not in the local cache; ``results`` holds the finished tasks."""

    def __init__(self, problem: str, fix: str, results: dict[str, Any]) -> None:
        super().__init__(problem, fix)
        self.results = results


INSTALL_FIX = "install it with `pip install 'moeprune[lmeval]'`"


def check_lm_eval() -> None:
    """Raise a :class:`UserError` unless lm-evaluation-harness can be imported."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise UserError(
            "--lm-eval needs lm-evaluation-harness, which is not installed", INSTALL_FIX
        ) from None


def parse_task_names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise UserError(
            "--lm-eval names no task", "pass comma-separated lm-eval task names, e.g. --lm-eval arc_easy,piqa"
        )
    return names


def include_dir(include: str | Path | None) -> Path | None:
    """The directory of local task YAMLs given to ``--lm-eval-include`` (a YAML file -> its folder)."""
    if include is None:
        return None
    path = Path(include).expanduser().resolve()
    if not path.exists():
        raise UserError(
            f"--lm-eval-include path '{include}' does not exist", "pass a directory of lm-eval task YAMLs"
        )
    return path if path.is_dir() else path.parent


@contextlib.contextmanager
def _working_dir(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def download_allowed(allow_download: bool | None = None) -> bool:
    """``allow_download``, or when None the ``MOEPRUNE_ALLOW_DOWNLOAD`` environment variable."""
    if allow_download is not None:
        return allow_download
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def offline(enabled: bool = True) -> Iterator[None]:
    """The Hugging Face Hub and datasets offline modes for the duration of the block: the
    environment variables (read when the modules are imported) and the module constants (read at
    call time, for modules imported before); everything is restored afterwards."""
    if not enabled:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    saved: list[tuple[Any, str, Any]] = []
    os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
    for module_name, attr in _OFFLINE_CONSTANTS:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _is_missing_data(exc: BaseException) -> bool:
    """An error of a dataset that is neither local nor in the cache (offline) or unreachable."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"OfflineModeIsEnabled", "DatasetNotFoundError", "LocalEntryNotFoundError"}:
        return True
    text = str(exc)
    return isinstance(exc, (ConnectionError, OSError)) and (
        "OfflineModeIsEnabled" in text or "Couldn't reach" in text or "offline mode" in text
    )


def _dataset_of(task: str, manager: Any, exc: BaseException) -> str:
    """The dataset the failed task needs: its YAML's dataset_path, else the name in the error."""
    try:
        import yaml

        entry = manager.task_index[task]
        yaml_path = entry["yaml_path"] if isinstance(entry, dict) else entry.yaml_path
        with open(yaml_path, encoding="utf-8") as fh:
            path = (yaml.safe_load(fh) or {}).get("dataset_path")
        if isinstance(path, str) and path:
            return path
    except Exception:  # noqa: BLE001 - best effort: fall back to the error text
        pass
    quoted = re.search(r"reach '([^']+)'", str(exc)) or re.search(r"'([^'\s]+/[^'\s]+)'", str(exc))
    return quoted.group(1) if quoted else task


def _task_manager(task_manager_cls: Any, folder: Path | None, tasks: list[str]) -> Any:
    """A TaskManager; indexing lm-eval's thousands of built-in YAMLs takes seconds, so when every
    requested task is in the include directory only that directory is indexed."""
    if folder is not None:
        try:
            local = task_manager_cls(include_path=str(folder), include_defaults=False)
        except TypeError:  # an lm-eval without include_defaults
            local = None
        # only plain tasks: a local group or tag may refer to lm-eval's built-in tasks
        local_tasks = set(getattr(local, "all_subtasks", None) or []) if local is not None else set()
        if local_tasks and all(t in local_tasks for t in tasks):
            return local
    return task_manager_cls(include_path=str(folder) if folder else None)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _convert(results: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``results`` -> moeprune's per-task dict (metric ``acc,none`` -> ``acc``)."""
    out: dict[str, Any] = {}
    n_samples = results.get("n-samples", {}) or {}
    for task, metrics in (results.get("results") or {}).items():
        converted: dict[str, float | None] = {}
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("none", "") else f"{metric}[{filt}]"
            if name.endswith("_stderr") or "_stderr[" in name:
                converted[name] = _number(value)
            else:
                number = _number(value)
                if number is not None:
                    converted[name] = number
        n = (n_samples.get(task) or {}).get("effective")
        out[f"lm_eval:{task}"] = {"kind": "lm_eval", "source": task, "n": n, "metrics": converted}
    return out


def prepare_lm_eval(tasks: list[str], include_path: str | Path | None = None) -> Any:
    """Check lm-eval is installed and every task name is known; returns the ``TaskManager``.

    Cheap enough to call before loading the model, so mistakes surface first.
    """
    check_lm_eval()
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise UserError("no lm-eval task given", "pass comma-separated lm-eval task names")
    folder = include_dir(include_path)
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # HFLM warns that a model object (not a name) was passed: that is how the bridge works.
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    with offline(not download_allowed()):
        manager = _task_manager(TaskManager, folder, tasks)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f" (looked in lm-eval's tasks and {folder})" if folder else ""
        raise UserError(
            f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{where}",
            "check the names (`lm-eval ls tasks`) or pass the directory of your task YAMLs with --lm-eval-include",
        )
    return manager


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    task_manager: Any = None,
    allow_download: bool | None = None,
) -> dict[str, Any]:
    """Run lm-eval tasks on a loaded model; returns ``{"lm_eval:<task>": {"kind", "source", "n", "metrics"}}``.

    ``task_manager`` is the one :func:`prepare_lm_eval` returned (built here when not given).
    Offline unless ``allow_download`` (None: the ``MOEPRUNE_ALLOW_DOWNLOAD`` environment variable);
    a task whose dataset is not cached raises :class:`LmEvalDataMissing` after the others ran.
    """
    if limit is not None and limit <= 0:
        raise UserError(
            f"--limit must be a positive number of records, got {limit}", "pass --limit 1 or more"
        )
    manager = task_manager if task_manager is not None else prepare_lm_eval(tasks, include_path)
    folder = include_dir(include_path)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
    if max_length is not None:
        kwargs["max_length"] = max_length
    lm = HFLM(**kwargs)
    out: dict[str, Any] = {}
    missing: list[str] = []
    online = download_allowed(allow_download)
    for task in tasks:
        with offline(not online), _working_dir(folder):
            try:
                results = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[task],
                    task_manager=manager,
                    limit=limit,
                    num_fewshot=num_fewshot,
                    log_samples=False,
                    bootstrap_iters=1000,
                )
            except FileNotFoundError as exc:
                raise UserError(
                    f"lm-eval could not find a data file: {str(exc).splitlines()[0][:200]}",
                    "relative data_files in a task YAML are resolved against the --lm-eval-include directory",
                ) from None
            except Exception as exc:
                if not _is_missing_data(exc):
                    raise
                missing.append(f"{task} ({_dataset_of(task, manager, exc)})")
                continue
        if results is not None:  # None: not rank 0
            out.update(_convert(results))
    if missing:
        how = (
            "check the network connection"
            if online
            else f"run once with --allow-download (or {ALLOW_DOWNLOAD_ENV}=1) to cache it, then it works offline"
        )
        raise LmEvalDataMissing(
            f"the dataset of lm-eval task {', '.join(missing)} is not in the local cache"
            + (" and could not be downloaded" if online else " (moeprune runs lm-eval offline)"),
            how,
            out,
        )
    return out
