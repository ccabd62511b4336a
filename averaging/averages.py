"""Online weight averages over flat fp32 partitions (one tensor per param group), and the Averager that runs them.

Nothing here knows about DeepSpeed: the partitions are plain tensors, and each rank averages only its own, so an
update is purely local (no communication). Exact semantics, for optimizer steps t = 1, 2, ... and an average with
`every: k`, sampling the weights θ_t when t mod k == 0:
  EMA   θ_ema ← β·θ_ema + (1−β)·θ_t, starting from the initial weights θ_0.
  LAWA  the mean of the last `window` samples (of fewer until the window fills; θ_0 before the first sample).
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch

from launch.errors import UserError
from launch.recipe import AverageConfig, AveragingConfig


class EMA:
    """Exponential moving average: one buffer per partition."""

    kind = "ema"

    def __init__(self, initial: list[torch.Tensor], beta: float, device: torch.device | None, pin: bool):
        self.beta = beta
        self.average = [_buffer_like(p, device, pin).copy_(p) for p in initial]
        self.samples = 0

    def sample(self, partitions: list[torch.Tensor]) -> None:
        # lerp: θ_ema + (1−β)(θ − θ_ema), one fused pass over every group.
        torch._foreach_lerp_(self.average, partitions, 1.0 - self.beta)
        self.samples += 1

    def weights(self) -> list[torch.Tensor]:
        return self.average

    def buffers(self) -> dict[str, torch.Tensor]:
        return {f"average.{g}": t for g, t in enumerate(self.average)}

    def counters(self) -> dict:
        return {"samples": self.samples}

    def load_counters(self, counters: dict) -> None:
        self.samples = counters["samples"]


class LAWA:
    """Latest-weight average: a ring of the last `window` samples and their running sum.

    Each sample is O(1): subtract the evicted snapshot, add the new one. A running sum of adds and subtracts drifts
    by a rounding error per operation, so whenever the ring wraps (every `window` samples) the sum is recomputed
    exactly from the ring. That bounds the drift to `window` steps forever at an amortised cost of one more add per
    sample and no extra memory, where a compensated (Kahan) sum would need a second buffer and 4 passes per update and
    still accumulates error over an unbounded stream of adds and subtracts.
    """

    kind = "lawa"

    def __init__(self, initial: list[torch.Tensor], window: int, device: torch.device | None, pin: bool):
        self.window = window
        self.ring = [_buffer_like(p, device, pin, rows=window).zero_() for p in initial]
        for row, p in zip(self.slot(0), initial):
            row.copy_(p)  # θ_0 stands in until the first sample overwrites slot 0
        self.sum = [_buffer_like(p, device, pin).zero_() for p in initial]
        self.head = 0  # the slot the next sample goes to
        self.count = 0  # samples in the ring
        self.samples = 0

    def slot(self, i: int) -> list[torch.Tensor]:
        return [r[i] for r in self.ring]

    def sample(self, partitions: list[torch.Tensor]) -> None:
        slot = self.slot(self.head)
        if self.count == self.window:
            torch._foreach_sub_(self.sum, slot)
        torch._foreach_copy_(slot, partitions)
        torch._foreach_add_(self.sum, slot)
        self.head = (self.head + 1) % self.window
        self.count = min(self.count + 1, self.window)
        self.samples += 1
        if self.head == 0:
            for s, r in zip(self.sum, self.ring):
                torch.sum(r, dim=0, out=s)

    def weights(self) -> list[torch.Tensor]:
        if self.count == 0:
            return self.slot(0)
        return torch._foreach_div(self.sum, float(self.count))

    def buffers(self) -> dict[str, torch.Tensor]:
        return {**{f"ring.{g}": t for g, t in enumerate(self.ring)}, **{f"sum.{g}": t for g, t in enumerate(self.sum)}}

    def counters(self) -> dict:
        return {"samples": self.samples, "head": self.head, "count": self.count}

    def load_counters(self, counters: dict) -> None:
        self.samples, self.head, self.count = counters["samples"], counters["head"], counters["count"]


def _buffer_like(p: torch.Tensor, device: torch.device | None, pin: bool, rows: int | None = None) -> torch.Tensor:
    shape = (p.numel(),) if rows is None else (rows, p.numel())
    return torch.empty(shape, dtype=torch.float32, device=device or p.device, pin_memory=pin)


def make_average(cfg: AverageConfig, initial: list[torch.Tensor], device: torch.device | None = None,
                 pin: bool = False) -> EMA | LAWA:
    """An average starting from `initial`, with its buffers on `device` (None: beside each partition)."""
    if cfg.kind == "ema":
        return EMA(initial, cfg.beta, device, pin)
    return LAWA(initial, cfg.window, device, pin)


HYPERPARAMETERS = ("kind", "every", "beta", "window")


def hyperparameters(cfg: AverageConfig) -> dict:
    """The keys of HYPERPARAMETERS that matter for this kind of average."""
    specific = {"beta": cfg.beta} if cfg.kind == "ema" else {"window": cfg.window}
    return {"kind": cfg.kind, "every": cfg.every, **specific}


class Averager:
    """Every configured average, sampled after each optimizer step, with the loss-spike guard.

    `padding` (per group, indices of elements that belong to no parameter; see averaging/partitions.py) is excluded
    from the non-finite check: ZeRO-3 leaves it uninitialised.
    With `offload: cpu` the buffers live in host memory. The device→host copy of a sample is issued on a side stream
    and its arithmetic deferred to the next call that needs the averages, so the host never waits for the device.
    """

    def __init__(self, cfg: AveragingConfig, initial_partitions: list[torch.Tensor],
                 padding: list[torch.Tensor] | None = None):
        self.cfg = cfg
        initial = [p.detach() for p in initial_partitions]
        on_cuda = any(p.is_cuda for p in initial)
        device = torch.device("cpu") if cfg.offload == "cpu" else None
        pin = device is not None and on_cuda
        self.averages = {name: make_average(avg, initial, device, pin) for name, avg in cfg.averages.items()}
        padding = padding or [None] * len(initial)
        self.padding = [None if pad is None else pad.to(p.device) for pad, p in zip(padding, initial)]
        self.losses = deque(maxlen=cfg.spike_guard.history)  # finite losses of recent steps
        self.skip_left = dict.fromkeys(self.averages, 0)  # samples still to skip after a spike, per average
        self.skipped = dict.fromkeys(self.averages, 0)
        self.step = 0
        # Offload: a host copy of the last accepted sample, which averages still have to take it, and its copy event.
        self.staging = [_buffer_like(p, device, pin) for p in initial] if device is not None else None
        self.stream = torch.cuda.Stream(initial[0].device) if pin else None
        self.pending: list[str] = []
        self.copied = None

    @property
    def names(self) -> list[str]:
        return list(self.averages)

    @property
    def nbytes(self) -> int:
        """Bytes held by the averages' buffers (and the offload staging copy)."""
        tensors = [t for avg in self.averages.values() for t in avg.buffers().values()] + (self.staging or [])
        return sum(t.numel() * t.element_size() for t in tensors)

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
        spike = not math.isfinite(loss)
        if spike:
            events.append(f"non-finite loss {loss}: weights not sampled{then}")
        else:
            if guard.enabled and self.losses and loss > guard.factor * statistics.median(self.losses):
                spike = True
                events.append(f"loss spike {loss:.4g} > {guard.factor:g} × median "
                              f"{statistics.median(self.losses):.4g}: weights not sampled{then}")
            self.losses.append(loss)  # spikes too: a lasting shift of the loss level becomes the new normal

        take = []
        for name in due:
            if spike:
                self.skipped[name] += 1
            elif self.skip_left[name]:
                self.skip_left[name] -= 1
                self.skipped[name] += 1
                events.append(f"{name}: sample skipped after a loss spike ({self.skip_left[name]} more to skip)")
            else:
                take.append(name)
        if spike and guard.enabled:
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
        """`tensors`: every buffer by `<name>.<buffer>`; `meta`: hyperparameters and counters, plain JSON values."""
        self._settle()
        tensors = {f"{name}.{key}": t for name, avg in self.averages.items() for key, t in avg.buffers().items()}
        averages = {name: {**hyperparameters(self.cfg.averages[name]), **avg.counters(),
                           "skipped": self.skipped[name], "skip_left": self.skip_left[name]}
                    for name, avg in self.averages.items()}
        return {"tensors": tensors, "meta": {"step": self.step, "losses": list(self.losses), "averages": averages}}

    def load_state_dict(self, state: dict) -> None:
        """Restore exactly what `state_dict` returned; a different set of averages or shapes is a UserError."""
        meta, tensors = state["meta"], state["tensors"]
        saved, ours = meta["averages"], {n: hyperparameters(c) for n, c in self.cfg.averages.items()}
        if set(saved) != set(ours):
            raise UserError(f"averages {sorted(saved)} saved, but the recipe configures {sorted(ours)}")
        for name, hyper in ours.items():
            was = {k: v for k, v in saved[name].items() if k in HYPERPARAMETERS}
            if was != hyper:
                raise UserError(f"average '{name}' was saved as {was}, but the recipe says {hyper}")
        for name, avg in self.averages.items():
            for key, t in avg.buffers().items():
                src = tensors.get(f"{name}.{key}")
                if src is None or src.shape != t.shape:
                    have = "missing" if src is None else f"of shape {list(src.shape)}"
                    raise UserError(f"{name}.{key} is {have}, this rank's partition needs {list(t.shape)}")
        self.pending = []
        for name, avg in self.averages.items():
            for key, t in avg.buffers().items():
                t.copy_(tensors[f"{name}.{key}"])
            avg.load_counters(saved[name])
            self.skipped[name], self.skip_left[name] = saved[name]["skipped"], saved[name]["skip_left"]
        self.step = meta["step"]
        self.losses = deque(meta["losses"], maxlen=self.cfg.spike_guard.history)

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
