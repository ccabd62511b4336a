"""Our training step against a plain DeepSpeed ZeRO-3 loop of the same model and batch, in the same run.

    .venv/bin/deepspeed --num_gpus 2 bench/train_step.py --recipe recipes/tiny_cpu.yaml [--set ...] [--steps 20]

Both loops drive one engine, in alternating blocks (so drift in the machine's speed hits both alike); each reports
the median step time and tokens/s. Rank 0 prints a markdown row and appends a JSON line to --out.
"""

from __future__ import annotations

import json
import statistics
import time

import deepspeed.comm as dist
import torch

from bench.harness import bench_parser, trainer
from model.llama import count_params
from polyak.errors import cli
from polyak.recipe import load_recipe


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop (after 3 warm-up steps)")
    parser.add_argument("--block", type=int, default=5, help="steps per alternating block")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    run = trainer(recipe)
    engine, batches, device = run.engine, run.batches, run.device
    world, seq_len = dist.get_world_size(), recipe.data.seq_len

    def plain_step():
        for _ in range(recipe.train.grad_accum):
            x, y = (t.to(device) for t in batches.next())
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()

    timings = {"plain": [], "ours": []}
    for _ in range(3):
        plain_step()
        run.step()
    while len(timings["ours"]) < args.steps:
        for name, step in (("plain", plain_step), ("ours", run.step)):
            for _ in range(args.block):
                dist.barrier()
                t0 = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings[name].append(time.perf_counter() - t0)

    tokens = recipe.train.micro_batch * recipe.train.grad_accum * world * seq_len
    result = {"recipe": args.recipe, "overrides": args.set, "ranks": world, "params": count_params(run.model_args),
              "tokens_per_step": tokens}
    for name, times in timings.items():
        median = statistics.median(times)
        result[name] = {"step_s": median, "tokens_per_s": tokens / median}
    result["ratio"] = result["ours"]["tokens_per_s"] / result["plain"]["tokens_per_s"]
    if dist.get_rank() == 0:
        print(f"| {result['params'] / 1e6:.1f}M | {world} | {result['plain']['step_s'] * 1e3:.0f} ms | "
              f"{result['ours']['step_s'] * 1e3:.0f} ms | {result['plain']['tokens_per_s']:,.0f} | "
              f"{result['ours']['tokens_per_s']:,.0f} | {result['ratio']:.3f} |")
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    cli(main, rank_process=True)
