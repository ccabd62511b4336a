"""A run's checkpoints folder on disk, readable without an engine or a process group.

    <run.dir>/checkpoints/
      global_step<N>/   DeepSpeed's files (its zero_to_fp32.py works on them unchanged), trainer.json (step, sampler
                        position, val loss), rng/rank<r>.safetensors, the components' files (averaging/, ...) and,
                        last, manifest.json: the size and SHA-256 of every other file
      latest            the tag of the newest complete checkpoint, replaced atomically
      .tmp-*            unfinished work of a killed process, removed on the next start

launch/checkpoint.py writes and loads checkpoints with an engine; everything that only reads them uses this module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from polyak.errors import UserError
from polyak.files import fsync_dir, mismatch, write_synced

MANIFEST = "manifest.json"
TRAINER = "trainer.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
_TAG = re.compile(r"^global_step(\d+)$")
# DeepSpeed's per-rank files and ours carry the writer's rank in their names (zero_pp_rank_3_..., rank00003...).
_RANK_IN_NAME = re.compile(r"rank_?(\d+)")


def tag_of(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def saved_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the checkpoints renamed into place in `ckpt_dir`, ascending."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(s for p in ckpt_dir.iterdir() if p.is_dir() and (s := step_of(p.name)) is not None)


def latest_step(ckpt_dir: Path) -> int | None:
    latest = ckpt_dir / LATEST
    return step_of(latest.read_text().strip()) if latest.is_file() else None


def describe_latest(ckpt_dir: Path) -> str:
    """The checkpoint `latest` names, for messages."""
    step = latest_step(ckpt_dir)
    return "none (no checkpoint was saved yet)" if step is None else str(ckpt_dir / tag_of(step))


def find(ckpt_dir: Path, tag: str | None) -> Path:
    """The directory of checkpoint `tag` (default: the one `latest` names) inside a checkpoints folder."""
    if not ckpt_dir.is_dir():
        raise UserError(f"{ckpt_dir}: no such checkpoints directory")
    if tag is None:
        step = latest_step(ckpt_dir)
        if step is None:
            raise UserError(f"{ckpt_dir / LATEST}: not found; name a checkpoint with --tag "
                            f"(saved: {_listing(ckpt_dir)})")
        tag = tag_of(step)
    directory = ckpt_dir / tag
    if not tag or not directory.is_dir():
        raise UserError(f"{ckpt_dir}: no checkpoint '{tag}' (saved: {_listing(ckpt_dir)})")
    return directory


def read_trainer_state(directory: Path) -> dict | None:
    """A checkpoint's trainer.json; None where there is none (an average saved by averaging.posthoc)."""
    try:
        return json.loads((directory / TRAINER).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise UserError(f"{directory / TRAINER}: not valid JSON") from None


def write_manifest(directory: Path, files: dict[str, dict]) -> None:
    write_synced(directory / MANIFEST, json.dumps({"files": dict(sorted(files.items()))}, indent=1))


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
    names = share(sorted(files), rank, world)
    with ThreadPoolExecutor(threads) as pool:  # hashlib releases the GIL: threads hash files side by side
        found = list(pool.map(lambda name: mismatch(directory / name, files[name]), names))
    return [f"{name}: {problem}" for name, problem in zip(names, found) if problem]


def share(names: list[str], rank: int, world: int) -> list[str]:
    """Rank `rank`'s share of a checkpoint's files: those named after it, and every world-th of the rest."""
    def owner(i: int, name: str) -> int:
        m = _RANK_IN_NAME.search(Path(name).name)
        return int(m.group(1)) % world if m else i % world

    return [name for i, name in enumerate(names) if owner(i, name) == rank]


def publish(tmp: Path, final: Path) -> None:
    """Rename a complete checkpoint into place, then point `latest` at it."""
    ckpt_dir = final.parent
    replaced = ckpt_dir / f"{TMP_PREFIX}replaced-{final.name}"
    if final.exists():  # the same step saved again after a resume from an older checkpoint: replaced whole
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    fsync_dir(ckpt_dir)
    write_synced(ckpt_dir / f"{TMP_PREFIX}{LATEST}", final.name)
    os.replace(ckpt_dir / f"{TMP_PREFIX}{LATEST}", ckpt_dir / LATEST)
    fsync_dir(ckpt_dir)
    shutil.rmtree(replaced, ignore_errors=True)


def remove(ckpt_dir: Path, step: int) -> None:
    """Delete a checkpoint; renamed first, so that a removal cut short leaves a `.tmp-` directory, never half a
    checkpoint."""
    doomed = ckpt_dir / f"{TMP_PREFIX}removed-{tag_of(step)}"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(ckpt_dir / tag_of(step), doomed)
    shutil.rmtree(doomed)


def remove_unfinished(ckpt_dir: Path) -> None:
    """Tidy what a process killed mid-save, mid-replacement or mid-removal left: a checkpoint moved aside to be
    replaced goes back if its replacement never arrived; everything else under a `.tmp-` name goes."""
    if not ckpt_dir.is_dir():
        return
    for p in ckpt_dir.iterdir():
        if not p.name.startswith(TMP_PREFIX):
            continue
        original = ckpt_dir / p.name.removeprefix(f"{TMP_PREFIX}replaced-")
        if original != p and not original.exists():
            os.replace(p, original)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()


def _listing(ckpt_dir: Path) -> str:
    def natural(name: str) -> list:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    tags = sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=natural)
    return ", ".join(tags) or "none"
