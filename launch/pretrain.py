"""Pre-train a Llama-style model with DeepSpeed ZeRO-3 and online weight averaging on the local partitions.

    deepspeed --num_gpus 2 launch/pretrain.py --recipe recipes/tiny_cpu.yaml [--set train.steps=100 ...]

build → resume → for each step: batch, forward, backward, step, average, evaluate, checkpoint, log.
"""

from __future__ import annotations

import argparse
import math
import signal
import time
from pathlib import Path

import deepspeed.comm as dist
import torch
import yaml

from averaging import zero
from averaging.release import RUN_TOKENIZER
from averaging.weights import zero_world_size
from data.loader import TokenWindows, TrainBatches, load_meta, val_batches
from data.tokenizer import copy_tokenizer
from launch import checkpoint, universal
from launch.dist import explain_stop, init_distributed, on_rank0, raise_stopped
from launch.engine import build, evaluate, train_step
from launch.metrics import MetricsLog, peak_flops
from launch.plan import repeat_warning
from model.llama import flops_per_token
from polyak import checkpoints
from polyak.errors import UserError, cli
from polyak.recipe import Recipe, load_recipe, recipe_to_dict, save_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="a YAML recipe from recipes/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (dotted), e.g. --set train.steps=100; repeatable")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="leave after this step (e.g. before a job's time limit); the next launch resumes; "
                             "the step resumed from, on another number of ranks: save it resharded and leave")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by deepspeed
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    signal.signal(signal.SIGTERM, raise_stopped)
    try:
        train(recipe, stop_after=args.stop_after)
    except UserError:
        raise
    except Exception as e:
        explain_stop(e, Path(recipe.run.dir) / "checkpoints")
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # over: a SIGTERM now (the launcher tidying up) just ends it


def train(recipe: Recipe, stop_after: int | None = None) -> None:
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir, ckpt_dir = Path(recipe.run.dir), Path(recipe.run.dir) / "checkpoints"
    on_rank0(lambda: _prepare(recipe))
    meta = load_meta(recipe.data.dir)

    # Build. A checkpoint written by another number of ranks is loaded through DeepSpeed's universal checkpoint,
    # and the engine must be built for that.
    latest = checkpoint.newest_intact(ckpt_dir)
    reshard = latest is not None and zero_world_size(ckpt_dir / checkpoints.tag_of(latest)) != world
    engine, schedule, args = build(recipe, meta["vocab_size"], world, device, load_universal=reshard)
    on_rank0(lambda: _claim_run_dir(recipe, run_dir, ckpt_dir))  # after the input checks: bad input writes nothing
    averager = (zero.averager(recipe.averaging, engine, run_dir, recipe.snapshots)
                if recipe.averaging.averages or recipe.snapshots.every else None)
    components = [averager] if averager else []
    seq_len, t = recipe.data.seq_len, recipe.train
    batches = TrainBatches(TokenWindows(recipe.data.dir, "train", seq_len), rank, world, t.micro_batch, t.seed)
    held_out = val_batches(TokenWindows(recipe.data.dir, "val", seq_len), rank, world, t.micro_batch,
                           recipe.eval.batches)

    # Resume from the newest intact checkpoint, if any.
    start, bad_steps = 0, 0
    on_rank0(lambda: universal.prepare(ckpt_dir, latest if reshard else None))  # converted once, the others wait
    source = universal.UniversalEngine(engine, universal.root(ckpt_dir)) if reshard else engine
    if latest is not None:
        state = checkpoint.load(source, ckpt_dir, latest, components)
        batches.load_state_dict(state["sampler"])
        start, bad_steps = state["step"], state["bad_steps"]
    log = MetricsLog(recipe, run_dir, start, enabled=rank == 0)
    checkpointer = checkpoint.Checkpointer(ckpt_dir, recipe.checkpoint, note=log.note)
    if latest is not None:
        log.note(f"resumed from {ckpt_dir / checkpoints.tag_of(latest)}")
    if warning := repeat_warning(recipe, world, meta["train_tokens"]):
        log.note(warning)
    if reshard:
        for line in source.notes():
            log.note(line)
        if stop_after == start:  # resharding was all that was asked: saved again as this world size's checkpoint
            checkpointer.save(engine, start, state, components)

    tokens_per_step = t.micro_batch * t.grad_accum * world * seq_len
    flops = flops_per_token(args, seq_len) * tokens_per_step
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", t.precision,
                      recipe.log.peak_tflops)
    last = t.steps if stop_after is None else min(stop_after, t.steps)
    for step in range(start + 1, last + 1):
        t0 = time.perf_counter()
        lr = schedule.get_last_lr()[0]
        loss = train_step(engine, batches, t.grad_accum, device)
        bad_steps = bad_steps + 1 if math.isnan(loss) else 0
        if bad_steps:
            schedule.step()  # a skipped step still counts, so the LR stays aligned with the step number
            log.note(f"step {step}: non-finite loss or gradients, update skipped ({bad_steps} in a row)")
            if bad_steps >= t.max_bad_steps:
                checkpointer.wait()
                raise UserError(f"{bad_steps} non-finite losses or gradients in a row at step {step} "
                                f"(train.max_bad_steps={t.max_bad_steps}); the last good checkpoint: "
                                f"{checkpoints.describe_latest(ckpt_dir)}")

        for event in averager.update(step, loss, zero.master_partitions(engine)) if averager else []:
            log.note(f"step {step}: {event}")
        elapsed = time.perf_counter() - t0
        norm = engine.get_global_grad_norm()
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": None if norm is None else float(norm),
                  "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_step / elapsed, "step_time": elapsed,
                  "mfu": flops / elapsed / (peak * world) if peak else None}

        if _due(step, recipe.eval.every, t.steps):
            record["val_loss"] = evaluate(engine, held_out)
            for name in averager.names if averager else ():
                with zero.swapped_in(engine, averager.weights(name)):
                    record[f"val_loss_{name}"] = evaluate(engine, held_out)

        # Not during a run of skipped updates: it would hold the last good weights again and push them out.
        if (_due(step, recipe.checkpoint.every, t.steps) or step == last) and not bad_steps:
            trainer_state = {"step": step, "sampler": batches.state_dict(), "bad_steps": bad_steps,
                             "val_loss": record.get("val_loss")}
            checkpointer.save(engine, step, trainer_state, components)

        if step % recipe.log.every == 0 or "val_loss" in record:
            log.log(record)
        log.progress(step, loss, record["tokens_per_s"])
    checkpointer.wait()
    if averager:
        averager.close()
    log.close()
    dist.barrier()


def _prepare(recipe: Recipe) -> None:
    # Imported here: datasets and pandas take a second to import, and only rank 0 prepares data.
    from data.prepare import prepare

    prepare(recipe.data)


def _claim_run_dir(recipe: Recipe, run_dir: Path, ckpt_dir: Path) -> None:
    """Save the resolved recipe and the tokenizer (so that the run folder alone can be released); refuse to resume
    checkpoints of a different model."""
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "recipe.yaml"
    if saved.exists() and checkpoints.latest_step(ckpt_dir) is not None:
        before = yaml.safe_load(saved.read_text())
        now = recipe_to_dict(recipe)
        for section in ("model", "data"):
            for key, value in now[section].items():
                if before.get(section, {}).get(key) != value:
                    raise UserError(f"{run_dir} holds checkpoints of another {section} ({section}.{key}: "
                                    f"{before.get(section, {}).get(key)!r} there, {value!r} now); "
                                    f"use another run.dir")
    save_recipe(recipe, saved)
    copy_tokenizer(recipe.data.dir, run_dir / RUN_TOKENIZER)


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


if __name__ == "__main__":
    cli(main, rank_process=True)
