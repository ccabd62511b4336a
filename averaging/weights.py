"""The weights a checkpoint holds, read without an engine or a process group: `raw` (DeepSpeed's fp32 master
partitions) or any saved average (averaging/state.py). Each is a partition layout and a slice reader,
`read(rank, group, start, stop)`, so that a tensor is assembled from its piece on every rank (partitions.py)."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch

from averaging.partitions import Layout
from averaging.state import SavedAverage, SavedAverages, description_file
from polyak.errors import UserError

# DeepSpeed's per-rank files of a ZeRO-3 checkpoint (the optimizer's carry a bf16_ prefix in bf16 runs).
MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
_OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def zero_world_size(directory: Path) -> int:
    """How many ranks wrote a ZeRO-3 checkpoint: DeepSpeed writes one optimizer file per rank."""
    n = sum(1 for p in directory.iterdir() if _OPTIM_STATES.match(p.name)) if directory.is_dir() else 0
    if not n:
        raise UserError(f"{directory}: no DeepSpeed ZeRO-3 optimizer files (*zero_pp_rank_*_optim_states.pt)")
    return n


class MasterWeights:
    """The raw training weights: DeepSpeed's fp32 master partitions (`fp32_flat_groups` in each rank's optimizer
    states file), laid out as its model states file records (`param_shapes`, one dict per flat partition)."""

    def __init__(self, directory: Path):
        self.directory = directory
        model_states = directory / MODEL_STATES
        if not model_states.is_file():
            raise UserError(f"{model_states}: not found; {directory} holds no DeepSpeed ZeRO-3 checkpoint")
        states = _load(model_states)
        self.step = states["global_steps"]
        self.layout = Layout([list(shapes.items()) for shapes in states["param_shapes"]],
                             world_size=states["dp_world_size"])
        ranks = {int(m.group(1)): directory / m.group(0)
                 for p in directory.iterdir() if (m := _OPTIM_STATES.match(p.name))}
        if sorted(ranks) != list(range(self.layout.world_size)):
            raise UserError(f"{directory}: optimizer states of ranks {sorted(ranks)}, but it was written by "
                            f"{self.layout.world_size} ranks; the checkpoint is incomplete")
        self.files = [ranks[rank] for rank in range(self.layout.world_size)]
        for rank in range(self.layout.world_size):
            self.partitions(rank)

    def partitions(self, rank: int) -> list[torch.Tensor]:
        """One rank's fp32 flat partitions, memory-mapped (read from disk only where sliced)."""
        state = _load(self.files[rank])["optimizer_state_dict"]
        flats = state["fp32_flat_groups"]
        have = [t.numel() for t in flats]
        want = [self.layout.partition_numel(g) for g in range(len(self.layout.groups))]
        if int(state["zero_stage"]) != 3 or have != want:
            raise UserError(f"{self.files[rank]}: flat partitions of {have} elements (ZeRO stage "
                            f"{int(state['zero_stage'])}), its model states file gives ZeRO-3 partitions of {want}")
        return flats

    @contextmanager
    def reader(self):
        """`read(rank, group, start, stop)`: elements [start, stop) of a rank's flat partition of a group."""
        flats = [self.partitions(rank) for rank in range(self.layout.world_size)]
        yield lambda rank, group, start, stop: flats[rank][group][start:stop]


def _load(path: Path) -> dict:
    # DeepSpeed's checkpoint files are pickles: the one documented exception where weights_only=False is allowed
    # (files the run's own trainer wrote). mmap: a tensor's bytes are read only when sliced.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def available(directory: Path) -> list[str]:
    """`raw` where DeepSpeed's files are, then the averages saved in the checkpoint."""
    names = ["raw"] if (directory / MODEL_STATES).is_file() else []
    if description_file(directory).is_file():
        names += SavedAverages(directory).names
    return names


def open_weights(directory: Path, name: str) -> MasterWeights | SavedAverage:
    names = available(directory)
    if name not in names:
        raise UserError(f"--weights {name}: not in {directory} (available: {', '.join(names) or 'none'})")
    return MasterWeights(directory) if name == "raw" else SavedAverages(directory).average(name)
