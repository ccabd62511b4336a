"""SIGKILL at random moments of a real 2-rank run, resumed by the same command: is the result bitwise the same?

    .venv/bin/python -m bench.faults [--trials 20] [--seed 0] [--work /tmp/polyak-faults]
                                     [--report docs/BENCHMARKS_faults.md]

The run is the end-to-end tests' tiny one (tests/conftest.py: 2 CPU ranks, 12 steps, EMA, LAWA and a power EMA,
a checkpoint every step). One uninterrupted run is the reference. Each trial launches the same command afresh,
waits for a random moment (the middle of a random step, or the save of one: its `.tmp-` directory has appeared, plus
a random delay), SIGKILLs rank 0, rank 1 or the launcher's whole process group, then runs the same command again to
the end and compares its loss curve (the last record of each step), fp32 master weights, Adam moments and averages
with the reference's, bit for bit. The table goes to stdout and, with the machine and the command, to --report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from bench.harness import (
    DEEPSPEED,
    ROOT,
    SMALL,
    TIMING,
    assert_identical,
    free_port,
    full_average,
    rank_states,
    read_metrics,
    run_cli,
    trained,
)
from polyak import checkpoints

TARGETS = ("rank 0", "rank 1", "all")
STEPS = next(int(item.split("=")[1]) for item in SMALL if item.startswith("train.steps="))
AVERAGES = ("ema", "lawa", "p10")  # SMALL's


def command(run_dir: Path, data_dir: Path) -> list[str]:
    """The command of the tests' `run2`: 2 ranks, a checkpoint every step."""
    return [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
            "--recipe", "recipes/tiny_cpu.yaml", *(a for item in trained(data_dir, run_dir) for a in ("--set", item))]


@dataclass
class Kill:
    step: int  # the step during which, or during whose save, the kill comes
    moment: str  # "step" or "save"
    target: str  # one of TARGETS
    delay: float = 0.0  # seconds after the moment was seen

    def __str__(self) -> str:
        return f"{self.target}, {self.moment} {self.step} +{self.delay:.3f} s"


def interrupt(run_dir: Path, data_dir: Path, kill: Kill, timeout: float = 600,
              cmd: list[str] | None = None) -> tuple[subprocess.CompletedProcess, str]:
    """Launch the run (`command(run_dir, data_dir)`, or `cmd`: another trainer command writing to `run_dir`) and
    SIGKILL `kill.target` at `kill`'s moment; returns the launcher's exit code and output, and what the run was found
    doing just before the kill.

    Moment "step": `latest` names a step at or after the one before (the step's own work is about to begin, or has
    begun: with a checkpoint every k steps, `latest` moves in jumps). Moment "save": the step's temporary checkpoint
    directory exists (its files are being written), or the save is already over."""
    ckpt_dir = run_dir / "checkpoints"
    with open(run_dir.parent / f"{run_dir.name}.log", "w+") as log:
        launcher = subprocess.Popen(cmd or command(run_dir, data_dir), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while not _reached(ckpt_dir, kill):
            if launcher.poll() is not None or time.monotonic() > deadline:
                launcher.kill()
                raise RuntimeError(f"the run never reached {kill}: exit code {launcher.poll()}")
            time.sleep(0.01)
        time.sleep(kill.delay)
        phase = _phase(ckpt_dir)
        if kill.target == "all":
            os.killpg(launcher.pid, signal.SIGKILL)
        else:
            _rank_process(launcher, int(kill.target.split()[1])).kill()
        launcher.wait(timeout=120)
        log.seek(0)
        return subprocess.CompletedProcess(launcher.args, launcher.returncode, log.read(), ""), phase


def _phase(ckpt_dir: Path) -> str:
    saving = sorted(p.name.removeprefix(".tmp-global_step") for p in ckpt_dir.glob(".tmp-global_step*"))
    if saving:
        return f"saving step {saving[0]}"
    latest = checkpoints.latest_step(ckpt_dir) or 0
    return "past the last step" if latest == STEPS else f"in step {latest + 1}"


def _reached(ckpt_dir: Path, kill: Kill) -> bool:
    latest = checkpoints.latest_step(ckpt_dir) or 0
    if kill.moment == "save":  # a save can begin and end between two looks: then the kill comes just after it
        return (ckpt_dir / f".tmp-global_step{kill.step}").exists() or latest >= kill.step
    return latest >= kill.step - 1


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The launcher's child that runs `rank` (DeepSpeed passes it as --local_rank on a single node)."""
    for p in psutil.Process(launcher.pid).children(recursive=True):
        if f"--local_rank={rank}" in p.cmdline():
            return p
    raise RuntimeError(f"no process of rank {rank} under the launcher")


def resume(run_dir: Path, data_dir: Path) -> subprocess.CompletedProcess:
    """The same command again, to the end."""
    return run_cli(command(run_dir, data_dir))


def last_records(run_dir: Path) -> dict[int, dict]:
    """The loss curve as the run ended up with it: the last record of each step, without the timings."""
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)}


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Loss curve, fp32 master weights with the Adam moments (DeepSpeed's optimizer files), the averages: bitwise."""
    assert last_records(run_dir) == last_records(reference), "loss curves differ"
    tag = (reference / "checkpoints" / "latest").read_text()
    a, b = run_dir / "checkpoints" / tag, reference / "checkpoints" / tag
    assert_identical(rank_states(a), rank_states(b), "raw weights and optimizer state")
    for name in AVERAGES:
        assert_identical(full_average(a, name), full_average(b, name), name)


def trial(work: Path, data_dir: Path, reference: Path, number: int, kill: Kill) -> dict:
    run_dir = work / f"trial{number:02d}"
    shutil.rmtree(run_dir, ignore_errors=True)
    killed, phase = interrupt(run_dir, data_dir, kill)
    latest = run_dir / "checkpoints" / "latest"
    at_kill = latest.read_text() if latest.is_file() else "none"
    resumed = resume(run_dir, data_dir)
    m = re.search(r"resumed from \S*/(global_step\d+)", resumed.stdout + resumed.stderr)
    try:
        assert_same_run(run_dir, reference)
        identical = True
    except AssertionError:
        identical = False
    said = re.search(r"^error: (rank \d+ died|stopped by SIGTERM)", killed.stdout, re.MULTILINE)
    row = {"trial": number, "kill": str(kill), "phase": phase, "launcher_exit": killed.returncode,
           "latest_at_kill": at_kill, "message": said.group(1) if said else "-",
           "resumed_from": m.group(1) if m else "start", "identical": identical}
    shutil.rmtree(run_dir)
    return row


def random_kill(rng: random.Random, steps: int) -> Kill:
    moment = rng.choice(["step", "save"])
    # Mid-step: up to about one step's time after the previous checkpoint; mid-save: within the few hundredths of a
    # second a save of this tiny model takes. Not the last step: the run may be over before the kill.
    return Kill(step=rng.randint(2, steps - 1), moment=moment, target=rng.choice(TARGETS),
                delay=round(rng.uniform(0, 0.8 if moment == "step" else 0.05), 3))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"deepspeed {__import__('deepspeed').__version__}")


def table(rows: list[dict]) -> str:
    lines = [("| trial | SIGKILL (target, moment) | the run was | launcher exit | its message "
              "| `latest` after the kill | resumed from | identical |"), "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['trial']} | {r['kill']} | {r['phase']} | {r['launcher_exit']} | {r['message']} "
              f"| {r['latest_at_kill']} | {r['resumed_from']} | {'yes' if r['identical'] else 'NO'} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/polyak-faults"))
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "BENCHMARKS_faults.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data_dir = args.work / "data"
    run_cli([sys.executable, "-m", "data.prepare", "--recipe", "recipes/tiny_cpu.yaml",
             *(a for item in SMALL + [f"data.dir={data_dir}"] for a in ("--set", item))])
    reference = args.work / "reference"
    if not (reference / "checkpoints" / "latest").is_file():
        shutil.rmtree(reference, ignore_errors=True)
        run_cli(command(reference, data_dir))

    rng, rows, late = random.Random(args.seed), [], 0
    while len(rows) < args.trials:
        row = trial(args.work, data_dir, reference, len(rows) + 1, random_kill(rng, STEPS))
        print(json.dumps(row), flush=True)
        # Too late to test anything: the last step's checkpoint was committed when the kill came, so nothing is left
        # to resume; the moment is drawn again.
        if row["latest_at_kill"] == checkpoints.tag_of(STEPS):
            late += 1
            continue
        rows.append(row)
    print(table(rows))
    shown = " ".join(command(Path("<run.dir>"), Path("<data.dir>"))).replace(str(DEEPSPEED), ".venv/bin/deepspeed")
    shown = re.sub(r"--master_port \d+ ", "", shown)
    same = sum(r["identical"] for r in rows)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(
        f"# Faults: SIGKILL at random moments, then the same command again\n\n"
        f"`.venv/bin/python -m bench.faults --trials {args.trials} --seed {args.seed}` on {machine()}.\n\n"
        f"Each trial launches the run afresh and SIGKILLs one rank (or the launcher's whole process group, as when a "
        f"node is lost) at the moment shown: during step N (some time after `latest` named step N-1), or during "
        f"the save of step N (its `.tmp-global_stepN` directory exists), plus the delay; *the run was*: what its "
        f"checkpoints directory showed just before the kill. Then the same command runs "
        f"to the end. *identical*: its loss curve (the last record of each step, timings aside), fp32 master weights, "
        f"Adam moments, EMA, LAWA and power EMA equal an uninterrupted run's bit for bit. *its message*: the one line "
        f"the "
        f"surviving rank printed (none when the whole group was killed).\n\n"
        f"The run (the tests' `run2`): `{shown}`\n\n"
        f"{table(rows)}\n\n{same} of {len(rows)} identical. Every kill came before the last step's checkpoint was "
        f"committed: {late} drawn moment(s) after it were drawn again.\n")
    print(f"{same} of {len(rows)} identical; written to {args.report}")


if __name__ == "__main__":
    main()
