"""Checkpoints in DeepSpeed's own layout (`global_step<N>/` and `latest`), written atomically, plus our own state.

Each checkpoint directory holds DeepSpeed's files (so its zero_to_fp32.py works unchanged), `trainer.json` (step,
sampler position, val loss; written by rank 0), `rng/rank<r>.safetensors` (every rank's RNG states) and, when
averages are configured, `averaging/` (averaging/state.py). A checkpoint is written under a hidden temporary name and
renamed into place only once every rank's files are complete; `latest` is replaced atomically after that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import deepspeed.comm as dist
import torch
from safetensors.torch import load_file, save_file

from launch.recipe import CheckpointConfig

_TAG = re.compile(r"^global_step(\d+)$")
_TMP_PREFIX = ".tmp-"


def tag_of(step: int) -> str:
    return f"global_step{step}"


def saved_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in `ckpt_dir`, ascending."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _TAG.match(p.name)))


def latest_step(ckpt_dir: Path) -> int | None:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    m = _TAG.match(latest.read_text().strip())
    return int(m.group(1)) if m else None


def save(engine, ckpt_dir: Path, step: int, trainer_state: dict, save_extra=None) -> Path:
    """Write the checkpoint of `step` on every rank; `save_extra(directory)` adds per-rank files before the commit."""
    rank = dist.get_rank()
    tag = tag_of(step)
    tmp = ckpt_dir / (_TMP_PREFIX + tag)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, save_latest=False)
    (tmp / "rng").mkdir(exist_ok=True)
    save_file(_rng_state(), str(tmp / "rng" / f"rank{rank:05d}.safetensors"))
    if save_extra is not None:
        save_extra(tmp)
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
    dist.barrier()
    if rank == 0:
        _fsync_tree(tmp)
        final = ckpt_dir / tag
        if final.exists():  # the same step saved again: the new one replaces it only once complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write(ckpt_dir / "latest", tag)
        _fsync_dir(ckpt_dir)
    dist.barrier()
    return ckpt_dir / tag


def load(engine, ckpt_dir: Path, step: int, load_extra=None) -> dict:
    """Restore engine, RNG and extras from the checkpoint of `step`; returns its trainer state."""
    directory = ckpt_dir / tag_of(step)
    # DeepSpeed's own files are pickles that DeepSpeed loads itself: the one place a pickle is read.
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag_of(step), load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {directory}")
    if load_extra is not None:
        load_extra(directory)
    rng_file = directory / "rng" / f"rank{dist.get_rank():05d}.safetensors"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: those start from the seed
        _set_rng_state(load_file(str(rng_file)))
    return json.loads((directory / "trainer.json").read_text())


def remove_unfinished(ckpt_dir: Path) -> None:
    """Drop temporary directories left by a save that never completed (rank 0 only)."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def prune(ckpt_dir: Path, cfg: CheckpointConfig) -> list[int]:
    """Apply the retention rules (rank 0 only); returns the steps removed."""
    steps = saved_steps(ckpt_dir)
    keep = set(steps if cfg.keep_last == 0 else steps[-cfg.keep_last:])
    latest = latest_step(ckpt_dir)
    if latest is not None:
        keep.add(latest)
    if cfg.keep_every:
        keep.update(s for s in steps if s % cfg.keep_every == 0)
    if cfg.keep_best:
        scored = [(v, s) for s in steps if (v := _val_loss(ckpt_dir, s)) is not None]
        keep.update(s for _, s in sorted(scored)[: cfg.keep_best])
    removed = [s for s in steps if s not in keep]
    for s in removed:
        shutil.rmtree(ckpt_dir / tag_of(s))
    return removed


def _val_loss(ckpt_dir: Path, step: int) -> float | None:
    try:
        return json.loads((ckpt_dir / tag_of(step) / "trainer.json").read_text()).get("val_loss")
    except (OSError, ValueError):
        return None


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
