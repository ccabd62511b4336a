"""The GPU run, prepared as one script: is the bf16 path right on the device, and how fast is the 1b recipe's model?

    bash bench/gpu.sh [OPTIONS]                  # on the GPU machine: installs the carried wheels (.whl), then this
    python -m bench.gpu --out DIR [--budget S] [--only P,Q] [--skip P,Q] [--work DIR]
    python -m bench.gpu --cpu --out DIR          # the same on CPU ranks, a tiny model (tests/test_gpu_bench.py)

Everything runs on the standard-library corpus (`data.source: stdlib`, a 4096-token BPE; no hub access needed),
prepared once. Phases, in this order; each starts only if the time budget (--budget, from this script's start) still
holds what it needs, else it is recorded as skipped, out of time; inside a phase, every subprocess gets the time
left, and timed loops stop at the phase's deadline, keeping what they measured:

  correctness     the real trainer (`deepspeed --num_gpus 1 launch/pretrain.py`), `125m` in bf16, ZeRO-3, an EMA
                  and a LAWA offloaded to the host (`averaging.offload: cpu`), 20 steps, a checkpoint every 5:
                  - oracle: the online averages of the last checkpoint equal the same averages computed offline from
                    DeepSpeed's zero_to_fp32 of each checkpoint's fp32 master weights (and the initial weights θ0,
                    taken from an engine built the same way before any step);
                  - resume: a second run SIGKILLed after its step-10 checkpoint (bench/faults.py) and run again to
                    the end: its losses, fp32 weights, Adam moments and averages against the uninterrupted run's,
                    bitwise, else the largest differences, before and after the resume point;
                  - logits: the exports (averaging.consolidate) of raw, EMA and LAWA in transformers' LlamaForCausalLM
                    against our model on held-out tokens, in fp32 and in bf16;
                  - offload_wait: on an engine built the same way, Averager.update on the training thread (median,
                    max) against the step, and how often it waited for the host worker, with the run's averaging
                    (every 5 steps; every step at 1B is measured by ds); judged on the GPU only.
  ds              the `1b` recipe's model (seq 2048, micro-batch 8, bf16) in the DeepSpeed ZeRO-3 engine
                  (launch/engine.py) on one GPU, timed in blocks on one engine: no averaging; EMA + LAWA every step
                  with offload cpu; EMA alone every step, offload cpu; the averaging of recipes/1b_lawa.yaml (every
                  10); EMA + LAWA every step and EMA alone every step, offload none.
  anchor_compile  the same model as a plain PyTorch loop under torch.compile (fp32 parameters, bf16 autocast, fused
                  AdamW): the reference the others are compared to.
  ds_persist      ds with zero.param_persistence_threshold 1e12 (every parameter stays resident): no averaging,
                  1b_lawa's averaging, EMA every step offloaded and not.
  ds_deepcompile  ds with DeepSpeed's DeepCompile (zero.compile + zero.deepcompile; its native op is built just in
                  time and timed apart): no averaging, 1b_lawa's averaging.
  on request (--only): anchor_eager (the plain loop without compile), ds_compile (engine.compile() without DeepCompile)

Into --out: gpu_bench.json (rewritten after every phase), gpu_bench.md (its tables) and gpu_bench.log (progress and
the end of every subprocess's output). Work files go to --work (default /tmp/polyak-gpu), which is emptied first.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
import yaml

from bench.faults import Kill, interrupt, last_records
from bench.gpu_report import goals, render
from bench.harness import DEEPSPEED, ROOT, bits, free_port, full_average, rank_states, run_cli
from polyak import checkpoints
from polyak.recipe import load_recipe

TINY = "recipes/tiny_cpu.yaml"  # the correctness run's base recipe
ORACLE_TOLERANCE = 1e-6  # the online averages against the offline oracle, as tests/test_gpu_paths.py
SPEED = "recipes/1b.yaml"  # the speed phases' model, batch and ZeRO settings
PHASES = ["correctness", "ds", "anchor_compile", "ds_persist", "ds_deepcompile"]
ON_REQUEST = ["anchor_eager", "ds_compile"]
PHASE_SETS = {
    "ds": [], "anchor_compile": [], "anchor_eager": [],
    "ds_persist": ["zero.param_persistence_threshold=1000000000000"],
    "ds_deepcompile": ["zero.compile=true", "zero.deepcompile=true"],
    "ds_compile": ["zero.compile=true"],
}
EMA_EVERY_1 = ["averaging.ema.kind=ema", "averaging.ema.beta=0.99", "averaging.ema.every=1"]
LAWA_EVERY_1 = ["averaging.lawa.kind=lawa", "averaging.lawa.window=3", "averaging.lawa.every=1"]


def _dotted(prefix: str, section: dict) -> list[str]:
    """A recipe section as --set items."""
    items = []
    for key, value in section.items():
        if isinstance(value, dict):
            items += _dotted(f"{prefix}{key}.", value)
        else:
            items.append(f"{prefix}{key}={json.dumps(value)}")
    return items


def block_sets(name: str) -> list[str]:
    if name == "recipe_1b_lawa":
        return _dotted("averaging.", yaml.safe_load((ROOT / "recipes/1b_lawa.yaml").read_text())["averaging"])
    offload = [f"averaging.offload={name.rsplit('_', 1)[1]}"] if name != "plain" else []
    return {"plain": [], "ema_lawa_cpu": EMA_EVERY_1 + LAWA_EVERY_1, "ema_lawa_none": EMA_EVERY_1 + LAWA_EVERY_1,
            "ema_cpu": EMA_EVERY_1, "ema_none": EMA_EVERY_1}[name] + offload


@dataclass
class Mode:
    """What differs between the GPU run and its CPU dry run."""

    name: str
    budget: float
    data: list[str]  # the data section (content; data.dir and data.seq_len are set per phase)
    correctness: list[str]  # on TINY
    speed: list[str]  # on SPEED
    steps: dict[str, tuple[int, int, float]]  # per block: warm-up steps, timed steps, at most seconds
    blocks: dict[str, list[str]]  # per speed phase
    need: dict[str, float]  # seconds a phase needs at least to be started
    cap: dict[str, float]  # seconds a phase may take at most
    kill_delay: float  # after the step-10 checkpoint, before the SIGKILL
    anchor_backend: str
    bf16_tolerance: float  # relative L2 error of bf16 logits against our fp32 model's
    gpu_only: dict[str, str] = field(default_factory=dict)  # phases skipped in this mode, with the reason


DATA_GPU = ["data.source=stdlib", "data.name=null", "data.subset=null", "data.tokenizer=bpe",
            "data.bpe_vocab_size=4096", "data.val_fraction=0.05", "data.max_tokens=3000000", "data.num_proc=8"]
COMMON = ["train.precision=bf16", "log.progress=false", "log.wandb=false"]
CORRECTNESS = ["train.steps=20", "train.warmup=5", "checkpoint.every=5", "eval.every=10", "eval.batches=2",
               "averaging.offload=cpu", "averaging.ema.beta=0.8", "averaging.ema.every=5",
               "averaging.lawa.window=3", "averaging.lawa.every=5"]
SPEED_BLOCKS = {
    "ds": ["plain", "ema_lawa_cpu", "ema_cpu", "recipe_1b_lawa", "ema_lawa_none", "ema_none"],
    "ds_persist": ["plain", "recipe_1b_lawa", "ema_cpu", "ema_none"],
    "ds_deepcompile": ["plain", "recipe_1b_lawa"],
    "ds_compile": ["plain"], "anchor_compile": ["plain"], "anchor_eager": ["plain"],
}

GPU = Mode(
    name="gpu", budget=480, data=DATA_GPU,
    correctness=COMMON + CORRECTNESS + ["model.size=125m", "data.seq_len=512", "train.micro_batch=8",
                                        "train.lr=1e-3"],
    speed=COMMON + ["data.seq_len=2048", "train.micro_batch=8", "train.steps=100000"],
    # LAWA every step at 1B writes a 4 GB snapshot each step (seconds): few timed steps show it.
    steps={"plain": (3, 10, 30), "recipe_1b_lawa": (2, 20, 40), "every_1": (1, 4, 25), "deepcompile": (7, 10, 30),
           "offload": (3, 20, 30)},
    blocks=SPEED_BLOCKS,
    need={"correctness": 150, "ds": 90, "anchor_compile": 150, "ds_persist": 60, "ds_deepcompile": 200,
          "anchor_eager": 40, "ds_compile": 150},
    cap={"correctness": 240, "ds": 150, "anchor_compile": 220, "ds_persist": 110, "ds_deepcompile": 330,
         "anchor_eager": 70, "ds_compile": 220},
    kill_delay=0.1, anchor_backend="inductor", bf16_tolerance=3e-2)

SMALL_MODEL = ["model.size=null", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
               "model.vocab_size=null"]
CPU = Mode(
    name="cpu", budget=900,
    data=[item.replace("4096", "512").replace("3000000", "300000").replace("num_proc=8", "num_proc=1")
          for item in DATA_GPU],
    correctness=COMMON + CORRECTNESS + SMALL_MODEL + ["data.seq_len=64", "train.micro_batch=4", "train.lr=0.01"],
    speed=COMMON + SMALL_MODEL + ["data.seq_len=64", "train.micro_batch=4", "train.steps=100000"],
    steps={"plain": (2, 3, 30), "recipe_1b_lawa": (1, 10, 30), "every_1": (1, 3, 30), "deepcompile": (1, 3, 30),
           "offload": (1, 10, 30)},
    blocks={"ds": ["plain", "ema_lawa_cpu", "ema_cpu", "recipe_1b_lawa", "ema_lawa_none", "ema_none"],
            "ds_persist": ["plain", "ema_cpu"], "ds_deepcompile": ["plain"], "ds_compile": ["plain"],
            "anchor_compile": ["plain"], "anchor_eager": ["plain"]},
    need=dict.fromkeys(PHASES + ON_REQUEST, 20), cap=dict.fromkeys(PHASES + ON_REQUEST, 300),
    kill_delay=0.1, anchor_backend="eager", bf16_tolerance=3e-2,
    gpu_only={"ds_deepcompile": "DeepCompile needs CUDA (deepspeed.compile.util.is_deepcompile_supported: torch >= "
                                "2.6 on a cuda accelerator)",
              "ds_compile": "GPU only in this script (inductor's compile time on 2 cores)"})


def block_spec(mode: Mode, phase: str, name: str) -> dict:
    kind = ("deepcompile" if phase == "ds_deepcompile" and name == "plain" else
            name if name in ("plain", "recipe_1b_lawa", "offload") else "every_1")
    warmup, steps, max_s = mode.steps[kind]
    return {"name": name, "sets": block_sets(name) if name in SPEED_BLOCKS["ds"] else [], "averaging": name != "plain",
            "warmup": warmup, "steps": steps, "max_s": max_s}


class Run:
    """The run's state: the clock, the results (saved after every phase), the log, subprocesses."""

    def __init__(self, mode: Mode, out: Path, work: Path, budget: float, argv: list[str]):
        self.mode, self.out, self.work, self.budget = mode, out, work, budget
        self.start = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        (work / "logs").mkdir(parents=True)
        self.logfile = open(out / "gpu_bench.log", "w")  # noqa: SIM115 - written all run long, closed by close()
        self.data_dir = work / "data"
        self.results = {"schema": 1, "mode": mode.name, "command": " ".join(argv),
                        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "budget_s": budget, "elapsed_s": 0.0, "phases_run": [], "env": {}, "data": {},
                        "correctness": {"status": "pending"}, "speed": {"model": None, "variants": {}},
                        "goals": {}}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.start:6.0f} s] {message}"
        print(line, flush=True)
        self.logfile.write(line + "\n")
        self.logfile.flush()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.results["goals"] = goals(self.results)
        for name, text in (("gpu_bench.json", json.dumps(self.results, indent=1, default=str)),
                           ("gpu_bench.md", render(self.results))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out / name)

    def env(self, extra: dict | None = None) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(extra or {})}
        if self.mode.name == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run stays on CPU ranks even on a machine with a GPU
            # One thread a process: its runs go side by side, and a tiny model gains nothing from more.
            env["OMP_NUM_THREADS"] = "1"
        return env

    def trainer(self, sets: list[str], run_dir: Path) -> list[str]:
        """The trainer as a user starts it, on one device."""
        cmd = [str(DEEPSPEED), "--num_gpus", "1", "--master_port", str(free_port()), "launch/pretrain.py",
               "--recipe", TINY]
        for item in sets + [f"run.dir={run_dir}"]:
            cmd += ["--set", item]
        return cmd

    def worker(self, name: str, spec: dict, deadline: float, extra_env: dict | None = None) -> dict:
        """bench/gpu_worker.py in a world of one rank, stopped (its process group killed) a grace period after the
        deadline; its result, with its exit code, wall time and, if it failed, the end of its output."""
        spec = {**spec, "deadline": time.time() + (deadline - time.monotonic())}
        spec_file, result_file = self.work / f"{name}.spec.json", self.work / f"{name}.result.json"
        spec_file.write_text(json.dumps(spec, indent=1))
        env = self.env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                        "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                        **(extra_env or {})})
        log_path = self.work / "logs" / f"{name}.log"
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "bench.gpu_worker", str(spec_file), str(result_file)],
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                proc.wait(timeout=max(5.0, deadline - time.monotonic()) + 30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        result = json.loads(result_file.read_text()) if result_file.is_file() else {"status": "error", "blocks": {}}
        result["returncode"], result["wall_s"] = proc.returncode, round(time.monotonic() - t0, 1)
        if proc.returncode != 0:
            if result.get("status") == "running":
                result["status"] = "timed out" if proc.returncode == -9 else "error"
            result["log_tail"] = tail(log_path, 60)
            self.log(f"{name}: exit code {proc.returncode}; the end of its output:\n{result['log_tail']}")
        return result

    def close(self) -> None:
        self.log("the end of every subprocess's output follows")
        for path in sorted((self.work / "logs").glob("*.log")):
            self.logfile.write(f"\n===== {path.name} (last 80 lines) =====\n{tail(path, 80)}\n")
        self.logfile.close()


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


# -- the phases ------------------------------------------------------------------------------------------------------

def environment(run: Run) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("deepspeed", "transformers", "tokenizers", "datasets", "pyarrow", "fsspec", "pydantic",
                    "typing_extensions", "huggingface_hub", "safetensors", "numpy", "triton", "hjson"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    try:
        import psutil

        env["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    env["work_disk_free_gib"] = round(shutil.disk_usage(run.work).free / 2**30, 1)
    env["git_commit"] = _quiet(["git", "rev-parse", "HEAD"])
    if run.mode.name == "gpu":
        query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
        env["nvidia_smi"] = _quiet(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"])
        probe = run.worker("probe", {"kind": "probe"}, time.monotonic() + 60)
        env["probe"] = {k: v for k, v in probe.items() if k not in ("blocks", "notes")}
    return env


def _quiet(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30,
                              check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def prepare_data(run: Run) -> dict:
    t0 = time.monotonic()
    run_cli([sys.executable, "-m", "data.prepare", "--recipe", TINY,
             *(a for item in run.mode.data + [f"data.dir={run.data_dir}"] for a in ("--set", item))],
            timeout=max(60, int(run.left())), env=run.env())
    meta = json.loads((run.data_dir / "meta.json").read_text())
    return {"dir": str(run.data_dir), "prepare_s": round(time.monotonic() - t0, 1), "sets": run.mode.data,
            **{k: meta[k] for k in ("vocab_size", "train_tokens", "val_tokens", "source")}}


def correctness(run: Run, deadline: float) -> dict:
    work = run.work / "correctness"
    work.mkdir()
    sets = run.mode.correctness + run.mode.data + [f"data.dir={run.data_dir}"]
    recipe = load_recipe(ROOT / TINY, sets)
    out = {"status": "running", "recipe": TINY, "sets": sets, "checks": {}}
    checks = out["checks"]

    def left() -> int:  # seconds a subprocess may still take
        return max(30, int(deadline - time.monotonic()))

    # The initial weights θ0 for the oracle, then the offload timing on the same engine: steps without averaging,
    # then steps with the run's own averaging (an EMA and a LAWA every 5 steps, offloaded). Every step at 1B: ds.
    theta0 = work / "theta0.safetensors"
    spec = {"kind": "ds", "recipe": TINY, "sets": sets + [f"run.dir={work / 'timing'}"], "theta0": str(theta0),
            "work": str(work / "timing"),
            "blocks": [block_spec(run.mode, "ds", "plain"), block_spec(run.mode, "ds", "offload")]}
    timing = run.worker("correctness_theta0", spec, deadline)
    checks["offload_wait"] = offload_check(timing)
    run.log(f"correctness: θ0 and offload timing: {timing['status']} ({timing['wall_s']} s)")

    # The reference run and the run to be killed, side by side; then the killed one resumed beside the checks.
    a_dir, b_dir = work / "a", work / "b"
    cmd_a = run.trainer(sets, a_dir)
    kill = Kill(step=11, moment="step", target="rank 0", delay=run.mode.kill_delay)
    with ThreadPoolExecutor(1) as pool:
        ref = pool.submit(run_cli, cmd_a, False, left(), run.env())
        try:
            killed, phase = interrupt(b_dir, run.data_dir, kill, timeout=left(), cmd=run.trainer(sets, b_dir))
            _keep_log(run, "correctness_b_killed", killed.stdout)
        except RuntimeError as e:  # the run ended or failed before the moment of the kill
            killed, phase = None, str(e)
        ref = ref.result()
    _keep_log(run, "correctness_a", ref.stdout + ref.stderr)
    if ref.returncode != 0:
        out["status"], out["error"] = "error", f"the reference run exited {ref.returncode}"
        out["log_tail"] = "\n".join((ref.stdout + ref.stderr).splitlines()[-60:])
        return out
    latest_at_kill = checkpoints.latest_step(b_dir / "checkpoints")
    run.log(f"correctness: reference run done; run b killed ({phase}; latest checkpoint then: {latest_at_kill})")
    with ThreadPoolExecutor(1) as pool:
        resumed = pool.submit(run_cli, run.trainer(sets, b_dir), False, left(), run.env())
        # zero_to_fp32 and transformers print progress: into a log, not onto the run's output.
        with open(run.work / "logs" / "correctness_checks.log", "w") as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            checks["oracle"] = guarded(oracle_check, a_dir, recipe, theta0)
            checks["logits"] = guarded(logits_check, a_dir, recipe, run, work / "exports")
        resumed = resumed.result()
    _keep_log(run, "correctness_b_resumed", resumed.stdout + resumed.stderr)
    checks["resume"] = guarded(resume_check, a_dir, b_dir, killed, phase, latest_at_kill, resumed, kill,
                               run.mode.name == "cpu")
    # The timing is judged on the GPU only: the CPU dry run shares its cores with other jobs.
    judged = ["oracle", "resume", "logits"] + (["offload_wait"] if run.mode.name == "gpu" else [])
    checks["offload_wait"]["judged"] = "offload_wait" in judged
    out["status"] = "passed" if all(checks[name].get("passed") for name in judged) else "failed"
    return out


def _keep_log(run: Run, name: str, text: str) -> None:
    (run.work / "logs" / f"{name}.log").write_text(text)


def guarded(check, *args) -> dict:
    """A check's result; an exception fails it with its message rather than stopping the run."""
    try:
        return check(*args)
    except Exception as e:  # noqa: BLE001 - every check must report
        import traceback

        return {"passed": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}


def offload_check(timing: dict) -> dict:
    blocks = timing.get("blocks", {})
    block, plain = blocks.get("offload", {}), blocks.get("plain", {})
    if block.get("status") != "ok":
        return {"passed": False, "error": timing.get("error") or block.get("reason") or "no timed steps",
                "worker_status": timing.get("status")}
    worker = block.get("worker", {})
    out = {"passed": worker.get("waits", 1) == 0, "averages": block.get("averages"), "offload": block.get("offload"),
           "timed_steps": block["steps"], "step_s_median": block["step_s_median"],
           "update_s_median": block["update_s_median"], "update_s_max": block["update_s_max"],
           "update_share": block["update_share"], "waits": worker.get("waits"), "wait_s": worker.get("wait_s"),
           "worker_jobs": worker.get("jobs"), "copy_s_per_job": worker.get("copy_s_per_job"),
           "host_work_s_per_job": worker.get("work_s_per_job")}
    if plain.get("status") == "ok":
        out["plain_step_s_median"] = plain["step_s_median"]
        out["step_overhead"] = block["step_s_median"] / plain["step_s_median"] - 1
    return out


def oracle_check(run_dir: Path, recipe, theta0_path: Path) -> dict:
    """The online averages of the last checkpoint against their definitions applied offline, in float64, to
    DeepSpeed's zero_to_fp32 of every checkpoint that holds a sample, from θ0 (tests/oracles.py does the same with
    a checkpoint every step; θ0 here comes from an engine built as the trainer builds it, on the same device: on a
    GPU zero.Init draws the initial weights there, so a CPU-built model would not give them). The error of a tensor
    is relative to its largest element; the tests' bound, 1e-6, is fp32 rounding."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    ckpt = run_dir / "checkpoints"
    saved = checkpoints.saved_steps(ckpt)
    last = recipe.train.steps
    theta0 = {k: v.double() for k, v in load_file(theta0_path).items()}
    cfgs = recipe.averaging.averages
    samples = {name: [s for s in range(1, last + 1) if s % c.every == 0] for name, c in cfgs.items()}
    out = {"passed": True, "checkpoints": saved, "tolerance": ORACLE_TOLERANCE, "averages": {}}
    fulls = {}
    for step in sorted({s for name in samples for s in samples[name]}):
        if step in saved:
            fulls[step] = {k: v.double() for k, v in get_fp32_state_dict_from_zero_checkpoint(
                str(ckpt), tag=checkpoints.tag_of(step)).items()}
    final = ckpt / checkpoints.tag_of(last)
    for name, cfg in cfgs.items():
        missing = [s for s in samples[name] if s not in fulls]
        if missing or cfg.kind not in ("ema", "lawa"):
            out["averages"][name] = {"checked": False, "why": f"samples at steps without a checkpoint: {missing}"
                                     if missing else f"no oracle here for kind {cfg.kind}"}
            continue
        if cfg.kind == "ema":
            oracle = {k: v.clone() for k, v in theta0.items()}
            for s in samples[name]:
                oracle = {k: cfg.beta * oracle[k] + (1 - cfg.beta) * fulls[s][k] for k in oracle}
        else:
            window = samples[name][-cfg.window:]
            oracle = {k: sum(fulls[s][k] for s in window) / len(window) for k in theta0}
        online = full_average(final, name)
        if online.keys() != oracle.keys():
            out["averages"][name] = {"checked": True, "passed": False, "error": "different parameter names"}
            out["passed"] = False
            continue
        error = max(((online[k].double() - oracle[k]).abs().max() / oracle[k].abs().max().clamp_min(1e-30)).item()
                    for k in oracle)
        close = error < ORACLE_TOLERANCE
        out["averages"][name] = {"checked": True, "passed": close, "kind": cfg.kind, "samples": samples[name],
                                 "relative_error": error}
        out["passed"] &= close
    if not any(a.get("checked") for a in out["averages"].values()):
        out["passed"] = False
    return out


def logits_check(run_dir: Path, recipe, run: Run, work: Path) -> dict:
    """Every export of the last checkpoint (raw, each average) in transformers against our model, on held-out
    tokens, on the device: fp32 against fp32 (tight) and bf16 against our fp32 (bf16 tolerance)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from averaging.consolidate import consolidate
    from averaging.release import Run as ReleaseRun
    from data.loader import TokenWindows
    from model.llama import Llama

    device = torch.device("cuda", 0) if run.mode.name == "gpu" and torch.cuda.is_available() else torch.device("cpu")
    ckpt = run_dir / "checkpoints"
    final = ckpt / checkpoints.tag_of(recipe.train.steps)
    args = ReleaseRun.of(ckpt).args
    windows = TokenWindows(run.data_dir, "val", recipe.data.seq_len)
    tokens = torch.stack([windows[i][:-1] for i in range(min(2, len(windows)))]).to(device)
    tol = run.mode.bf16_tolerance
    out = {"passed": True, "device": str(device), "tokens": list(tokens.shape),
           "tolerance": {"fp32": 1e-4, "bf16": tol}, "metric": "||logits - ours_fp32|| / ||ours_fp32||",
           "weights": {}}
    for name in ["raw", *recipe.averaging.averages]:
        export = consolidate(ckpt, None, name, work / name)
        state = {}
        for f in sorted(export.glob("model*.safetensors")):
            state.update(load_file(f))
        expected = (get_fp32_state_dict_from_zero_checkpoint(str(ckpt)) if name == "raw"
                    else full_average(final, name))
        same = state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
        ours = Llama(args)
        weights = dict(state)
        if args.tie_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        ours.load_state_dict(weights)
        with torch.no_grad():
            ours = ours.to(device)
            reference = ours(tokens).float()
            ours_bf16 = ours.to(torch.bfloat16)(tokens).float()
            del ours
            hf = {}
            for dtype in (torch.float32, torch.bfloat16):
                model = LlamaForCausalLM.from_pretrained(export, dtype=dtype).to(device)
                hf[dtype] = model(tokens).logits.float()
                del model

        entry = {"export_equals_checkpoint": same, "hf_fp32": _relative(hf[torch.float32], reference),
                 "hf_bf16": _relative(hf[torch.bfloat16], reference), "ours_bf16": _relative(ours_bf16, reference),
                 "hf_bf16_vs_ours_bf16": _relative(hf[torch.bfloat16], ours_bf16),
                 "top1_agreement_hf_bf16": (hf[torch.bfloat16].argmax(-1) == reference.argmax(-1)).float().mean()
                 .item()}
        entry["passed"] = same and entry["hf_fp32"] <= 1e-4 and entry["hf_bf16"] <= tol
        out["weights"][name] = entry
        out["passed"] &= entry["passed"]
        shutil.rmtree(export)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _relative(x: torch.Tensor, reference: torch.Tensor) -> float:
    """‖x − reference‖ / ‖reference‖ (METHOD.md's measure for a comparison against a reference)."""
    return ((x - reference).norm() / reference.norm()).item()


def differences(a, b, path: str = "") -> list[tuple[str, float]]:
    """Where two nested states (tensors in dicts, lists, objects) differ, with the largest absolute difference of
    each differing tensor (inf where it is not a number: a shape, a key, a non-float value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape \
                or a.dtype != b.dtype:
            return [(path, math.inf)]
        same = bits(a) == bits(b)  # by their bits, as the tests compare: ZeRO-3's padding can hold the same NaN
        if bool(same.all()):
            return []
        if a.is_floating_point():
            diff = (a.double() - b.double()).abs().masked_fill(same, 0).nan_to_num(nan=math.inf)
            return [(path, diff.max().item())]
        return [(path, math.inf)]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [(path, math.inf)]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [(path, math.inf)]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}/{i}")]
    if hasattr(a, "__dict__") and hasattr(b, "__dict__") and type(a) is type(b):
        return differences(vars(a), vars(b), path)
    if a == b:
        return []
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return [(path, abs(a - b))]
    return [(path, math.inf)]


def summarize(diffs: list[tuple[str, float]]) -> dict:
    return {"identical": not diffs, "differing": len(diffs),
            "max_abs_diff": max((d for _, d in diffs), default=0.0), "first": diffs[0][0] if diffs else None}


def resume_check(a_dir: Path, b_dir: Path, killed, phase: str, latest_at_kill, resumed, kill: Kill,
                 bitwise_required: bool) -> dict:
    """The killed-and-resumed run against the uninterrupted one: metrics, DeepSpeed's optimizer states (fp32
    master weights, Adam's moments) and every average, at the last step and at the checkpoint resumed from."""
    text = resumed.stdout + resumed.stderr
    m = re.search(r"resumed from \S*/global_step(\d+)", text)
    resumed_from = int(m.group(1)) if m else None
    out = {"kill": str(kill), "killed_while": phase, "launcher_exit": killed.returncode if killed else None,
           "latest_at_kill": latest_at_kill, "resumed_from": resumed_from, "resume_exit": resumed.returncode}
    last = (a_dir / "checkpoints" / "latest").read_text().strip()
    if killed is None or killed.returncode == 0 or resumed_from is None or resumed.returncode != 0 \
            or (b_dir / "checkpoints" / "latest").read_text().strip() != last:
        out.update(passed=False, error="the run was not interrupted and resumed as planned"
                   + ("" if resumed.returncode == 0 else f"; the resumed run exited {resumed.returncode}"))
        out["log_tail"] = "\n".join(text.splitlines()[-40:])
        return out
    rec_a, rec_b = last_records(a_dir), last_records(b_dir)
    out["metrics_identical"] = rec_a == rec_b
    for when, steps in (("before_resume", [s for s in rec_a if s <= resumed_from]),
                        ("after_resume", [s for s in rec_a if s > resumed_from])):
        out[f"max_loss_diff_{when}"] = max((abs(rec_a[s]["loss"] - rec_b[s]["loss"]) for s in steps if s in rec_b),
                                           default=None)
    val = [k for k in rec_a[max(rec_a)] if k.startswith("val_loss")]
    out["max_val_loss_diff"] = max((abs(rec_a[s][k] - rec_b[s][k]) for s in rec_a if s in rec_b for k in val
                                    if k in rec_a[s] and k in rec_b[s]), default=None)
    compared = {}
    for tag in (checkpoints.tag_of(resumed_from), last):
        a, b = a_dir / "checkpoints" / tag, b_dir / "checkpoints" / tag
        compared[tag] = {"optimizer_states": summarize(differences(rank_states(a), rank_states(b)))}
        for name in json.loads((a / "averaging" / "averaging.json").read_text())["averages"]:
            compared[tag][name] = summarize(differences(full_average(a, name), full_average(b, name)))
    out["checkpoints"] = compared
    bitwise = out["metrics_identical"] and all(c["identical"] for tag in compared.values() for c in tag.values())
    out["bitwise"] = bitwise
    before = compared[checkpoints.tag_of(resumed_from)]
    if not bitwise:
        differs_before = (out["max_loss_diff_before_resume"] or 0) > 0 or not all(
            c["identical"] for c in before.values())
        out["note"] = ("the two runs already differ before the resume point, where neither was interrupted: "
                       "nondeterministic kernels, not the resume" if differs_before else
                       "identical up to the resume point, different after it: the resume is not exact")
    out["passed"] = bitwise if bitwise_required else bitwise or not out.get("note", "").startswith("identical")
    out["bitwise_required"] = bitwise_required
    return out


def speed(run: Run, phase: str, deadline: float) -> dict:
    """One speed phase in its own process: its blocks, each a row of the table."""
    work = run.work / phase
    sets = run.mode.speed + PHASE_SETS[phase] + run.mode.data + [f"data.dir={run.data_dir}", f"run.dir={work}"]
    blocks = [block_spec(run.mode, phase, name) for name in run.mode.blocks[phase]]
    spec = {"kind": "anchor" if phase.startswith("anchor") else "ds", "recipe": SPEED, "sets": sets,
            "work": str(work), "blocks": blocks, "compile": phase == "anchor_compile",
            "backend": run.mode.anchor_backend}
    extra = {}
    if phase == "ds_deepcompile":  # DeepCompile's op is built just in time: for this GPU only, with every core
        capability = run.results["env"].get("probe", {}).get("capability")
        extra = {"MAX_JOBS": str(os.cpu_count() or 4)}
        if capability and "TORCH_CUDA_ARCH_LIST" not in os.environ:
            extra["TORCH_CUDA_ARCH_LIST"] = capability
    result = run.worker(phase, spec, deadline, extra)
    result["sets"], result["phase_sets"] = sets, PHASE_SETS[phase]
    return result


# -- the driver ------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON, markdown and log go ($OUT)")
    parser.add_argument("--cpu", action="store_true", help="the CPU dry run: a tiny model on CPU ranks")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds from this script's start (default: 480 on GPU, 900 with --cpu)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/polyak-gpu"), help="scratch (emptied first)")
    parser.add_argument("--only", default=None, help=f"comma-separated phases from {PHASES + ON_REQUEST}")
    parser.add_argument("--skip", default="", help="comma-separated phases not to run")
    args = parser.parse_args(argv)
    mode = copy.deepcopy(CPU if args.cpu else GPU)
    chosen = args.only.split(",") if args.only else list(PHASES)
    unknown = [p for p in chosen + [p for p in args.skip.split(",") if p] if p not in PHASES + ON_REQUEST]
    if unknown:
        parser.error(f"unknown phases {unknown}; known: {PHASES + ON_REQUEST}")
    chosen = [p for p in chosen if p not in args.skip.split(",")]
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device here: run the CPU dry run with --cpu")
    run = Run(mode, args.out, args.work, args.budget or mode.budget, sys.argv if argv is None else argv)
    run.results["phases_run"] = chosen
    run.log(f"{mode.name} mode, phases {chosen}, budget {run.budget:.0f} s, work in {args.work}")
    try:
        run.results["env"] = environment(run)
        run.save()
        run.results["data"] = prepare_data(run)
        run.log(f"data prepared in {run.results['data']['prepare_s']} s")
        run.save()
        for phase in chosen:
            left, need = run.left(), mode.need[phase]
            if phase in mode.gpu_only:
                entry = {"status": "skipped", "reason": mode.gpu_only[phase]}
            elif left < need:
                entry = {"status": "skipped", "reason": f"out of time ({left:.0f} s of the budget left, this phase "
                                                        f"needs about {need:.0f} s)"}
            else:
                run.log(f"{phase}: starting ({left:.0f} s left)")
                deadline = time.monotonic() + min(mode.cap[phase], left - 10)
                try:
                    entry = correctness(run, deadline) if phase == "correctness" else speed(run, phase, deadline)
                except Exception as e:  # noqa: BLE001 - a phase that breaks must not lose the others
                    import traceback

                    entry = {"status": "error", "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()[-4000:]}
                run.log(f"{phase}: {entry.get('status')}")
            if phase == "correctness":
                run.results["correctness"] = entry
            else:
                run.results["speed"]["variants"][phase] = entry
                if entry.get("model") and not run.results["speed"]["model"]:
                    run.results["speed"]["model"] = entry["model"]
            shutil.rmtree(run.work / phase, ignore_errors=True)  # checkpoints and snapshots: gigabytes on a GPU
            run.save()
        if "correctness" not in chosen:
            run.results["correctness"] = {"status": "skipped", "reason": "not among the phases asked for"}
    finally:
        run.save()
        print(render(run.results), flush=True)
        run.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
