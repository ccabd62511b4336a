"""The snapshot store: self-verifying files, retention, and what readers make of them (consolidation and post-hoc
averaging against DeepSpeed's zero_to_fp32)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from averaging.consolidate import consolidate
from averaging.partitions import Layout
from averaging.posthoc import posthoc
from averaging.snapshots import Snapshot, SnapshotStore, complete, saved_steps
from averaging.state import SavedAverages, description_file, rank_file
from bench.harness import run_cli
from polyak.errors import UserError
from polyak.recipe import SnapshotConfig
from tests.test_consolidate import link_copy, released, zero_to_fp32
from tests.test_posthoc import assert_close_weights, oracle

LAYOUT = Layout([[("w", (5, 7))], [("b", (9,))]], world_size=2)


def weights(step: int, rank: int) -> list[torch.Tensor]:
    full = {"w": torch.full((5, 7), float(step)) + torch.arange(35.0).view(5, 7), "b": torch.arange(9.0) - step}
    return LAYOUT.cut(full, rank)


def write(root, step: int, scheduled: bool = True, cfg=SnapshotConfig()) -> list[SnapshotStore]:
    stores = [SnapshotStore(root, cfg, LAYOUT, rank) for rank in range(2)]
    for rank, store in enumerate(stores):
        store.write(step, {"raw": (weights(step, rank), "fp32")}, scheduled)
    return stores


def test_a_snapshot_verifies_itself_and_is_complete_only_with_every_rank(tmp_path):
    write(tmp_path, 3)
    snapshot = Snapshot(tmp_path / "step3")
    assert snapshot.problems() == [] and [s.step for s in complete(tmp_path)] == [3]
    assert torch.equal(snapshot.partitions(1)[0], weights(3, 1)[0])

    path = tmp_path / "step3" / "rank00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(data)
    assert snapshot.problems() == ["rank00001.safetensors: its data differ from the SHA-256 in its header"]
    path.write_bytes(data[:-4])
    assert snapshot.problems() == [f"rank00001.safetensors: {len(data) - 4} bytes, its header says {len(data)}"]
    path.unlink()
    (tmp_path / "step3" / ".rank00001.tmp").write_bytes(b"half a file: a killed writer")
    assert snapshot.problems() == ["rank00001.safetensors: missing"] and complete(tmp_path) == []
    with pytest.raises(UserError, match=r"step3: damaged or incomplete: rank00001.safetensors: missing"):
        snapshot.check()
    SnapshotStore(tmp_path, SnapshotConfig(), LAYOUT, 1).remove_unfinished()
    assert sorted(p.name for p in (tmp_path / "step3").iterdir()) == ["rank00000.safetensors", "snapshot.json"]


def test_a_rank_file_of_another_snapshot_is_not_taken_for_this_one(tmp_path):
    write(tmp_path, 3)
    write(tmp_path / "other", 4)
    (tmp_path / "other" / "step4" / "rank00001.safetensors").replace(tmp_path / "step3" / "rank00001.safetensors")
    assert Snapshot(tmp_path / "step3").problems() == [
        "rank00001.safetensors: written for another snapshot ({'step': '4', 'rank': '1', 'world_size': '2'})"]


def test_retention_keeps_windows_checkpoints_and_the_scheduled_ones_asked_for(tmp_path):
    root, ckpt_dir = tmp_path / "snapshots", tmp_path / "checkpoints"
    cfg = SnapshotConfig(every=2, keep_last=2, keep_every=4)
    # A checkpoint on disk whose LAWA needs the samples of steps 5 and 6.
    (ckpt_dir / "global_step6" / "averaging").mkdir(parents=True)
    description_file(ckpt_dir / "global_step6").write_text(json.dumps({"averages": {
        "lawa": {"kind": "lawa", "steps": [5, 6]}, "ema": {"kind": "ema"}}}))
    write(root, 20)  # left by a killed run beyond the step resumed from: training writes it again
    stores = [SnapshotStore(root, cfg, LAYOUT, rank, ckpt_dir) for rank in range(2)]
    for step in range(1, 13):
        for rank, store in enumerate(stores):
            store.write(step, {"raw": (weights(step, rank), "fp32")}, scheduled=step % 2 == 0)
            store.prune({step - 1, step}, upto=step)  # a LAWA of window 2, sampling every step
    # Scheduled: the last 2 (10, 12) and every 4th (4, 8, 12); the windows of the last three prunes (9-12: another
    # rank may still read them); the checkpoint's (5, 6); and step 20, beyond the step pruned up to.
    assert saved_steps(root) == [4, 5, 6, 8, 9, 10, 11, 12, 20]
    (ckpt_dir / "global_step6").rename(ckpt_dir / ".tmp-removed-global_step6")
    for step in (13, 14, 15):
        for rank, store in enumerate(stores):
            store.write(step, {"raw": (weights(step, rank), "fp32")}, scheduled=step % 2 == 0)
            store.prune({step - 1, step}, upto=step)
    assert saved_steps(root) == [4, 8, 12, 13, 14, 15, 20]
    assert all(not any(p.name.startswith(".") for p in (root / f"step{s}").iterdir()) for s in saved_steps(root))


def test_a_checkpoint_being_written_keeps_the_samples_it_needs(tmp_path):
    root, ckpt_dir = tmp_path / "snapshots", tmp_path / "checkpoints"
    store = SnapshotStore(root, SnapshotConfig(), Layout(LAYOUT.groups, 1), 0, ckpt_dir)
    pending = ckpt_dir / ".tmp-global_step2"
    pending.mkdir(parents=True)
    for step in (1, 2):
        store.write(step, {"raw": (Layout(LAYOUT.groups, 1).cut({"w": torch.zeros(5, 7), "b": torch.zeros(9)}, 0),
                                   "fp32")}, scheduled=False)
    store.pin(pending, {1, 2})
    for step in (3, 4, 5, 6):
        store.prune({step}, upto=step)
    assert saved_steps(root) == [1, 2]  # the pinned checkpoint is still being committed
    pending.rename(ckpt_dir / "global_step2")  # committed, and it holds no averaging state of its own
    store.prune({7}, upto=7)
    assert saved_steps(root) == [1, 2]
    (ckpt_dir / "global_step2").rmdir()  # removed by retention
    store.prune({8}, upto=8)
    assert saved_steps(root) == []


def test_a_lawa_saved_by_an_earlier_version_is_refused_in_one_line(tmp_path):
    description_file(tmp_path).parent.mkdir()
    description_file(tmp_path).write_text(json.dumps({
        "world_size": 1, "step": 4, "losses": [], "layout": Layout(LAYOUT.groups, 1).to_dict(),
        "averages": {"lawa": {"kind": "lawa", "every": 1, "window": 3, "samples": 4, "head": 1, "count": 3,
                              "skipped": 0, "skip_left": 0}}}))
    rank_file(tmp_path, 0).touch()
    with pytest.raises(UserError, match=r"averaging.json: LAWA 'lawa' was saved with its samples inside the "
                                        r"checkpoint, by an earlier version; .*the version that wrote it$"):
        SavedAverages(tmp_path)


@pytest.mark.slow
def test_a_snapshot_holds_the_checkpoints_fp32_master_weights(run2, tmp_path):
    root = run2 / "snapshots"
    # Scheduled every 4 and LAWA's samples (every 2), every one referenced by a checkpoint the run kept.
    assert saved_steps(root) == [2, 4, 6, 8, 10, 12]
    snapshots = complete(root)
    assert [(s.step, s.scheduled) for s in snapshots] == [(2, False), (4, True), (6, False), (8, True), (10, False),
                                                         (12, True)]
    out = consolidate(run2 / "checkpoints", None, "raw", tmp_path / "release", snapshot=8)
    exported, oracle_weights = released(out), zero_to_fp32(run2, "global_step8")
    assert exported.keys() == oracle_weights.keys()
    assert all(torch.equal(exported[name], t) for name, t in oracle_weights.items())
    assert json.loads((out / "polyak.json").read_text())["step"] == 8

    proc = run_cli([sys.executable, "-m", "averaging.consolidate", str(run2 / "checkpoints"), "--snapshot", "7",
                    "--weights", "raw", "--out", str(tmp_path / "none")], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("(snapshots of steps 2, 4, 6, 8, 10, 12)")


@pytest.mark.slow
def test_posthoc_over_snapshots_equals_the_average_of_the_checkpoints(run2, tmp_path):
    copy = link_copy(run2, tmp_path / "run")
    target = posthoc(copy / "snapshots", "sma", last=3, release=tmp_path / "missing" / "parent" / "release")
    assert json.loads((target / "polyak.json").read_text())["posthoc"]["steps"] == [8, 10, 12]
    assert_close_weights(released(target), oracle(run2, [8, 10, 12], "sma"))


@pytest.mark.slow
def test_a_checkpoint_carries_one_partition_per_average(run2):
    """The EMA's and the power EMA's averages and the LAWA's running sum: 3 partitions a rank, whatever LAWA's
    window."""
    saved = SavedAverages(run2 / "checkpoints" / "global_step12")
    assert sorted(saved.names) == ["ema", "lawa", "p10"]
    numel = sum(saved.layout.partition_numel(g) for g in range(len(saved.layout.groups)))
    for rank in range(2):
        header = rank_file(run2 / "checkpoints" / "global_step12", rank).stat().st_size - 3 * 4 * numel
        assert 0 < header < 4096
