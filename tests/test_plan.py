"""The plan: every shipped recipe fits the hardware it names and has the data it needs; a recipe that does not fit
is one line; a run that repeats its data says so."""

import re
import sys

import pytest

from bench.harness import ROOT, SMALL, pretrain, run_cli
from data.loader import TokenWindows, TrainBatches, load_meta
from launch.plan import repeat_warning, tokens_needed
from model.llama import count_params
from model.sizes import resolve
from polyak.recipe import load_recipe

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def run_plan(recipe, *args: str, check: bool = True):
    return run_cli([sys.executable, "-m", "launch.plan", "--recipe", str(recipe), *args], check=check)


def facts(stdout: str) -> dict[str, str]:
    """The plan's `name: value` lines (DeepSpeed's own log lines start with a date and are left out)."""
    return dict(line.split(": ", 1) for line in stdout.splitlines() if not line.startswith("["))


def number(text: str) -> int:
    return int(re.match(r"[\d,]+", text)[0].replace(",", ""))


def gib(text: str) -> float:
    value, unit = re.match(r"([\d.]+) (GiB|MiB)", text).groups()
    return float(value) / (1024 if unit == "MiB" else 1)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_fits_the_hardware_it_names(path):
    recipe = load_recipe(path)
    hw, t = recipe.hardware, recipe.train
    plan = facts(run_plan(path).stdout)
    world = hw.ranks_per_node * hw.nodes
    assert number(plan["world"]) == world
    assert number(plan["tokens needed"]) == t.steps * t.micro_batch * t.grad_accum * world * recipe.data.seq_len
    assert gib(plan["memory per node"]) <= hw.host_memory_gib
    params = number(plan["parameters"])
    if hw.gpu:
        assert gib(plan["memory per GPU"]) <= hw.gpu_memory_gib
        # A GPU recipe's data is a hub dataset of known size: enough that nothing repeats.
        assert number(plan["tokens available"]) >= number(plan["tokens needed"])
        assert "warning" not in plan
    per_param = 12 + 4 * len(recipe.averaging.averages)
    assert gib(plan["checkpoint size"]) == pytest.approx(params * per_param / 2**30, abs=0.05)
    for name, average in recipe.averaging.averages.items():
        if average.kind == "lawa":
            assert plan[f"horizon {name}"].startswith(f"{average.window * average.every} steps")


def test_the_plan_counts_parameters_snapshots_and_horizons():
    sets = ["averaging.p05.kind=power", "averaging.p05.sigma_rel=0.05", "snapshots.every=500",
            "snapshots.weights=[raw, p05]", "snapshots.dtype=bf16"]
    recipe = load_recipe(ROOT / "recipes/1b_lawa.yaml", sets)
    plan = facts(run_plan(ROOT / "recipes/1b_lawa.yaml", *(a for s in sets for a in ("--set", s))).stdout)
    params = count_params(resolve(recipe.model, 50304, recipe.data.seq_len))
    assert number(plan["parameters"]) == params
    assert gib(plan["snapshot size"]) == pytest.approx(params * 2 * 2 / 2**30, abs=0.05)  # raw and p05 in bf16
    assert plan["horizon ema"].startswith("200 steps = 1.0% of 20000 steps")
    assert plan["horizon p05"].startswith("sigma_rel 0.05 = 5.0% of the steps so far, as wide as a uniform window "
                                          "of 17.3% of them")


@pytest.mark.parametrize("recipe, args, key", [
    ("tiny_cpu.yaml", ["--set", "model.size=7b"], "hardware.host_memory_gib=8"),
    ("7b.yaml", ["--set", "zero.offload_optimizer=none", "--world", "1"], "hardware.gpu_memory_gib=79.6"),
])
def test_a_recipe_too_big_for_its_hardware_is_one_line(recipe, args, key):
    proc = run_plan(ROOT / "recipes" / recipe, *args, check=False)
    assert proc.returncode == 2
    (error,) = proc.stderr.strip().splitlines()
    assert error.startswith("error: the recipe needs about ") and f"more than {key}: use more ranks" in error
    assert "memory per node" in proc.stdout  # the plan that shows why comes first


def test_the_repeat_warning_starts_exactly_where_the_loader_starts_a_second_pass(data_dir):
    recipe = load_recipe(ROOT / "recipes/tiny_cpu.yaml", SMALL + [f"data.dir={data_dir}", "train.grad_accum=3"])
    world, t = 3, recipe.train
    batches = TrainBatches(TokenWindows(data_dir, "train", recipe.data.seq_len), 0, world, t.micro_batch, t.seed)
    train_tokens = load_meta(data_dir)["train_tokens"]
    t.steps = batches.batches_per_epoch // t.grad_accum
    assert repeat_warning(recipe, world, train_tokens) is None
    t.steps += 1
    warning = repeat_warning(recipe, world, train_tokens)
    assert warning.startswith(f"warning: data repeats: the run needs {tokens_needed(recipe, world):,} tokens")
    assert "\n" not in warning


def test_the_plan_reads_a_prepared_folder_and_warns(data_dir):
    sets = [a for item in SMALL + [f"data.dir={data_dir}", "train.steps=2000"] for a in ("--set", item)]
    plan = facts(run_plan(ROOT / "recipes/tiny_cpu.yaml", *sets).stdout)
    assert number(plan["tokens available"]) == load_meta(data_dir)["train_tokens"]
    assert plan["warning"].startswith("data repeats")


@pytest.mark.slow
def test_a_run_that_repeats_its_data_says_so_at_the_start(data_dir, tmp_path):
    # 1200 steps of 4 windows on one rank: the small corpus's one pass (about 1100) ends before; the run is asked to
    # leave after its first step, the warning being printed at the start.
    proc = pretrain(1, [f"data.dir={data_dir}", f"run.dir={tmp_path}", "train.steps=1200", "eval.every=0",
                        "checkpoint.every=0", "snapshots.every=0"], "--stop-after", "1")
    assert proc.stderr.count("warning: data repeats: the run needs 307,200 tokens") == 1
