"""The snapshot store: weights-only copies of every rank's partitions, written as training goes, no gather.

    <run.dir>/snapshots/
      step<N>/
        snapshot.json           rank 0: the step, world size, partition layout, and what the snapshot holds
        rank00000.safetensors   each rank's flat partitions, `<weights>.<group>` (`raw`: the fp32 master weights),
                                with the SHA-256 of its data in its header, so that it verifies itself
        .rank00000.tmp          a rank's file being written

A rank writes its own file under a temporary name, syncs it and renames it into place, so a file under its final
name is complete; a snapshot is complete when snapshot.json and every rank's file are there and agree. A snapshot
costs the fp32 master partitions only (a third of a checkpoint's bytes with Adam's moments; a sixth in bf16).

Two kinds share the store: a LAWA's samples (always fp32, kept while in its window or referenced by a checkpoint on
disk) and scheduled snapshots (`snapshots.every`, for post-hoc averaging, kept by `keep_last` / `keep_every`). Each
rank deletes only its own files, so no rank ever waits for another; rank 0 removes snapshot.json first, so a
snapshot being deleted is incomplete, never half valid.
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from averaging import tensorfile
from averaging.partitions import Layout, reshard_plan
from averaging.state import window_steps
from polyak import checkpoints
from polyak.errors import UserError
from polyak.files import fsync_dir, write_synced
from polyak.recipe import SnapshotConfig

DESCRIPTION = "snapshot.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_STEP = re.compile(r"^step(\d+)$")
_CHUNK = 1 << 24  # elements read back at a time: bounds the memory a read-back takes, whatever the model size


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank:05d}.safetensors"


class Snapshot:
    """One snapshot, read without an engine: its layout, what it holds, and a slice reader like MasterWeights'."""

    def __init__(self, directory: Path):
        self.directory = directory
        try:
            description = json.loads((directory / DESCRIPTION).read_text())
        except FileNotFoundError:
            raise UserError(f"{directory}: no {DESCRIPTION}; the snapshot is incomplete or being removed") from None
        self.step = description["step"]
        self.layout = Layout.from_dict(description["layout"])
        self.weights: dict[str, str] = description["weights"]  # name -> dtype
        self.averages: dict[str, dict] = description["averages"]  # name -> hyperparameters and counters
        self.scheduled: bool = description["scheduled"]

    def problems(self) -> list[str]:
        """What is wrong with the snapshot's files, one line each; [] when complete and intact."""
        found = []
        for rank in range(self.layout.world_size):
            path = rank_file(self.directory, rank)
            problem = tensorfile.verify(path)
            if problem is None and _rank_meta(path) != {"step": str(self.step), "rank": str(rank),
                                                        "world_size": str(self.layout.world_size)}:
                problem = f"written for another snapshot ({_rank_meta(path)})"
            if problem:
                found.append(f"{path.name}: {problem}")
        return found

    def check(self) -> Snapshot:
        problems = self.problems()
        if problems:
            raise UserError(f"{self.directory}: damaged or incomplete: {'; '.join(problems)}")
        return self

    def partitions(self, rank: int, name: str = "raw") -> list[torch.Tensor]:
        """One rank's flat partitions of weights `name`, in fp32."""
        with safe_open(str(rank_file(self.directory, rank)), framework="pt") as f:
            return [f.get_tensor(f"{name}.{g}").float() for g in range(len(self.layout.groups))]

    @contextmanager
    def reader(self, name: str = "raw"):
        """`read(rank, group, start, stop)`: elements [start, stop) of a rank's partition of weights `name`, in fp32."""
        if name not in self.weights:
            raise UserError(f"{self.directory}: holds {', '.join(self.weights)}, not {name}")
        with ExitStack() as stack:
            files = [stack.enter_context(safe_open(str(rank_file(self.directory, r)), framework="pt"))
                     for r in range(self.layout.world_size)]
            yield lambda rank, group, start, stop: files[rank].get_slice(f"{name}.{group}")[start:stop].float()


class SnapshotWeights:
    """One of the weights a snapshot holds, as consolidation reads weights: a layout and a slice reader."""

    def __init__(self, snapshot: Snapshot, name: str):
        if name not in snapshot.weights:
            raise UserError(f"--weights {name}: not in {snapshot.directory} (it holds {', '.join(snapshot.weights)})")
        self.snapshot, self.name, self.layout, self.step = snapshot, name, snapshot.layout, snapshot.step

    def reader(self):
        return self.snapshot.reader(self.name)


def saved_steps(root: Path) -> list[int]:
    """Steps with a snapshot directory in the store (complete or not), ascending."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP.match(p.name)))


def complete(root: Path) -> list[Snapshot]:
    """The store's complete, intact snapshots, by step (each file is hashed: this reads the whole store)."""
    found = []
    for step in saved_steps(root):
        try:
            snapshot = Snapshot(root / f"step{step}")
        except (UserError, OSError, ValueError, KeyError):
            continue
        if not snapshot.problems():
            found.append(snapshot)
    return found


class SnapshotStore:
    """One rank's side of the store: it writes and deletes its own files, and reads back any rank's (a LAWA's samples,
    also after the run was resumed on another number of ranks)."""

    def __init__(self, root: Path, cfg: SnapshotConfig, layout: Layout, rank: int, ckpt_dir: Path | None = None):
        self.root, self.cfg, self.layout, self.rank, self.ckpt_dir = root, cfg, layout, rank, ckpt_dir
        self.verified: set[Path] = set()  # files this process has hashed once
        self.pins: dict[str, set[int]] = {}  # checkpoint name -> the samples its averages need, while it is written
        # The steps the averages needed in the last three prunes. A rank's averaging lags its training by at most one
        # update and the ranks' training runs in step, so when a rank prunes, every rank has finished the work of two
        # updates before: what those could still read or write stays.
        self.recent: deque[set[int]] = deque(maxlen=3)

    def scheduled(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def write(self, step: int, weights: dict[str, tuple[list[torch.Tensor], str]], scheduled: bool,
              averages: dict[str, dict] | None = None) -> None:
        """This rank's file of snapshot `step`: `weights` maps a name to its partitions and dtype; `averages` the
        hyperparameters and counters of the averages among them (post-hoc power reconstruction needs them)."""
        directory = self.root / f"step{step}"
        directory.mkdir(parents=True, exist_ok=True)
        world = self.layout.world_size
        if self.rank == 0:
            for p in directory.glob("rank*.safetensors"):  # left by a run of more ranks, resumed on fewer
                if int(p.name[4:9]) >= world:
                    p.unlink()
            description = {"step": step, "world_size": world, "scheduled": scheduled,
                           "weights": {name: dtype for name, (_, dtype) in weights.items()},
                           "averages": averages or {}, "layout": self.layout.to_dict()}
            write_synced(directory / f".{DESCRIPTION}.tmp", json.dumps(description, indent=1))
            os.replace(directory / f".{DESCRIPTION}.tmp", directory / DESCRIPTION)
        entries = [tensorfile.Entry(f"{name}.{g}", DTYPES[dtype], (t.numel(),), lambda t=t: [t])
                   for name, (tensors, dtype) in weights.items() for g, t in enumerate(tensors)]
        tmp, final = directory / f".rank{self.rank:05d}.tmp", rank_file(directory, self.rank)
        tensorfile.write(tmp, entries, digest=True,
                         metadata={"step": str(step), "rank": str(self.rank), "world_size": str(world)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(directory)
        self.verified.add(final)

    def read_back(self, step: int) -> tuple[Layout, Path]:
        """The layout snapshot `step` was written in and its directory, with the files this rank reads from it
        verified (once per process). A sample this run wrote in its own layout is read from this rank's file alone
        (rank 0 may not have written the snapshot's description yet); one written on another number of ranks, from
        the pieces of its ranks' files that hold this rank's elements."""
        directory = self.root / f"step{step}"
        own = rank_file(directory, self.rank)
        try:
            if own.is_file() and _rank_meta(own)["world_size"] == str(self.layout.world_size):
                if tensorfile.read_header(own)[0].get("raw.0", {}).get("dtype") != "F32":
                    raise UserError(f"{own}: holds no fp32 weights to read back")
                layout = self.layout
            else:
                snapshot = Snapshot(directory)
                if snapshot.weights.get("raw") != "fp32":
                    raise UserError(f"{directory}: holds no fp32 weights to read back")
                layout = snapshot.layout
        except UserError as e:
            raise UserError(f"{e}; a LAWA sample is lost, so this run's LAWA cannot go on (resume from an older "
                            f"checkpoint, or start the run afresh)") from None
        for source in sorted({piece.rank for piece in reshard_plan(layout, self.layout, self.rank)}):
            path = rank_file(directory, source)
            if path not in self.verified:
                problem = tensorfile.verify(path)
                if problem:
                    raise UserError(f"{path}: {problem}; a LAWA sample is lost, so this run's LAWA cannot go on "
                                    f"(resume from an older checkpoint, or start the run afresh)")
                self.verified.add(path)
        return layout, directory

    def accumulate(self, out: list[torch.Tensor], step: int, subtract: bool = False) -> None:
        """Add (or subtract) this rank's partitions of snapshot `step`'s fp32 weights to `out`, a chunk at a time."""
        layout, directory = self.read_back(step)
        with ExitStack() as stack:
            files = {}
            for piece in reshard_plan(layout, self.layout, self.rank):
                if piece.rank not in files:
                    files[piece.rank] = stack.enter_context(safe_open(str(rank_file(directory, piece.rank)), "pt"))
                for start in range(piece.start, piece.stop, _CHUNK):
                    stop = min(start + _CHUNK, piece.stop)
                    dest = out[piece.group][piece.dest + start - piece.start:piece.dest + stop - piece.start]
                    chunk = files[piece.rank].get_slice(f"raw.{piece.group}")[start:stop].to(dest.device)
                    if subtract:
                        dest.sub_(chunk)
                    else:
                        dest.add_(chunk)

    def pin(self, checkpoint: Path, steps: set[int]) -> None:
        """Keep `steps` while the checkpoint being written into `checkpoint` (its temporary name) exists."""
        self.pins[checkpoint.name.removeprefix(checkpoints.TMP_PREFIX)] = set(steps)

    def prune(self, live: set[int], upto: int) -> None:
        """Delete this rank's files of every snapshot up to step `upto` that nothing needs: not in `live` (what the
        averages read or wrote in this update) nor in the two updates before, not needed by a checkpoint on disk or
        being written, not kept by the retention rules of scheduled snapshots. Later steps (left by a killed run, or
        being written by a rank ahead) are left alone: training writes them again as it reaches them."""
        self.recent.append(set(live))
        keep = set().union(*self.recent) | self._needed_by_checkpoints()
        steps = [s for s in saved_steps(self.root) if s <= upto]
        scheduled = [s for s in steps if _scheduled(self.root / f"step{s}")]
        if self.cfg.keep_last:
            keep.update(scheduled[-self.cfg.keep_last:])
            if self.cfg.keep_every:
                keep.update(s for s in scheduled if s % self.cfg.keep_every == 0)
        else:
            keep.update(scheduled)
        for step in steps:
            if step not in keep:
                self._delete(self.root / f"step{step}")

    def _needed_by_checkpoints(self) -> set[int]:
        needed = set()
        for name, steps in list(self.pins.items()):
            # Renamed from its temporary name to its own at some moment: looked for in that order, it is never missed.
            if (self.ckpt_dir / (checkpoints.TMP_PREFIX + name)).exists() or (self.ckpt_dir / name).exists():
                needed |= steps
            else:
                del self.pins[name]
        for step in checkpoints.saved_steps(self.ckpt_dir) if self.ckpt_dir else ():
            needed |= window_steps(self.ckpt_dir / checkpoints.tag_of(step))
        return needed

    def _delete(self, directory: Path) -> None:
        if self.rank == 0:
            try:
                world = json.loads((directory / DESCRIPTION).read_text())["world_size"]
            except (OSError, ValueError, KeyError):
                world = self.layout.world_size
            (directory / DESCRIPTION).unlink(missing_ok=True)
            for r in range(self.layout.world_size, world):  # ranks of a larger world that wrote it: gone
                rank_file(directory, r).unlink(missing_ok=True)
        rank_file(directory, self.rank).unlink(missing_ok=True)
        self.verified.discard(rank_file(directory, self.rank))
        try:
            directory.rmdir()  # the last rank out removes the directory
        except OSError:
            pass

    def remove_unfinished(self) -> None:
        """This rank's temporary files, left by a killed writer."""
        for step in saved_steps(self.root):
            (self.root / f"step{step}" / f".rank{self.rank:05d}.tmp").unlink(missing_ok=True)


def _scheduled(directory: Path) -> bool:
    try:
        return json.loads((directory / DESCRIPTION).read_text())["scheduled"]
    except (OSError, ValueError, KeyError):
        return False


def _rank_meta(path: Path) -> dict:
    meta = tensorfile.read_header(path)[0]["__metadata__"]
    return {k: meta.get(k) for k in ("step", "rank", "world_size")}
