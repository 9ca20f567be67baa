"""Bridge to EleutherAI's lm-evaluation-harness (optional extra ``moeprune[lmeval]``).

:func:`run_lm_eval` wraps an already-loaded model (a pruned checkpoint loads like any HF model)
in lm-eval's ``HFLM`` and calls ``lm_eval.simple_evaluate``. Local task YAMLs are found through
``include_path``. lm-eval hands a YAML's ``dataset_kwargs.data_files`` straight to
``datasets.load_dataset``, which resolves relative paths against the *current directory*; so that
a local task directory is self-contained, the run happens with the include directory as the
current directory (relative ``data_files`` are relative to it, absolute ones work anywhere).
Nothing here downloads when the data is local; set ``HF_DATASETS_OFFLINE=1`` to make sure.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moeprune.errors import UserError

__all__ = ["check_lm_eval", "parse_task_names", "prepare_lm_eval", "run_lm_eval"]

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
) -> dict[str, Any]:
    """Run lm-eval tasks on a loaded model; returns ``{"lm_eval:<task>": {"kind", "source", "n", "metrics"}}``.

    ``task_manager`` is the one :func:`prepare_lm_eval` returned (built here when not given).
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
    with _working_dir(folder):
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
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
    if results is None:  # not rank 0
        return {}
    return _convert(results)
