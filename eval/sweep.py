"""The horizon sweep: held-out loss of a run's post-hoc averages over a grid of horizons, at chosen steps.

    python -m eval.sweep runs/experiment_long --at 400 800 1600 --out reports/experiment_sweep
    python -m eval.sweep runs/experiment_long --at all --target 2.9 --out reports/experiment_sweep

At each step S (one with a complete snapshot) the candidates are:
  power σ_rel  a power EMA rebuilt from the snapshots of the tracked ones (averaging/power.py), per --sigma-rel;
  lawa W       the mean of the last W snapshots of the raw weights up to S, per --windows;
  raw          the raw weights of the snapshot at S.
Each is evaluated in this process on the run's held-out windows, the ones the trainer evaluates (eval.batches global
micro-batches of the val split), so its loss compares with the logged val_loss. To put them on one axis, a horizon:
the length of the uniform window with the same spread, W × the snapshots' spacing for a LAWA and √12·σ_rel·S for a
power EMA, shown as a percentage of S. The 1% rule (a horizon of 1% of train.steps) is marked.

Writes to --out: sweep.csv (every candidate at every step), sweep.md (every candidate's loss with the best marked,
how far the 1% rule is from the best at each step, and with --target, the steps each candidate takes to reach it) and
sweep.png (loss against horizon). eval.compare puts the same table and plot into its report.
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from averaging import power
from averaging.release import Run
from averaging.snapshots import Snapshot, complete
from data.loader import TokenWindows, val_batches
from model.llama import Llama
from polyak import metrics
from polyak.errors import UserError, cli

SIGMA_RELS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2)
WINDOWS = (1, 2, 4, 8, 16)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Result:
    step: int
    method: str  # power | lawa | raw
    parameter: float  # σ_rel, or the window
    horizon: float  # steps
    loss: float
    residual: float | None = None  # of a power reconstruction's sample weights

    @property
    def label(self) -> str:
        return {"power": f"power {self.parameter:g}", "lawa": f"lawa {int(self.parameter)}", "raw": "raw"}[self.method]


def sweep(run_dir: Path, snapshots: list[Snapshot], steps: list[int], sigma_rels=SIGMA_RELS, windows=WINDOWS,
          device: str = DEVICE) -> list[Result]:
    """Every candidate at each of `steps`, evaluated on the held-out windows; `snapshots`: the run's complete ones."""
    run = Run.of(run_dir / "checkpoints")
    by_step = {s.step: s for s in snapshots}
    missing = [s for s in steps if s not in by_step]
    if missing:
        raise UserError(f"--at {missing[0]}: no complete snapshot of that step (snapshots: "
                        f"{', '.join(map(str, sorted(by_step)))})")
    layout = snapshots[0].layout
    run.check(layout, snapshots[0].directory)
    raw = [s for s in snapshots if "raw" in s.weights]
    spacing = min((b.step - a.step for a, b in zip(raw, raw[1:])), default=1)
    model = Llama(run.args).to(device).eval()
    held_out = _held_out(run, layout.world_size)

    def loss_of(flats: list[list[torch.Tensor]]) -> float:
        weights = layout.rebuild(flats)
        if run.args.tie_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        model.load_state_dict(weights)
        return _loss(model, held_out, device)

    results = []
    for step in steps:
        ranks = range(layout.world_size)
        if "raw" in by_step[step].weights:
            results.append(Result(step, "raw", 0, 0, loss_of([by_step[step].partitions(r) for r in ranks])))
        earlier = [s for s in raw if s.step <= step]
        for w in windows:
            if len(earlier) >= w:
                flats = [_mean([s.partitions(r) for s in earlier[-w:]]) for r in ranks]
                results.append(Result(step, "lawa", w, w * spacing, loss_of(flats)))
        if any(s.averages for s in snapshots if s.step <= step):
            profiles, every = power.tracked(snapshots, step)
            for sigma in sigma_rels:
                x, residual = power.solve(profiles, sigma, step // every)
                flats = [power.combine(profiles, x, r) for r in ranks]
                results.append(Result(step, "power", sigma, math.sqrt(12) * sigma * step, loss_of(flats),
                                      residual))
    return results


def _held_out(run: Run, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The trainer's held-out windows: the first eval.batches global micro-batches of the val split."""
    windows = TokenWindows(run.recipe.data.dir, "val", run.recipe.data.seq_len)
    return val_batches(windows, 0, 1, world * run.recipe.train.micro_batch, run.recipe.eval.batches)


@torch.no_grad()
def _loss(model: Llama, held_out, device: str) -> float:
    total, tokens = 0.0, 0
    for x, y in held_out:
        total += model(x.to(device), y.to(device)).double().item() * y.numel()
        tokens += y.numel()
    return total / tokens


def _mean(partitions: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    total = [t.double() for t in partitions[0]]
    for p in partitions[1:]:
        for acc, t in zip(total, p):
            acc.add_(t.double())
    return [(t / len(partitions)).float() for t in total]


def steps_to_target(results: list[Result], target: float) -> dict[str, int | None]:
    """The first step at which each candidate is at or below the target."""
    out = {}
    for r in sorted(results, key=lambda r: r.step):
        out.setdefault(r.label, None)
        if out[r.label] is None and r.loss <= target:
            out[r.label] = r.step
    return out


def nearest(steps: list[int], percents: list[float], total: int) -> list[int]:
    """The step of `steps` nearest each percentage of `total` (the later on a tie), each once."""
    return sorted({min(steps, key=lambda s: (abs(100 * s - p * total), -s)) for p in percents})


def best(results: list[Result]) -> dict[int, Result]:
    """The candidate of lowest val loss at each step."""
    out = {}
    for r in results:
        if r.step not in out or r.loss < out[r.step].loss:
            out[r.step] = r
    return out


def records(results: list[Result]) -> list[dict]:
    """One row per candidate and step, as sweep.csv and eval.compare's summary.json hold them."""
    bests = best(results)
    return [{"step": r.step, "method": r.method, "parameter": r.parameter, "horizon_steps": r.horizon,
             "horizon_pct": 100 * r.horizon / r.step, "val_loss": r.loss, "residual": r.residual,
             "best": bests[r.step] is r} for r in results]


def write_csv(results: list[Result], path: Path) -> None:
    rows = records(results)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)  # a residual of None (not a power EMA) is written empty


def section(results: list[Result], steps_total: int, logged: dict, online: list[str]) -> list[str]:
    """The sweep in markdown: every candidate with the best of each step marked, how far the 1% rule is from the
    best, and the plot (sweep.png, beside it)."""
    rule = 0.01 * steps_total
    bests = best(results)
    lines = ["Horizon: the length of the uniform window with the same spread (W × the snapshots' spacing for a LAWA "
             "of the last W raw snapshots, √12·σ_rel·S for a power EMA rebuilt at step S from the snapshots of the "
             "tracked ones; 0 for the raw weights), as % of the steps so far. The 1% rule is a horizon of "
             f"{rule:g} steps (1% of {steps_total}). sweep.csv has every value at full precision, and each power "
             "EMA's fit residual.", "",
             "| step | candidate | horizon (steps) | horizon (% of steps so far) | val loss | |",
             "|---:|---|---:|---:|---:|---|"]
    for r in sorted(results, key=lambda r: (r.step, r.horizon)):
        lines.append(f"| {r.step} | {r.label} | {r.horizon:g} | {100 * r.horizon / r.step:.2f}% | {r.loss:.4f} | "
                     f"{'best' if bests[r.step] is r else ''} |")
    lines.append("")
    for step, b in sorted(bests.items()):
        here = [r for r in results if r.step == step]
        seen = [f"{n} {logged[step][f'val_loss_{n}']:.4f}" for n in online
                if logged.get(step, {}).get(f"val_loss_{n}") is not None]
        lines.append(f"- Step {step}: {_against_rule(here, b, rule)}"
                     + (f"; logged online: {', '.join(seen)}" if seen else "") + ".")
    lines += ["", "![val loss against the horizon](sweep.png)"]
    return lines


def _against_rule(here: list[Result], b: Result, rule: float) -> str:
    """How far the 1% rule is from the best at one step: in loss, at the candidate whose horizon is nearest the
    rule's, and in horizon."""
    def pct(horizon: float) -> str:
        return f"{100 * horizon / b.step:.2f}%"

    text = f"best {b.label} (horizon {pct(b.horizon)}, val loss {b.loss:.4f}); the 1% rule's horizon is {pct(rule)}"
    averaged = [r for r in here if r.horizon > 0]
    if averaged:
        # Horizons of the grid grow geometrically: nearest on a log scale.
        near = min(averaged, key=lambda r: abs(math.log(r.horizon / rule)))
        text += (", and the best is the candidate nearest it" if near is b else
                 f", the candidate nearest it ({near.label}, {pct(near.horizon)}) is "
                 f"{near.loss - b.loss:.4f} nats above the best")
    if b.horizon > 0:
        text += f"; the best horizon is {b.horizon / rule:.3g}× the rule's"
    return text


def report(run_dir: Path, snapshots: list[Snapshot], steps: list[int], out: Path, sigma_rels=SIGMA_RELS,
           windows=WINDOWS, device: str = DEVICE) -> tuple[list[Result], list[str]]:
    """Sweep `steps` of the run, write sweep.csv and sweep.png into `out`; the results and their markdown."""
    results = sweep(run_dir, snapshots, steps, sigma_rels, windows, device)
    recipe = Run.of(run_dir / "checkpoints").recipe
    logged = metrics.read(run_dir) if (run_dir / metrics.FILE).is_file() else {}
    write_csv(results, out / "sweep.csv")
    plot([r for r in results if r.step in _some(results)], recipe.train.steps, out / "sweep.png")
    return results, section(results, recipe.train.steps, logged, list(recipe.averaging.averages))


def plot(results: list[Result], steps_total: int, path: Path) -> None:
    """Val loss against the horizon as % of the steps so far, one line a step and method, its best starred."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    bests = best(results)
    for i, step in enumerate(sorted(bests)):
        color, here = f"C{i}", [r for r in results if r.step == step]
        for method, marker in (("power", "o"), ("lawa", "s")):
            points = sorted((100 * r.horizon / step, r.loss) for r in here if r.method == method)
            if points:
                ax.plot(*zip(*points), marker=marker, ms=4, lw=1.2, color=color,
                        ls="-" if method == "power" else "--", label=f"step {step}: {method}")
        raw = next((r for r in here if r.method == "raw"), None)
        if raw is not None:
            # No horizon to place it at on a log axis: a level line, thicker when it is the best.
            ax.axhline(raw.loss, color=color, ls="-.", lw=2 if raw is bests[step] else 0.8,
                       label=f"step {step}: raw" + (" (best)" if raw is bests[step] else ""))
        if bests[step].horizon > 0:
            ax.plot(100 * bests[step].horizon / step, bests[step].loss, marker="*", ms=14, color=color, ls="none")
        ax.axvline(100 * 0.01 * steps_total / step, color=color, ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("horizon, % of the steps so far (dotted: the 1% rule; dash-dot: raw weights; star: best)")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title("Post-hoc averages: val loss against the averaging horizon")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[Result]:
    p = argparse.ArgumentParser(prog="python -m eval.sweep", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="a run directory with snapshots (snapshots.every)")
    p.add_argument("--at", nargs="+", default=None, metavar="STEP", help="steps to sweep, or 'all' (default: the "
                   "last snapshot's)")
    p.add_argument("--sigma-rel", nargs="+", type=float, default=list(SIGMA_RELS), help="power EMA widths")
    p.add_argument("--windows", nargs="+", type=int, default=list(WINDOWS), help="LAWA windows, in snapshots")
    p.add_argument("--target", type=float, help="report the steps each candidate takes to reach this val loss")
    p.add_argument("--device", choices=["cpu", "cuda"], default=DEVICE)
    p.add_argument("--out", type=Path, required=True, help="report folder")
    args = p.parse_args(argv)
    if not (args.run_dir / "recipe.yaml").is_file():
        raise UserError(f"{args.run_dir} is not a run directory (no recipe.yaml)")
    snapshots = complete(args.run_dir / "snapshots")
    if not snapshots:
        raise UserError(f"{args.run_dir / 'snapshots'}: no complete snapshot; give the run snapshots.every")
    if args.at == ["all"]:
        at = [s.step for s in snapshots]
    elif args.at is None:
        at = [snapshots[-1].step]
    else:
        try:
            at = [int(s) for s in args.at]
        except ValueError:
            raise UserError(f"--at {' '.join(args.at)}: steps, or 'all'") from None
    args.out.mkdir(parents=True, exist_ok=True)
    results, lines = report(args.run_dir, snapshots, at, args.out, args.sigma_rel, args.windows, args.device)
    lines = [f"# Horizon sweep: `{args.run_dir}`", "", *lines]
    if args.target is not None:
        lines += ["", f"Steps to reach a val loss of {args.target:g} (among the steps swept):", "",
                  "| candidate | steps |", "|---|---:|"]
        lines += [f"| {label} | {'not reached' if s is None else s} |"
                  for label, s in steps_to_target(results, args.target).items()]
    (args.out / "sweep.md").write_text("\n".join([*lines, ""]))
    print(f"wrote {args.out / 'sweep.md'}, sweep.csv and sweep.png")
    return results


def _some(results: list[Result], n: int = 4) -> set[int]:
    """A few steps spread over the sweep, for a readable plot of many steps (the table has them all)."""
    steps = sorted({r.step for r in results})
    return {steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n)} if len(steps) > n else set(steps)


if __name__ == "__main__":
    cli(main)
