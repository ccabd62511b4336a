"""Where a run's numbers go: metrics.jsonl, a progress bar and, when enabled, wandb (rank 0 only)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from tqdm import tqdm

from launch.recipe import Recipe, recipe_to_dict


class MetricsLog:
    def __init__(self, recipe: Recipe, run_dir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.bar = tqdm(total=recipe.train.steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (enabled and recipe.log.progress), file=sys.stderr)
        self.wandb = _start_wandb(recipe, run_dir) if enabled and recipe.log.wandb else None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.enabled:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def note(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def _start_wandb(recipe: Recipe, run_dir: Path):
    """wandb is never fatal: offline without a key, and a warning instead of a crash when it cannot start."""
    try:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        return wandb.init(project=recipe.log.wandb_project, name=recipe.run.name, dir=str(run_dir), mode=mode,
                          config=recipe_to_dict(recipe), resume="allow", id=_wandb_id(run_dir))
    except Exception as e:  # noqa: BLE001 - logging must not stop training
        print(f"warning: wandb disabled ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run directory, so a resumed run continues its curves."""
    path = run_dir / "wandb_id"
    if not path.exists():
        import wandb

        path.write_text(wandb.util.generate_id())
    return path.read_text().strip()
