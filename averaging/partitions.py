"""ZeRO-3's partition layout: which slice of every parameter each rank holds in its flat partitions.

Stage 3 cuts every parameter on its own: flattened and padded with zeros up to a multiple of the world size N, its
rank r holds elements [r·c, (r+1)·c) with c = ceil(numel / N); a rank's flat partition of a param group is these
chunks, one per parameter, in the group's order. The padding therefore sits at the tail of the last ranks' chunks
(for a 5-element parameter on 4 ranks: 2, 2, 1 + 1 padding, 0 + 2 padding). Its values are whatever memory held:
only the elements of real parameters mean anything.

This module is the one place that knows this; consolidation, post-hoc averaging and resharding build on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch


def chunk_size(numel: int, world_size: int) -> int:
    """Elements of one parameter held by each rank."""
    return math.ceil(numel / world_size)


@dataclass(frozen=True)
class ParamSlice:
    """One parameter's place in the flat partitions: elements [start, stop) of every rank's partition of `group`."""

    name: str
    shape: tuple[int, ...]
    group: int
    start: int
    stop: int

    def unpadded(self, pieces: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Its pieces from every rank, in rank order, cut where the parameter ends: the flattened parameter in parts
        (taken one at a time from `pieces`, which may be lazy)."""
        left = math.prod(self.shape)
        for piece in pieces:
            yield piece[:left]
            left -= min(left, piece.numel())

    def join(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full parameter from its piece on every rank, in rank order, the last ranks' padding dropped."""
        return torch.cat(list(self.unpadded(pieces))).view(self.shape)


@dataclass(frozen=True)
class Layout:
    """Parameter names and shapes per flat partition (param group), in the optimizer's order, and the world size."""

    groups: tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]
    world_size: int

    def __post_init__(self):
        # Normalise lists (e.g. from JSON) so that two equal layouts compare equal.
        groups = tuple(tuple((str(name), tuple(int(d) for d in shape)) for name, shape in g) for g in self.groups)
        object.__setattr__(self, "groups", groups)

    @property
    def names(self) -> list[str]:
        return [name for group in self.groups for name, _ in group]

    def chunks(self, group: int) -> list[int]:
        """Elements per rank of each parameter of a group."""
        return [chunk_size(math.prod(shape), self.world_size) for _, shape in self.groups[group]]

    def partition_numel(self, group: int) -> int:
        """Length of every rank's flat partition of a group (padding included)."""
        return sum(self.chunks(group))

    def cut(self, full: Mapping[str, torch.Tensor], rank: int) -> list[torch.Tensor]:
        """One rank's flat partitions (one per group, zero padding) of full parameter tensors given by name."""
        flats = []
        for g, group in enumerate(self.groups):
            pieces = []
            for (name, shape), chunk in zip(group, self.chunks(g)):
                if tuple(full[name].shape) != shape:
                    raise ValueError(f"{name}: shape {tuple(full[name].shape)}, the layout says {shape}")
                piece = full[name].reshape(-1)[rank * chunk:(rank + 1) * chunk]
                pieces += [piece, piece.new_zeros(chunk - piece.numel())]
            flats.append(torch.cat(pieces) if pieces else torch.zeros(0))
        return flats

    def rebuild(self, flats: Sequence[Sequence[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Full parameter tensors by name from every rank's flat partitions (`flats[rank][group]`), padding dropped."""
        if len(flats) != self.world_size:
            raise ValueError(f"{len(flats)} ranks' partitions given, the layout has {self.world_size}")
        return {p.name: p.join([rank_flats[p.group][p.start:p.stop] for rank_flats in flats]) for p in self.params()}

    def params(self) -> list[ParamSlice]:
        """Where each parameter lives in the flat partitions, in the optimizer's order."""
        found = []
        for g, group in enumerate(self.groups):
            start = 0
            for (name, shape), chunk in zip(group, self.chunks(g)):
                found.append(ParamSlice(name, shape, g, start, start + chunk))
                start += chunk
        return found

    def padding(self, rank: int) -> list[torch.Tensor]:
        """Indices of the padding elements in a rank's flat partition of each group."""
        indices = []
        for g, group in enumerate(self.groups):
            pad, offset = [], 0
            for (_, shape), chunk in zip(group, self.chunks(g)):
                real = min(max(math.prod(shape) - rank * chunk, 0), chunk)
                pad.append(torch.arange(offset + real, offset + chunk))
                offset += chunk
            indices.append(torch.cat(pad) if pad else torch.zeros(0, dtype=torch.long))
        return indices

    def difference(self, other: Layout) -> str | None:
        """The first difference from another layout, in words (None: the same)."""
        if self.world_size != other.world_size:
            return f"{self.world_size} ranks saved, {other.world_size} now"
        if len(self.groups) != len(other.groups):
            return f"{len(self.groups)} param groups saved, {len(other.groups)} now"
        for g, (was, new) in enumerate(zip(self.groups, other.groups)):
            for i in range(max(len(was), len(new))):
                a = was[i] if i < len(was) else "nothing"
                b = new[i] if i < len(new) else "nothing"
                if a != b:
                    return f"group {g} parameter {i}: saved {a}, now {b}"
        return None

    def to_dict(self) -> dict:
        return {"world_size": self.world_size,
                "groups": [[{"name": name, "shape": list(shape)} for name, shape in group] for group in self.groups],
                "partition_numel": [self.partition_numel(g) for g in range(len(self.groups))]}

    @classmethod
    def from_dict(cls, d: dict) -> Layout:
        return cls(groups=[[(p["name"], p["shape"]) for p in group] for group in d["groups"]],
                   world_size=d["world_size"])


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of rank `rank`'s flat partition of `group` in one layout, which another layout holds at
    [dest, dest + stop - start) of one of its ranks' partitions of the same group."""

    group: int
    rank: int
    start: int
    stop: int
    dest: int


def reshard_plan(saved: Layout, new: Layout, rank: int) -> list[Piece]:
    """Where rank `rank` of `new` finds the real elements of its flat partitions among the ranks of `saved`: the
    same parameters, cut for another world size. Its padding is in no piece; contiguous pieces are merged."""
    if saved.groups != new.groups:
        raise ValueError("the two layouts cut different parameters")
    plan = []
    for was, now in zip(saved.params(), new.params()):
        old_chunk, new_chunk = was.stop - was.start, now.stop - now.start
        lo, hi = rank * new_chunk, min((rank + 1) * new_chunk, math.prod(now.shape))  # this rank's elements
        for source in range(lo // old_chunk, (hi - 1) // old_chunk + 1) if lo < hi else ():
            a, b = max(lo, source * old_chunk), min(hi, (source + 1) * old_chunk)  # those `source` held
            offset = was.start - source * old_chunk
            piece = Piece(now.group, source, a + offset, b + offset, now.start + a - lo)
            last = plan[-1] if plan else None
            if (last is not None and (last.group, last.rank, last.stop) == (piece.group, piece.rank, piece.start)
                    and last.dest + last.stop - last.start == piece.dest):
                plan[-1] = replace(last, stop=piece.stop)
            else:
                plan.append(piece)
    return plan
