"""What tests and benchmarks share: the trainer launched as a user launches it, on CPU ranks, with a small recipe;
two runs compared bit for bit; and, inside a benchmark's ranks, a recipe's engine built as the trainer builds it."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from averaging.state import SavedAverages
from data.loader import TokenWindows, TrainBatches, load_meta
from launch.dist import free_port, init_distributed, on_rank0
from launch.engine import build, train_step
from model.llama import LlamaArgs
from polyak import metrics
from polyak.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent


def _deepspeed() -> Path:
    """DeepSpeed's launcher for this Python: beside the interpreter (a venv), else on PATH (wheels installed with
    `pip install --target`, as on the GPU machine: bench/gpu.sh)."""
    beside = Path(sys.executable).parent / "deepspeed"
    found = shutil.which("deepspeed")
    return beside if beside.exists() or found is None else Path(found)


DEEPSPEED = _deepspeed()

# The embedded default recipe, shrunk so that a multi-rank run takes seconds; with a power EMA beside its EMA and
# LAWA, and a scheduled snapshot every 4 steps.
SMALL = [
    "model.size=null", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "data.bpe_vocab_size=512", "data.seq_len=64", "data.max_tokens=300000",
    "train.micro_batch=4", "train.steps=12", "train.warmup=2", "train.lr=0.01",
    "eval.every=4", "eval.batches=2", "checkpoint.every=4", "log.progress=false",
    "averaging.ema.beta=0.8", "averaging.lawa.window=3", "averaging.lawa.every=2",
    "averaging.p10.kind=power", "averaging.p10.sigma_rel=0.1", "snapshots.every=4",
]


def trained(data_dir: Path, run_dir: Path) -> list[str]:
    """The tests' reference runs (`run1`..`run3` in tests/conftest.py, the fault benchmark's): SMALL with a
    checkpoint every step, for offline oracles."""
    return SMALL + [f"data.dir={data_dir}", f"run.dir={run_dir}", "checkpoint.every=1"]


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


def pretrain(ranks: int, overrides: list[str], *extra: str, check: bool = True, port: int | None = None):
    """`deepspeed --num_gpus N launch/pretrain.py --recipe recipes/tiny_cpu.yaml --set ...` on CPU ranks, with SMALL
    before `overrides`."""
    args = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(port or free_port()), "launch/pretrain.py",
            "--recipe", "recipes/tiny_cpu.yaml", *extra]
    for item in SMALL + overrides:
        args += ["--set", item]
    return run_cli(args, check=check)


def read_metrics(run_dir: Path) -> list[dict]:
    """Every logged step's last record, in step order."""
    return list(metrics.read(run_dir).values())


# What a run records that depends on the machine's speed rather than on the computation.
TIMING = {"tokens_per_s", "step_time", "mfu"}


def computed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def rank_states(step_dir: Path) -> list:
    # DeepSpeed's own optimizer files are pickles: read here only to compare two runs.
    return [torch.load(p, map_location="cpu", weights_only=False)["optimizer_state_dict"]
            for p in sorted(step_dir.glob("*optim_states.pt"))]


def assert_identical(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b)), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}/{i}")
    elif hasattr(a, "__dict__"):  # DeepSpeed's own objects (its loss scaler) compare by their fields
        assert_identical(vars(a), vars(b), where)
    else:
        assert a == b, where


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bits, as integers: compared, a NaN equals the same NaN. ZeRO-3 leaves the padding of a rank's
    flat partitions uninitialised, so two runs' identical optimizer states can hold the same NaN there, which
    torch.equal would call different."""
    t = t.detach().contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) \
        if t.is_floating_point() else t


def full_average(directory: Path, name: str) -> dict[str, torch.Tensor]:
    """One average saved in a checkpoint, as full fp32 tensors by parameter name."""
    return SavedAverages(directory).average(name).full()


def bench_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of every benchmark that `deepspeed bench/<name>.py` runs on its ranks."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="docs/bench_results.jsonl", help="a JSON line of results is appended here")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by deepspeed
    return parser


@dataclass
class Trainer:
    """A recipe's engine on this rank and its training batches, built as launch/pretrain.py builds them."""

    recipe: Recipe
    device: torch.device
    engine: object
    model_args: LlamaArgs
    batches: TrainBatches

    def step(self) -> float:
        return train_step(self.engine, self.batches, self.recipe.train.grad_accum, self.device)


def trainer(recipe: Recipe) -> Trainer:
    """Start this rank's process group, prepare the data (rank 0) and build the engine."""
    from data.prepare import prepare

    device = init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    on_rank0(lambda: prepare(recipe.data))
    engine, _, model_args = build(recipe, load_meta(recipe.data.dir)["vocab_size"], world, device)
    batches = TrainBatches(TokenWindows(recipe.data.dir, "train", recipe.data.seq_len), rank, world,
                           recipe.train.micro_batch, recipe.train.seed)
    return Trainer(recipe, device, engine, model_args, batches)
