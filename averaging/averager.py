"""The Averager: every configured average of one rank and its snapshot store, sampled after each optimizer step, with
the loss-spike guard; a checkpoint component that saves and loads its own state (averaging/state.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from averaging import state
from averaging.averages import HYPERPARAMETERS, LAWA, buffer_like, hyperparameters, make_average
from averaging.partitions import Layout
from averaging.snapshots import SnapshotStore
from averaging.spikes import LossHistory
from polyak.errors import UserError
from polyak.recipe import AveragingConfig


@dataclass
class WorkerTimes:
    """Where an Averager's time goes, for benchmarks (bench/gpu_worker.py). On the training thread: the updates that
    found the worker still busy with earlier work and waited for it, and the seconds they waited. On the worker: its
    jobs, the seconds they waited for the device→host copy, and the seconds of host work (averages, snapshots)."""

    waits: int = 0
    wait_s: float = 0.0
    jobs: int = 0
    copy_s: float = 0.0
    work_s: float = 0.0


class Averager:
    """`partitions`: this rank's flat fp32 partitions, one per param group. `layout` (the ZeRO-3 partition layout,
    averaging/partitions.py) and `rank` place them in the model: they are needed to save and load the state, and
    they exclude ZeRO-3's padding, which it leaves uninitialised, from the non-finite check. `store` holds the LAWAs'
    samples and writes the scheduled snapshots. `agree(flag)` sums a one-element tensor over the ranks (the
    default, for one process, returns it): every rank then makes the same choice about non-finite weights.

    Where the work happens: an EMA beside the partitions (`offload: none`) is updated in place on the training
    stream. Everything in host memory (offloaded EMAs, every LAWA, the snapshots) is fed from one host copy of the
    partitions (`staging`, the only page-locked buffer, on a side stream on a GPU) by a worker thread, which also
    writes and reads back the snapshots: the training thread only issues the copy, and waits for the worker only when
    the previous update's work is still running at the next one.
    """

    def __init__(self, cfg: AveragingConfig, partitions: list[torch.Tensor], layout: Layout | None = None,
                 rank: int = 0, store: SnapshotStore | None = None,
                 agree: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.cfg, self.layout, self.rank, self.store = cfg, layout, rank, store
        self.agree = agree or (lambda flag: flag)
        initial = [p.detach() for p in partitions]
        host = torch.device("cpu")
        self.averages = {name: make_average(avg, initial, host if cfg.offload == "cpu" else None, store)
                         for name, avg in cfg.averages.items()}
        if store is None and any(isinstance(a, LAWA) for a in self.averages.values()):
            raise ValueError("a LAWA keeps its samples in a snapshot store: give one")
        # Sampled by the worker from the host copy: offloaded EMAs, every LAWA, and what snapshots hold.
        held = set(store.cfg.weights) if store is not None else set()
        self.on_host = {name for name, a in self.averages.items()
                        if isinstance(a, LAWA) or cfg.offload == "cpu" or name in held}
        padding = layout.padding(rank) if layout is not None else [None] * len(initial)
        self.padding = [None if pad is None else pad.to(p.device) for pad, p in zip(padding, initial)]
        guard = cfg.spike_guard
        self.history = LossHistory(guard.factor, guard.history)
        self.skip_left = dict.fromkeys(self.averages, 0)  # samples still to skip after a spike, per average
        self.skipped = dict.fromkeys(self.averages, 0)
        self.step = 0
        on_cuda = initial[0].is_cuda
        self.staging = None
        if self.on_host or store is not None:
            self.staging = [buffer_like(p, host) for p in initial]
            if on_cuda:
                self.staging = [t.pin_memory() for t in self.staging]
        self.stream = torch.cuda.Stream(initial[0].device) if on_cuda and self.staging else None
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="averaging") if self.staging else None
        self.pending: list[Future] = []
        self.copied: torch.cuda.Event | None = None  # the last device→host copy, until the optimizer waits for it
        self.times = WorkerTimes()

    @property
    def names(self) -> list[str]:
        return list(self.averages)

    @property
    def nbytes(self) -> int:
        """Bytes held by the averages' buffers and the host copy."""
        tensors = [t for avg in self.averages.values() for ts in avg.buffers().values() for t in ts]
        return sum(t.numel() * t.element_size() for t in tensors + (self.staging or []))

    def update(self, step: int, loss: float, partitions: list[torch.Tensor]) -> list[str]:
        """Sample the averages due at optimizer step `step` from this rank's partitions, and write a snapshot when
        one is due; returns events (skips). `loss` must be the same on every rank (e.g. the mean over ranks)."""
        busy, start = any(not job.done() for job in self.pending), time.perf_counter()
        self._wait()
        if busy:  # the training thread waited for the worker
            self.times.waits += 1
            self.times.wait_s += time.perf_counter() - start
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

        partitions = [p.detach() for p in partitions]
        for name in take:
            if name not in self.on_host:
                self.averages[name].sample(step, partitions)
        on_host = [name for name in take if name in self.on_host]
        scheduled = self.store is not None and self.store.scheduled(step)
        if on_host or scheduled:
            copied = self._copy_to_host(partitions)
            self.pending.append(self.worker.submit(self._host_work, step, on_host, scheduled, copied))
        return events

    def weights(self, name: str) -> list[torch.Tensor]:
        """The averaged flat partitions of one average (read-only; on the host when offloaded)."""
        self._wait()
        return self.averages[name].weights()

    def state_dict(self) -> dict:
        """`tensors`: every buffer by `<name>.<buffer>.<group>` (state.key); `meta`: hyperparameters and counters,
        plain JSON values."""
        self._wait()
        return self._state()

    def load_state_dict(self, saved: dict) -> None:
        """Restore exactly what `state_dict` returned; a different set of averages or shapes is a UserError."""
        self._wait()
        meta, tensors = saved["meta"], saved["tensors"]
        was, ours = meta["averages"], {n: hyperparameters(c) for n, c in self.cfg.averages.items()}
        if set(was) != set(ours):
            raise UserError(f"averages {sorted(was)} saved, but the recipe configures {sorted(ours)}")
        for name, hyper in ours.items():
            before = {k: v for k, v in was[name].items() if k in HYPERPARAMETERS}
            if before != hyper:
                raise UserError(f"average '{name}' was saved as {before}, but the recipe says {hyper}")
        mine = self._state()["tensors"]
        for k, t in mine.items():
            src = tensors.get(k)
            if src is None or src.shape != t.shape:
                have = "missing" if src is None else f"of shape {list(src.shape)}"
                raise UserError(f"{k} is {have}, this rank's partition needs {list(t.shape)}")
        for k, t in mine.items():
            t.copy_(tensors[k])
        for name, avg in self.averages.items():
            avg.load_counters(was[name])
            self.skipped[name], self.skip_left[name] = was[name]["skipped"], was[name]["skip_left"]
        self.step = meta["step"]
        guard = self.cfg.spike_guard
        self.history = LossHistory(guard.factor, guard.history, meta["losses"])

    def save(self, directory: Path) -> Future:
        """Checkpoint component: this rank's state into the checkpoint directory being written. With a worker the
        state is written by it, after the work already queued; the returned future says when it is done."""
        if self.worker is None:
            done = Future()
            state.write(directory, self.rank, self.layout, self._state())
            done.set_result(None)
            return done

        def write():
            if self.store is not None:
                self.store.pin(directory, self._window_steps())
            state.write(directory, self.rank, self.layout, self._state())

        self.pending.append(self.worker.submit(write))
        return self.pending[-1]

    def load(self, directory: Path) -> None:
        """Checkpoint component: this rank's state from a checkpoint saved by any number of ranks."""
        saved = state.SavedAverages(directory)
        resharded = saved.layout.world_size != self.layout.world_size
        try:
            self.load_state_dict(saved.state_for(self.rank, self.layout))
        except UserError as e:
            source = state.description_file(directory) if resharded else state.rank_file(directory, self.rank)
            raise UserError(f"{source}: {e}") from None
        if self.store is not None:
            self.store.remove_unfinished()
            for step in sorted(self._window_steps()):
                self.store.read_back(step)

    def close(self) -> None:
        """Finish the queued work (a checkpoint's state among it) and stop the worker."""
        self._wait()
        if self.worker is not None:
            self.worker.shutdown()

    def _state(self) -> dict:
        tensors = {state.key(name, buffer, g): t for name, avg in self.averages.items()
                   for buffer, ts in avg.buffers().items() for g, t in enumerate(ts)}
        averages = {name: {**hyperparameters(self.cfg.averages[name]), **avg.counters(),
                           "skipped": self.skipped[name], "skip_left": self.skip_left[name]}
                    for name, avg in self.averages.items()}
        return {"tensors": tensors,
                "meta": {"step": self.step, "losses": list(self.history.losses), "averages": averages}}

    def _window_steps(self) -> set[int]:
        return {s for avg in self.averages.values() if isinstance(avg, LAWA) for s in avg.steps}

    def _all_finite(self, partitions: list[torch.Tensor]) -> bool:
        """Whether every rank's partitions are finite, padding ignored: one scalar sum over the ranks, so that all
        make the same choice. A sum is one read pass and NaN or inf propagate through it, so a finite sum proves
        every element finite; only when it is not (a real non-finite weight, or garbage in ZeRO-3's uninitialised
        padding) does the exact check with the padding masked run."""
        finite = torch.isfinite(torch.stack([p.detach().sum() for p in partitions])).all()
        if not bool(finite):
            flags = []
            for p, pad in zip(partitions, self.padding):
                mask = torch.isfinite(p.detach())
                if pad is not None:
                    mask.index_fill_(0, pad, True)
                flags.append(mask.all())
            finite = torch.stack(flags).all()
        return self.agree((~finite).float().reshape(1)).item() == 0

    def _copy_to_host(self, partitions: list[torch.Tensor]) -> torch.cuda.Event | None:
        if self.stream is None:
            torch._foreach_copy_(self.staging, partitions)
            return None
        # Copy on a side stream once the optimizer step has written the partitions. The next forward and backward
        # only read the compute partitions, so they overlap the copy; the next optimizer step, which writes these
        # partitions again, waits for it on the device (fence), the host never does.
        main = torch.cuda.current_stream(partitions[0].device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            for dst, src in zip(self.staging, partitions):
                dst.copy_(src, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        return self.copied

    def fence(self) -> None:
        """Call before the optimizer writes the partitions again: the current stream waits, on the device, for the
        last copy of them to the host (zero.averager hooks it to the optimizer's step)."""
        if self.copied is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(self.copied)
            self.copied = None

    def _host_work(self, step: int, names: list[str], scheduled: bool, copied: torch.cuda.Event | None) -> None:
        """The worker's part of an update: the host averages' samples, then the snapshot of this step."""
        start = time.perf_counter()
        if copied is not None:
            copied.synchronize()
        copied_at = time.perf_counter()
        sampled = False
        for name in names:
            self.averages[name].sample(step, self.staging)
            sampled |= isinstance(self.averages[name], LAWA)
        if sampled or scheduled:
            self.store.write(step, *self._snapshot(sampled, scheduled))
            self.store.prune(self._window_steps() | {step}, upto=step)
        self.times.jobs += 1
        self.times.copy_s += copied_at - start
        self.times.work_s += time.perf_counter() - copied_at

    def _snapshot(self, lawa_sample: bool, scheduled: bool) -> tuple[dict, bool, dict]:
        """What the snapshot of this step holds: the raw weights where a LAWA took them (in fp32: it reads them back
        exactly) or the recipe asks for them, and the averages the recipe names in a scheduled one."""
        cfg, weights = self.store.cfg, {}
        if lawa_sample or (scheduled and "raw" in cfg.weights):
            weights["raw"] = (self.staging, "fp32" if lawa_sample else cfg.dtype)
        held = [name for name in cfg.weights if name != "raw"] if scheduled else []
        for name in held:
            weights[name] = (self.averages[name].weights(), cfg.dtype)
        averages = {name: {**hyperparameters(self.cfg.averages[name]), **self.averages[name].counters()}
                    for name in held}
        return weights, scheduled, averages

    def _wait(self) -> None:
        """Let the worker finish what it was given (its errors are raised here)."""
        pending, self.pending = self.pending, []
        for job in pending:
            job.result()
