"""The averaging state of a checkpoint written by N ranks, loaded on M: every average, bit for bit.

Each new rank builds its flat partitions from the slices of the saved ranks' files that hold its elements
(partitions.reshard_plan), reading only those slices. Every buffer is elementwise (an EMA, a LAWA ring and its
running sum), so the full averages are the saved ones exactly. The counters (samples, the ring's head and fill, the
spike guard's) move over as they are: they are the same on every rank, and a checkpoint where they are not is refused.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from averaging.averages import Averager
from averaging.partitions import Layout, reshard_plan
from averaging.state import layout_difference, description_file, rank_file
from launch.errors import UserError


def load_resharded_state(averager: Averager, directory: str | Path, rank: int, world_size: int,
                         layout: Layout) -> None:
    """Restore this rank's averaging state from a checkpoint saved by any number of ranks (state.load_state's
    counterpart when that number differs from `world_size`)."""
    if layout.world_size != world_size:
        raise ValueError(f"the layout is for {layout.world_size} ranks, loading on {world_size}")
    path = description_file(directory)
    if not path.is_file():
        raise UserError(f"{path}: not found; this checkpoint holds no averaging state")
    saved = Layout.from_dict(json.loads(path.read_text())["layout"])
    difference = layout_difference(Layout(saved.groups, world_size), layout)
    if difference:
        raise UserError(f"{path}: the saved partition layout differs from this model's: {difference}")
    plan = reshard_plan(saved, layout, rank)
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(_existing(directory, r)), framework="pt"))
                 for r in range(saved.world_size)]
        metas = [json.loads(f.metadata()["meta"]) for f in files]
        for r, meta in enumerate(metas):
            if meta != metas[0]:
                # Each rank's averages must have made the same choices for their pieces to form one average.
                raise UserError(f"{rank_file(directory, r)}: rank {r}'s averaging counters {meta['averages']} "
                                f"(step {meta['step']}) differ from rank 0's {metas[0]['averages']} "
                                f"(step {metas[0]['step']}); these averages cannot be resharded")
        shapes = _saved_shapes(files, saved, directory)
        tensors = {}
        for key, t in averager.state_dict()["tensors"].items():  # this rank's buffers: names and new shapes
            if shapes.get(key, [])[:-1] != list(t.shape[:-1]):
                continue  # not saved, or another LAWA window: load_state_dict below names the difference
            rows = (slice(None),) * (t.ndim - 1)  # a LAWA ring has one row per sample
            tensors[key] = torch.zeros(t.shape, dtype=t.dtype)
            group = int(key.rsplit(".", 1)[1])  # e.g. lawa.ring.0: the ring of group 0
            for piece in plan:
                if piece.group == group:
                    tensors[key][rows + (slice(piece.dest, piece.dest + piece.stop - piece.start),)] = \
                        files[piece.rank].get_slice(key)[rows + (slice(piece.start, piece.stop),)]
    try:
        averager.load_state_dict({"tensors": tensors, "meta": metas[0]})
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def _existing(directory: str | Path, rank: int) -> Path:
    path = rank_file(directory, rank)
    if not path.is_file():
        raise UserError(f"{path}: not found; the averaging state of rank {rank} is missing")
    return path


def _saved_shapes(files: list, saved: Layout, directory: str | Path) -> dict[str, list[int]]:
    """Every buffer's shape, the same in every rank's file and of the saved layout's partition sizes."""
    shapes = {key: files[0].get_slice(key).get_shape() for key in files[0].keys()}  # noqa: SIM118 (no dict)
    for r, f in enumerate(files):
        keys = set(f.keys())
        for key in keys | set(shapes):
            numel = saved.partition_numel(int(key.rsplit(".", 1)[1]))
            shape = f.get_slice(key).get_shape() if key in keys else None
            if shape is None or shape != shapes.get(key) or shape[-1] != numel:
                have = "missing" if shape is None else f"of shape {shape}"
                raise UserError(f"{rank_file(directory, r)}: {key} is {have}; rank 0 saved "
                                f"{shapes.get(key)} and the saved layout gives each rank {numel} elements")
    return shapes
