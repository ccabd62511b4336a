"""Checkpoints in DeepSpeed's own layout (`global_step<N>/` and `latest`), written atomically and verifiable.

Each checkpoint directory holds DeepSpeed's files (so its zero_to_fp32.py works unchanged), `trainer.json` (step,
sampler position, val loss; written by rank 0), `rng/rank<r>.safetensors` (every rank's RNG states), when averages
are configured `averaging/` (averaging/state.py), and last `manifest.json`: the size and SHA-256 of every other file.

A save survives a SIGKILL of any rank at any moment: the files go into `.tmp-global_step<N>/`, every rank syncs and
hashes its share of them, rank 0 writes the manifest, renames the directory into place and only then replaces
`latest` (itself atomically). Whatever starts with `.tmp-` is unfinished and removed on the next start. A resume
verifies the manifest of the checkpoint it is about to load and falls back to the newest intact one.

    python -m launch.checkpoint --verify runs/tiny_cpu    # every checkpoint of a run, no engine needed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from launch.errors import UserError, cli
from launch.recipe import CheckpointConfig

MANIFEST = "manifest.json"
_TAG = re.compile(r"^global_step(\d+)$")
_TMP_PREFIX = ".tmp-"
# DeepSpeed's per-rank files and ours carry the writer's rank in their names (zero_pp_rank_3_..., rank00003...).
_RANK_IN_NAME = re.compile(r"rank_?(\d+)")


def tag_of(step: int) -> str:
    return f"global_step{step}"


def saved_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the checkpoints renamed into place in `ckpt_dir`, ascending."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _TAG.match(p.name)))


def latest_step(ckpt_dir: Path) -> int | None:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    m = _TAG.match(latest.read_text().strip())
    return int(m.group(1)) if m else None


def describe_latest(ckpt_dir: Path) -> str:
    """The checkpoint `latest` names, for messages."""
    step = latest_step(ckpt_dir)
    return "none (no checkpoint was saved yet)" if step is None else str(ckpt_dir / tag_of(step))


def save(engine, ckpt_dir: Path, step: int, trainer_state: dict, save_extra=None) -> Path:
    """Write the checkpoint of `step` on every rank; `save_extra(directory)` adds per-rank files before the commit."""
    rank, world = dist.get_rank(), dist.get_world_size()
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

    # Each rank syncs and hashes its share (mostly the files it wrote itself: still in its page cache, and on a
    # network filesystem the writer's fsync is the one that counts), so the manifest costs one share's time.
    names = [sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())] if rank == 0 else [None]
    dist.broadcast_object_list(names, src=0)
    shares = [None] * world
    dist.all_gather_object(shares, {name: _describe(tmp / name, sync=True)
                                    for name in _share(names[0], rank, world)})
    if rank == 0:
        files = {name: entry for share in shares for name, entry in share.items()}
        _write_synced(tmp / MANIFEST, json.dumps({"files": dict(sorted(files.items()))}, indent=1))
        for directory in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            _fsync_dir(directory)
        _publish(tmp, ckpt_dir / tag)
    dist.barrier()
    return ckpt_dir / tag


def load(engine, ckpt_dir: Path, step: int, load_extra=None) -> dict:
    """Restore engine, RNG and extras from the checkpoint of `step` (see `newest_intact`); returns its trainer state.

    A UserError from `load_extra` on any rank is raised on every rank, so none waits for the others."""
    directory = ckpt_dir / tag_of(step)
    # DeepSpeed's own files are pickles that DeepSpeed loads itself (weights_only=False): checked against the
    # manifest first (newest_intact), so a damaged one is never unpickled.
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag_of(step), load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {directory}")
    _on_every_rank(lambda: load_extra is not None and load_extra(directory))
    rng_file = directory / "rng" / f"rank{dist.get_rank():05d}.safetensors"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: those start from the seed
        _set_rng_state(load_file(str(rng_file)))
    return json.loads((directory / "trainer.json").read_text())


def newest_intact(ckpt_dir: Path) -> int | None:
    """The step to resume from: `latest`, or if its files do not match their manifest, the newest older checkpoint
    that does (every rank verifies a share; rank 0 says in one line what it skipped). None when nothing was saved.
    Rank 0 first tidies what a killed process left (`remove_unfinished`)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    candidates = [None]
    if rank == 0:
        remove_unfinished(ckpt_dir)
        latest = latest_step(ckpt_dir)
        candidates = [[] if latest is None else [latest] + [s for s in reversed(saved_steps(ckpt_dir)) if s < latest]]
    dist.broadcast_object_list(candidates, src=0)  # one list for all, so every rank takes the same turns below
    if not candidates[0]:
        return None
    damaged = []
    for step in candidates[0]:
        found = [None] * world
        dist.all_gather_object(found, problems(ckpt_dir / tag_of(step), rank, world))
        found = list(dict.fromkeys(p for share in found for p in share))  # a missing manifest: seen by every rank
        if not found:
            if damaged and rank == 0:
                print(f"warning: {'; '.join(damaged)}; resuming from {tag_of(step)}, the newest intact checkpoint",
                      file=sys.stderr)
            return step
        damaged.append(f"{tag_of(step)} is damaged ({', '.join(found)})")
    raise UserError(f"{ckpt_dir}: no intact checkpoint to resume from: {'; '.join(damaged)}; "
                    f"move the directory away to start afresh")


def problems(directory: Path, rank: int = 0, world: int = 1, threads: int = 1) -> list[str]:
    """What is wrong with rank `rank`'s share (of `world`) of a checkpoint's files, one line each; [] when intact."""
    if not directory.is_dir():
        return ["its directory is missing"]
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return [f"{MANIFEST} is missing: the save never finished"]
    except (ValueError, KeyError, TypeError):
        return [f"{MANIFEST} is not a manifest"]
    names = _share(sorted(files), rank, world)
    with ThreadPoolExecutor(threads) as pool:  # hashlib releases the GIL: threads hash files side by side
        found = list(pool.map(lambda name: _check(directory / name, files[name]), names))
    return [f"{name}: {problem}" for name, problem in zip(names, found) if problem]


def verify_run(path: Path, threads: int) -> bool:
    """Print one line per checkpoint of a run (`ok`, or what is damaged); True when all are intact."""
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = saved_steps(ckpt_dir)
    if not steps:
        raise UserError(f"{path}: no checkpoints (expected a run directory or its checkpoints/ directory)")
    latest = latest_step(ckpt_dir)
    intact = True
    for step in steps:
        found = problems(ckpt_dir / tag_of(step), threads=threads)
        intact &= not found
        mark = " (latest)" if step == latest else ""
        print(f"{tag_of(step)}{mark}: {'ok' if not found else 'DAMAGED ' + '; '.join(found)}")
    return intact


def remove_unfinished(ckpt_dir: Path) -> None:
    """Tidy what a process killed mid-save, mid-replacement or mid-removal left (rank 0 only): a checkpoint moved
    aside to be replaced goes back if its replacement never arrived; everything else under a `.tmp-` name goes."""
    if not ckpt_dir.is_dir():
        return
    for p in ckpt_dir.iterdir():
        if not p.name.startswith(_TMP_PREFIX):
            continue
        original = ckpt_dir / p.name.removeprefix(f"{_TMP_PREFIX}replaced-")
        if original != p and not original.exists():
            os.replace(p, original)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()


def prune(ckpt_dir: Path, cfg: CheckpointConfig) -> list[int]:
    """Apply the retention rules to the checkpoints up to `latest`, which is always kept (rank 0 only); returns the
    steps removed. Newer ones (left behind when a resume fell back to an older checkpoint) are left alone: training
    replaces them as it reaches their steps again."""
    latest = latest_step(ckpt_dir)
    if latest is None or cfg.keep_last == 0:
        return []
    steps = [s for s in saved_steps(ckpt_dir) if s <= latest]
    keep = set(steps[-cfg.keep_last:]) | {latest}
    if cfg.keep_every:
        keep.update(s for s in steps if s % cfg.keep_every == 0)
    if cfg.keep_best:
        scored = [(v, s) for s in steps if (v := _val_loss(ckpt_dir, s)) is not None]
        keep.update(s for _, s in sorted(scored)[: cfg.keep_best])
    removed = [s for s in steps if s not in keep]
    for s in removed:
        # Renamed first, so a removal cut short leaves a `.tmp-` directory, never a half checkpoint.
        doomed = ckpt_dir / f"{_TMP_PREFIX}removed-{tag_of(s)}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(ckpt_dir / tag_of(s), doomed)
        shutil.rmtree(doomed)
    return removed


def _publish(tmp: Path, final: Path) -> None:
    """Rename a complete checkpoint into place, then point `latest` at it."""
    ckpt_dir = final.parent
    replaced = ckpt_dir / f"{_TMP_PREFIX}replaced-{final.name}"
    if final.exists():  # the same step saved again after a resume from an older checkpoint: replaced whole
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    _write_synced(ckpt_dir / f"{_TMP_PREFIX}latest", final.name)
    os.replace(ckpt_dir / f"{_TMP_PREFIX}latest", ckpt_dir / "latest")
    _fsync_dir(ckpt_dir)
    shutil.rmtree(replaced, ignore_errors=True)


def _share(names: list[str], rank: int, world: int) -> list[str]:
    """Rank `rank`'s share of a checkpoint's files: those named after it, and every world-th of the rest."""
    def owner(i: int, name: str) -> int:
        m = _RANK_IN_NAME.search(Path(name).name)
        return int(m.group(1)) % world if m else i % world

    return [name for i, name in enumerate(names) if owner(i, name) == rank]


def _describe(path: Path, sync: bool = False) -> dict:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _check(path: Path, expected: dict) -> str | None:
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{size} bytes, the manifest says {expected['size']}"
    if _describe(path)["sha256"] != expected["sha256"]:
        return "contents differ from the manifest's SHA-256"
    return None


def _on_every_rank(fn) -> None:
    """Run `fn` on every rank; a UserError on any rank is raised on all of them (the lowest rank's message)."""
    try:
        fn()
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


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description="Verify a run's checkpoints against their manifests.")
    parser.add_argument("--verify", required=True, type=Path, metavar="DIR", help="a run directory or its checkpoints")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="files hashed at once")
    args = parser.parse_args()
    if not verify_run(args.verify, max(1, args.threads)):
        sys.exit(1)


if __name__ == "__main__":
    cli(main)
