"""The horizon sweep: held-out loss of a run's post-hoc averages over a grid of horizons, at chosen steps.

    python -m eval.sweep runs/experiment_long --at 400 800 1600 --out reports/experiment
    python -m eval.sweep runs/experiment_long --at all --target 2.9 --out reports/experiment

At each step S (one with a complete snapshot) the candidates are:
  power σ_rel  a power EMA rebuilt from the snapshots of the tracked ones (averaging/power.py), per --sigma-rel;
  lawa W       the mean of the last W snapshots of the raw weights up to S, per --windows;
  raw          the raw weights of the snapshot at S.
Each is evaluated in this process on the run's held-out windows, the ones the trainer evaluates (eval.batches global
micro-batches of the val split), so its loss compares with the logged val_loss. To put them on one axis, a horizon:
the length of the uniform window with the same spread, W × the snapshots' spacing for a LAWA and √12·σ_rel·S for a
power EMA, shown as a percentage of S. The 1% rule (a horizon of 1% of train.steps) is marked.

Writes to --out: sweep.csv (every candidate at every step), sweep.md (the best horizon at each step against the 1%
rule, and with --target, the steps each candidate takes to reach it) and sweep.png (loss against horizon).
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
from averaging.snapshots import complete
from data.loader import TokenWindows, val_batches
from model.llama import Llama
from polyak import metrics
from polyak.errors import UserError, cli

SIGMA_RELS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2)
WINDOWS = (1, 2, 4, 8, 16)


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


def sweep(run_dir: Path, at: list[int] | None, sigma_rels=SIGMA_RELS, windows=WINDOWS,
          device: str = "cpu") -> list[Result]:
    """Every candidate at every step of `at` (None: every snapshot step), evaluated on the held-out windows."""
    run = Run.of(run_dir / "checkpoints")
    snapshots = complete(run_dir / "snapshots")
    if not snapshots:
        raise UserError(f"{run_dir / 'snapshots'}: no complete snapshot; give the run snapshots.every")
    by_step = {s.step: s for s in snapshots}
    steps = sorted(by_step) if at is None else at
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


def write_csv(results: list[Result], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "method", "parameter", "horizon_steps", "horizon_pct", "val_loss", "residual"])
        for r in results:
            w.writerow([r.step, r.method, r.parameter, r.horizon, 100 * r.horizon / r.step, r.loss,
                        "" if r.residual is None else r.residual])


def write_report(results: list[Result], run_dir: Path, steps_total: int, path: Path, logged: dict,
                 online: list[str], target: float | None) -> None:
    rule = 0.01 * steps_total
    lines = [f"# Horizon sweep: `{run_dir}`", "",
             f"Horizon as % of the steps so far; the 1% rule is a horizon of {rule:g} steps (1% of {steps_total}). "
             "Power EMAs are rebuilt from the snapshots of the tracked ones (residual: how far their sample weights "
             "are from the wanted profile's, relative).", "",
             "| step | raw | best | its horizon | its val loss | 1% rule's horizon | online averages (1% rule) |",
             "|---:|---:|---|---:|---:|---:|---|"]
    for step in sorted({r.step for r in results}):
        here = [r for r in results if r.step == step]
        raw = next((r.loss for r in here if r.method == "raw"), None)
        best = min(here, key=lambda r: r.loss)
        logged_online = ", ".join(f"{n} {logged[step][f'val_loss_{n}']:.4f}" for n in online
                                  if f"val_loss_{n}" in logged.get(step, {})) or "not evaluated"
        lines.append(f"| {step} | {'-' if raw is None else f'{raw:.4f}'} | {best.label} | "
                     f"{100 * best.horizon / step:.2f}% ({best.horizon:g} steps) | {best.loss:.4f} | "
                     f"{100 * rule / step:.2f}% | {logged_online} |")
    if target is not None:
        reached = steps_to_target(results, target)
        lines += ["", f"Steps to reach a val loss of {target:g} (among the steps swept):", "",
                  "| candidate | steps |", "|---|---:|"]
        lines += [f"| {label} | {'not reached' if s is None else s} |" for label, s in reached.items()]
    lines += ["", "![val loss against the horizon](sweep.png)", ""]
    path.write_text("\n".join(lines))


def plot(results: list[Result], steps_total: int, path: Path) -> None:
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for step in sorted({r.step for r in results}):
        here = [r for r in results if r.step == step and r.method != "raw"]
        line = None
        for method, marker in (("power", "o"), ("lawa", "s")):
            points = sorted((100 * r.horizon / step, r.loss) for r in here if r.method == method)
            if points:
                line = ax.plot(*zip(*points), marker=marker, ms=4, lw=1.2,
                               color=line[0].get_color() if line else None,
                               ls="-" if method == "power" else "--", label=f"step {step}: {method}")
        best = min(here, key=lambda r: r.loss, default=None)
        if best is not None:
            ax.plot(100 * best.horizon / step, best.loss, marker="*", ms=14, color=line[0].get_color(), ls="none")
            ax.axvline(100 * 0.01 * steps_total / step, color=line[0].get_color(), ls=":", lw=1)
        raw = next((r.loss for r in results if r.step == step and r.method == "raw"), None)
        if raw is not None:
            ax.axhline(raw, color=line[0].get_color(), ls="-.", lw=0.8)
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
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, required=True, help="report folder (e.g. eval.compare's)")
    args = p.parse_args(argv)
    if not (args.run_dir / "recipe.yaml").is_file():
        raise UserError(f"{args.run_dir} is not a run directory (no recipe.yaml)")
    if args.at == ["all"]:
        at = None
    elif args.at is None:
        steps = [s.step for s in complete(args.run_dir / "snapshots")]
        at = steps[-1:]
    else:
        try:
            at = [int(s) for s in args.at]
        except ValueError:
            raise UserError(f"--at {' '.join(args.at)}: steps, or 'all'") from None
    results = sweep(args.run_dir, at, args.sigma_rel, args.windows, args.device)
    run = Run.of(args.run_dir / "checkpoints")
    logged = metrics.read(args.run_dir) if (args.run_dir / metrics.FILE).is_file() else {}
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(results, args.out / "sweep.csv")
    write_report(results, args.run_dir, run.recipe.train.steps, args.out / "sweep.md", logged,
                 list(run.recipe.averaging.averages), args.target)
    plot([r for r in results if at is not None or r.step in _some(results)], run.recipe.train.steps,
         args.out / "sweep.png")
    print(f"wrote {args.out / 'sweep.md'}, sweep.csv and sweep.png")
    return results


def _some(results: list[Result], n: int = 4) -> set[int]:
    """A few steps spread over the run, for a readable plot of a sweep at every step."""
    steps = sorted({r.step for r in results})
    return {steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n)} if len(steps) > n else set(steps)


if __name__ == "__main__":
    cli(main)
