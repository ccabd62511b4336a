"""What averaging costs in checkpoints and snapshots, in one run on one engine.

    .venv/bin/deepspeed --num_gpus 2 bench/checkpoint.py --recipe recipes/tiny_cpu.yaml --set model.size=125m \
        --set log.progress=false [--saves 3] [--steps 6] [--work /tmp/polyak-bench-checkpoint]

  Saves, alternating, `--saves` times each: DeepSpeed's own `engine.save_checkpoint`; ours (launch/checkpoint.py)
  without averages; ours with an EMA and a LAWA (window 10, every 1) whose window is full. For each: the time the
  training thread is held (the slowest rank's), the time until the checkpoint is committed in the background, and
  its bytes on disk (the averaging state's apart).
  Memory: the bytes a LAWA holds, and the resident set it adds, with a window of 2 and of 20, each after 25 samples.
  Updates: training steps alone against training steps each followed by a LAWA update with every: 1 (writing the
  sample, reading the evicted one back), in alternating blocks; medians.
Rank 0 prints the tables and appends a JSON line to --out.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

import deepspeed.comm as dist

from averaging.zero import averager, master_partitions
from bench.harness import bench_parser, trainer
from bench.update_cost import rss, settled_rss
from launch.checkpoint import Checkpointer
from model.llama import count_params
from polyak.errors import cli
from polyak.recipe import AverageConfig, AveragingConfig, CheckpointConfig, load_recipe

MiB = 2**20


def averages(**kinds: AverageConfig) -> AveragingConfig:
    return AveragingConfig(averages=kinds)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def slowest(seconds: float) -> float:
    """The slowest rank's time: what the ranks, which wait for each other next, all lose."""
    times = [None] * dist.get_world_size()
    dist.all_gather_object(times, seconds)
    return max(times)


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=3, help="saves of each kind")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per variant")
    parser.add_argument("--block", type=int, default=2, help="training steps per alternating block")
    parser.add_argument("--work", type=Path, default=Path("/tmp/polyak-bench-checkpoint"))
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    load_start = os.getloadavg()
    run = trainer(recipe)
    engine, step = run.engine, run.step
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
    dist.barrier()

    for _ in range(2):  # the first steps allocate the optimizer state
        loss = step()
    partitions = master_partitions(engine)
    numel = sum(p.numel() for p in partitions)

    # Saves. The averaged run's LAWA has a full window, so its checkpoint holds what it always will.
    both = averager(averages(ema=AverageConfig(kind="ema", beta=0.9),
                             lawa=AverageConfig(kind="lawa", window=10)), engine, args.work / "averaged")
    for s in range(1, 12):
        both.update(s, loss, partitions)
    savers = {"plain": Checkpointer(args.work / "plain" / "checkpoints", CheckpointConfig()),
              "averaged": Checkpointer(args.work / "averaged" / "checkpoints", CheckpointConfig())}
    saves = {"deepspeed": [], "plain": [], "averaged": []}
    for i in range(1, args.saves + 1):
        dist.barrier()
        t0 = time.perf_counter()
        engine.save_checkpoint(str(args.work / "deepspeed"), tag=f"save{i}", save_latest=False)
        saves["deepspeed"].append({"held_s": slowest(time.perf_counter() - t0)})
        for name, saver in savers.items():
            dist.barrier()
            t0 = time.perf_counter()
            saver.save(engine, i, {"step": i}, [both] if name == "averaged" else [])
            held = time.perf_counter() - t0
            saver.wait()
            saves[name].append({"held_s": slowest(held), "committed_s": slowest(time.perf_counter() - t0)})
    sizes = {"deepspeed": du(args.work / "deepspeed" / "save1"),
             "plain": du(args.work / "plain" / "checkpoints" / "global_step1"),
             "averaged": du(args.work / "averaged" / "checkpoints" / "global_step1"),
             "averaged_state": du(args.work / "averaged" / "checkpoints" / "global_step1" / "averaging"),
             "snapshot": du(args.work / "averaged" / "snapshots" / "step11")}
    both.close()
    del both

    # Memory of a LAWA: its buffers and the resident set it adds, with a short and a long window.
    memory = {}
    for window in (2, 20):
        before = settled_rss()
        lawa = averager(averages(lawa=AverageConfig(kind="lawa", window=window)), engine,
                        args.work / f"window{window}")
        for s in range(1, 26):
            lawa.update(s, loss, partitions)
        lawa.weights("lawa")  # every sample taken
        memory[window] = {"buffer_bytes": lawa.nbytes, "rss_added_bytes": rss() - before}
        lawa.close()
        del lawa

    # A LAWA update with every: 1 after each training step, against training steps alone.
    lawa = averager(averages(lawa=AverageConfig(kind="lawa", window=10)), engine, args.work / "steps")
    count = iter(range(1, 2**62))
    for _ in range(11):  # the window full: every later update evicts and writes
        lawa.update(next(count), loss, partitions)
    timings = {"plain": [], "lawa": []}
    while len(timings["lawa"]) < args.steps:
        for name in timings:
            for _ in range(args.block):
                dist.barrier()
                t0 = time.perf_counter()
                loss = step()
                if name == "lawa":
                    lawa.update(next(count), loss, master_partitions(engine))
                timings[name].append(slowest(time.perf_counter() - t0))
    lawa.close()

    if rank != 0:
        return
    median = {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for name, runs in saves.items()}
    plain_step, lawa_step = (statistics.median(timings[k]) for k in ("plain", "lawa"))
    result = {"recipe": args.recipe, "overrides": args.set, "ranks": world, "params": count_params(run.model_args),
              "partition_bytes": numel * 4, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
              "saves": median, "sizes": sizes, "lawa_memory": memory,
              "step_s": {"plain": plain_step, "lawa": lawa_step}, "lawa_step_share": lawa_step / plain_step - 1}
    print_tables(result)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


def print_tables(r: dict) -> None:
    ds = r["saves"]["deepspeed"]["held_s"]
    print(f"\n{r['params'] / 1e6:.1f}M parameters, {r['ranks']} ranks, {r['partition_bytes'] / MiB:,.1f} MiB fp32 "
          f"partition per rank, load average {r['loadavg_start'][0]:.2f} → {r['loadavg_end'][0]:.2f}\n")
    print("| save | training held (median) | vs DeepSpeed | committed after | bytes on disk | of which averages |")
    print("|---|---|---|---|---|---|")
    labels = {"deepspeed": "DeepSpeed's save_checkpoint", "plain": "ours, no averages",
              "averaged": "ours, EMA + LAWA (window 10)"}
    for name, label in labels.items():
        e = r["saves"][name]
        committed = f"{e['committed_s']:.2f} s" if "committed_s" in e else "—"
        state = f"{r['sizes']['averaged_state'] / MiB:,.0f} MiB" if name == "averaged" else "—"
        print(f"| {label} | {e['held_s']:.2f} s | {e['held_s'] / ds:.2f}× | {committed} | "
              f"{r['sizes'][name] / MiB:,.0f} MiB | {state} |")
    print(f"\nA LAWA sample in the snapshot store: {r['sizes']['snapshot'] / MiB:,.0f} MiB (all ranks).\n")
    print("| LAWA window | buffers per rank | resident set added per rank |")
    print("|---|---|---|")
    for window, m in r["lawa_memory"].items():
        print(f"| {window} | {m['buffer_bytes'] / MiB:,.1f} MiB | {m['rss_added_bytes'] / MiB:,.1f} MiB |")
    print(f"\nTraining step (median): {r['step_s']['plain']:.2f} s alone, {r['step_s']['lawa']:.2f} s with a LAWA "
          f"update (every: 1, window 10): {r['lawa_step_share']:+.2%}.")


if __name__ == "__main__":
    cli(main, rank_process=True)
