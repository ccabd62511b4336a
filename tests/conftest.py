"""Shared fixtures: one small prepared corpus and a launcher for real multi-rank DeepSpeed runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEEPSPEED = Path(sys.executable).parent / "deepspeed"

# The embedded default recipe, shrunk so that a multi-rank run takes seconds.
SMALL = [
    "model.size=null", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "data.bpe_vocab_size=512", "data.seq_len=64", "data.max_tokens=300000",
    "train.micro_batch=4", "train.steps=12", "train.warmup=2", "train.lr=0.01",
    "eval.every=4", "eval.batches=2", "checkpoint.every=4", "log.progress=false",
    "averaging.ema.beta=0.8", "averaging.lawa.window=3", "averaging.lawa.every=2",
]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts several DeepSpeed ranks (tens of seconds); runs in CI too")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], check: bool = True, timeout: int = 600, env: dict | None = None):
    """Run a command from the repository root, as a user would; returns the CompletedProcess.

    The command runs in its own process group: on a timeout the ranks a launcher started are killed with it, so a
    hung run cannot hold the cores for the tests after it.
    """
    with subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}) as p:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            stdout, stderr = p.communicate()
            raise AssertionError(f"{' '.join(map(str, args))} still running after {timeout} s\n{stdout[-4000:]}\n"
                                 f"{stderr[-8000:]}") from None
    proc = subprocess.CompletedProcess(args, p.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def pretrain(ranks: int, overrides: list[str], *extra: str, check: bool = True):
    """`deepspeed --num_gpus N launch/pretrain.py --recipe recipes/tiny_cpu.yaml --set ...` on CPU ranks."""
    args = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), "launch/pretrain.py",
            "--recipe", "recipes/tiny_cpu.yaml", *extra]
    for item in SMALL + overrides:
        args += ["--set", item]
    return run_cli(args, check=check)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The stdlib corpus with a small BPE, prepared once for the whole session."""
    directory = tmp_path_factory.mktemp("data") / "stdlib"
    run_cli([sys.executable, "-m", "data.prepare", "--recipe", "recipes/tiny_cpu.yaml",
             *sum((["--set", s] for s in SMALL + [f"data.dir={directory}"]), [])])
    return directory


def _trained(tmp_path_factory, data_dir, ranks: int) -> Path:
    """An uninterrupted run of `ranks` ranks with EMA and LAWA and a checkpoint every step (for offline oracles)."""
    run_dir = tmp_path_factory.mktemp(f"run{ranks}")
    pretrain(ranks, [f"data.dir={data_dir}", f"run.dir={run_dir}", "checkpoint.every=1"])
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
