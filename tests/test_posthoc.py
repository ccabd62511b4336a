"""Post-hoc averages of saved checkpoints, checked against the same averages of zero_to_fp32's full weights."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from averaging.consolidate import consolidate
from averaging.posthoc import posthoc
from averaging.state import description_file
from averaging.weights import MasterWeights
from bench.harness import full_average, run_cli
from polyak.errors import UserError
from tests.test_consolidate import link_copy, released, zero_to_fp32


def oracle(run_dir, steps: list[int], method: str, beta: float | None = None) -> dict[str, torch.Tensor]:
    """The average of full weights, one checkpoint after another, as the module docstring defines it."""
    fulls = [zero_to_fp32(run_dir, f"global_step{s}") for s in steps]
    if method == "ema":
        average = {name: t.clone() for name, t in fulls[0].items()}
        for full in fulls[1:]:
            for name, t in full.items():
                average[name].lerp_(t, 1 - beta)
        return average
    return {name: sum(full[name] for full in fulls) / len(fulls) for name in fulls[0]}


def assert_close_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0, msg=name)


def posthoc_steps(directory, name: str) -> list[int]:
    return json.loads(description_file(directory).read_text())["averages"][name]["posthoc"]["steps"]


@pytest.mark.slow
@pytest.mark.parametrize("method, options, steps", [
    ("sma", {"last": 4}, [9, 10, 11, 12]),
    ("ema", {"beta": 0.7, "every": 2}, [2, 4, 6, 8, 10, 12]),
    ("lawa", {"window": 3, "every": 3}, [6, 9, 12]),  # every 3rd counted back from 12, then the last 3
])
def test_averages_equal_those_of_full_weights(method, options, steps, run2, tmp_path):
    copy = link_copy(run2, tmp_path / "run")
    target = posthoc(copy / "checkpoints", method, out_tag="offline", **options)
    assert target == copy / "checkpoints" / "offline" and posthoc_steps(target, "offline") == steps
    average = full_average(target, "offline")
    assert_close_weights(average, oracle(run2, steps, method, options.get("beta")))

    out = consolidate(copy / "checkpoints", "offline", "offline", tmp_path / "release")
    exported = released(out)
    assert all(torch.equal(exported[name], t) for name, t in average.items())
    assert json.loads((out / "polyak.json").read_text())["step"] == 12

    release = posthoc(copy / "checkpoints", method, release=tmp_path / "direct", **options)
    direct = released(release)
    assert all(torch.equal(direct[name], t) for name, t in average.items())
    assert json.loads((release / "polyak.json").read_text())["posthoc"]["steps"] == steps
    assert not list(tmp_path.glob(".*")) and not list((copy / "checkpoints").glob(".*"))


def test_skip_spikes_and_best_select_the_right_steps(run1, tmp_path):
    copy = link_copy(run1, tmp_path / "run")
    records = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if r["step"] == 7:
            r["loss"] = 3 * max(x["loss"] for x in records if x["step"] < 7)  # a spike
        if r["step"] == 9:
            r["loss"] = None  # a non-finite loss, logged as null
        if r["step"] == 6:
            r["val_loss"] = 0.25  # an eval the checkpoint does not record: metrics.jsonl's counts
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    trainer = copy / "checkpoints" / "global_step12" / "trainer.json"
    trainer.write_text(json.dumps({**json.loads(trainer.read_text()), "val_loss": 0.5}))
    ckpt = copy / "checkpoints"

    target = posthoc(ckpt, "sma", skip_spikes=2.0, out_tag="calm")
    assert posthoc_steps(target, "calm") == [1, 2, 3, 4, 5, 6, 8, 10, 11, 12]
    target = posthoc(ckpt, "sma", best=2, out_tag="best")
    assert posthoc_steps(target, "best") == [6, 12]
    assert_close_weights(full_average(target, "best"), oracle(run1, [6, 12], "sma"))
    target = posthoc(ckpt, "sma", skip_spikes=2.0, last=4, best=2, out_tag="both")
    assert posthoc_steps(target, "both") == [8, 12]  # of the last 4 that are no spikes (8, 10, 11, 12), the best 2
    with pytest.raises(UserError, match="--best 5: only 4 of the 12 checkpoints left have a val loss"):
        posthoc(ckpt, "sma", best=5, out_tag="five")


@pytest.mark.slow
def test_checkpoints_of_different_world_sizes_are_refused(run1, run2, tmp_path):
    copy = link_copy(run2, tmp_path / "run")
    odd = copy / "checkpoints" / "global_step13"
    shutil.copytree(run1 / "checkpoints" / "global_step12", odd, symlinks=True)
    (odd / "trainer.json").write_text(json.dumps({**json.loads((odd / "trainer.json").read_text()), "step": 13}))
    with pytest.raises(UserError, match="^global_step12 and global_step13 cannot be averaged together: written by "
                                        "2 and 1 ranks$"):
        posthoc(copy / "checkpoints", "sma", last=2, out_tag="mixed")
    assert {p.name for p in (copy / "checkpoints").iterdir()} == {
        p.name for p in (run2 / "checkpoints").iterdir()} | {"global_step13"}


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.slow
@pytest.mark.parametrize("method, options", [("sma", {}), ("ema", {"beta": 0.9})])
def test_posthoc_never_holds_a_full_model_tensor(method, options, run3, tmp_path):
    copy = link_copy(run3, tmp_path / "run")
    layout = MasterWeights(copy / "checkpoints" / "global_step12").layout
    partition = max(layout.partition_numel(g) for g in range(len(layout.groups)))
    model = sum(math.prod(shape) for group in layout.groups for _, shape in group)
    with LargestTensor() as spy:
        posthoc(copy / "checkpoints", method, out_tag="spied", **options)
    assert 0 < spy.numel <= partition < model


def test_bad_options_are_one_line_errors_and_write_nothing(run1, tmp_path):
    copy = link_copy(run1, tmp_path / "run")
    ckpt = copy / "checkpoints"
    (ckpt / "taken").mkdir()
    before = sorted(ckpt.iterdir())
    for args, expected in {("--method", "sma", "--out-tag", "taken"): f"error: {ckpt / 'taken'}: already exists",
                           ("--method", "sma", "--dtype", "bf16", "--out-tag", "x"):
                               "error: --dtype and --max-shard-size go with --release"}.items():
        proc = run_cli([sys.executable, "-m", "averaging.posthoc", str(ckpt), *args], check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
        assert proc.stderr.startswith(expected), proc.stderr
    for options, expected in [
        ({"beta": 0.9}, "--beta is the EMA's decay"),
        ({"method": "lawa"}, "--window is LAWA's window"),
        ({"out_tag": "global_step3"}, "--out-tag global_step3: must be a name"),
        ({"last": 0}, "--last 0: must be at least 1"),
        ({"skip_spikes": 1.0}, "--skip-spikes 1.0: must be above 1"),
    ]:
        with pytest.raises(UserError, match=expected):
            posthoc(ckpt, **{"method": "sma", "out_tag": "x", **options})
    assert sorted(ckpt.iterdir()) == before
