"""The loss-spike rule, shared by the online guard (averager.py) and post-hoc selection (posthoc.py).

A step's training loss is a spike when it is not finite, or when it exceeds `factor` × the median of the last
`history` finite losses before it. Every finite loss joins the history, spikes too: a lasting shift of the loss level
becomes the new normal.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable


class LossHistory:
    def __init__(self, factor: float, history: int, losses: Iterable[float] = ()):
        self.factor = factor
        self.losses = deque(losses, maxlen=history)

    def observe(self, loss: float, check: bool = True) -> str | None:
        """Record a step's loss; why it is a spike (a non-finite loss always is; a high one when `check`), or None."""
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        why = None
        if check and self.losses and loss > self.factor * (median := statistics.median(self.losses)):
            why = f"loss spike {loss:.4g} > {self.factor:g} × median {median:.4g}"
        self.losses.append(loss)
        return why
