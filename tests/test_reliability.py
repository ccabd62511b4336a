"""Reliability through the real CLIs: SIGKILLs and damaged checkpoints, non-finite losses, bad input, secrets."""

from __future__ import annotations

import secrets
import shutil
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from bench.faults import Kill, assert_same_run, interrupt, last_records, resume
from bench.harness import SMALL, free_port, pretrain, read_metrics, run_cli
from data.loader import TokenWindows, TrainBatches, val_batches
from polyak import checkpoints
from tests.runs import copy_run, poison_token, sampler


def intact(ckpt_dir: Path) -> bool:
    return all(not checkpoints.problems(ckpt_dir / f"global_step{s}") for s in checkpoints.saved_steps(ckpt_dir))


# SIGKILL of one rank, and the same command again: the run2 of tests/conftest.py, bit for bit.

@pytest.mark.slow
@pytest.mark.parametrize("kill", [Kill(step=7, moment="save", target="rank 1"),
                                  Kill(step=4, moment="step", target="rank 0", delay=0.3)], ids=str)
def test_sigkill_of_a_rank_then_the_same_command_gives_the_uninterrupted_run(kill, run2, data_dir, tmp_path):
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    killed, _ = interrupt(run_dir, data_dir, kill)
    assert killed.returncode != 0
    dead, latest = kill.target.split()[1], (ckpt_dir / "latest").read_text()
    assert (f"error: rank {dead} died (killed, or crashed: see its output above); run the same command again to "
            f"resume from the last checkpoint: {ckpt_dir / latest}") in killed.stdout.splitlines()
    assert intact(ckpt_dir)  # whatever was being written is under a .tmp- name

    resumed = resume(run_dir, data_dir)
    assert f"resumed from {ckpt_dir / latest}" in resumed.stderr
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".tmp-")]
    assert_same_run(run_dir, run2)


@pytest.mark.slow
def test_damaged_checkpoints_are_named_and_the_run_resumes_from_the_newest_intact(run2, data_dir, tmp_path):
    copy_run(run2, tmp_path)
    shutil.copy(run2 / "metrics.jsonl", tmp_path / "metrics.jsonl")
    truncated = tmp_path / "checkpoints" / "global_step12" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = truncated.stat().st_size
    with open(truncated, "r+b") as f:
        f.truncate(size // 2)
    flipped = tmp_path / "checkpoints" / "global_step11" / "averaging" / "rank00001.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0x04
    flipped.write_bytes(bytes(data))

    proc = pretrain(2, [f"data.dir={data_dir}", f"run.dir={tmp_path}", "checkpoint.every=1"])
    assert (f"warning: global_step12 is damaged (zero_pp_rank_0_mp_rank_00_optim_states.pt: {size // 2} bytes, the "
            f"manifest says {size}); global_step11 is damaged (averaging/rank00001.safetensors: contents differ "
            f"from the manifest's SHA-256); resuming from global_step10, the newest intact checkpoint"
            ) in proc.stderr.splitlines()
    assert f"resumed from {tmp_path / 'checkpoints' / 'global_step10'}" in proc.stderr
    assert intact(tmp_path / "checkpoints")  # 11 and 12 saved again, whole
    assert_same_run(tmp_path, run2)


# Non-finite losses, injected for real.

@pytest.mark.slow
def test_a_diverging_run_stops_naming_the_last_good_checkpoint(data_dir, tmp_path):
    # An LR of 1e30 takes one finite step into weights whose every later loss is inf or NaN.
    proc = pretrain(2, [f"data.dir={data_dir}", f"run.dir={tmp_path}", "checkpoint.every=1", "train.lr=1e30",
                        "train.max_bad_steps=3"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    records = read_metrics(tmp_path)
    good = max(r["step"] for r in records if r["loss"] is not None)
    assert [r["loss"] for r in records[good:]] == [None, None]  # the third one stops the run before it is logged
    ckpt_dir = tmp_path / "checkpoints"
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        (f"error: 3 non-finite losses or gradients in a row at step {good + 3} (train.max_bad_steps=3); the last "
         f"good checkpoint: {ckpt_dir / f'global_step{good}'}")]
    assert checkpoints.saved_steps(ckpt_dir) == list(range(1, good + 1))  # none saved during the bad steps
    assert checkpoints.latest_step(ckpt_dir) == good and intact(ckpt_dir)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=f"global_step{good}")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_one_skipped_step_keeps_data_order_and_schedule_aligned(run2, data_dir, tmp_path):
    """From run2's step 6, with the input embedding of one token that only step `bad`'s batch holds set to NaN:
    exactly that step's loss is non-finite; its update is skipped, and every later step draws run2's batches at
    run2's learning rate."""
    start, ranks, micro = 6, 2, 4
    inputs = {}
    for rank in range(ranks):
        batches = TrainBatches(TokenWindows(data_dir, "train", 64), rank, ranks, micro, seed=1234, consumed=start)
        for step in range(start + 1, 13):
            inputs.setdefault(step, set()).update(batches.next()[0].unique().tolist())
    held_out = {t for rank in range(ranks) for x, _ in val_batches(TokenWindows(data_dir, "val", 64), rank, ranks,
                                                                    micro, 2) for t in x.unique().tolist()}
    bad, token = next((step, t) for step in range(start + 2, 13) for t in sorted(inputs[step])
                      if t not in held_out and all(t not in inputs[s] for s in inputs if s != step))

    copy_run(run2, tmp_path, steps=range(1, start + 1))
    poison_token(tmp_path / "checkpoints" / f"global_step{start}", token)

    proc = pretrain(2, [f"data.dir={data_dir}", f"run.dir={tmp_path}", "checkpoint.every=1"])
    assert f"step {bad}: non-finite loss or gradients, update skipped (1 in a row)" in proc.stderr.splitlines()
    ours, theirs = last_records(tmp_path), last_records(run2)
    assert [s for s in ours if ours[s]["loss"] is None] == [bad]
    assert [ours[s]["lr"] for s in ours] == [theirs[s]["lr"] for s in ours]
    assert all(ours[s] == theirs[s] for s in range(start + 1, bad))  # the poisoned row is in no earlier batch
    saved = [s for s in range(1, 13) if s != bad]  # none for the skipped step
    assert checkpoints.saved_steps(tmp_path / "checkpoints") == saved
    assert [sampler(tmp_path, s) for s in saved if s > start] == [sampler(run2, s) for s in saved if s > start]


# Bad input: one line `error: ...`, exit code 2, no traceback, nothing written.

def pretrain_cli(tmp_path: Path, *sets: str, recipe: str = "recipes/tiny_cpu.yaml") -> str:
    """`python launch/pretrain.py` as one rank of its own (no launcher); returns its one error line."""
    args = [sys.executable, "launch/pretrain.py", "--recipe", recipe]
    for item in SMALL + [f"run.dir={tmp_path / 'run'}", *sets]:
        args += ["--set", item]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    return one_error_line(run_cli(args, check=False, env=env))


def one_error_line(proc) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


BAD_VALUES = [
    ("train.stepz=3", "unknown key 'train.stepz'"),
    ("train.steps=many", "train.steps must be an integer, got 'many'"),
    ("averaging.ema.beta=1.0", "averaging.ema.beta=1.0 must be in [0, 1)"),
    ("averaging.ema.beta=-0.1", "averaging.ema.beta=-0.1 must be in [0, 1)"),
    ("averaging.lawa.window=0", "averaging.lawa.window=0 must be at least 1"),
    ("averaging.lawa.every=0", "averaging.lawa.every=0 must be at least 1"),
    ("train.steps=0", "train.steps=0 must be at least 1"),
    ("train.warmup=13", "train.warmup=13 must be between 0 and train.steps (12)"),
]


@pytest.mark.parametrize("setting, message", BAD_VALUES, ids=[setting for setting, _ in BAD_VALUES])
def test_bad_recipe_values(setting, message, tmp_path):
    assert pretrain_cli(tmp_path, setting) == f"error: --set {setting.split('=')[0]}: {message}"
    assert not (tmp_path / "run").exists()


def test_malformed_yaml(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  steps: [12\nmodel:\n  dim: 64\n")
    assert pretrain_cli(tmp_path, recipe=str(recipe)) == f"error: {recipe}: not valid YAML (line 3)"
    assert not (tmp_path / "run").exists()


def test_a_missing_data_file(tmp_path):
    missing = tmp_path / "corpus" / "missing.txt"
    line = pretrain_cli(tmp_path, "data.source=files", f"data.files=[{missing}]", f"data.dir={tmp_path / 'data'}")
    assert line == f"error: data.files: file not found: {missing}"
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_larger_than_the_model_vocabulary(data_dir, tmp_path):
    line = pretrain_cli(tmp_path, f"data.dir={data_dir}", "model.vocab_size=256")
    assert line == "error: model.vocab_size=256 is smaller than the tokenizer's vocabulary (512)"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_checkpoints_of_another_model_shape(run2, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    copy_run(run2, run_dir, steps=[12])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    line = pretrain_cli(tmp_path, f"data.dir={data_dir}", "model.dim=128")
    assert line == (f"error: {run_dir} holds checkpoints of another model (model.dim: 64 there, 128 now); "
                    "use another run.dir")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_an_existing_export_directory(run2, tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    (out / "config.json").write_text("{}")
    proc = run_cli([sys.executable, "-m", "averaging.consolidate", str(run2 / "checkpoints"), "--weights", "ema",
                    "--out", str(out)], check=False)
    assert one_error_line(proc) == (f"error: {out}: already exists; a release is never overwritten, "
                                    "choose another folder")
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"


# Secrets.

@pytest.mark.slow
def test_the_wandb_key_never_reaches_the_run_directory(data_dir, tmp_path, monkeypatch):
    key = secrets.token_hex(20)  # a wandb API key is 40 hex digits
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "wandb_id").write_text("keycheck1")  # as on a resumed run: its wandb run is chosen already
    proc = pretrain(1, [f"data.dir={data_dir}", f"run.dir={tmp_path}", "train.steps=2", "log.wandb=true"])
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts and p.suffix == ".wandb" for p in files)  # wandb ran and wrote its run
    assert [p for p in files if key.encode() in p.read_bytes()] == []
    assert key not in proc.stdout + proc.stderr
    assert "WANDB_API_KEY" not in (tmp_path / "recipe.yaml").read_text()
