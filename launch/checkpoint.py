"""Checkpoints with an engine: written on every rank, atomically and verifiably; loaded, or the newest intact one.

The layout on disk is polyak/checkpoints.py's. A save survives a SIGKILL of any rank at any moment: the files go into
`.tmp-global_step<N>/`, every rank syncs and hashes its share of them, rank 0 writes the manifest, renames the
directory into place and only then replaces `latest` (itself atomically); all but writing the files happens in the
background (Checkpointer). A resume verifies the manifest of the checkpoint it is about to load and falls back to
the newest intact one.

Components (the averager, say) put their own state into a checkpoint: `save(directory)` on every rank before the
commit, `load(directory)` on every rank after DeepSpeed's state is loaded.

    python -m launch.checkpoint --verify runs/tiny_cpu    # every checkpoint of a run, no engine needed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from polyak import checkpoints
from polyak.checkpoints import TMP_PREFIX, TRAINER, tag_of
from polyak.errors import UserError, cli
from polyak.files import describe, fsync_dir
from polyak.recipe import CheckpointConfig


class Component(Protocol):
    def save(self, directory: Path) -> Future: ...  # the files are complete once the future is done

    def load(self, directory: Path) -> None: ...


class Checkpointer:
    """Saves the checkpoints of a run. The training thread writes the files (DeepSpeed's, the RNG states, what the
    components write, trainer.json) and goes on; a thread on every rank then syncs and hashes its share, and rank 0
    writes the manifest, renames the checkpoint into place, replaces `latest` and applies the retention rules. That
    commit talks over a process group of its own (gloo), so it never meets the training's collectives; the next
    save, and the end of training, wait for it. A checkpoint is only ever found complete or not at all: a process
    killed before its commit leaves a `.tmp-` directory, which the next start removes.

    Created on every rank at once (it creates a process group)."""

    def __init__(self, ckpt_dir: Path, retention: CheckpointConfig, note=print):
        self.ckpt_dir, self.retention, self.note = ckpt_dir, retention, note
        self.group = dist.new_group(backend="gloo")
        self.committing: threading.Thread | None = None
        self.failure: BaseException | None = None

    def save(self, engine, step: int, trainer_state: dict, components: Sequence[Component] = ()) -> Path:
        """Write the checkpoint of `step`, the components' state included; it is committed in the background."""
        self.wait()
        rank = dist.get_rank()
        tmp = self.ckpt_dir / (TMP_PREFIX + tag_of(step))
        if rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        engine.save_checkpoint(str(self.ckpt_dir), tag=tmp.name, save_latest=False)
        (tmp / "rng").mkdir(exist_ok=True)
        save_file(_rng_state(), str(tmp / "rng" / f"rank{rank:05d}.safetensors"))
        writing = [component.save(tmp) for component in components]
        if rank == 0:
            (tmp / TRAINER).write_text(json.dumps(trainer_state, indent=1))
        # Daemon: a run stopped while a commit is under way leaves it unfinished, as a kill would.
        self.committing = threading.Thread(target=self._commit, args=(tmp, writing), daemon=True,
                                           name=f"commit {tmp.name}")
        self.committing.start()
        return self.ckpt_dir / tag_of(step)

    def wait(self) -> None:
        """Until the last checkpoint is committed (its failure, if any, is raised here)."""
        if self.committing is not None:
            self.committing.join()
            self.committing = None
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    def _commit(self, tmp: Path, writing: list[Future]) -> None:
        try:
            rank, world = dist.get_rank(), dist.get_world_size()
            for future in writing:
                future.result()
            dist.barrier(group=self.group)  # every rank's files are written
            # Each rank syncs and hashes its share (mostly the files it wrote itself: still in its page cache, and
            # on a network filesystem the writer's fsync is the one that counts).
            names = [sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())] if rank == 0 else [None]
            dist.broadcast_object_list(names, src=0, group=self.group)
            shares = [None] * world
            dist.all_gather_object(shares, {name: describe(tmp / name, sync=True)
                                            for name in checkpoints.share(names[0], rank, world)}, group=self.group)
            if rank == 0:
                checkpoints.write_manifest(tmp, {name: entry for share in shares for name, entry in share.items()})
                for directory in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
                    fsync_dir(directory)
                checkpoints.publish(tmp, self.ckpt_dir / tmp.name.removeprefix(TMP_PREFIX))
                for removed in prune(self.ckpt_dir, self.retention):
                    self.note(f"removed checkpoint {tag_of(removed)} (retention)")
        except BaseException as e:  # noqa: BLE001 - handed to the training thread at its next wait()
            self.failure = e


def load(engine, ckpt_dir: Path, step: int, components: Sequence[Component] = ()) -> dict:
    """Restore engine, RNG and components from the checkpoint of `step` (see `newest_intact`); returns its trainer
    state. A UserError from a component on any rank is raised on every rank, so none waits for the others."""
    directory = ckpt_dir / tag_of(step)
    # DeepSpeed's own files are pickles that DeepSpeed loads itself (weights_only=False): checked against the
    # manifest first (newest_intact), so a damaged one is never unpickled.
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag_of(step), load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {directory}")
    for component in components:
        _on_every_rank(component.load, directory)
    rng_file = directory / "rng" / f"rank{dist.get_rank():05d}.safetensors"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: those start from the seed
        _set_rng_state(load_file(str(rng_file)))
    return checkpoints.read_trainer_state(directory)


def newest_intact(ckpt_dir: Path) -> int | None:
    """The step to resume from: `latest`, or if its files do not match their manifest, the newest older checkpoint
    that does (every rank verifies a share; rank 0 says in one line what it skipped). None when nothing was saved.
    Rank 0 first tidies what a killed process left."""
    rank, world = dist.get_rank(), dist.get_world_size()
    candidates = [None]
    if rank == 0:
        checkpoints.remove_unfinished(ckpt_dir)
        latest = checkpoints.latest_step(ckpt_dir)
        candidates = [[] if latest is None else
                      [latest] + [s for s in reversed(checkpoints.saved_steps(ckpt_dir)) if s < latest]]
    dist.broadcast_object_list(candidates, src=0)  # one list for all, so every rank takes the same turns below
    if not candidates[0]:
        return None
    damaged = []
    for step in candidates[0]:
        found = [None] * world
        dist.all_gather_object(found, checkpoints.problems(ckpt_dir / tag_of(step), rank, world))
        found = list(dict.fromkeys(p for share in found for p in share))  # a missing manifest: seen by every rank
        if not found:
            if damaged and rank == 0:
                print(f"warning: {'; '.join(damaged)}; resuming from {tag_of(step)}, the newest intact checkpoint",
                      file=sys.stderr)
            return step
        damaged.append(f"{tag_of(step)} is damaged ({', '.join(found)})")
    raise UserError(f"{ckpt_dir}: no intact checkpoint to resume from: {'; '.join(damaged)}; "
                    f"move the directory away to start afresh")


def prune(ckpt_dir: Path, cfg: CheckpointConfig) -> list[int]:
    """Apply the retention rules to the checkpoints up to `latest`, which is always kept (rank 0 only); returns the
    steps removed. Newer ones (left behind when a resume fell back to an older checkpoint) are left alone: training
    replaces them as it reaches their steps again."""
    latest = checkpoints.latest_step(ckpt_dir)
    if latest is None or cfg.keep_last == 0:
        return []
    steps = [s for s in checkpoints.saved_steps(ckpt_dir) if s <= latest]
    keep = set(steps[-cfg.keep_last:]) | {latest}
    if cfg.keep_every:
        keep.update(s for s in steps if s % cfg.keep_every == 0)
    if cfg.keep_best:
        scored = [(v, s) for s in steps if (v := _val_loss(ckpt_dir, s)) is not None]
        keep.update(s for _, s in sorted(scored)[: cfg.keep_best])
    removed = [s for s in steps if s not in keep]
    for s in removed:
        checkpoints.remove(ckpt_dir, s)
    return removed


def verify_run(path: Path, threads: int) -> bool:
    """Print one line per checkpoint of a run (`ok`, or what is damaged); True when all are intact."""
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = checkpoints.saved_steps(ckpt_dir)
    if not steps:
        raise UserError(f"{path}: no checkpoints (expected a run directory or its checkpoints/ directory)")
    latest = checkpoints.latest_step(ckpt_dir)
    intact = True
    for step in steps:
        found = checkpoints.problems(ckpt_dir / tag_of(step), threads=threads)
        intact &= not found
        mark = " (latest)" if step == latest else ""
        print(f"{tag_of(step)}{mark}: {'ok' if not found else 'DAMAGED ' + '; '.join(found)}")
    return intact


def _on_every_rank(fn, *args) -> None:
    """Run `fn(*args)` on every rank; a UserError on any rank is raised on all of them (the lowest rank's message)."""
    try:
        fn(*args)
        error = None
    except UserError as e:
        error = str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise UserError(first)


def _val_loss(ckpt_dir: Path, step: int) -> float | None:
    try:
        return (checkpoints.read_trainer_state(ckpt_dir / tag_of(step)) or {}).get("val_loss")
    except UserError:
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


def main() -> None:
    parser = argparse.ArgumentParser(description="Verify a run's checkpoints against their manifests.")
    parser.add_argument("--verify", required=True, type=Path, metavar="DIR", help="a run directory or its checkpoints")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="files hashed at once")
    args = parser.parse_args()
    if not verify_run(args.verify, max(1, args.threads)):
        sys.exit(1)


if __name__ == "__main__":
    cli(main)
