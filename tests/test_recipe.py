"""Recipes: every shipped recipe validates; bad input is one clear line; schedules hit their end points."""

import math
import sys

import pytest

from bench.harness import ROOT, run_cli
from launch.ds_config import deepspeed_config
from launch.schedule import lr_multiplier
from polyak.errors import UserError
from polyak.recipe import TrainConfig, load_recipe, recipe_from_dict, recipe_to_dict


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate_and_round_trip(path):
    recipe = load_recipe(path)
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe


def test_base_chain_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {steps: 10, lr: 3e-4}\naveraging: {ema: {kind: ema, beta: 0.9}}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {steps: 20}\n")
    r = load_recipe(tmp_path / "b.yaml", ["averaging.ema.beta=0.8", "averaging.lawa={kind: lawa, window: 5}"])
    assert (r.train.steps, r.train.lr) == (20, 3e-4)
    assert r.averaging.averages["ema"].beta == 0.8
    assert r.averaging.averages["lawa"].window == 5


@pytest.mark.parametrize("text, overrides, message", [
    ("train: {lrr: 1}", [], "b.yaml: unknown key 'train.lrr'"),
    ("train: {steps: ten}", [], "b.yaml: train.steps must be an integer, got 'ten'"),
    ("", ["train.lr=fast"], "--set train.lr: train.lr must be a number, got 'fast'"),
    ("", ["averaging.ema.beta=1.0"], "--set averaging.ema.beta: averaging.ema.beta=1.0 must be in [0, 1)"),
    ("", ["averaging.ema.every=0"], "averaging.ema.every=0 must be at least 1"),
    ("averaging: {lawa: {kind: lawa, window: 0}}", [], "b.yaml: averaging.lawa.window=0 must be at least 1"),
    ("", ["train.steps=0"], "train.steps=0 must be at least 1"),
    ("", ["zero.deepcompile=true"], "--set zero.deepcompile: zero.deepcompile=True needs zero.compile: true"),
    ("", ["train.warmup=50"], "train.warmup=50 must be between 0 and train.steps (10)"),
    ("train: {schedule: step}", [], "b.yaml: train.schedule='step' must be one of cosine, linear, wsd, constant"),
    ("train: [1, 2]", [], "b.yaml: train must be a mapping"),
    ("train: {steps: 3\n", [], "b.yaml: not valid YAML"),
    ("", ["train.steps"], "--set 'train.steps': expected key=value"),
    ("hardware: {gpu: H100 80GB}", [], "b.yaml: hardware.gpu_memory_gib=None must be set with hardware.gpu"),
    ("", ["hardware.nodes=0"], "--set hardware.nodes: hardware.nodes=0 must be at least 1"),
])
def test_bad_recipes_name_key_and_file(tmp_path, text, overrides, message):
    (tmp_path / "a.yaml").write_text("train: {steps: 10}\naveraging: {ema: {kind: ema}}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n" + text)
    with pytest.raises(UserError) as e:
        load_recipe(tmp_path / "b.yaml", overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_recipe_and_base_loop(tmp_path):
    with pytest.raises(UserError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(UserError, match="loops back"):
        load_recipe(tmp_path / "loop.yaml")


def test_cli_error_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(ROOT / "recipes/tiny_cpu.yaml") + "\ntrain: {stepz: 3}\n")
    proc = run_cli([sys.executable, "launch/pretrain.py", "--recipe", str(bad)], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: unknown key 'train.stepz'"


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_schedules_warm_up_then_end_at_the_final_fraction(schedule):
    t = TrainConfig(steps=100, warmup=10, final_lr=0.1, schedule=schedule, decay_fraction=0.2)
    m = [lr_multiplier(t, s) for s in range(t.steps)]
    assert m[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert max(m) == pytest.approx(1.0)
    assert m[-1] == pytest.approx(1.0 if schedule == "constant" else 0.1)
    assert all(a >= b - 1e-12 for a, b in zip(m[10:], m[11:]))  # never rises after warmup
    if schedule == "wsd":
        assert m[79] == 1.0 and m[80] < 1.0  # stable until the last 20%
    if schedule == "cosine":
        assert m[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))


def test_deepcompile_reaches_the_deepspeed_config():
    recipe = load_recipe(ROOT / "recipes/tiny_cpu.yaml")
    assert deepspeed_config(recipe, 1)["compile"] == {"deepcompile": False}
    recipe = load_recipe(ROOT / "recipes/tiny_cpu.yaml", ["zero.compile=true", "zero.deepcompile=true"])
    assert deepspeed_config(recipe, 1)["compile"] == {"deepcompile": True}
