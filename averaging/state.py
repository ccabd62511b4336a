"""Each rank's averaging state on disk, readable without a DeepSpeed engine.

Inside a checkpoint directory, `averaging/` holds
  rank00000.safetensors, ...  every rank's buffers (flat partitions), with that rank's counters as JSON metadata
  averaging.json              written by rank 0: world size, partition layout (names and shapes per group),
                              the averages' kinds, hyperparameters and counters.
"""

from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from averaging.averages import HYPERPARAMETERS, Averager, hyperparameters, make_average
from averaging.partitions import Layout
from launch.errors import UserError
from launch.recipe import AverageConfig


def rank_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / "averaging" / f"rank{rank:05d}.safetensors"


def description_file(directory: str | Path) -> Path:
    return Path(directory) / "averaging" / "averaging.json"


def save_state(averager: Averager, layout: Layout, directory: str | Path, rank: int, world_size: int) -> None:
    """Write this rank's averaging state into the checkpoint directory `directory` (rank 0 also the description)."""
    if layout.world_size != world_size:
        raise ValueError(f"the layout is for {layout.world_size} ranks, saving from {world_size}")
    state = averager.state_dict()
    _write(state["tensors"], state["meta"], layout, directory, rank)


def save_weights(flats: list[torch.Tensor], layout: Layout, directory: str | Path, rank: int, name: str,
                 step: int, info: dict) -> None:
    """Fixed flat partitions (an offline average, say) as this rank's state of an average `name`, for the readers.

    To read_full_average and consolidation they are what they are: an EMA with β = 0 that took one sample holds
    exactly that sample (its buffer `average.<group>`). `info` (JSON) is kept with the counters.
    """
    counters = {**hyperparameters(AverageConfig(kind="ema", beta=0.0)), "samples": 1, "skipped": 0, "skip_left": 0}
    meta = {"step": step, "losses": [], "averages": {name: {**counters, **info}}}
    _write({f"{name}.average.{g}": t for g, t in enumerate(flats)}, meta, layout, directory, rank)


def _write(tensors: dict[str, torch.Tensor], meta: dict, layout: Layout, directory: str | Path, rank: int) -> None:
    path = rank_file(directory, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: t.detach().contiguous() for key, t in tensors.items()}
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})
    if rank == 0:
        description = {"world_size": layout.world_size, **meta, "layout": layout.to_dict()}
        description_file(directory).write_text(json.dumps(description, indent=1))


def load_state(averager: Averager, directory: str | Path, rank: int, world_size: int,
               layout: Layout | None = None) -> None:
    """Restore this rank's averaging state exactly; any mismatch (ranks, layout, averages) is a UserError."""
    description = _read_description(directory)
    path = description_file(directory)
    if description["world_size"] != world_size:
        raise UserError(f"{path}: the averages were saved by {description['world_size']} ranks, this run has "
                        f"{world_size}; resume on {description['world_size']} ranks")
    if layout is not None:
        difference = layout_difference(Layout.from_dict(description["layout"]), layout)
        if difference:
            raise UserError(f"{path}: the saved partition layout differs from this model's: {difference}")
    tensors, meta = _read_rank(directory, rank)
    try:
        averager.load_state_dict({"tensors": tensors, "meta": meta})
    except UserError as e:
        raise UserError(f"{rank_file(directory, rank)}: {e}") from None


def read_full_average(directory: str | Path, name: str) -> dict[str, torch.Tensor]:
    """One average's full fp32 parameters by name, from the saved per-rank partitions alone."""
    description = _read_description(directory)
    averages = description["averages"]
    if name not in averages:
        raise UserError(f"{description_file(directory)}: no average named '{name}' "
                        f"(saved: {', '.join(averages) or 'none'})")
    layout = Layout.from_dict(description["layout"])
    cfg = AverageConfig(**{k: v for k, v in averages[name].items() if k in HYPERPARAMETERS})
    flats = []
    for rank in range(layout.world_size):
        tensors, meta = _read_rank(directory, rank)
        if meta["averages"][name] != averages[name]:
            # Ranks sample independently; only the same choices on every rank give one consistent average.
            raise UserError(f"{rank_file(directory, rank)}: rank {rank}'s '{name}' counters "
                            f"{meta['averages'][name]} differ from rank 0's {averages[name]}")
        average = make_average(cfg, [torch.zeros(layout.partition_numel(g)) for g in range(len(layout.groups))])
        for key, t in average.buffers().items():
            t.copy_(tensors[f"{name}.{key}"])
        average.load_counters(meta["averages"][name])
        flats.append(average.weights())
    return layout.rebuild(flats)


class AverageFiles:
    """One saved average, read a slice at a time: consolidation assembles a tensor without holding the model."""

    def __init__(self, directory: str | Path, name: str):
        description = _read_description(directory)
        averages = description["averages"]
        if name not in averages:
            raise UserError(f"{description_file(directory)}: no average named '{name}' "
                            f"(saved: {', '.join(averages) or 'none'})")
        self.directory, self.name = Path(directory), name
        self.entry = averages[name]  # hyperparameters and counters, as saved
        self.step = description["step"]
        self.layout = Layout.from_dict(description["layout"])
        self.cfg = AverageConfig(**{k: v for k, v in self.entry.items() if k in HYPERPARAMETERS})
        groups = range(len(self.layout.groups))
        keys = make_average(self.cfg, [torch.zeros(0) for _ in groups]).buffers()
        for rank in range(self.layout.world_size):
            path = rank_file(directory, rank)
            if not path.is_file():
                raise UserError(f"{path}: not found; the averaging state of rank {rank} is missing")
            with safe_open(str(path), framework="pt") as f:
                counters = json.loads(f.metadata()["meta"])["averages"].get(name)
                if counters != self.entry:
                    # Ranks sample independently; only the same choices on every rank give one consistent average.
                    raise UserError(f"{path}: rank {rank}'s '{name}' counters {counters} differ from rank 0's "
                                    f"{self.entry}")
                saved = set(f.keys())
                for key in keys:
                    numel = self.layout.partition_numel(int(key.rsplit(".", 1)[1]))
                    shape = f.get_slice(f"{name}.{key}").get_shape() if f"{name}.{key}" in saved else None
                    if shape is None or shape[-1] != numel:
                        have = "missing" if shape is None else f"of shape {shape}"
                        raise UserError(f"{path}: {name}.{key} is {have}; the saved layout gives this rank "
                                        f"{numel} elements")

    @contextmanager
    def reader(self):
        """`read(rank, group, start, stop)`: elements [start, stop) of a rank's averaged partition of a group.

        Each rank's file is memory-mapped while the reader is open and only the slices asked for are read.
        """
        with ExitStack() as stack:
            files = [stack.enter_context(safe_open(str(rank_file(self.directory, rank)), framework="pt"))
                     for rank in range(self.layout.world_size)]

            def read(rank: int, group: int, start: int, stop: int) -> torch.Tensor:
                average = make_average(self.cfg, [torch.zeros(stop - start)])
                for key, t in average.buffers().items():
                    buffer = key.rsplit(".", 1)[0]  # e.g. ring.0 -> ring: the one group of this slice
                    t.copy_(files[rank].get_slice(f"{self.name}.{buffer}.{group}")[
                        (slice(None),) * (t.ndim - 1) + (slice(start, stop),)])
                average.load_counters(self.entry)
                return average.weights()[0]

            yield read


def _read_description(directory: str | Path) -> dict:
    path = description_file(directory)
    if not path.is_file():
        raise UserError(f"{path}: not found; this checkpoint holds no averaging state")
    return json.loads(path.read_text())


def _read_rank(directory: str | Path, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    path = rank_file(directory, rank)
    if not path.is_file():
        raise UserError(f"{path}: not found; the averaging state of rank {rank} is missing")
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (a safe_open handle is no dict)
        return tensors, json.loads(f.metadata()["meta"])


def layout_difference(saved: Layout, now: Layout) -> str | None:
    """The first difference between two layouts, in words."""
    if saved.world_size != now.world_size:
        return f"{saved.world_size} ranks saved, {now.world_size} now"
    if len(saved.groups) != len(now.groups):
        return f"{len(saved.groups)} param groups saved, {len(now.groups)} now"
    for g, (was, new) in enumerate(zip(saved.groups, now.groups)):
        for i in range(max(len(was), len(new))):
            a = was[i] if i < len(was) else "nothing"
            b = new[i] if i < len(new) else "nothing"
            if a != b:
                return f"group {g} parameter {i}: saved {a}, now {b}"
    return None
