"""The kinds of online weight average, over flat fp32 partitions (one tensor per param group).

Nothing here knows about DeepSpeed: the partitions are plain tensors, and each rank averages only its own, so an
update is purely local (no communication). Exact semantics, for optimizer steps t = 1, 2, ... and an average with
`every: k`, sampling the weights θ_t when t mod k == 0:
  EMA    θ_ema ← β·θ_ema + (1−β)·θ_t, starting from the initial weights θ_0.
  LAWA   the mean of the last `window` samples (of fewer until the window fills; θ_0 before the first sample).
  power  EDM2's power-function EMA (Karras et al., 2024): after n samples, sample k weighs
         (k^(γ+1) − (k−1)^(γ+1)) / n^(γ+1), a discrete k^γ profile; online, θ ← β_n·θ + (1−β_n)·θ_n with
         β_n = (1 − 1/n)^(γ+1). γ comes from σ_rel, the profile's standard deviation relative to its length: a power
         average of any σ_rel can be rebuilt after training from snapshots of two (averaging/power.py).

Each kind gives its state as `buffers()` (tensors, one per group, by buffer name) and `counters()` (plain JSON
values); `weights()` of a kind rebuilt from slices of its buffers is the same slice of its average, since every
buffer is elementwise: consolidation reads an average a tensor at a time that way.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import numpy as np
import torch

from polyak.recipe import AverageConfig


class SampleStore(Protocol):
    """Where a LAWA's samples live (averaging/snapshots.py's SnapshotStore)."""

    def accumulate(self, out: list[torch.Tensor], step: int, subtract: bool = False) -> None: ...


class EMA:
    """Exponential moving average: one buffer per partition."""

    def __init__(self, initial: list[torch.Tensor], beta: float, device: torch.device | None = None):
        self.beta = beta
        self.average = [buffer_like(p, device).copy_(p) for p in initial]  # θ_0
        self.samples = 0

    def decay(self) -> float:
        """β for the sample being taken (the `samples`-th)."""
        return self.beta

    def sample(self, step: int, partitions: list[torch.Tensor]) -> None:
        self.samples += 1
        # lerp: θ_ema + (1−β)(θ − θ_ema), one fused pass over every group.
        torch._foreach_lerp_(self.average, partitions, 1.0 - self.decay())

    def weights(self) -> list[torch.Tensor]:
        return self.average

    def buffers(self) -> dict[str, list[torch.Tensor]]:
        return {"average": self.average}

    def counters(self) -> dict:
        return {"samples": self.samples}

    def load_counters(self, counters: dict) -> None:
        self.samples = counters["samples"]


class PowerEMA(EMA):
    """EDM2's power-function EMA: an EMA whose decay grows with the samples taken. θ_0 only stands in until the first
    sample, which β_1 = 0 makes the average (torch's lerp returns its end exactly at weight 1)."""

    def __init__(self, initial: list[torch.Tensor], sigma_rel: float, device: torch.device | None = None):
        super().__init__(initial, 0.0, device)
        self.gamma = gamma_of(sigma_rel)

    def decay(self) -> float:
        return (1.0 - 1.0 / self.samples) ** (self.gamma + 1.0)


def gamma_of(sigma_rel: float) -> float:
    """The exponent γ of the power profile whose relative standard deviation is σ_rel: the largest real root of
    σ_rel^-2 = (γ+2)²(γ+3)/(γ+1), i.e. γ³ + 7γ² + (16 − σ_rel^-2)γ + (12 − σ_rel^-2) = 0 (EDM2, appendix C)."""
    t = sigma_rel ** -2
    return float(max(r.real for r in np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]) if abs(r.imag) < 1e-9))


def sigma_rel_of(gamma: float) -> float:
    return ((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3)) ** 0.5


def power_weights(gamma: float, n: int) -> np.ndarray:
    """The weight of samples 1..n in a power average after n samples (they sum to 1), in float64."""
    k = np.arange(n + 1, dtype=np.float64)
    return np.diff((k / n) ** (gamma + 1))


class LAWA:
    """Latest-weight average: the running sum of the samples in the window, the samples themselves in the snapshot
    store (each written once, by the Averager, at the step it was taken). Memory: the sum, whatever the window.

    Each sample is O(1): subtract the evicted sample (read back from the store), add the new one. A running sum of
    adds and subtracts drifts by a rounding error per operation, so whenever `window` more samples have been taken
    the sum is recomputed exactly from the window, read back in step order. That bounds the drift to `window` samples
    forever at an amortised cost of one more read per sample, where a compensated (Kahan) sum would need a second
    buffer and still accumulate error over an unbounded stream of adds and subtracts.
    """

    def __init__(self, initial: list[torch.Tensor], window: int, store: SampleStore | None = None):
        self.window, self.store = window, store
        self.sum = [buffer_like(p, torch.device("cpu")).copy_(p) for p in initial]  # θ_0 stands in until a sample
        self.steps: deque[int] = deque()  # the steps of the samples in the window, oldest first
        self.samples = 0

    def sample(self, step: int, partitions: list[torch.Tensor]) -> None:
        """Take θ_step; the store must hold every earlier sample in the window (this one it need not yet)."""
        evicted = self.steps.popleft() if len(self.steps) == self.window else None
        self.samples += 1
        if self.samples % self.window == 0 and self.steps:
            torch._foreach_zero_(self.sum)
            for earlier in self.steps:
                self.store.accumulate(self.sum, earlier)
            torch._foreach_add_(self.sum, partitions)
        elif self.steps:
            if evicted is not None:
                self.store.accumulate(self.sum, evicted, subtract=True)
            torch._foreach_add_(self.sum, partitions)
        else:  # the first sample, or a window of one
            torch._foreach_copy_(self.sum, partitions)
        self.steps.append(step)

    def weights(self) -> list[torch.Tensor]:
        if not self.steps:
            return self.sum
        return torch._foreach_div(self.sum, float(len(self.steps)))

    def buffers(self) -> dict[str, list[torch.Tensor]]:
        return {"sum": self.sum}

    def counters(self) -> dict:
        return {"samples": self.samples, "steps": list(self.steps)}

    def load_counters(self, counters: dict) -> None:
        self.samples, self.steps = counters["samples"], deque(counters["steps"])


def buffer_like(p: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """An fp32 buffer of p's size on `device` (None: beside p)."""
    return torch.empty(p.numel(), dtype=torch.float32, device=device or p.device)


Average = EMA | PowerEMA | LAWA


def make_average(cfg: AverageConfig, initial: list[torch.Tensor], device: torch.device | None = None,
                 store: SampleStore | None = None) -> Average:
    """An average starting from `initial`: an EMA's buffer on `device` (None: beside each partition), a LAWA's sum
    in host memory beside its samples' store."""
    if cfg.kind == "ema":
        return EMA(initial, cfg.beta, device)
    if cfg.kind == "power":
        return PowerEMA(initial, cfg.sigma_rel, device)
    return LAWA(initial, cfg.window, store)


HYPERPARAMETERS = ("kind", "every", "beta", "window", "sigma_rel")
_SPECIFIC = {"ema": "beta", "lawa": "window", "power": "sigma_rel"}


def hyperparameters(cfg: AverageConfig) -> dict:
    """The keys of HYPERPARAMETERS that matter for this kind of average."""
    return {"kind": cfg.kind, "every": cfg.every, _SPECIFIC[cfg.kind]: getattr(cfg, _SPECIFIC[cfg.kind])}
