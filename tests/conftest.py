"""Shared fixtures: one small prepared corpus and trained multi-rank runs (bench/harness.py launches them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.harness import SMALL, pretrain, run_cli


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The stdlib corpus with a small BPE, prepared once for the whole session."""
    directory = tmp_path_factory.mktemp("data") / "stdlib"
    run_cli([sys.executable, "-m", "data.prepare", "--recipe", "recipes/tiny_cpu.yaml",
             *sum((["--set", s] for s in SMALL + [f"data.dir={directory}"]), [])])
    return directory


def _trained(tmp_path_factory, data_dir, ranks: int) -> Path:
    """An uninterrupted run of `ranks` ranks with EMA and LAWA, a checkpoint every step (for offline oracles) and a
    scheduled snapshot every 4."""
    run_dir = tmp_path_factory.mktemp(f"run{ranks}")
    pretrain(ranks, [f"data.dir={data_dir}", f"run.dir={run_dir}", "checkpoint.every=1", "snapshots.every=4"])
    return run_dir


@pytest.fixture(scope="session")
def run1(tmp_path_factory, data_dir) -> Path:
    return _trained(tmp_path_factory, data_dir, 1)


@pytest.fixture(scope="session")
def run2(tmp_path_factory, data_dir) -> Path:
    return _trained(tmp_path_factory, data_dir, 2)


@pytest.fixture(scope="session")
def run3(tmp_path_factory, data_dir) -> Path:
    return _trained(tmp_path_factory, data_dir, 3)
