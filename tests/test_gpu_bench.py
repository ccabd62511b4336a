"""The GPU benchmark's CPU dry run (bench/gpu.py --cpu): the same phases on a tiny model, end to end."""

from __future__ import annotations

import json
import sys

import pytest

from bench.gpu import PHASES, SPEED_BLOCKS
from bench.gpu_report import BLOCKS_DESCRIBED, DESCRIPTIONS
from bench.harness import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_bench")
    out = tmp / "out"
    proc = run_cli([sys.executable, "-m", "bench.gpu", "--cpu", "--out", str(out), "--work", str(tmp / "work")])
    return out, proc


def test_the_correctness_checks_pass_on_cpu(dry_run):
    out, _ = dry_run
    results = json.loads((out / "gpu_bench.json").read_text())
    assert results["mode"] == "cpu"
    correctness = results["correctness"]
    assert correctness["status"] == "passed", json.dumps(correctness, indent=1)[-4000:]
    checks = correctness["checks"]
    oracle = checks["oracle"]["averages"]
    assert {name: (a["checked"], a["passed"], a["samples"]) for name, a in oracle.items()} == {
        "ema": (True, True, [5, 10, 15, 20]), "lawa": (True, True, [5, 10, 15, 20])}
    resume = checks["resume"]
    assert resume["passed"] and resume["bitwise"] and resume["bitwise_required"]
    assert resume["launcher_exit"] != 0 and resume["resumed_from"] in (10, 15)  # really killed, really resumed
    assert set(resume["checkpoints"]) == {f"global_step{resume['resumed_from']}", "global_step20"}
    logits = checks["logits"]
    assert logits["passed"] and set(logits["weights"]) == {"raw", "ema", "lawa"}
    for entry in logits["weights"].values():
        assert entry["export_equals_checkpoint"] and entry["hf_fp32"] <= 1e-4 and 0 < entry["hf_bf16"] <= 3e-2
    wait = checks["offload_wait"]  # timed, not judged: CI machines are shared
    assert not wait["judged"] and wait["timed_steps"] >= 1 and wait["waits"] is not None
    assert wait["update_s_median"] > 0 and wait["worker_jobs"] >= 1
    assert wait["offload"] == "cpu" and {a["every"] for a in wait["averages"].values()} == {5}


def test_every_speed_variant_is_measured_or_skipped_with_a_reason(dry_run):
    out, _ = dry_run
    results = json.loads((out / "gpu_bench.json").read_text())
    variants = results["speed"]["variants"]
    assert list(variants) == [p for p in PHASES if p != "correctness"]
    deepcompile = variants["ds_deepcompile"]
    assert deepcompile["status"] == "skipped" and "CUDA" in deepcompile["reason"]
    for phase in ("ds", "ds_persist", "anchor_compile"):
        assert variants[phase]["status"] == "ok", json.dumps(variants[phase], indent=1)[-3000:]
    assert list(variants["ds"]["blocks"]) == SPEED_BLOCKS["ds"]
    for phase in ("ds", "ds_persist", "anchor_compile"):
        for name, block in variants[phase]["blocks"].items():
            assert block["status"] == "ok" and block["steps"] >= 1 and block["tokens_per_s"] > 0, (phase, name)
            assert block["mfu"] is None  # no peak FLOP/s for a CPU
            if name != "plain":
                assert block["update_s_median"] > 0 and block["worker"]["jobs"] >= 0, (phase, name)
                assert "waits" in block["worker"]
    assert variants["anchor_compile"]["compile"] == {"enabled": True, "backend": "eager"}
    model = results["speed"]["model"]
    assert model["tokens_per_step"] == 4 * 64 and model["precision"] == "bf16" and model["world"] == 1
    assert set(results["goals"]) >= {"mfu_with_averaging", "averaging_share_every_1", "fastest_deepspeed_settings"}
    assert results["data"]["vocab_size"] == 512 and results["env"]["deepspeed"]


def test_the_markdown_and_the_log_are_written(dry_run):
    out, proc = dry_run
    md = (out / "gpu_bench.md").read_text()
    for heading in ("## Correctness: passed", "## Speed", "## Goals"):
        assert heading in md
    for phase in ("ds", "ds_persist", "anchor_compile", "ds_deepcompile"):
        assert DESCRIPTIONS[phase] in md
    for block in SPEED_BLOCKS["ds"]:
        assert BLOCKS_DESCRIBED[block] in md
    assert "skipped: DeepCompile needs CUDA" in md
    assert md in proc.stdout  # printed last, where the device tool's output tail shows it
    log = (out / "gpu_bench.log").read_text()
    assert "correctness: passed" in log and "===== correctness_a.log" in log
