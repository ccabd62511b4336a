"""End to end through `deepspeed launch/pretrain.py` on CPU ranks: training, averaging, checkpoints, resume."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch

from bench.harness import (
    ROOT,
    SMALL,
    assert_identical,
    computed,
    free_port,
    full_average,
    pretrain,
    rank_states,
    read_metrics,
    trained,
)
from launch import dist
from polyak.errors import UserError
from polyak.recipe import load_recipe
from tests.oracles import offline_averages

pytestmark = pytest.mark.slow

def test_two_ranks_train_and_log(run2):
    records = read_metrics(run2)
    assert [r["step"] for r in records] == list(range(1, 13))
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 3 and val[0] > val[1] > val[2]
    for r in records:
        assert r["mfu"] is None and r["tokens_per_s"] > 0 and r["grad_norm"] > 0
        assert ("val_loss_ema" in r) == ("val_loss_lawa" in r) == ("val_loss" in r)
    assert records[-1]["lr"] == pytest.approx(0.01 * 0.1)  # cosine down to final_lr
    assert records[-1]["tokens"] == 12 * 2 * 4 * 64
    ckpt = run2 / "checkpoints"
    assert (ckpt / "latest").read_text() == "global_step12"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("global_step")) == sorted(
        f"global_step{s}" for s in range(1, 13))
    assert load_recipe(run2 / "recipe.yaml").run.dir == str(run2)
    # Weight decay on the matrices, none on the norms: two optimizer groups survive ZeRO-3's partitioning.
    for state in rank_states(ckpt / "global_step12"):
        groups = state["optimizer_state_dict"]["param_groups"]
        assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_three_ranks_lower_val_loss(run3):
    val = [r["val_loss"] for r in read_metrics(run3) if "val_loss" in r]
    assert val[0] > val[1] > val[2]


@pytest.mark.parametrize("run", ["run2", "run3"])
def test_online_averages_equal_offline_averages_of_the_full_weights(run, request):
    """EMA, LAWA and the power EMA kept on local partitions equal the same averages computed from gathered full
    weights (tests/oracles.py)."""
    run_dir = request.getfixturevalue(run)
    final = run_dir / "checkpoints" / "global_step12"
    for name, oracle in offline_averages(run_dir).items():
        online = full_average(final, name)
        assert online.keys() == oracle.keys()
        for k in oracle:
            torch.testing.assert_close(online[k].double(), oracle[k], rtol=1e-6, atol=1e-7, msg=f"{name} {k}")


def test_resume_is_bitwise_identical(run2, data_dir, tmp_path):
    """Stopped after step 6 and relaunched: the same losses, weights, optimizer state and averages."""
    overrides = [f"data.dir={data_dir}", f"run.dir={tmp_path}", "checkpoint.every=1"]
    pretrain(2, overrides, "--stop-after", "6")
    assert (tmp_path / "checkpoints" / "latest").read_text() == "global_step6"
    proc = pretrain(2, overrides)
    assert "resumed from" in proc.stderr
    assert computed(read_metrics(tmp_path)) == computed(read_metrics(run2))
    a, b = run2 / "checkpoints" / "global_step12", tmp_path / "checkpoints" / "global_step12"
    assert_identical(rank_states(a), rank_states(b))
    for name in ("ema", "lawa", "p10"):
        assert_identical(full_average(a, name), full_average(b, name))

    # The same run directory with another model is refused, and nothing in it changes.
    before = (tmp_path / "recipe.yaml").read_text()
    proc = pretrain(2, overrides + ["model.dim=128"], check=False)
    assert proc.returncode != 0
    assert f"{tmp_path} holds checkpoints of another model (model.dim: 64 there, 128 now)" in proc.stderr
    assert (tmp_path / "recipe.yaml").read_text() == before


def test_two_node_launchers_on_loopback_form_one_world(run2, data_dir, tmp_path):
    """DeepSpeed's per-node launcher, node_rank 0 and 1 on one machine: the same run as 2 local ranks."""
    world = base64.urlsafe_b64encode(json.dumps({"node0": [0], "node1": [0]}).encode()).decode()
    port = free_port()
    # The same threads per rank as two ranks sharing this machine, so the arithmetic is the same too.
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    sets = sum((["--set", s] for s in SMALL + [f"data.dir={data_dir}", f"run.dir={tmp_path}",
                                               "checkpoint.every=1"]), [])
    nodes = [subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={world}",
                               f"--node_rank={n}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "launch/pretrain.py", "--recipe", "recipes/tiny_cpu.yaml", *sets],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": threads}, start_new_session=True)
             for n in (0, 1)]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in nodes]
    finally:  # a hung node launcher and its rank would otherwise hold the cores for the tests after this one
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert computed(read_metrics(tmp_path)) == computed(read_metrics(run2))


def test_two_runs_given_the_same_port_on_one_node_both_train_as_alone(run2, data_dir, tmp_path):
    """The README's plain command twice on one node, the same --master_port (as two launches on the default 29500):
    the second starts while the first trains, and each trains exactly as the uninterrupted run2."""
    port, first, second = free_port(), tmp_path / "first", tmp_path / "second"
    with concurrent.futures.ThreadPoolExecutor() as pool:
        running = pool.submit(pretrain, 2, trained(data_dir, first), port=port)
        while not (first / "metrics.jsonl").exists() and not running.done():
            time.sleep(0.2)
        pretrain(2, trained(data_dir, second), port=port)
        running.result()
    for run in (first, second):
        assert computed(read_metrics(run)) == computed(read_metrics(run2)), run.name


def test_a_taken_port_across_nodes_is_named_and_the_job_there_untouched(monkeypatch):
    """Across nodes the ranks meet at MASTER_ADDR:MASTER_PORT: where another job's rank 0 listens, a rank 0 cannot,
    and any other rank finds its slot claimed; each stops with one line, and writes nothing to the other job's store."""
    port = free_port()
    theirs = torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    theirs.set("polyak/rank1", "their rank 1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("CROSS_SIZE", "2")
    for rank, why in ((0, "is taken, by another job or program"), (1, "is another job's rendezvous")):
        with pytest.raises(UserError, match=f"^127.0.0.1:{port} {why}.*: pass a free one, e.g. deepspeed "
                                            r"--master_port \d+ \.\.\. \(or set MASTER_PORT\)$"):
            dist._rendezvous(rank, 2, timedelta(seconds=10))
    assert theirs.get("polyak/rank1") == b"their rank 1" and theirs.num_keys() == 1
