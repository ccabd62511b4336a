"""Shared fixtures: one small prepared corpus and trained multi-rank runs (bench/harness.py launches them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.harness import DEEPSPEED, SMALL, free_port, run_cli, trained


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The stdlib corpus with a small BPE, prepared once for the whole session."""
    directory = tmp_path_factory.mktemp("data") / "stdlib"
    run_cli([sys.executable, "-m", "data.prepare", "--recipe", "recipes/tiny_cpu.yaml",
             *sum((["--set", s] for s in SMALL + [f"data.dir={directory}"]), [])])
    return directory


def _trained(tmp_path_factory, data_dir, ranks: int) -> Path:
    """An uninterrupted run of `ranks` ranks (bench/harness.py's `trained`)."""
    run_dir = tmp_path_factory.mktemp(f"run{ranks}")
    run_cli([str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), "launch/pretrain.py",
             "--recipe", "recipes/tiny_cpu.yaml", *(a for item in trained(data_dir, run_dir) for a in ("--set", item))])
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
