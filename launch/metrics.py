"""Where a run's numbers go: metrics.jsonl, a progress bar and, when enabled, wandb (rank 0 only); MFU's peaks."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from tqdm import tqdm

from polyak import metrics
from polyak.recipe import Recipe, recipe_to_dict

# Dense (no sparsity) peak FLOP/s by device-name substring, first match wins; fp32 means plain fp32, no TF32.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp32": 67e12}),  # SXM, reported as "H100 80GB HBM3"
    ("H200", {"bf16": 989e12, "fp32": 67e12}),
    ("H800", {"bf16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp32": 19.5e12}),
    ("A800", {"bf16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp32": 30.3e12}),
    ("A10", {"bf16": 125e12, "fp32": 31.2e12}),  # A10 and A10G; after A100, which it is a substring of
    ("MI300X", {"bf16": 1307e12, "fp32": 163.4e12}),
]


def peak_flops(device_name: str, precision: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device for MFU: the override (in TFLOP/s) if given, else the table; None if unknown."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for key, peaks in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return peaks.get(precision)
    return None


class MetricsLog:
    def __init__(self, recipe: Recipe, run_dir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.file = metrics.open_for_append(run_dir) if enabled else None
        self.bar = tqdm(total=recipe.train.steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (enabled and recipe.log.progress), file=sys.stderr)
        self.wandb = _start_wandb(recipe, run_dir) if enabled and recipe.log.wandb else None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        metrics.append(self.file, record)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and math.isfinite(v)},
                           step=record["step"])

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
