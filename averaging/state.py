"""Each rank's averaging state on disk, readable without a DeepSpeed engine.

Inside a checkpoint directory, `averaging/` holds
  rank00000.safetensors, ...  every rank's buffers, `<average>.<buffer>.<group>` (flat partitions: an EMA's
                              average, a LAWA's running sum), with that rank's counters as JSON metadata
  averaging.json              written by rank 0: world size, partition layout (names and shapes per group),
                              the averages' kinds, hyperparameters and counters (a LAWA's: the steps of the samples
                              in its window, which the snapshot store holds).

SavedAverages is the one reader: it checks a directory once (every rank's file present, with rank 0's counters and
buffers of the saved layout's sizes), then gives a rank's state for any world size (resharded through
partitions.reshard_plan, reading only the slices that rank needs), or one average a slice at a time.
"""

from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from averaging.averages import HYPERPARAMETERS, hyperparameters, make_average
from averaging.partitions import Layout, reshard_plan
from polyak.errors import UserError
from polyak.recipe import AverageConfig


def key(name: str, buffer: str, group: int) -> str:
    return f"{name}.{buffer}.{group}"


def parse_key(k: str) -> tuple[str, str, int]:
    """(average, buffer, group) of a tensor's name; average names are identifiers, so they hold no dot."""
    name, buffer, group = k.split(".")
    return name, buffer, int(group)


def rank_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / "averaging" / f"rank{rank:05d}.safetensors"


def description_file(directory: str | Path) -> Path:
    return Path(directory) / "averaging" / "averaging.json"


def window_steps(directory: str | Path) -> set[int]:
    """The snapshot steps the LAWAs saved in a checkpoint directory need to go on (none if it holds no averages)."""
    try:
        averages = json.loads(description_file(directory).read_text())["averages"]
    except (OSError, ValueError, KeyError):
        return set()
    return {step for entry in averages.values() for step in entry.get("steps", ())}


def write(directory: str | Path, rank: int, layout: Layout, saved: dict) -> None:
    """This rank's state (`Averager.state_dict()`) into `directory`; rank 0 also writes the description."""
    path = rank_file(directory, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.detach().contiguous() for k, t in saved["tensors"].items()}
    save_file(tensors, str(path), metadata={"meta": json.dumps(saved["meta"])})
    if rank == 0:
        description = {"world_size": layout.world_size, **saved["meta"], "layout": layout.to_dict()}
        description_file(directory).write_text(json.dumps(description, indent=1))


def write_weights(directory: str | Path, rank: int, layout: Layout, name: str, flats: list[torch.Tensor], step: int,
                  info: dict) -> None:
    """Fixed flat partitions (an offline average, say) as this rank's state of an average `name`, for the readers:
    an EMA with β = 0 that took one sample holds exactly that sample. `info` (JSON) is kept with the counters."""
    counters = {**hyperparameters(AverageConfig(kind="ema", beta=0.0)), "samples": 1, "skipped": 0, "skip_left": 0}
    meta = {"step": step, "losses": [], "averages": {name: {**counters, **info}}}
    write(directory, rank, layout, {"tensors": {key(name, "average", g): t for g, t in enumerate(flats)},
                                    "meta": meta})


class SavedAverages:
    """The averaging state of one checkpoint directory, checked on opening."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = description_file(directory)
        if not path.is_file():
            raise UserError(f"{path}: not found; this checkpoint holds no averaging state")
        description = json.loads(path.read_text())
        self.layout = Layout.from_dict(description["layout"])
        self.meta = {k: v for k, v in description.items() if k not in ("world_size", "layout")}
        for name, entry in self.meta["averages"].items():
            if entry["kind"] == "lawa" and "steps" not in entry:
                raise UserError(f"{path}: LAWA '{name}' was saved with its samples inside the checkpoint, by an "
                                f"earlier version; this one keeps them in the snapshot store: resume or export "
                                f"this checkpoint with the version that wrote it")
        for rank in range(self.layout.world_size):
            file = rank_file(directory, rank)
            if not file.is_file():
                raise UserError(f"{file}: not found; the averaging state of rank {rank} is missing")
            with safe_open(str(file), framework="pt") as f:
                meta = json.loads(f.metadata()["meta"])
                if meta != self.meta:
                    # Ranks sample independently; only the same choices on every rank give one consistent average.
                    raise UserError(f"{file}: rank {rank}'s averaging counters {meta['averages']} (step "
                                    f"{meta['step']}) differ from rank 0's {self.meta['averages']} (step "
                                    f"{self.meta['step']}); these averages are not one consistent state")
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (no dict)
            for k in sorted(shapes.keys() | self.keys):
                numel = self.layout.partition_numel(parse_key(k)[2])
                if shapes.get(k) != [numel]:
                    have = "missing" if k not in shapes else f"of shape {shapes[k]}"
                    raise UserError(f"{file}: {k} is {have}; the saved layout gives each rank {numel} elements")

    @property
    def names(self) -> list[str]:
        return list(self.meta["averages"])

    def config(self, name: str) -> AverageConfig:
        if name not in self.meta["averages"]:
            raise UserError(f"{description_file(self.directory)}: no average named '{name}' "
                            f"(saved: {', '.join(self.names) or 'none'})")
        return AverageConfig(**{k: v for k, v in self.meta["averages"][name].items() if k in HYPERPARAMETERS})

    def state_for(self, rank: int, layout: Layout) -> dict:
        """Rank `rank`'s state (as `Averager.state_dict()` gives it) in `layout`, the loading run's: the saved one,
        or cut anew from the slices of the saved ranks' files when the world size differs. Every buffer is
        elementwise, so the full averages stay the saved ones bit for bit."""
        difference = Layout(self.layout.groups, layout.world_size).difference(layout)
        if difference:
            raise UserError(f"{description_file(self.directory)}: the saved partition layout differs from this "
                            f"model's: {difference}")
        if layout.world_size == self.layout.world_size:
            return {"tensors": load_file(str(rank_file(self.directory, rank))), "meta": self.meta}
        plan = reshard_plan(self.layout, layout, rank)
        tensors = {}
        with ExitStack() as stack:
            files = [stack.enter_context(safe_open(str(rank_file(self.directory, r)), framework="pt"))
                     for r in range(self.layout.world_size)]
            for k in self.keys:
                group = parse_key(k)[2]
                tensors[k] = torch.zeros(layout.partition_numel(group))
                for piece in (p for p in plan if p.group == group):
                    tensors[k][piece.dest:piece.dest + piece.stop - piece.start] = \
                        files[piece.rank].get_slice(k)[piece.start:piece.stop]
        return {"tensors": tensors, "meta": self.meta}

    def average(self, name: str) -> SavedAverage:
        return SavedAverage(self, name)

    @property
    def keys(self) -> set[str]:
        """Every buffer's name, as each rank's file holds it."""
        groups = range(len(self.layout.groups))
        return {key(name, buffer, g) for name in self.names
                for buffer in make_average(self.config(name), [torch.zeros(0) for _ in groups]).buffers()
                for g in groups}


class SavedAverage:
    """One saved average, read a slice at a time: consolidation assembles a tensor without holding the model."""

    def __init__(self, saved: SavedAverages, name: str):
        self.saved, self.name = saved, name
        self.cfg = saved.config(name)
        self.entry = saved.meta["averages"][name]  # hyperparameters and counters, as saved
        self.layout, self.step = saved.layout, saved.meta["step"]

    @contextmanager
    def reader(self):
        """`read(rank, group, start, stop)`: elements [start, stop) of a rank's averaged partition of a group.

        Each rank's file is memory-mapped while the reader is open and only the slices asked for are read."""
        with ExitStack() as stack:
            files = [stack.enter_context(safe_open(str(rank_file(self.saved.directory, rank)), framework="pt"))
                     for rank in range(self.layout.world_size)]

            def read(rank: int, group: int, start: int, stop: int) -> torch.Tensor:
                average = make_average(self.cfg, [torch.zeros(stop - start)])
                for buffer, (t,) in average.buffers().items():
                    t.copy_(files[rank].get_slice(key(self.name, buffer, group))[start:stop])
                average.load_counters(self.entry)
                return average.weights()[0]

            yield read

    def full(self) -> dict[str, torch.Tensor]:
        """The full fp32 parameters by name (tests and small models; consolidation streams instead)."""
        with self.reader() as read:
            return {p.name: p.join([read(rank, p.group, p.start, p.stop) for rank in range(self.layout.world_size)])
                    for p in self.layout.params()}
