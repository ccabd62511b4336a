"""Consolidation against DeepSpeed's zero_to_fp32: wall time and peak RSS on the same ZeRO-3 checkpoints.

    python -m bench.consolidate [--work /tmp/polyak-bench] [--runs 66m:4 317m:4 420m:2] [--max-shard-size 5GB 1GB]
                                [--repeat 2] [--report docs/BENCHMARKS_consolidate.md]

For each model the real trainer (launch/pretrain.py on CPU ranks) takes one step and saves a checkpoint (kept in
--work and reused by later runs); then both tools export its raw fp32 weights as safetensors under /usr/bin/time -v,
alternately, --repeat times each, the checkpoint's files read into the page cache first so that both read from
memory. The outputs are checked tensor for tensor, and the table goes to --report with the machine and the commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from averaging.weights import MasterWeights
from bench.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# The models, named by their parameter count: the named sizes' shapes with the recipe's 4096-token vocabulary,
# deepened past 300M parameters.
MODELS = {
    "66m": {"size": "125m"},
    "163m": {"size": "350m", "n_layers": 12},
    "317m": {"size": "350m", "n_layers": 24},
    "420m": {"size": "350m", "n_layers": 32},
}


def make_checkpoint(work: Path, size: str, ranks: int) -> Path:
    """A run of model `size` on `ranks` CPU ranks after one training step, its checkpoint saved (reused if there)."""
    model = MODELS[size]
    run_dir = work / f"{size}-{ranks}ranks"
    if (run_dir / "checkpoints" / "latest").is_file():
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny_cpu.yaml").read_text())
    # No averages: their buffers would take the memory the larger models need (the export of raw weights is timed).
    del recipe["averaging"]
    recipe_file = work / "bench_recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    overrides = [*(f"model.{k}={v}" for k, v in model.items()), "train.steps=1", "train.warmup=0",
                 "train.micro_batch=1", "data.seq_len=128", "zero.reduce_bucket_size=20000000",
                 "zero.prefetch_bucket_size=20000000", "checkpoint.every=1", "eval.batches=1", "log.progress=false",
                 f"run.dir={run_dir}"]
    port = free_port()
    command = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port), "launch/pretrain.py",
               "--recipe", str(recipe_file), *(a for item in overrides for a in ("--set", item))]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    (run_dir / "bench_command.txt").write_text(" ".join(command).replace(str(BIN) + "/", ".venv/bin/") + "\n")
    return run_dir


def commands(tool: str, ckpt_dir: Path, out: Path, shard: str) -> list[str]:
    if tool == "zero_to_fp32":
        return [sys.executable, str(ckpt_dir / "zero_to_fp32.py"), str(ckpt_dir), str(out), "--safe_serialization",
                "--max_shard_size", shard]
    return [sys.executable, "-m", "averaging.consolidate", str(ckpt_dir), "--weights", "raw", "--out", str(out),
            "--max-shard-size", shard]


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident set (MiB) of a command, from GNU time."""
    proc = subprocess.run(["/usr/bin/time", "-v", *command], check=False, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return seconds, peak_kb / 1024


def warm(directory: Path) -> None:
    """Read every file of a checkpoint once, so that both tools find it in the page cache."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 26):
                    pass


def tensors(out: Path) -> dict[str, Path]:
    index = out / "model.safetensors.index.json"
    if index.is_file():
        return {name: out / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return dict.fromkeys(f.keys(), out / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    files_a, files_b = tensors(a), tensors(b)
    if files_a.keys() != files_b.keys():
        return False
    for name in files_a:
        with safe_open(str(files_a[name]), framework="pt") as fa, safe_open(str(files_b[name]), framework="pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                return False
    return True


def machine() -> str:
    meminfo = Path("/proc/meminfo").read_text()
    ram = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) / 2**20
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    return (f"{os.cpu_count()} CPU cores ({cpu}), {ram:.1f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"deepspeed {__import__('deepspeed').__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/polyak-bench"))
    parser.add_argument("--runs", nargs="+", default=["66m:4", "317m:4", "420m:2"], metavar="MODEL:RANKS",
                        help=f"models ({', '.join(MODELS)}) and the ranks that train them")
    parser.add_argument("--max-shard-size", nargs="+", default=["5GB", "1GB"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "BENCHMARKS_consolidate.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    start_load = os.getloadavg()[0]
    rows, trained, timed_commands = [], [], []
    for run in args.runs:
        size, ranks = run.split(":")
        run_dir = make_checkpoint(args.work, size, int(ranks))
        trained.append((run_dir / "bench_command.txt").read_text().strip())
        ckpt_dir = run_dir / "checkpoints"
        layout = MasterWeights(ckpt_dir / (ckpt_dir / "latest").read_text().strip()).layout
        n_params = sum(math.prod(shape) for group in layout.groups for _, shape in group)
        for shard in args.max_shard_size:
            results = {}
            for attempt in range(args.repeat):
                for tool in ("zero_to_fp32", "consolidate"):
                    out = args.work / f"out-{tool}"
                    shutil.rmtree(out, ignore_errors=True)
                    warm(ckpt_dir / (ckpt_dir / "latest").read_text().strip())
                    command = commands(tool, ckpt_dir, out, shard)
                    wall, peak = timed(command)
                    print(f"{run} {shard} {tool}: {wall:.1f} s, {peak:.0f} MiB", flush=True)
                    best = results.get(tool, (math.inf, 0.0))
                    results[tool] = (min(best[0], wall), max(best[1], peak))
                    if attempt == 0:
                        timed_commands.append(" ".join(command).replace(sys.executable, ".venv/bin/python"))
            if not same_weights(args.work / "out-zero_to_fp32", args.work / "out-consolidate"):
                raise SystemExit(f"{run}: the two exports differ")
            (theirs_s, theirs_mb), (ours_s, ours_mb) = results["zero_to_fp32"], results["consolidate"]
            rows.append(f"| {size} | {n_params / 1e6:.0f}M | {ranks} | {n_params * 4 / 2**30:.2f} GiB | {shard} | "
                        f"{theirs_s:.1f} | {ours_s:.1f} | {theirs_mb:,.0f} | {ours_mb:,.0f} | "
                        f"{ours_mb / theirs_mb:.2f} |")
    for tool in ("zero_to_fp32", "consolidate"):
        shutil.rmtree(args.work / f"out-{tool}", ignore_errors=True)
    write_report(args, rows, trained, timed_commands, (start_load, os.getloadavg()[0]))


def write_report(args, rows: list[str], trained: list[str], timed_commands: list[str],
                 load: tuple[float, float]) -> None:
    text = f"""# Consolidation: averaging.consolidate against DeepSpeed's zero_to_fp32

Machine: {machine()}.

Both tools export the raw fp32 weights of the same ZeRO-3 checkpoint (one training step of the real trainer on CPU
ranks) as safetensors with the same maximum shard size, and their outputs are identical tensor for tensor. Wall time
is the best of {args.repeat} runs, peak RSS (GNU time's maximum resident set size) the largest; the checkpoint is
read into the page cache before each run; the load average was {load[0]:.1f} at the start and {load[1]:.1f} at the
end (the 1-minute average, which the bench's own training runs raise). RSS counts the checkpoint pages a process has
mapped as well as its own buffers: zero_to_fp32 keeps every rank's optimizer file mapped until it exits and holds an
output shard whole, so its peak grows with the model; averaging.consolidate maps the rank files afresh for each tensor
and streams the tensor's pieces into the shard, so its peak is the interpreter's and barely moves with model or shard.

| model | parameters | ranks | fp32 weights | max shard | zero_to_fp32 (s) | consolidate (s) | zero_to_fp32 peak (MiB) | consolidate peak (MiB) | peak ratio |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Reproduce with `.venv/bin/python -m bench.consolidate --runs {' '.join(args.runs)} --max-shard-size \
{' '.join(args.max_shard_size)} --repeat {args.repeat}` (the checkpoints stay in `{args.work}` for later runs).
The trainer wrote them with `bench_recipe.yaml`, recipes/tiny_cpu.yaml without its averages (their buffers would
take the memory the larger models need):

{chr(10).join("    " + c for c in trained)}

The timed commands, each under `/usr/bin/time -v`:

{chr(10).join("    " + c for c in timed_commands)}
"""
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text)
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
