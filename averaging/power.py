"""A power EMA of any width, rebuilt after training from snapshots of the power averages tracked online (EDM2:
Karras et al., 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", section 3.2).

Each snapshot of a tracked power average is a known linear combination of the samples θ_1..θ_n taken so far: sample
k weighs (k^(γ+1) − (k−1)^(γ+1)) / n^(γ+1) (averaging/averages.py). So is the power average wanted, of exponent γ_T
after n_T samples. Least squares over the samples' weights finds the combination x of the snapshots whose weights
come closest to the target's; Σ x_i·snapshot_i is then the reconstruction, and how far the weights are from the
target's (the residual, relative to the target's norm) says how good it is. EDM2 fits the continuous profiles; here
the discrete weights of the samples are fitted directly, so a tracked profile at one of its own snapshots comes back
exactly (its weights are a column of the system).

Applied rank by rank, partition by partition, to the snapshots' flat partitions: no rank's files are combined with
another's, and nothing the size of the whole model is held.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from averaging.averages import gamma_of, power_weights
from averaging.snapshots import Snapshot
from polyak.errors import UserError


@dataclass(frozen=True)
class Tracked:
    """One tracked power average in one snapshot."""

    snapshot: Snapshot
    name: str
    sigma_rel: float
    samples: int


def tracked(snapshots: list[Snapshot], upto: int) -> tuple[list[Tracked], int]:
    """Every power average held by the snapshots up to step `upto`, and the `every` they share."""
    found, every = [], set()
    for snapshot in snapshots:
        if snapshot.step > upto:
            continue
        for name, entry in snapshot.averages.items():
            if entry["kind"] != "power" or name not in snapshot.weights:
                continue
            if entry["samples"] != snapshot.step // entry["every"]:
                # The weights of a sample depend on its index: an average that skipped samples (the spike guard,
                # non-finite weights) no longer has the profile the fit assumes.
                raise UserError(f"{snapshot.directory}: '{name}' took {entry['samples']} samples by step "
                                f"{snapshot.step} at every {entry['every']}: it skipped some, so its profile is not "
                                f"the one post-hoc reconstruction fits")
            found.append(Tracked(snapshot, name, entry["sigma_rel"], entry["samples"]))
            every.add(entry["every"])
    if not found:
        raise UserError(f"no snapshot up to step {upto} holds a power average: track some (averaging: "
                        f"{{p05: {{kind: power, sigma_rel: 0.05}}}}) and hold them in the snapshots "
                        f"(snapshots: {{every: K, weights: [p05, ...]}})")
    if len(every) > 1:
        raise UserError(f"the tracked power averages sample at different intervals ({sorted(every)}); "
                        f"post-hoc reconstruction needs one")
    return found, every.pop()


def solve(profiles: list[Tracked], sigma_rel: float, samples: int) -> tuple[np.ndarray, float]:
    """Coefficients of the snapshots whose combination is closest to the power average of `sigma_rel` after
    `samples` samples, and the relative residual of its weights."""
    if samples < max(p.samples for p in profiles):
        raise ValueError("the target comes before a snapshot it would combine")
    a = np.zeros((samples, len(profiles)))
    for i, p in enumerate(profiles):
        a[:p.samples, i] = power_weights(gamma_of(p.sigma_rel), p.samples)
    b = power_weights(gamma_of(sigma_rel), samples)
    x, *_ = np.linalg.lstsq(a, b, rcond=None)
    return x, float(np.linalg.norm(a @ x - b) / np.linalg.norm(b))


def combine(profiles: list[Tracked], coefficients: np.ndarray, rank: int) -> list[torch.Tensor]:
    """One rank's flat partitions of Σ x_i·snapshot_i, accumulated in float64 (the coefficients can be large and of
    both signs), returned in fp32."""
    total = None
    for p, x in zip(profiles, coefficients, strict=True):
        parts = p.snapshot.partitions(rank, p.name)
        if total is None:
            total = [torch.zeros(t.numel(), dtype=torch.float64) for t in parts]
        for acc, t in zip(total, parts):
            acc.add_(t.double(), alpha=float(x))
    return [t.float() for t in total]
