"""Weight averages of one long run against short-schedule runs of the same recipe: does an average at step S match
a run whose LR schedule ended at S?

    python -m eval.compare runs/1b_lawa runs/1b_lawa_5k runs/1b_lawa_10k --out reports/1b_lawa
    python -m eval.compare runs/1b_lawa runs/1b_lawa_5k --out reports/1b_lawa --evaluate release/1b_lawa_ema

The long run is the one with the most train.steps; every other run must share its recipe except run.*,
train.steps, checkpoint.*, log.*, eval.* and averaging. Writes DIR/report.md, DIR/comparison.csv (one row per
curve), DIR/summary.json and DIR/val_loss.png. Values are the logged val losses only, never interpolated: a
step where a curve was not evaluated is reported as such. If the long run has snapshots, the report also holds its
horizon sweep (eval/sweep.py) at the snapshot steps nearest --sweep-at percent of it, with DIR/sweep.csv and
DIR/sweep.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from averaging.snapshots import complete
from eval import sweep
from eval.plots import plot_comparison
from polyak import metrics
from polyak.errors import UserError, cli
from polyak.recipe import Recipe, load_recipe, recipe_to_dict

# Recipe keys a short-schedule run may change; everything else must equal the long run's recipe.
FREE_KEYS = ("run.", "checkpoint.", "log.", "eval.", "averaging.", "hardware.", "snapshots.", "train.steps")
NOT_EVALUATED = "not evaluated"
NOT_REACHED = "not reached"


@dataclass
class Run:
    dir: Path
    recipe: Recipe
    records: dict[int, dict]  # step -> its last logged record

    @property
    def steps(self) -> int:
        return self.recipe.train.steps

    def curve(self, key: str) -> dict[int, float | None]:
        """key's value at every step that logged it (None where it was not finite)."""
        return {step: r[key] for step, r in sorted(self.records.items()) if key in r}


def load_run(run_dir: Path) -> Run:
    if not (run_dir / "recipe.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no recipe.yaml)")
    return Run(run_dir, load_recipe(run_dir / "recipe.yaml"), metrics.read(run_dir))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_same_recipe(long: Run, short: Run) -> None:
    a, b = _flatten(recipe_to_dict(long.recipe)), _flatten(recipe_to_dict(short.recipe))
    for key in [*a, *(k for k in b if k not in a)]:
        if not key.startswith(FREE_KEYS) and a.get(key) != b.get(key):
            raise UserError(f"{short.dir}: its recipe differs from the long run's ({long.dir}) in {key} "
                            f"({b.get(key)!r} vs {a.get(key)!r}); short-schedule runs may differ only in run.*, "
                            "train.steps, checkpoint.*, log.*, eval.*, hardware.*, snapshots.* and averaging")


def steps_to_target(curve: dict[int, float | None], target: float) -> int | None:
    """The first evaluated step at or below the target."""
    return next((step for step, value in curve.items() if value is not None and value <= target), None)


def val_curves(long: Run, shorts: list[Run]) -> tuple[dict[str, Run], dict[str, dict]]:
    """The run and val-loss curve of each label: raw and the averages of the long run, short_<steps> of the others."""
    owner = {"raw": long, **{name: long for name in long.recipe.averaging.averages}}
    curves = {label: long.curve("val_loss" if label == "raw" else f"val_loss_{label}") for label in owner}
    for short in shorts:
        owner[f"short_{short.steps}"] = short
        curves[f"short_{short.steps}"] = short.curve("val_loss")
    return owner, curves


def compare(runs: list[Run], target: float | None = None) -> dict:
    """The numbers of the report: values at each short run's end step, final values, steps to the target."""
    most = max(r.steps for r in runs)
    longest = [r for r in runs if r.steps == most]
    if len(longest) > 1:
        raise UserError(f"{longest[0].dir} and {longest[1].dir} both have the most train.steps ({most}); "
                        "pass one long run")
    long = longest[0]
    shorts = sorted((r for r in runs if r is not long), key=lambda r: r.steps)
    for a, b in itertools.pairwise(shorts):
        if a.steps == b.steps:
            raise UserError(f"{a.dir} and {b.dir} both have train.steps={a.steps}")
    for short in shorts:
        check_same_recipe(long, short)

    averages = list(long.recipe.averaging.averages)
    owner, curves = val_curves(long, shorts)
    if not curves["raw"]:
        raise UserError(f"{long.dir / 'metrics.jsonl'} has no val_loss: the long run never evaluated")

    target_from = "--target"
    if target is None:
        last = max(curves["raw"])
        target, target_from = curves["raw"][last], f"the long run's final raw val loss, step {last}"
        if target is None:
            raise UserError(f"{long.dir}: the final raw val loss is not finite; pass --target")

    at_ends = []
    for short in shorts:
        s, own = short.steps, f"short_{short.steps}"
        row = {"step": s, "short_run": own, "short_final": curves[own].get(s)}
        row.update({label: curves[label].get(s) for label in ("raw", *averages)})
        row["not_evaluated"] = [label for label in ("raw", *averages, own) if s not in curves[label]]
        at_ends.append(row)

    raw_steps = steps_to_target(curves["raw"], target)
    summary_curves = {}
    for label, curve in curves.items():
        n = steps_to_target(curve, target)
        last = max(curve, default=None)
        summary_curves[label] = {
            "run_dir": str(owner[label].dir), "end_step": owner[label].steps, "final_step": last,
            "final_val_loss": curve.get(last), "steps_to_target": n,
            "saving_pct": None if n is None or raw_steps is None else 100.0 * (raw_steps - n) / raw_steps}
    return {
        "long_run": {"dir": str(long.dir), "name": long.recipe.run.name, "steps": long.steps,
                     "averages": {n: dataclasses.asdict(a) for n, a in long.recipe.averaging.averages.items()}},
        "short_runs": [{"dir": str(r.dir), "name": r.recipe.run.name, "steps": r.steps} for r in shorts],
        "target": target, "target_from": target_from,
        "at_short_ends": at_ends, "curves": summary_curves, "releases": [],
    }


def _cell(value, evaluated: bool):
    """A CSV value at full precision, or why there is none."""
    if not evaluated:
        return NOT_EVALUATED
    return "non-finite" if value is None else value


def _fmt(value, evaluated: bool = True) -> str:
    """A report value to 4 decimals, or why there is none."""
    cell = _cell(value, evaluated)
    return f"{cell:.4f}" if isinstance(cell, float) else cell


def write_csv(summary: dict, path: Path) -> None:
    """One row per curve: its final value, steps to the target, saving, and its value at every short end step."""
    ends = [row["step"] for row in summary["at_short_ends"]]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["curve", "run_dir", "final_step", "final_val_loss", "steps_to_target", "saving_pct",
                    *(f"val_loss_at_{s}" for s in ends)])
        for label, c in summary["curves"].items():
            at = []
            for row in summary["at_short_ends"]:
                key = "short_final" if label == row["short_run"] else label
                if key not in row:
                    at.append("")  # another short run: not compared at this step
                else:
                    at.append(_cell(row[key], label not in row["not_evaluated"]))
            w.writerow([label, c["run_dir"], c["final_step"], _cell(c["final_val_loss"], c["final_step"] is not None),
                        NOT_REACHED if c["steps_to_target"] is None else c["steps_to_target"],
                        "" if c["saving_pct"] is None else c["saving_pct"], *at])


def _table(header: list[str], rows: list[list], numeric_from: int) -> list[str]:
    """Markdown table lines; columns from `numeric_from` on are right-aligned."""
    rule = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(map(str, cells)) + " |" for cells in (header, rule, *rows)]


def write_report(summary: dict, path: Path, sweep_lines: list[str]) -> None:
    long, averages = summary["long_run"], list(summary["long_run"]["averages"])
    described = ", ".join(f"{n} ({_describe(a)})" for n, a in long["averages"].items()) or "none"
    shorts = ", ".join(f"`{r['dir']}` ({r['steps']} steps)" for r in summary["short_runs"]) or "none"
    lines = [f"# Weight averages against short schedules: {long['name']}", "",
             f"Long run: `{long['dir']}` ({long['steps']} steps); averages: {described}.",
             f"Short-schedule runs: {shorts}.",
             f"Target val loss: {summary['target']:.4f} ({summary['target_from']}).", ""]
    if summary["at_short_ends"]:
        rows = []
        for row in summary["at_short_ends"]:
            missing = row["not_evaluated"]
            rows.append([row["step"], _fmt(row["short_final"], row["short_run"] not in missing),
                         *(_fmt(row[label], label not in missing) for label in ("raw", *averages))])
        lines += ["## Val loss at each short run's end step", "",
                  ("Each short run ends its LR schedule at step S; the long run is still at a high LR there, and "
                   "its averages are read at the same step."), "",
                  *_table(["step S", "short run (final)", "long raw", *(f"long {n}" for n in averages)], rows, 0),
                  ""]
    rows = []
    for label, c in summary["curves"].items():
        n, saving, evaluated = c["steps_to_target"], c["saving_pct"], c["final_step"] is not None
        rows.append([label, f"`{c['run_dir']}`", c["final_step"] if evaluated else "-",
                     _fmt(c["final_val_loss"], evaluated), NOT_REACHED if n is None else n,
                     "-" if saving is None else f"{saving:.1f}%"])
    lines += ["## Final values and steps to the target", "",
              ("Steps to the target are the first evaluated step at or below it (so a multiple of the eval "
               "interval); the saving is against the long run's raw curve."), "",
              *_table(["curve", "run", "final step", "final val loss", "steps to target", "saving"], rows, 2)]
    if summary["releases"]:
        rows = [[f"`{r['model_dir']}`", r["weights"], r["step"], f"{r['loss']:.4f}", f"{r['perplexity']:.3f}",
                 f"{r['bits_per_byte']:.4f}", r["tokens"]] for r in summary["releases"]]
        lines += ["", "## Released weights on the val split", "",
                  *_table(["folder", "weights", "step", "loss", "perplexity", "bits per byte", "tokens"], rows, 2)]
    lines += ["", "![val loss and LR schedules](val_loss.png)", "", "## Horizon sweep", "", *sweep_lines, ""]
    path.write_text("\n".join(lines))


def _describe(average: dict) -> str:
    if average["kind"] == "ema":
        return f"EMA, beta {average['beta']}, every {average['every']}"
    if average["kind"] == "power":
        return f"power EMA, sigma_rel {average['sigma_rel']}, every {average['every']}"
    return f"LAWA, window {average['window']}, every {average['every']}"


def horizon_sweep(long: Run, percents: list[float] | None, out: Path) -> tuple[dict, list[str]]:
    """The long run's horizon sweep at the snapshot steps nearest `percents` of it (None: not asked for), written
    into `out`: its summary and its lines of the report, or why there is none."""
    if percents is None:
        return {"skipped": "--sweep-at none"}, ["Not swept (--sweep-at none)."]
    snapshots = complete(long.dir / "snapshots")
    if not snapshots:
        why = f"`{long.dir}` has no complete snapshot to rebuild averages from (give the run snapshots.every)"
        return {"skipped": why}, [f"Not swept: {why}."]
    steps = sweep.nearest([s.step for s in snapshots], percents, long.steps)
    results, lines = sweep.report(long.dir, snapshots, steps, out)
    intro = (f"Held-out loss of post-hoc averages of the long run at the snapshot steps nearest "
             f"{', '.join(f'{p:g}' for p in percents)}% of its {long.steps} steps (eval.sweep).")
    return {"at_pct": percents, "steps": steps, "results": sweep.records(results)}, [intro, "", *lines]


def _percents(text: str) -> list[float] | None:
    if text == "none":
        return None
    try:
        percents = [float(p) for p in text.split(",")]
    except ValueError:
        percents = []
    if not percents or not all(0 < p <= 100 for p in percents):
        raise UserError(f"--sweep-at {text}: percentages of the run in (0, 100], comma-separated (25,50,100), "
                        "or none")
    return percents


def plot(runs: list[Run], summary: dict, path: Path) -> None:
    by_dir = {str(r.dir): r for r in runs}
    long = by_dir[summary["long_run"]["dir"]]
    shorts = [by_dir[r["dir"]] for r in summary["short_runs"]]
    owner, curves = val_curves(long, shorts)
    lr = {f"long ({long.steps} steps)": long.curve("lr")}
    lr.update({f"short_{r.steps}": r.curve("lr") for r in shorts})
    plot_comparison(
        path, f"Val loss: {summary['long_run']['name']} ({long.steps} steps) and its averages vs short schedules",
        long={f"long {label}": c for label, c in curves.items() if owner[label] is long},
        short={label: c for label, c in curves.items() if owner[label] is not long},
        lr=lr, target=summary["target"])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="the long run and its short-schedule runs, any order")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--target", type=float, help="target val loss (default: the long run's final raw val loss)")
    p.add_argument("--evaluate", nargs="+", type=Path, default=[], metavar="RELEASE_DIR",
                   help="release folders to evaluate on their run's val split")
    p.add_argument("--sweep-at", default="25,50,100", metavar="PCT,...",
                   help="sweep the long run's horizons at the snapshot steps nearest these percentages of it, or "
                   "none (default: 25,50,100)")
    args = p.parse_args(argv)
    percents = _percents(args.sweep_at)

    runs = [load_run(d) for d in args.run_dirs]
    summary = compare(runs, args.target)
    if args.evaluate:
        from averaging.release import read_provenance
        from eval.evaluate import evaluate_release

        for folder in args.evaluate:
            result = evaluate_release(folder)
            info = read_provenance(folder) or {}
            summary["releases"].append({"model_dir": str(folder), "weights": info.get("weights"),
                                        "step": info.get("step"), **result})
    args.out.mkdir(parents=True, exist_ok=True)
    long = next(r for r in runs if str(r.dir) == summary["long_run"]["dir"])
    summary["sweep"], sweep_lines = horizon_sweep(long, percents, args.out)
    write_csv(summary, args.out / "comparison.csv")
    write_report(summary, args.out / "report.md", sweep_lines)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(runs, summary, args.out / "val_loss.png")
    print(f"wrote {args.out / 'report.md'}, comparison.csv, summary.json and val_loss.png"
          + (", sweep.csv and sweep.png" if "results" in summary["sweep"] else ""))
    return summary


if __name__ == "__main__":
    cli(main)
