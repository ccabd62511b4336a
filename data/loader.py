"""The reader of prepared data (data/prepare.py writes it): meta.json, the token streams, training windows over
them, and a deterministic, resumable, rank-sharded batch order."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from polyak.errors import UserError


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"{data_dir} is not a prepared data folder (no meta.json); "
                        "prepare it with python -m data.prepare --recipe <recipe>")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path}: not valid JSON; delete {data_dir} and prepare it again") from None


def split_tokens(data_dir: str | Path, split: str) -> np.ndarray:
    """A split's token stream, memory-mapped, checked against the count meta.json records."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, not {split!r}")
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    dtype = np.dtype(meta["dtype"])
    n_tokens = meta[f"{split}_tokens"]
    if not path.is_file() or path.stat().st_size != n_tokens * dtype.itemsize:
        raise UserError(f"{path}: missing or not the {n_tokens} tokens meta.json records; "
                        f"delete {data_dir} and prepare it again")
    return np.memmap(path, dtype=dtype, mode="r")


class TokenWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of seq_len + 1 tokens at stride seq_len: inputs and their shifted targets."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int):
        self.data_dir, self.split, self.seq_len = data_dir, split, seq_len
        n_tokens = len(split_tokens(data_dir, split))
        self.n_windows = (n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise UserError(f"the {split} split of {data_dir} has {n_tokens} tokens, too few for one window of "
                            f"data.seq_len + 1 = {seq_len + 1}; lower data.seq_len or prepare more data")
        self._tokens = None  # opened on first use, so that the object pickles to loader workers

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n_windows:
            raise IndexError(f"window {i} of {self.n_windows}")
        if self._tokens is None:
            self._tokens = split_tokens(self.data_dir, self.split)
        start = i * self.seq_len
        return torch.from_numpy(self._tokens[start:start + self.seq_len + 1].astype(np.int64))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


class TrainBatches:
    """Micro-batches of train windows, the same on every run and resumable from a count.

    The order is over global micro-batches: epoch e is a permutation of all windows seeded by (seed, e); global
    micro-batch g takes its next world_size * micro_batch windows, and rank r the r-th micro_batch of those.
    The windows left over at an epoch's end are dropped, so every global micro-batch is full. The state is the
    count of global micro-batches taken, so a run resumes with any world_size whose world_size * micro_batch
    is the same.
    """

    def __init__(self, windows: TokenWindows, rank: int, world_size: int, micro_batch: int, seed: int,
                 consumed: int = 0):
        self.windows, self.rank, self.micro_batch = windows, rank, micro_batch
        self.seed, self.consumed = seed, consumed
        self.global_batch = world_size * micro_batch
        self.batches_per_epoch = len(windows) // self.global_batch
        if self.batches_per_epoch < 1:
            raise UserError(f"the train split has {len(windows)} windows, fewer than one global micro-batch of "
                            f"{world_size} ranks x train.micro_batch {micro_batch}; prepare more data")
        self._epoch, self._order = None, None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, g = divmod(self.consumed, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._epoch, self._order = epoch, torch.randperm(len(self.windows), generator=generator)
        start = g * self.global_batch + self.rank * self.micro_batch
        batch = torch.stack([self.windows[i] for i in self._order[start:start + self.micro_batch].tolist()])
        self.consumed += 1
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed, self.seed = state["consumed"], state["seed"]
        self._epoch, self._order = None, None


def val_batches(windows: TokenWindows, rank: int, world_size: int, micro_batch: int,
                n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the first n_batches global micro-batches of val windows, in order."""
    global_batch = world_size * micro_batch
    n_batches = min(n_batches, len(windows) // global_batch)
    if n_batches < 1:
        raise UserError(f"the val split has {len(windows)} windows, fewer than one micro-batch for each of "
                        f"{world_size} ranks x {micro_batch}; raise data.val_fraction or lower the micro-batch")
    batches = []
    for g in range(n_batches):
        start = g * global_batch + rank * micro_batch
        batch = torch.stack([windows[i] for i in range(start, start + micro_batch)])
        batches.append((batch[:, :-1], batch[:, 1:]))
    return batches


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 64-bit seed for each (seed, epoch) pair."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{epoch}".encode(), digest_size=8).digest(), "little")
