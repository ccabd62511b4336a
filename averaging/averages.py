"""The kinds of online weight average, over flat fp32 partitions (one tensor per param group).

Nothing here knows about DeepSpeed: the partitions are plain tensors, and each rank averages only its own, so an
update is purely local (no communication). Exact semantics, for optimizer steps t = 1, 2, ... and an average with
`every: k`, sampling the weights θ_t when t mod k == 0:
  EMA   θ_ema ← β·θ_ema + (1−β)·θ_t, starting from the initial weights θ_0.
  LAWA  the mean of the last `window` samples (of fewer until the window fills; θ_0 before the first sample).
"""

from __future__ import annotations

import torch

from polyak.recipe import AverageConfig


class EMA:
    """Exponential moving average: one buffer per partition."""

    def __init__(self, initial: list[torch.Tensor], beta: float, device: torch.device | None, pin: bool):
        self.beta = beta
        self.average = [buffer_like(p, device, pin).copy_(p) for p in initial]
        self.samples = 0

    def sample(self, partitions: list[torch.Tensor]) -> None:
        # lerp: θ_ema + (1−β)(θ − θ_ema), one fused pass over every group.
        torch._foreach_lerp_(self.average, partitions, 1.0 - self.beta)
        self.samples += 1

    def weights(self) -> list[torch.Tensor]:
        return self.average

    def buffers(self) -> dict[str, list[torch.Tensor]]:
        """The state, by buffer name, one tensor per group."""
        return {"average": self.average}

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

    def __init__(self, initial: list[torch.Tensor], window: int, device: torch.device | None, pin: bool):
        self.window = window
        self.ring = [buffer_like(p, device, pin, rows=window).zero_() for p in initial]
        for row, p in zip(self.slot(0), initial):
            row.copy_(p)  # θ_0 stands in until the first sample overwrites slot 0
        self.sum = [buffer_like(p, device, pin).zero_() for p in initial]
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

    def buffers(self) -> dict[str, list[torch.Tensor]]:
        return {"ring": self.ring, "sum": self.sum}

    def counters(self) -> dict:
        return {"samples": self.samples, "head": self.head, "count": self.count}

    def load_counters(self, counters: dict) -> None:
        self.samples, self.head, self.count = counters["samples"], counters["head"], counters["count"]


def buffer_like(p: torch.Tensor, device: torch.device | None, pin: bool, rows: int | None = None) -> torch.Tensor:
    """An fp32 buffer of p's size (`rows` of it), on `device` (None: beside p), page-locked when `pin`."""
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
