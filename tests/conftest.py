"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os

import pytest
import torch

# `--dtype auto` is bfloat16 on CPUs with bf16 units (moeprune.device); the suite checks every
# surgery and statistic exactly in float32, so auto means float32 here, in this process and in the
# subprocesses it starts (environment inherited). Tests of the detection set it themselves.
os.environ["MOEPRUNE_CPU_BF16"] = "0"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Every test module runs torch on one intra-op thread (restored after the module): the tiny
    models are dominated by per-op overhead, and on a busy or shared machine (xdist workers on a
    few cores) more threads only spin against each other, often 10x slower. Module scope, so that
    module-scoped fixtures (models built, calibrated, saved once per module) run on one thread
    too. Subprocesses (torchrun) do not inherit this setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _command_process_state():
    """`moeprune.cli.run()` is the process entry point: it marks the process as the command's
    (`cli.OWNS_PROCESS`) and freezes every object before exiting. Tests call it in-process, so
    neither may outlive the test (a frozen model is never collected)."""
    yield
    import gc

    from moeprune import cli, modelio

    cli.OWNS_PROCESS = False
    modelio.FREEZE_AFTER_PAUSE = False
    gc.unfreeze()
