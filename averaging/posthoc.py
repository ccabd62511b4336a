"""Post-hoc averaging: average saved weights offline, exploring windows and widths without retraining.

    python -m averaging.posthoc runs/tiny_cpu/checkpoints --method lawa --window 5 --every 2 --out-tag lawa5
    python -m averaging.consolidate runs/tiny_cpu/checkpoints --tag lawa5 --weights lawa5 --out release/lawa5
    python -m averaging.posthoc runs/tiny_cpu/snapshots --method ema --beta 0.9 --release release/ema09
    python -m averaging.posthoc runs/tiny_cpu/checkpoints --method power --sigma-rel 0.08 --release release/p08

The weights come from the run's checkpoints (a checkpoints directory) or from its snapshot store (a snapshots
directory: weights only, a third of a checkpoint's bytes, so they can be kept far more often; averaging/snapshots.py).
Selection, in this order, from every checkpoint the trainer saved (or every complete snapshot of the raw weights):
--every K keeps every K-th counted back from the newest (which stays), --skip-spikes F drops those whose training
loss exceeds F × the median of the preceding losses (the recipe's averaging.spike_guard.history of them, as the
online guard), --last N keeps the newest N, --best K the K of lowest val loss. The methods, over the selected
θ_1..θ_n in step order:
  sma    their mean
  lawa   the mean of the last W (LAWA's window, Kaddour 2022)
  ema    θ ← β·θ + (1−β)·θ_s for s = 2..n, from θ_1 (the online EMA, averaging/averages.py, replayed)
  power  not a selection: a power EMA of width σ_rel at step --at, rebuilt from every snapshot of the power averages
         tracked online (EDM2's post-hoc EMA, averaging/power.py); the fit's residual is printed and recorded
It runs rank by rank, partition by partition: a rank's fp32 flat partitions from each source (memory-mapped)
accumulate into one buffer per param group, so nothing the size of the model is ever allocated. The result is saved
in the averaging state format, as an average inside a checkpoint-like directory of the run (--out-tag), or goes
straight to a release folder (--release).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from averaging import power
from averaging.averages import make_average
from averaging.release import DTYPES, Run, refuse_existing, write_release
from averaging.snapshots import Snapshot, complete
from averaging.spikes import LossHistory
from averaging.state import SavedAverages, write_weights
from averaging.weights import MasterWeights
from polyak import checkpoints, metrics
from polyak.errors import UserError, cli
from polyak.files import temp_dir_beside
from polyak.recipe import MAX_SIGMA_REL, AverageConfig

METHODS = ("sma", "ema", "lawa", "power")


@dataclass
class Saved:
    """Weights the trainer saved: a checkpoint (it has a trainer.json) or a snapshot."""

    directory: Path
    step: int
    val_loss: float | None
    snapshot: bool = False

    def open(self) -> MasterWeights | Snapshot:
        return Snapshot(self.directory) if self.snapshot else MasterWeights(self.directory)


def saved_checkpoints(ckpt_dir: Path) -> list[Saved]:
    """The trainer's checkpoints in `ckpt_dir`, by step (directories made here hold no trainer.json)."""
    if not ckpt_dir.is_dir():
        raise UserError(f"{ckpt_dir}: no such checkpoints directory")
    saved = []
    for path in ckpt_dir.iterdir():
        if not path.name.startswith(".") and path.is_dir() and (state := checkpoints.read_trainer_state(path)):
            saved.append(Saved(path, state["step"], state.get("val_loss")))
    return sorted(saved, key=lambda s: s.step)


def saved_snapshots(root: Path) -> list[Saved]:
    """The store's complete snapshots of the raw weights, by step."""
    return [Saved(s.directory, s.step, None, snapshot=True) for s in complete(root) if "raw" in s.weights]


def select(saved: list[Saved], metrics: dict[int, dict], every: int = 1, skip_spikes: float | None = None,
           history: int = 20, last: int | None = None, best: int | None = None) -> list[Saved]:
    """The checkpoints to average, in step order (the order of selection is the module docstring's)."""
    chosen = saved[::-1][::every][::-1]
    if skip_spikes is not None:
        unlogged = [s.step for s in chosen if "loss" not in metrics.get(s.step, {})]
        if unlogged:
            raise UserError(f"--skip-spikes: metrics.jsonl has no training loss of step {unlogged[0]} (log.every)")
        spiked = spikes(metrics, skip_spikes, history)
        chosen = [s for s in chosen if s.step not in spiked]
    if last is not None:
        chosen = chosen[-last:]
    if best is not None:
        scored = [(v, s.step, s) for s in chosen
                  if (v := s.val_loss if s.val_loss is not None else metrics.get(s.step, {}).get("val_loss"))
                  is not None]
        if len(scored) < best:
            raise UserError(f"--best {best}: only {len(scored)} of the {len(chosen)} checkpoints left have a val "
                            f"loss (eval.every decides which steps are evaluated)")
        chosen = sorted((s for _, _, s in sorted(scored)[:best]), key=lambda s: s.step)
    return chosen


def spikes(metrics_by_step: dict[int, dict], factor: float, history: int) -> set[int]:
    """The steps whose logged training loss is a spike (averaging/spikes.py: non-finite, logged as null, or above
    factor × the median of the last `history` finite losses logged before it)."""
    guard = LossHistory(factor, history)
    return {step for step, r in metrics_by_step.items()
            if "loss" in r and guard.observe(float("nan") if r["loss"] is None else r["loss"])}


def average(sources: list[MasterWeights | Snapshot], method: str, beta: float | None, rank: int) -> list[torch.Tensor]:
    """One rank's average: each checkpoint's fp32 flat partitions of the rank accumulated into one buffer per group."""
    first = sources[0].partitions(rank)
    if method == "ema":
        ema = make_average(AverageConfig(kind="ema", beta=beta), first)
        del first
        for source in sources[1:]:
            ema.sample(0, source.partitions(rank))
        return ema.weights()
    total = [t.clone() for t in first]
    del first
    for source in sources[1:]:
        torch._foreach_add_(total, source.partitions(rank))
    torch._foreach_div_(total, float(len(sources)))
    return total


def posthoc(source_dir: Path, method: str, *, every: int = 1, last: int | None = None, beta: float | None = None,
            window: int | None = None, skip_spikes: float | None = None, best: int | None = None,
            sigma_rel: float | None = None, at: int | None = None, out_tag: str | None = None,
            release: Path | None = None, dtype: str = "fp32", max_shard_size: str = "5GB") -> Path:
    """Average the checkpoints (or snapshots) in `source_dir` into the averaging state `<run>/checkpoints/out_tag`
    or the release folder `release`; or, with method `power`, rebuild a power EMA from the run's snapshots."""
    _check_options(method, beta, window, every, last, best, skip_spikes, sigma_rel, at)
    if (out_tag is None) == (release is None):
        raise ValueError("give exactly one of out_tag and release")
    run = Run.of(source_dir)
    target = release if release is not None else run.dir / "checkpoints" / _check_tag(out_tag)
    refuse_existing(target)
    if method == "power":
        step, layout, rank_average, info = _power(run, sigma_rel, at)
    else:
        step, layout, rank_average, info = _selected(run, source_dir, method, every, last, beta, window,
                                                     skip_spikes, best)
    name = out_tag or method
    info = {"posthoc": {"method": method, **info, "source": str(source_dir.resolve())}}
    target.parent.mkdir(parents=True, exist_ok=True)
    state_dir = temp_dir_beside(target)
    try:
        for rank in tqdm(range(layout.world_size), desc=f"{method} average", unit="rank", disable=None):
            write_weights(state_dir, rank, layout, name, rank_average(rank), step, info)
        if release is not None:
            write_release(SavedAverages(state_dir).average(name), run, release, dtype, max_shard_size,
                          {"checkpoint": str(source_dir.resolve()), "step": step, "weights": f"posthoc {method}",
                           **info})
        else:
            refuse_existing(target)
            os.rename(state_dir, target)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    return target


def _selected(run: Run, source_dir: Path, method: str, every: int, last: int | None, beta: float | None,
              window: int | None, skip_spikes: float | None, best: int | None):
    """SMA, EMA or LAWA over the selected checkpoints or snapshots: the last step, the layout, one rank's average,
    and what to record of it."""
    from_snapshots = source_dir.name == "snapshots"
    saved = saved_snapshots(source_dir) if from_snapshots else saved_checkpoints(source_dir)
    logged = metrics.read(run.dir) if (run.dir / metrics.FILE).is_file() else {}
    chosen = select(saved, logged, every, skip_spikes, run.recipe.averaging.spike_guard.history, last, best)
    if method == "lawa":
        chosen = chosen[-window:]
    if not chosen:
        what = "complete snapshot" if from_snapshots else "checkpoint"
        raise UserError(f"{source_dir}: no {what} left to average ({len(saved)} saved)")
    sources = _consistent([s.open() for s in chosen])
    run.check(sources[0].layout, sources[0].directory)
    options = {"beta": beta} if method == "ema" else {"window": window} if method == "lawa" else {}
    info = {**options, "every": every, "skip_spikes": skip_spikes, "last": last, "best": best,
            "averaged": [s.directory.name for s in chosen], "steps": [s.step for s in chosen]}
    return chosen[-1].step, sources[0].layout, lambda rank: average(sources, method, beta, rank), info


def _power(run: Run, sigma_rel: float, at: int | None):
    """The power EMA of `sigma_rel` at step `at` (default: the newest snapshot's), rebuilt from the tracked ones."""
    snapshots = [s for s in complete(run.dir / "snapshots") if s.averages]
    if not snapshots:
        raise UserError(f"{run.dir / 'snapshots'}: no complete snapshot holds an average")
    at = at if at is not None else max(s.step for s in snapshots)
    profiles, every = power.tracked(snapshots, at)
    if at % every:
        raise UserError(f"--at {at}: the tracked averages sample every {every} steps; choose a multiple")
    _consistent([p.snapshot for p in profiles])
    run.check(profiles[0].snapshot.layout, profiles[0].snapshot.directory)
    coefficients, residual = power.solve(profiles, sigma_rel, at // every)
    print(f"power EMA of sigma_rel {sigma_rel:g} at step {at} from {len(profiles)} tracked snapshots: relative "
          f"residual of its sample weights {residual:.3g}")
    info = {"sigma_rel": sigma_rel, "at": at, "residual": residual,
            "tracked": [{"step": p.snapshot.step, "name": p.name, "sigma_rel": p.sigma_rel, "coefficient": float(x)}
                        for p, x in zip(profiles, coefficients)]}
    return at, profiles[0].snapshot.layout, lambda rank: power.combine(profiles, coefficients, rank), info


def _check_options(method, beta, window, every, last, best, skip_spikes, sigma_rel, at) -> None:
    if method not in METHODS:
        raise UserError(f"--method {method}: one of {', '.join(METHODS)}")
    if (sigma_rel is not None) != (method == "power"):
        raise UserError("--sigma-rel is the power EMA's width: give it with --method power, and only then")
    if sigma_rel is not None and not 0 < sigma_rel < MAX_SIGMA_REL:
        raise UserError(f"--sigma-rel {sigma_rel}: must be in (0, {MAX_SIGMA_REL:.4f})")
    if method == "power" and (every != 1 or last or best or skip_spikes):
        raise UserError("--every, --last, --best and --skip-spikes select checkpoints or snapshots to average; "
                        "--method power uses every snapshot of the tracked power averages")
    if at is not None and method != "power":
        raise UserError("--at goes with --method power")
    if (beta is not None) != (method == "ema"):
        raise UserError("--beta is the EMA's decay: give it with --method ema, and only then")
    if (window is not None) != (method == "lawa"):
        raise UserError("--window is LAWA's window: give it with --method lawa, and only then")
    if beta is not None and not 0 <= beta < 1:
        raise UserError(f"--beta {beta}: must be in [0, 1)")
    for flag, value in (("--window", window), ("--every", every), ("--last", last), ("--best", best)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if skip_spikes is not None and skip_spikes <= 1:
        raise UserError(f"--skip-spikes {skip_spikes}: must be above 1")


def _check_tag(tag: str) -> str:
    if not tag.isidentifier() or tag == "raw" or re.fullmatch(r"global_step\d+", tag):
        raise UserError(f"--out-tag {tag}: must be a name of letters, digits and underscores, not 'raw' and not "
                        "a training checkpoint's global_step<N>")
    return tag


def _consistent(sources: list[MasterWeights | Snapshot]) -> list[MasterWeights | Snapshot]:
    """Only checkpoints of one model and one partition layout (world size) average partition by partition."""
    first = sources[0]
    for other in sources[1:]:
        if other.layout != first.layout:
            a, b = first.layout.world_size, other.layout.world_size
            why = f"written by {a} and {b} ranks" if a != b else "their parameters or partitions differ"
            raise UserError(f"{first.directory.name} and {other.directory.name} cannot be averaged together: {why}")
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path,
                        help="a run's checkpoints (<run.dir>/checkpoints) or snapshots (<run.dir>/snapshots)")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--every", type=int, default=1, metavar="K", help="every K-th saved checkpoint")
    parser.add_argument("--last", type=int, metavar="N", help="the newest N")
    parser.add_argument("--beta", type=float, metavar="B", help="the EMA's decay (--method ema)")
    parser.add_argument("--window", type=int, metavar="W", help="LAWA's window (--method lawa)")
    parser.add_argument("--sigma-rel", type=float, metavar="S", help="the power EMA's width (--method power)")
    parser.add_argument("--at", type=int, metavar="STEP",
                        help="--method power: the step to rebuild it at (default: the newest snapshot's)")
    parser.add_argument("--skip-spikes", type=float, metavar="FACTOR",
                        help="drop checkpoints whose training loss exceeds FACTOR x the median of the preceding")
    parser.add_argument("--best", type=int, metavar="K", help="the K of lowest val loss")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out-tag", metavar="NAME",
                     help="save as average NAME in <checkpoints>/NAME (consolidate --tag NAME --weights NAME)")
    out.add_argument("--release", type=Path, metavar="DIR", help="write a transformers release folder")
    parser.add_argument("--dtype", choices=DTYPES, help="with --release (default: fp32)")
    parser.add_argument("--max-shard-size", help="with --release (default: 5GB)")
    args = parser.parse_args()
    if args.release is None and (args.dtype or args.max_shard_size):
        raise UserError("--dtype and --max-shard-size go with --release")
    target = posthoc(args.source, args.method, every=args.every, last=args.last, beta=args.beta,
                     window=args.window, skip_spikes=args.skip_spikes, best=args.best, sigma_rel=args.sigma_rel,
                     at=args.at, out_tag=args.out_tag,
                     release=args.release, dtype=args.dtype or "fp32", max_shard_size=args.max_shard_size or "5GB")
    if args.out_tag:
        print(f"wrote {target}; export it with: python -m averaging.consolidate {target.parent} "
              f"--tag {args.out_tag} --weights {args.out_tag} --out DIR")


if __name__ == "__main__":
    cli(main)
