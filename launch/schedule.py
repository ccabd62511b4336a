"""Learning-rate schedules: a multiplier of the peak LR for each optimizer step."""

import math

from polyak.recipe import TrainConfig


def lr_multiplier(t: TrainConfig, step: int) -> float:
    """LR / peak LR at `step` (0-based count of optimizer steps taken), with linear warmup and a final-LR floor."""
    if step < t.warmup:
        return (step + 1) / t.warmup
    floor = t.final_lr
    if t.schedule == "constant":
        return 1.0
    if t.schedule == "wsd":
        decay_start = t.steps - max(1, round(t.decay_fraction * t.steps))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start + 1) / (t.steps - decay_start)
        return 1.0 - (1.0 - floor) * min(progress, 1.0)
    progress = min((step - t.warmup) / max(1, t.steps - 1 - t.warmup), 1.0)
    if t.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
