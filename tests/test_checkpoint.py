"""Checkpoints: retention rules on directories alone; manifests, verification and fallback on real ZeRO-3 saves."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from bench.harness import ROOT, SMALL
from launch import checkpoint
from launch.dist import on_rank0
from polyak import checkpoints
from polyak.errors import UserError
from polyak.recipe import CheckpointConfig, load_recipe
from tests.distributed import run_ranks


def make_checkpoints(ckpt_dir: Path, val_losses: dict[int, float | None], latest: int) -> None:
    """Checkpoint directories as prune sees them: a trainer.json with the val loss, and `latest`."""
    for step, val_loss in val_losses.items():
        directory = ckpt_dir / f"global_step{step}"
        directory.mkdir(parents=True)
        (directory / "trainer.json").write_text(json.dumps({"step": step, "val_loss": val_loss}))
    (ckpt_dir / "latest").write_text(f"global_step{latest}")


def remaining(ckpt_dir: Path) -> list[int]:
    return checkpoints.saved_steps(ckpt_dir)


def test_keep_last(tmp_path):
    make_checkpoints(tmp_path, {s: None for s in range(1, 7)}, latest=6)
    assert checkpoint.prune(tmp_path, CheckpointConfig(keep_last=2)) == [1, 2, 3, 4]
    assert remaining(tmp_path) == [5, 6]


def test_keep_last_zero_keeps_everything(tmp_path):
    make_checkpoints(tmp_path, {s: None for s in range(1, 7)}, latest=6)
    assert checkpoint.prune(tmp_path, CheckpointConfig(keep_last=0, keep_every=4)) == []
    assert remaining(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_keep_every(tmp_path):
    make_checkpoints(tmp_path, {s: None for s in range(1, 10)}, latest=9)
    checkpoint.prune(tmp_path, CheckpointConfig(keep_last=1, keep_every=3))
    assert remaining(tmp_path) == [3, 6, 9]


def test_keep_best_by_the_val_loss_in_trainer_json(tmp_path):
    losses = {1: 3.0, 2: None, 3: 2.5, 4: 2.7, 5: 2.6, 6: 2.9, 7: 2.8}  # no val loss: never among the best
    make_checkpoints(tmp_path, losses, latest=7)
    checkpoint.prune(tmp_path, CheckpointConfig(keep_last=1, keep_best=2))
    assert remaining(tmp_path) == [3, 5, 7]


def test_latest_is_kept_and_newer_ones_are_left_alone(tmp_path):
    # `latest` at 4: a resume fell back from a damaged 6; 5 and 6 get replaced when training reaches them.
    make_checkpoints(tmp_path, {1: 1.0, 2: 2.0, 3: 3.0, 4: 9.0, 5: 0.5, 6: 0.1}, latest=4)
    checkpoint.prune(tmp_path, CheckpointConfig(keep_last=1, keep_best=1))
    assert remaining(tmp_path) == [1, 4, 5, 6]


def test_a_checkpoint_being_written_is_never_pruned(tmp_path):
    make_checkpoints(tmp_path, {1: None, 2: None}, latest=2)
    being_written = tmp_path / ".tmp-global_step3"
    being_written.mkdir()
    (being_written / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"partial")
    assert checkpoint.prune(tmp_path, CheckpointConfig(keep_last=1)) == [1]
    assert remaining(tmp_path) == [2] and being_written.is_dir()


def test_what_a_kill_left_is_tidied_on_the_next_start(tmp_path):
    make_checkpoints(tmp_path, {1: None, 2: None, 3: None}, latest=3)
    # A save, a removal and a replacement of `latest` cut short.
    (tmp_path / ".tmp-global_step4").mkdir()
    (tmp_path / ".tmp-removed-global_step0").mkdir()
    (tmp_path / ".tmp-latest").write_text("global_step4")
    # Checkpoints moved aside to be replaced by a new save of their step, before (1) and after (2) it took their place.
    for step in (1, 2):
        os.replace(tmp_path / f"global_step{step}", tmp_path / f".tmp-replaced-global_step{step}")
    (tmp_path / "global_step2").mkdir()
    checkpoints.remove_unfinished(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step1", "global_step2", "global_step3", "latest"]
    assert json.loads((tmp_path / "global_step1" / "trainer.json").read_text())["step"] == 1
    assert not (tmp_path / "global_step2" / "trainer.json").exists()
    assert (tmp_path / "latest").read_text() == "global_step3"


# Real saves: the tiny model of the end-to-end tests, built as pretrain builds it, on 2 gloo ranks.

def _engine(world: int):
    from launch.engine import build

    recipe = load_recipe(ROOT / "recipes" / "tiny_cpu.yaml", SMALL)
    torch.set_num_threads(1)
    return build(recipe, 512, world, torch.device("cpu"))[0]


def _save_two(rank: int, world: int, ckpt_dir: str) -> None:
    engine = _engine(world)
    checkpointer = checkpoint.Checkpointer(Path(ckpt_dir), CheckpointConfig())
    for step in (1, 2):
        checkpointer.save(engine, step, {"step": step, "rank_that_wrote_this": rank})
    checkpointer.wait()


def _resume(rank: int, world: int, ckpt_dir: str) -> dict:
    engine = _engine(world)
    step = checkpoint.newest_intact(Path(ckpt_dir))

    class RefusedOnRank1:
        def save(self, directory: Path) -> None:
            raise AssertionError("only loaded here")

        def load(self, directory: Path) -> None:
            if rank == 1:
                raise UserError(f"rank 1 refuses {directory.name}")

    try:
        checkpoint.load(engine, Path(ckpt_dir), step, [RefusedOnRank1()])
        error = None
    except UserError as e:
        error = str(e)
    return {"step": step, "error": error}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Checkpoints of steps 1 and 2, saved by 2 ranks."""
    ckpt_dir = tmp_path_factory.mktemp("saved") / "checkpoints"
    run_ranks(_save_two, 2, str(ckpt_dir))
    return ckpt_dir


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_manifest_lists_every_file_with_its_size_and_hash(saved):
    assert (saved / "latest").read_text() == "global_step2"
    assert not [p for p in saved.iterdir() if p.name.startswith(".tmp-")]
    for step in (1, 2):
        directory = saved / f"global_step{step}"
        files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                       if p.is_file() and p.name != "manifest.json")
        assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(files)
        manifest = json.loads((directory / "manifest.json").read_text())["files"]
        assert manifest == {f: {"size": (directory / f).stat().st_size, "sha256": sha256(directory / f)}
                            for f in files}


def verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.checkpoint", "--verify", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow
def test_verify_names_a_truncated_and_a_bit_flipped_file(saved, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(saved, run_dir / "checkpoints")
    proc = verify(run_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["global_step1: ok", "global_step2 (latest): ok"]

    truncated = run_dir / "checkpoints" / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = truncated.stat().st_size
    with open(truncated, "r+b") as f:
        f.truncate(size - 100)
    flipped = run_dir / "checkpoints" / "global_step1" / "rng" / "rank00000.safetensors"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))

    proc = verify(run_dir / "checkpoints")
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        "global_step1: DAMAGED rng/rank00000.safetensors: contents differ from the manifest's SHA-256",
        (f"global_step2 (latest): DAMAGED zero_pp_rank_1_mp_rank_00_optim_states.pt: {size - 100} bytes, "
         f"the manifest says {size}")]


def test_verify_of_a_directory_without_checkpoints_is_a_one_line_error(tmp_path):
    proc = verify(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {tmp_path}: no checkpoints (expected a run directory "
                                                     "or its checkpoints/ directory)")


@pytest.mark.slow
def test_resume_skips_a_damaged_latest_and_a_user_error_on_one_rank_reaches_all(saved, tmp_path, capfd):
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(saved, ckpt_dir)
    damaged = ckpt_dir / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0x01
    damaged.write_bytes(bytes(data))

    results = run_ranks(_resume, 2, str(ckpt_dir))
    assert results == [{"step": 1, "error": "rank 1 refuses global_step1"}] * 2
    assert ("warning: global_step2 is damaged (zero_pp_rank_1_mp_rank_00_optim_states.pt: contents differ from "
            "the manifest's SHA-256); resuming from global_step1, the newest intact checkpoint"
            ) in capfd.readouterr().err.splitlines()


@pytest.mark.slow
def test_resume_refuses_when_no_checkpoint_is_intact(saved, tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(saved, ckpt_dir)
    for step in (1, 2):
        (ckpt_dir / f"global_step{step}" / "manifest.json").unlink()
    results = run_ranks(_newest_intact_or_error, 2, str(ckpt_dir))
    assert results == [(f"{ckpt_dir}: no intact checkpoint to resume from: global_step2 is damaged (manifest.json "
                        "is missing: the save never finished); global_step1 is damaged (manifest.json is missing: the "
                        "save never finished); move the directory away to start afresh")] * 2


def _newest_intact_or_error(rank: int, world: int, ckpt_dir: str):
    try:
        return checkpoint.newest_intact(Path(ckpt_dir))
    except UserError as e:
        return str(e)


def _slow_rank0_work(rank: int, world: int, fail: bool) -> str | None:
    """Rank-0 work twice as long as the process group's collective timeout, then one collective."""

    def work():
        time.sleep(COLLECTIVE_TIMEOUT * 2)
        if fail:
            raise UserError("the data is not there")

    try:
        on_rank0(work)
    except UserError as e:
        return str(e)
    total = torch.ones(1)
    torch.distributed.all_reduce(total)  # the group still works after the long wait
    return f"sum {total.item():g}"


# Short, but not so short that ranks starting a few seconds apart on a loaded machine miss each other in the group's
# own set-up (seen at 2 s under a load of 10 on 2 cores).
COLLECTIVE_TIMEOUT = 8.0


@pytest.mark.slow
@pytest.mark.parametrize("fail", [False, True], ids=["done", "user error"])
def test_rank0_work_longer_than_the_collective_timeout(fail):
    """Data preparation and the universal conversion run on rank 0 for as long as they take: the others' wait is not
    a collective of the training group, whose timeout would stop the run."""
    results = run_ranks(_slow_rank0_work, 2, fail, collective_timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))
    assert results == (["the data is not there"] * 2 if fail else ["sum 2"] * 2)
