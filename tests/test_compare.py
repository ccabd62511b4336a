"""eval.compare on hand-written runs: values at each short end step, steps to target, savings, refusals, the PNG; and
on a trained run, the horizon sweep in its report."""

import csv
import json
import struct
import sys

import numpy as np
import pytest
import torch

from averaging.snapshots import complete
from bench.harness import run_cli
from eval.compare import main
from eval.sweep import records, sweep
from launch.schedule import lr_multiplier
from polyak.errors import UserError
from polyak.recipe import AverageConfig, Recipe, save_recipe
from tests.test_evaluate import hf_loss, make_release

# val losses by step; the long run evaluates every 10 steps, the short runs every 10, 15 and 20.
LONG = {
    "val_loss": {10: 4.0, 20: 3.6, 30: 3.3, 40: 3.1, 50: 2.95, 60: 2.8, 70: 2.7, 80: 2.6, 90: 2.5, 100: 2.4},
    "val_loss_ema": {10: 3.9, 20: 3.5, 30: 3.2, 40: 2.95, 50: 2.8, 60: 2.65, 70: 2.55, 80: 2.45, 90: 2.35,
                     100: 2.3},
    "val_loss_lawa": {10: 3.95, 20: 3.45, 30: 3.1, 40: 2.85, 50: 2.7, 60: 2.6, 70: 2.45, 80: 2.35, 90: 2.3,
                      100: 2.25},
}
SHORT = {40: {10: 4.0, 20: 3.6, 30: 3.2, 40: 2.9}, 45: {15: None, 30: 3.25, 45: 2.85},
         80: {20: 3.7, 40: 3.2, 60: 2.75, 80: 2.39}}


def write_run(run_dir, steps, every, curves, **changes):
    """A run directory as launch/pretrain.py leaves it: recipe.yaml and metrics.jsonl (a record every step)."""
    recipe = Recipe()
    recipe.run.name, recipe.run.dir = run_dir.name, str(run_dir)
    recipe.train.steps, recipe.train.warmup, recipe.eval.every = steps, 5, every
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(recipe, section), name, value)
    run_dir.mkdir(parents=True)
    save_recipe(recipe, run_dir / "recipe.yaml")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            record = {"step": step, "loss": 5.0 - step / 100, "lr": recipe.train.lr * lr_multiplier(recipe.train, step),
                      "grad_norm": 1.0, "tokens": step * 2048, "tokens_per_s": 1e4, "step_time": 0.2, "mfu": None}
            record.update({key: values[step] for key, values in curves.items() if step in values})
            f.write(json.dumps(record) + "\n")
    return run_dir


@pytest.fixture
def runs(tmp_path):
    long = write_run(tmp_path / "long", 100, 10, LONG, checkpoint__every=25,
                     averaging__averages={"ema": AverageConfig("ema", beta=0.9),
                                          "lawa": AverageConfig("lawa", window=5, every=2)})
    # A run that stopped after step 40 and resumed from its step-30 checkpoint logs steps 31-40 twice: the first
    # copies (stale, here with val losses of 9.9) must lose.
    lines = (long / "metrics.jsonl").read_text().splitlines()
    stale = [json.loads(line) for line in lines[30:40]]
    for record in stale:
        record.update({k: 9.9 for k in record if k.startswith("val_loss")})
    (long / "metrics.jsonl").write_text("\n".join([*lines[:30], *map(json.dumps, stale), *lines[30:]]) + "\n")
    shorts = [write_run(tmp_path / f"short{s}", s, {40: 10, 45: 15, 80: 20}[s], {"val_loss": SHORT[s]})
              for s in (80, 40, 45)]
    return long, shorts


def test_summary_csv_and_report_numbers(runs, tmp_path):
    long, shorts = runs
    out = tmp_path / "report"
    main([str(shorts[0]), str(long), str(shorts[1]), str(shorts[2]), "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["long_run"]["dir"] == str(long) and summary["target"] == 2.4
    assert [r["steps"] for r in summary["short_runs"]] == [40, 45, 80]
    assert summary["at_short_ends"] == [
        {"step": 40, "short_run": "short_40", "short_final": 2.9, "raw": 3.1, "ema": 2.95, "lawa": 2.85,
         "not_evaluated": []},
        {"step": 45, "short_run": "short_45", "short_final": 2.85, "raw": None, "ema": None, "lawa": None,
         "not_evaluated": ["raw", "ema", "lawa"]},
        {"step": 80, "short_run": "short_80", "short_final": 2.39, "raw": 2.6, "ema": 2.45, "lawa": 2.35,
         "not_evaluated": []},
    ]
    curves = summary["curves"]
    assert {k: (c["final_step"], c["final_val_loss"], c["steps_to_target"]) for k, c in curves.items()} == {
        "raw": (100, 2.4, 100), "ema": (100, 2.3, 90), "lawa": (100, 2.25, 80),
        "short_40": (40, 2.9, None), "short_45": (45, 2.85, None), "short_80": (80, 2.39, 80)}
    assert {k: c["saving_pct"] for k, c in curves.items()} == {
        "raw": 0.0, "ema": 10.0, "lawa": 20.0, "short_40": None, "short_45": None, "short_80": 20.0}

    rows = {row["curve"]: row for row in csv.DictReader((out / "comparison.csv").read_text().splitlines())}
    assert rows["lawa"]["steps_to_target"] == "80" and float(rows["lawa"]["saving_pct"]) == 20.0
    assert rows["short_40"]["steps_to_target"] == "not reached" and rows["short_40"]["saving_pct"] == ""
    assert (rows["raw"]["val_loss_at_40"], rows["raw"]["val_loss_at_45"], rows["raw"]["val_loss_at_80"]) == (
        "3.1", "not evaluated", "2.6")
    assert (rows["short_45"]["val_loss_at_45"], rows["short_45"]["val_loss_at_40"]) == ("2.85", "")
    assert float(rows["ema"]["final_val_loss"]) == 2.3

    report = (out / "report.md").read_text()
    assert "| 40 | 2.9000 | 3.1000 | 2.9500 | 2.8500 |" in report
    assert "| 45 | 2.8500 | not evaluated | not evaluated | not evaluated |" in report
    assert f"| short_40 | `{shorts[1]}` | 40 | 2.9000 | not reached | - |" in report
    assert f"| lawa | `{long}` | 100 | 2.2500 | 80 | 20.0% |" in report


def test_explicit_target(runs, tmp_path):
    long, shorts = runs
    summary = main([str(long), *map(str, shorts), "--out", str(tmp_path / "r"), "--target", "3.0"])
    steps = {k: (c["steps_to_target"], c["saving_pct"]) for k, c in summary["curves"].items()}
    assert steps == {"raw": (50, 0.0), "ema": (40, 20.0), "lawa": (40, 20.0), "short_40": (40, 20.0),
                     "short_45": (45, 10.0), "short_80": (60, -20.0)}
    assert summary["target_from"] == "--target"


def test_png_is_a_readable_figure(runs, tmp_path):
    long, shorts = runs
    main([str(long), *map(str, shorts), "--out", str(tmp_path / "r")])
    png = (tmp_path / "r" / "val_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert 800 <= width <= 2000 and 600 <= height <= 1500
    assert len(png) > 30_000  # two panels of lines, text and a legend, not a blank canvas


def test_recipes_that_differ_are_refused(runs, tmp_path):
    long, _ = runs
    other = write_run(tmp_path / "other", 50, 10, {"val_loss": {50: 3.0}}, train__lr=1e-3, data__seq_len=128)
    with pytest.raises(UserError) as e:
        main([str(long), str(other), "--out", str(tmp_path / "r")])
    assert str(e.value) == (f"{other}: its recipe differs from the long run's ({long}) in data.seq_len (128 vs 256); "
                            "short-schedule runs may differ only in run.*, train.steps, checkpoint.*, log.*, eval.*, "
                            "hardware.*, snapshots.* and averaging")
    twin = write_run(tmp_path / "twin", 100, 10, {"val_loss": {100: 2.0}})
    with pytest.raises(UserError, match="both have the most train.steps \\(100\\)"):
        main([str(long), str(twin), "--out", str(tmp_path / "r")])
    proc = run_cli([sys.executable, "-m", "eval.compare", str(long), str(tmp_path / "nope"), "--out",
                    str(tmp_path / "r")], check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'nope'} is not a run directory (no recipe.yaml)\n"


def test_evaluate_adds_release_table(runs, tmp_path):
    long, shorts = runs
    release = make_release(tmp_path / "release", tmp_path / "data")
    summary = main([str(long), str(shorts[0]), "--out", str(tmp_path / "r"), "--evaluate", str(release)])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(release)
    val = torch.from_numpy(np.fromfile(tmp_path / "data" / "val.bin", dtype=np.uint16).astype(np.int64))
    (result,) = summary["releases"]
    assert result["loss"] == pytest.approx(hf_loss(model, val, 64), abs=1e-5)
    assert (result["weights"], result["step"], result["tokens"]) == ("raw", 10, len(val))
    assert (f"| `{release}` | raw | 10 | {result['loss']:.4f} | {result['perplexity']:.3f} | "
            f"{result['bits_per_byte']:.4f} | {len(val)} |") in (tmp_path / "r" / "report.md").read_text()


def test_a_run_without_snapshots_gets_a_line_instead_of_a_sweep(runs, tmp_path):
    long, shorts = runs
    summary = main([str(long), str(shorts[0]), "--out", str(tmp_path / "r")])
    report = (tmp_path / "r" / "report.md").read_text()
    why = f"`{long}` has no complete snapshot to rebuild averages from (give the run snapshots.every)"
    assert report.endswith(f"## Horizon sweep\n\nNot swept: {why}.\n")
    assert summary["sweep"] == {"skipped": why} and not (tmp_path / "r" / "sweep.csv").exists()
    with pytest.raises(UserError, match=r"^--sweep-at 0,50: percentages of the run in \(0, 100\]"):
        main([str(long), "--out", str(tmp_path / "r"), "--sweep-at", "0,50"])


def test_the_report_holds_the_sweep_eval_sweep_computes(run1, tmp_path):
    """run1 (12 steps) has snapshots every 2 steps (its LAWA's samples and scheduled ones): 40% and 100% of it are
    steps 4 (4.8 is nearer 4 than 6) and 12. The report's numbers are eval.sweep's own, computed here apart."""
    summary = main([str(run1), "--out", str(tmp_path / "r"), "--sweep-at", "40,100"])
    assert summary["sweep"]["steps"] == [4, 12]
    want = sweep(run1, complete(run1 / "snapshots"), [4, 12])
    assert summary["sweep"]["results"] == records(want)  # exactly, through summary.json's floats
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["sweep"] == summary["sweep"]

    report = (tmp_path / "r" / "report.md").read_text()
    assert ("averages: ema (EMA, beta 0.8, every 1), lawa (LAWA, window 3, every 2), "
            "p10 (power EMA, sigma_rel 0.1, every 1).") in report
    section = report.split("## Horizon sweep")[1]
    # A row: step, candidate, horizon in steps and in %, val loss, then "best" on the best row only.
    rows = [cells for line in section.splitlines() if (cells := line.strip("| ").split(" | "))[0].isdigit()]
    assert len(rows) == len(want)
    table = {(int(r[0]), r[1]): r for r in rows}
    for r in want:
        assert table[(r.step, r.label)][2:5] == [f"{r.horizon:g}", f"{100 * r.horizon / r.step:.2f}%", f"{r.loss:.4f}"]
    for step in (4, 12):
        here = [r for r in rows if int(r[0]) == step]
        (marked,) = [r for r in here if r[5:] == ["best"]]
        assert float(marked[4]) == min(float(r[4]) for r in here)
        assert f"- Step {step}: best {marked[1]} " in section
    assert "the 1% rule's horizon is 1.00%" in section and "![val loss against the horizon](sweep.png)" in section
    assert (tmp_path / "r" / "sweep.png").stat().st_size > 10_000
