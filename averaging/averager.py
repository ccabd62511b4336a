"""The Averager: every configured average of one rank, sampled after each optimizer step, with the loss-spike guard;
a checkpoint component that saves and loads its own state (averaging/state.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from averaging import state
from averaging.averages import HYPERPARAMETERS, buffer_like, hyperparameters, make_average
from averaging.partitions import Layout
from averaging.spikes import LossHistory
from polyak.errors import UserError
from polyak.recipe import AveragingConfig


class Averager:
    """`partitions`: this rank's flat fp32 partitions, one per param group. `layout` (the ZeRO-3 partition layout,
    averaging/partitions.py) and `rank` place them in the model: they are needed to save and load the state, and
    they exclude ZeRO-3's padding, which it leaves uninitialised, from the non-finite check.

    With `offload: cpu` the buffers live in host memory. The device→host copy of a sample is issued on a side stream
    and its arithmetic deferred to the next call that needs the averages, so the host never waits for the device.
    """

    def __init__(self, cfg: AveragingConfig, partitions: list[torch.Tensor], layout: Layout | None = None,
                 rank: int = 0):
        self.cfg, self.layout, self.rank = cfg, layout, rank
        initial = [p.detach() for p in partitions]
        on_cuda = any(p.is_cuda for p in initial)
        device = torch.device("cpu") if cfg.offload == "cpu" else None
        pin = device is not None and on_cuda
        self.averages = {name: make_average(avg, initial, device, pin) for name, avg in cfg.averages.items()}
        padding = layout.padding(rank) if layout is not None else [None] * len(initial)
        self.padding = [None if pad is None else pad.to(p.device) for pad, p in zip(padding, initial)]
        guard = cfg.spike_guard
        self.history = LossHistory(guard.factor, guard.history)  # finite losses of recent steps
        self.skip_left = dict.fromkeys(self.averages, 0)  # samples still to skip after a spike, per average
        self.skipped = dict.fromkeys(self.averages, 0)
        self.step = 0
        # Offload: a host copy of the last accepted sample, which averages still have to take it, and its copy event.
        self.staging = [buffer_like(p, device, pin) for p in initial] if device is not None else None
        self.stream = torch.cuda.Stream(initial[0].device) if pin else None
        self.pending: list[str] = []
        self.copied = None

    @property
    def names(self) -> list[str]:
        return list(self.averages)

    @property
    def nbytes(self) -> int:
        """Bytes held by the averages' buffers (and the offload staging copy)."""
        tensors = [t for avg in self.averages.values() for ts in avg.buffers().values() for t in ts]
        return sum(t.numel() * t.element_size() for t in tensors + (self.staging or []))

    def update(self, step: int, loss: float, partitions: list[torch.Tensor]) -> list[str]:
        """Sample the averages due at optimizer step `step` from this rank's partitions; returns events (skips).

        `loss` must be the same on every rank (e.g. the mean over ranks) so that every rank makes the same choices.
        """
        self._settle()
        self.step = step
        events = []
        due = [name for name, avg in self.cfg.averages.items() if step % avg.every == 0]
        guard = self.cfg.spike_guard
        then = f", the next {guard.skip} samples skipped" if guard.enabled and guard.skip else ""
        why = self.history.observe(loss, check=guard.enabled)
        if why:
            events.append(f"{why}: weights not sampled{then}")

        take = []
        for name in due:
            if why:
                self.skipped[name] += 1
            elif self.skip_left[name]:
                self.skip_left[name] -= 1
                self.skipped[name] += 1
                events.append(f"{name}: sample skipped after a loss spike ({self.skip_left[name]} more to skip)")
            else:
                take.append(name)
        if why and guard.enabled:
            self.skip_left = dict.fromkeys(self.averages, guard.skip)
        if take and not self._all_finite(partitions):
            for name in take:
                self.skipped[name] += 1
            events.append(f"non-finite weights: not sampled into {', '.join(take)}")
            take = []
        if take:
            self._sample(take, [p.detach() for p in partitions])
        return events

    def weights(self, name: str) -> list[torch.Tensor]:
        """The averaged flat partitions of one average (read-only; on the host when offloaded)."""
        self._settle()
        return self.averages[name].weights()

    def state_dict(self) -> dict:
        """`tensors`: every buffer by `<name>.<buffer>.<group>` (state.key); `meta`: hyperparameters and counters,
        plain JSON values."""
        self._settle()
        tensors = {state.key(name, buffer, g): t for name, avg in self.averages.items()
                   for buffer, ts in avg.buffers().items() for g, t in enumerate(ts)}
        averages = {name: {**hyperparameters(self.cfg.averages[name]), **avg.counters(),
                           "skipped": self.skipped[name], "skip_left": self.skip_left[name]}
                    for name, avg in self.averages.items()}
        return {"tensors": tensors,
                "meta": {"step": self.step, "losses": list(self.history.losses), "averages": averages}}

    def load_state_dict(self, saved: dict) -> None:
        """Restore exactly what `state_dict` returned; a different set of averages or shapes is a UserError."""
        meta, tensors = saved["meta"], saved["tensors"]
        was, ours = meta["averages"], {n: hyperparameters(c) for n, c in self.cfg.averages.items()}
        if set(was) != set(ours):
            raise UserError(f"averages {sorted(was)} saved, but the recipe configures {sorted(ours)}")
        for name, hyper in ours.items():
            before = {k: v for k, v in was[name].items() if k in HYPERPARAMETERS}
            if before != hyper:
                raise UserError(f"average '{name}' was saved as {before}, but the recipe says {hyper}")
        mine = self.state_dict()["tensors"]
        for k, t in mine.items():
            src = tensors.get(k)
            if src is None or src.shape != t.shape:
                have = "missing" if src is None else f"of shape {list(src.shape)}"
                raise UserError(f"{k} is {have}, this rank's partition needs {list(t.shape)}")
        self.pending = []
        for k, t in mine.items():
            t.copy_(tensors[k])
        for name, avg in self.averages.items():
            avg.load_counters(was[name])
            self.skipped[name], self.skip_left[name] = was[name]["skipped"], was[name]["skip_left"]
        self.step = meta["step"]
        guard = self.cfg.spike_guard
        self.history = LossHistory(guard.factor, guard.history, meta["losses"])

    def save(self, directory: Path) -> None:
        """Checkpoint component: this rank's state into the checkpoint directory being written."""
        state.write(directory, self.rank, self.layout, self.state_dict())

    def load(self, directory: Path) -> None:
        """Checkpoint component: this rank's state from a checkpoint saved by any number of ranks."""
        saved = state.SavedAverages(directory)
        resharded = saved.layout.world_size != self.layout.world_size
        try:
            self.load_state_dict(saved.state_for(self.rank, self.layout))
        except UserError as e:
            source = state.description_file(directory) if resharded else state.rank_file(directory, self.rank)
            raise UserError(f"{source}: {e}") from None

    def _all_finite(self, partitions: list[torch.Tensor]) -> bool:
        """Padding ignored. A sum is one read pass and NaN or inf propagate through it, so a finite sum proves every
        element finite; only when it is not (a real non-finite weight, or garbage in ZeRO-3's uninitialised
        padding) does the exact check with the padding masked run."""
        if bool(torch.isfinite(torch.stack([p.sum() for p in partitions])).all()):
            return True
        flags = []
        for p, pad in zip(partitions, self.padding):
            finite = torch.isfinite(p)
            if pad is not None:
                finite.index_fill_(0, pad, True)
            flags.append(finite.all())
        return bool(torch.stack(flags).all())

    def _sample(self, names: list[str], partitions: list[torch.Tensor]) -> None:
        if self.staging is None:
            for name in names:
                self.averages[name].sample(partitions)
            return
        if self.stream is None:
            torch._foreach_copy_(self.staging, partitions)
        else:
            # Copy on a side stream once the optimizer step has written the partitions; the training stream then
            # orders its later work (the next optimizer step) after the copy, without the host ever waiting.
            main = torch.cuda.current_stream(partitions[0].device)
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                for dst, src in zip(self.staging, partitions):
                    dst.copy_(src, non_blocking=True)
                self.copied = torch.cuda.Event()
                self.copied.record()
            main.wait_event(self.copied)
        self.pending = names

    def _settle(self) -> None:
        """Apply an offloaded sample whose copy was issued earlier."""
        if not self.pending:
            return
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None
        for name in self.pending:
            self.averages[name].sample(self.staging)
        self.pending = []
