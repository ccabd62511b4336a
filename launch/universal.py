"""Resuming on another number of ranks: the model and optimizer state through DeepSpeed's universal checkpoint.

DeepSpeed loads a ZeRO-3 checkpoint only on the world size that wrote it. For another one, rank 0 converts the
checkpoint once with DeepSpeed's ds_to_universal (every parameter's fp32 weights, Adam moments and the step, whole)
into `<checkpoints>/universal/global_step<N>/`, beside the checkpoint, which stays as it was; an engine built with
`checkpoint: {load_universal: true}` then cuts each parameter for its own rank. A conversion is reused by later
launches while its checkpoint is unchanged, and removed by the first launch that no longer needs it. The averaging
state is resharded by its reader (averaging/state.py); trainer state, sampler and RNG come from the checkpoint as
always.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import deepspeed.comm as dist
import torch
from deepspeed.checkpoint import ds_to_universal

from polyak import checkpoints


def root(ckpt_dir: Path) -> Path:
    """Where the conversions of the checkpoints in `ckpt_dir` live, in DeepSpeed's `<dir>/<tag>` layout."""
    return ckpt_dir / "universal"


def prepare(ckpt_dir: Path, step: int | None) -> None:
    """Rank 0, before the engines are built: convert the checkpoint of `step` unless an up-to-date conversion is
    there (None: none is needed), and remove every other conversion."""
    if step is None:
        shutil.rmtree(root(ckpt_dir), ignore_errors=True)
        return
    tag = checkpoints.tag_of(step)
    root(ckpt_dir).mkdir(exist_ok=True)
    for p in root(ckpt_dir).iterdir():
        if p.name != tag or _fingerprint(ckpt_dir / tag) != _saved_fingerprint(p):
            shutil.rmtree(p)  # another checkpoint's, an outdated or an unfinished conversion
    if (root(ckpt_dir) / tag).is_dir():
        return
    # Converted under a temporary name and renamed once complete, so a crash never leaves half a conversion.
    staging = root(ckpt_dir) / f".tmp-{tag}"
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(ckpt_dir / tag), output_folder=str(staging / tag), keep_temp_folder=False, strict=True,
        inject_missing_state=False,
        # In-process and serial: rank 0 holds a process group that worker processes must not inherit.
        num_extract_workers=1, num_merge_workers=1))
    (staging / tag / "source.json").write_text(json.dumps(_fingerprint(ckpt_dir / tag), indent=1))
    os.replace(staging / tag, root(ckpt_dir) / tag)
    shutil.rmtree(staging)  # ds_to_universal's `latest_universal` file


class UniversalEngine:
    """The engine as launch/checkpoint.py's `load` sees it: its DeepSpeed state (model, optimizer, LR schedule)
    read from the universal conversion in `directory` (`root(ckpt_dir)`) instead of the checkpoint itself."""

    def __init__(self, engine, directory: Path):
        self.engine, self.directory = engine, directory
        self.saved_config = None  # the DeepSpeed config of the run that wrote the checkpoint, once loaded

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        # DeepSpeed 0.19.8's universal ZeRO-3 load (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3)
        # gives every param group the hyperparameters of group 0 (ours differ in weight decay: each gets its own
        # back) and one `step` tensor for all (Adam increments it in place, once per group: each gets its own copy,
        # or bias correction would run ahead for the rest of the run).
        zero = self.engine.optimizer
        weight_decay = [group["weight_decay"] for group in zero.optimizer.param_groups]
        path, client_state = self.engine.load_checkpoint(str(self.directory), tag=tag, **kwargs)
        for group, value in zip(zero.optimizer.param_groups, weight_decay):
            group["weight_decay"] = value
        for flat in zero.fp32_partitioned_groups_flat:  # the load empties the groups' params: ZeRO-3 sets them per step
            state = zero.optimizer.state[flat]
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        self.saved_config = client_state["ds_config"]
        return path, client_state

    def notes(self) -> list[str]:
        """How the resumed run differs from one that kept its world size, one line each."""
        saved, world = self.engine.loaded_checkpoint_dp_world_size, dist.get_world_size()
        micro_was = self.saved_config["train_micro_batch_size_per_gpu"]
        micro = self.engine.train_micro_batch_size_per_gpu()
        lines = [f"resharded from {saved} to {world} ranks through the universal checkpoint {self.directory}"]
        if world > saved:
            new = f"rank {saved}" if world == saved + 1 else f"ranks {saved}-{world - 1}"
            lines.append(f"no saved RNG state for {new}: seeded from train.seed")
        if saved * micro_was != world * micro:
            lines.append(f"the data order differs from the original run's: ranks x train.micro_batch was "
                         f"{saved} x {micro_was}, is {world} x {micro} (an unchanged product keeps the order)")
        return lines

    def __getattr__(self, name):
        return getattr(self.engine, name)


def _fingerprint(directory: Path) -> dict:
    """Names, sizes and modification times of DeepSpeed's files in a checkpoint: a conversion is of these."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(directory.glob("*_states.pt"))}


def _saved_fingerprint(conversion: Path) -> dict | None:
    try:
        return json.loads((conversion / "source.json").read_text())
    except (OSError, ValueError):
        return None
