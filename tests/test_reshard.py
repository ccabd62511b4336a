"""Resuming on another number of ranks: the averaging state cut anew, and real runs resumed 2→3, 3→2 and 2→1."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from averaging.averager import Averager
from averaging.partitions import Layout, reshard_plan
from averaging.snapshots import SnapshotStore
from averaging.state import description_file, rank_file, window_steps
from averaging.weights import zero_world_size
from bench.harness import full_average, pretrain, read_metrics
from launch import universal
from polyak.checkpoints import problems, tag_of
from polyak.errors import UserError
from polyak.recipe import AverageConfig, AveragingConfig, SnapshotConfig, SpikeGuardConfig

# Two param groups; sizes that 2..6 mostly do not divide, and parameters smaller than the world size, so that whole
# chunks are padding on the last ranks.
GROUPS = [[("embed", (7, 3)), ("bias", (1,)), ("up", (5, 5)), ("gate", (2,))], [("norm", (3,)), ("head", (4, 6))]]
PAIRS = [(n, m) for n in range(1, 7) for m in range(1, 7)]


def full_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for group in GROUPS for name, shape in group}


def averaging_config() -> AveragingConfig:
    # The spike guard with a skip makes every counter non-trivial: samples, skipped, skip_left, the window's steps.
    return AveragingConfig(spike_guard=SpikeGuardConfig(enabled=True, factor=1.5, history=4, skip=2),
                           averages={"ema": AverageConfig(kind="ema", beta=0.8),
                                     "lawa": AverageConfig(kind="lawa", window=3, every=2)})


LOSSES = [5.0, 4.8, 4.7, 9.0, 4.6, 4.5, 4.4, 4.3, 4.2]  # a spike at step 4: samples skipped at 4 and 5 (6 for LAWA)


def started(world: int, seed: int, store: Path, cfg: AveragingConfig | None = None, groups=GROUPS) -> list[Averager]:
    """Every rank's Averager of `world` ranks, started from the full weights of `seed`, LAWA samples in `store`."""
    layout = Layout(groups, world)
    g = torch.Generator().manual_seed(seed)
    full = {name: torch.randn(shape, generator=g) for group in groups for name, shape in group}
    return [Averager(cfg or averaging_config(), layout.cut(full, r), layout, r,
                     SnapshotStore(store, SnapshotConfig(), layout, r)) for r in range(world)]


def averaged_on(world: int, steps: int, store: Path) -> list[Averager]:
    """Every rank's Averager of `world` ranks after `steps` steps of the same full weights."""
    layout = Layout(GROUPS, world)
    averagers = started(world, seed=0, store=store)
    for step in range(1, steps + 1):
        for r, averager in enumerate(averagers):
            averager.update(step, LOSSES[step - 1], layout.cut(full_weights(step), r))
    return averagers


def save_all(averagers: list[Averager], directory: Path) -> None:
    for averager in averagers:
        averager.save(directory).result()


def resharded(directory: Path, world: int, store: Path) -> list[Averager]:
    """Fresh Averagers of `world` ranks (started from other weights) that load the state saved in `directory`, their
    LAWA samples in `store`."""
    averagers = started(world, seed=99, store=store)
    for averager in averagers:
        averager.load(directory)
    return averagers


def description(directory: Path) -> dict:
    return {k: v for k, v in json.loads(description_file(directory).read_text()).items()
            if k not in ("world_size", "layout")}


@pytest.mark.parametrize(("saved", "world"), PAIRS)
def test_the_plan_builds_every_rank_of_another_world_size(saved, world):
    """Applied to partitions whose padding is NaN: exactly Layout.cut of the full tensors (zero padding)."""
    full = full_weights(1)
    old, new = Layout(GROUPS, saved), Layout(GROUPS, world)
    partitions = [old.cut(full, r) for r in range(saved)]
    for r in range(saved):
        for flat, pad in zip(partitions[r], old.padding(r)):
            flat[pad] = math.nan
    for rank in range(world):
        built = [torch.zeros(new.partition_numel(g)) for g in range(len(GROUPS))]
        for p in reshard_plan(old, new, rank):
            built[p.group][p.dest:p.dest + p.stop - p.start] = partitions[p.rank][p.group][p.start:p.stop]
        for got, want in zip(built, new.cut(full, rank)):
            assert torch.equal(got, want)


def test_the_plan_reads_one_slice_per_rank_when_nothing_changes():
    layout = Layout(GROUPS, 3)
    for rank in range(3):
        plan = reshard_plan(layout, layout, rank)
        assert {(p.group, p.rank) for p in plan} == {(0, rank), (1, rank)}
        # Merged wherever no padding interrupts: one slice per stretch of this rank's partitions.
        assert len(plan) == len(GROUPS) + sum(len(pad) > 0 for pad in layout.padding(rank))


@pytest.mark.parametrize(("saved", "world"), [(1, 3), (2, 3), (3, 2), (4, 1), (2, 5), (6, 4), (3, 3)])
def test_averages_resharded_are_the_saved_ones_bitwise(saved, world, tmp_path):
    """EMA, LAWA's sum, every counter: the full averages, and the state after more steps (LAWA reading back samples
    written on the other number of ranks), as if never cut."""
    save_all(averaged_on(saved, steps=7, store=tmp_path / "store"), tmp_path / "saved")
    shutil.copytree(tmp_path / "store", tmp_path / "store_cut")  # as a resumed run finds it
    save_all(resharded(tmp_path / "saved", world, tmp_path / "store_cut"), tmp_path / "resharded")
    assert description(tmp_path / "resharded") == description(tmp_path / "saved")
    counters = description(tmp_path / "saved")["averages"]
    assert (counters["ema"]["skipped"], counters["lawa"]["skipped"], counters["lawa"]["skip_left"]) == (3, 2, 1)
    for name in ("ema", "lawa"):
        a, b = full_average(tmp_path / "saved", name), full_average(tmp_path / "resharded", name)
        assert all(torch.equal(a[k], b[k]) for k in a)

    # Two more steps on each: the same averages as the run that kept its world size.
    go_on = averaged_on(saved, steps=9, store=tmp_path / "store_go_on")
    cut = resharded(tmp_path / "saved", world, tmp_path / "store_cut")
    layout = Layout(GROUPS, world)
    for step in (8, 9):
        for r, averager in enumerate(cut):
            averager.update(step, LOSSES[step - 1], layout.cut(full_weights(step), r))
    save_all(go_on, tmp_path / "go_on")
    save_all(cut, tmp_path / "cut")
    assert description(tmp_path / "cut") == description(tmp_path / "go_on")
    for name in ("ema", "lawa"):
        a, b = full_average(tmp_path / "go_on", name), full_average(tmp_path / "cut", name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_with_other_counters_are_refused(tmp_path):
    averagers = averaged_on(2, steps=3, store=tmp_path / "store")
    averagers[1].update(4, 4.6, Layout(GROUPS, 2).cut(full_weights(4), 1))  # one rank a step ahead
    save_all(averagers, tmp_path)
    with pytest.raises(UserError, match=r"rank00001\.safetensors: rank 1's averaging counters .* differ from rank 0's "
                                        r".*; these averages are not one consistent state"):
        resharded(tmp_path, 3, tmp_path / "store")


def test_bad_saved_states_are_named(tmp_path):
    store = tmp_path / "store"
    save_all(averaged_on(2, steps=3, store=store), tmp_path)
    other = [[("embed", (7, 4)), *GROUPS[0][1:]], GROUPS[1]]
    with pytest.raises(UserError, match="the saved partition layout differs from this model's: group 0 parameter 0"):
        started(3, 0, store, groups=other)[0].load(tmp_path)
    wider = AveragingConfig(averages={"ema": AverageConfig(kind="ema", beta=0.8),
                                      "lawa": AverageConfig(kind="lawa", window=5, every=2)})
    with pytest.raises(UserError, match=r"average 'lawa' was saved as .*'window': 3.*, but the recipe says "
                                        r".*'window': 5"):
        started(3, 0, store, wider)[0].load(tmp_path)
    (store / "step2" / "rank00001.safetensors").unlink()  # a sample in the window, lost
    with pytest.raises(UserError, match=r"step2/rank00001\.safetensors: missing; a LAWA sample is lost"):
        resharded(tmp_path, 3, store)
    rank_file(tmp_path, 1).unlink()
    with pytest.raises(UserError, match=r"rank00001\.safetensors: not found; the averaging state of rank 1"):
        resharded(tmp_path, 3, store)


# Real runs: the session's 12-step runs on 2 and 3 ranks (a checkpoint every step) resumed from step 6 elsewhere.
STEP = 6
# A resumed run's losses against the original's, with the same data order. Observed: up to 1.2e-7, from the rounding
# of the per-rank loss means, of the gradient reduction over another number of ranks and of matrix products run on
# another number of threads. With Adam's step advancing once per param group (one step tensor shared by both
# groups, as DeepSpeed's universal load leaves it): 6e-5 to 2e-4; with the moments lost: 3e-3 to 6e-3.
LOSS_RTOL = 2e-6


def resumable_copy(run: Path, to: Path) -> Path:
    """A new run directory holding only `run`'s checkpoint of STEP and the snapshots its LAWA needs (the session's
    run stays as it is)."""
    tag = tag_of(STEP)
    shutil.copytree(run / "checkpoints" / tag, to / "checkpoints" / tag)
    for step in window_steps(run / "checkpoints" / tag):
        shutil.copytree(run / "snapshots" / f"step{step}", to / "snapshots" / f"step{step}")
    (to / "checkpoints" / "latest").write_text(tag)
    return to


def overrides(data_dir: Path, run_dir: Path, *more: str) -> list[str]:
    return [f"data.dir={data_dir}", f"run.dir={run_dir}", "checkpoint.every=1", *more]


def assert_same_state(original: Path, resharded: Path) -> None:
    """The same full averages, fp32 weights, Adam moments and step, and optimizer hyperparameters, bitwise."""
    for name in ("ema", "lawa"):
        a, b = full_average(original, name), full_average(resharded, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (get_fp32_state_dict_from_zero_checkpoint(str(d.parent), tag=d.name) for d in (original, resharded))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = optimizer_state(original), optimizer_state(resharded)
    assert a["param_groups"] == b["param_groups"] and a["steps"] == b["steps"]
    for key in ("exp_avg", "exp_avg_sq"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def optimizer_state(step_dir: Path) -> dict:
    """Full Adam moments by parameter, every param group's step on every rank, and the param groups, from
    DeepSpeed's per-rank optimizer files."""
    layout = Layout.from_dict(json.loads(description_file(step_dir).read_text())["layout"])
    # DeepSpeed's own optimizer files are pickles: read here only to compare two checkpoints.
    ranks = [torch.load(step_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", map_location="cpu",
                        weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]
             for r in range(layout.world_size)]
    state = {key: layout.rebuild([[rank["state"][g][key] for g in range(len(layout.groups))] for rank in ranks])
             for key in ("exp_avg", "exp_avg_sq")}
    assert all(rank["param_groups"] == ranks[0]["param_groups"] for rank in ranks)
    steps = [[float(rank["state"][g]["step"]) for g in range(len(layout.groups))] for rank in ranks]
    assert all(rank_steps == steps[0] for rank_steps in steps)
    return {**state, "steps": steps[0], "param_groups": ranks[0]["param_groups"]}


def assert_same_steps(original: Path, resumed: Path) -> None:
    """Adam's step of every param group, on every rank, after training on from the resharded checkpoint: one per
    optimizer step, as in the run that was never stopped."""
    step_dir = tag_of(12)
    assert optimizer_state(resumed / "checkpoints" / step_dir)["steps"] == \
        optimizer_state(original / "checkpoints" / step_dir)["steps"] == [12.0, 12.0]


def trained_on_from(original: Path, run: Path) -> Path:
    """`run` with `original`'s checkpoint of STEP back in place of the one saved again: the next launch on another
    number of ranks resumes from the conversion and trains on in the same process."""
    step_dir = run / "checkpoints" / tag_of(STEP)
    shutil.rmtree(step_dir)
    shutil.copytree(original / "checkpoints" / tag_of(STEP), step_dir)
    return run


def assert_continues(original: Path, resumed: Path) -> None:
    """The resumed steps: finite, falling, and the original run's losses (the same data, the same Adam state)."""
    was = {r["step"]: r["loss"] for r in read_metrics(original)}
    now = read_metrics(resumed)
    assert [r["step"] for r in now] == list(range(STEP + 1, 13))
    losses = [r["loss"] for r in now]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-3:]) / 3 < losses[0] < was[1]
    for r in now:  # from the second step on, each loss follows an update made with the carried moments
        assert r["loss"] == pytest.approx(was[r["step"]], rel=LOSS_RTOL), r["step"]


@pytest.mark.slow
def test_two_ranks_resharded_to_three(run2, data_dir, tmp_path):
    """Stopped where it resumed: the checkpoint saved again by 3 ranks holds the 2-rank run's state bitwise."""
    run = resumable_copy(run2, tmp_path)
    proc = pretrain(3, overrides(data_dir, run), "--stop-after", str(STEP))
    assert "resharded from 2 to 3 ranks through the universal checkpoint" in proc.stderr
    assert "no saved RNG state for rank 2: seeded from train.seed" in proc.stderr
    assert ("the data order differs from the original run's: ranks x train.micro_batch was 2 x 4, is 3 x 4"
            in proc.stderr)
    step_dir = run / "checkpoints" / tag_of(STEP)
    assert zero_world_size(step_dir) == 3 and problems(step_dir) == []
    assert_same_state(run2 / "checkpoints" / tag_of(STEP), step_dir)

    pretrain(3, overrides(data_dir, trained_on_from(run2, run)))
    assert_same_steps(run2, run)


@pytest.mark.slow
def test_three_ranks_resharded_to_two_train_on_as_before(run3, data_dir, tmp_path):
    """3 x micro-batch 4 as 2 x 6: the same state, and then the same losses as the run that was never stopped."""
    run = resumable_copy(run3, tmp_path)
    proc = pretrain(2, overrides(data_dir, run, "train.micro_batch=6"), "--stop-after", str(STEP))
    assert "resharded from 3 to 2 ranks" in proc.stderr
    assert "no saved RNG state" not in proc.stderr and "data order" not in proc.stderr
    assert_same_state(run3 / "checkpoints" / tag_of(STEP), run / "checkpoints" / tag_of(STEP))

    proc = pretrain(2, overrides(data_dir, trained_on_from(run3, run), "train.micro_batch=6"))
    assert "resharded from 3 to 2 ranks" in proc.stderr
    assert_continues(run3, run)
    assert_same_steps(run3, run)


@pytest.mark.slow
def test_two_ranks_resumed_on_one_without_stopping(run2, data_dir, tmp_path):
    """Resharded and trained on in one launch; the checkpoint is left as it was and its conversion kept beside it
    for the next launch, until the checkpoint changes."""
    run = resumable_copy(run2, tmp_path)
    ckpt_dir, tag = run / "checkpoints", tag_of(STEP)
    before = sorted(p.relative_to(ckpt_dir / tag) for p in (ckpt_dir / tag).rglob("*"))
    pretrain(1, overrides(data_dir, run, "train.micro_batch=8"))
    assert_continues(run2, run)
    assert sorted(p.relative_to(ckpt_dir / tag) for p in (ckpt_dir / tag).rglob("*")) == before
    assert problems(ckpt_dir / tag) == [] and zero_world_size(ckpt_dir / tag) == 2

    conversion = universal.root(ckpt_dir) / tag
    (conversion / "mark").touch()
    universal.prepare(ckpt_dir, STEP)
    assert (conversion / "mark").exists()  # not converted again
    os.utime(ckpt_dir / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")  # as if saved again
    universal.prepare(ckpt_dir, STEP)
    assert not (conversion / "mark").exists() and (conversion / "zero" / "optimizer_state.pt").is_file()

    assert sorted(universal.root(ckpt_dir).iterdir()) == [conversion]
    universal.prepare(ckpt_dir, None)
    assert not universal.root(ckpt_dir).exists()
