"""Pre-train a Llama-style model with DeepSpeed ZeRO-3 and online weight averaging on the local partitions.

    deepspeed --num_gpus 2 launch/pretrain.py --recipe recipes/tiny_cpu.yaml [--set train.steps=100 ...]

build → resume → for each step: batch, forward, backward, step, average, evaluate, checkpoint, log.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path

# `deepspeed launch/pretrain.py` puts launch/ first on the path; the imports below are from the repository root.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from averaging.averages import Averager  # noqa: E402
from averaging.reshard import load_resharded_state  # noqa: E402
from averaging.state import load_state, save_state  # noqa: E402
from averaging.zero import layout, master_partitions, padding, swapped_in  # noqa: E402
from data.loader import TokenWindows, TrainBatches, load_meta, val_batches  # noqa: E402
from data.prepare import prepare  # noqa: E402
from launch import checkpoint, universal  # noqa: E402
from launch.ds_config import deepspeed_config  # noqa: E402
from launch.memory import check_fits, estimate  # noqa: E402
from launch.errors import UserError, cli  # noqa: E402
from launch.metrics import MetricsLog  # noqa: E402
from launch.recipe import Recipe, load_recipe, recipe_to_dict, save_recipe  # noqa: E402
from launch.schedule import lr_multiplier  # noqa: E402
from model.llama import Llama  # noqa: E402
from model.sizes import flops_per_token, peak_flops, resolve  # noqa: E402


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
    signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        train(recipe, stop_after=args.stop_after)
    except UserError:
        raise
    except Exception as e:
        _explain_stop(e, Path(recipe.run.dir) / "checkpoints")
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # over: a SIGTERM now (the launcher tidying up) just ends it


def train(recipe: Recipe, stop_after: int | None = None) -> None:
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir, ckpt_dir = Path(recipe.run.dir), Path(recipe.run.dir) / "checkpoints"
    on_rank0(lambda: prepare(recipe.data))
    meta = load_meta(recipe.data.dir)

    # The checkpoint to resume from, if any. One written by another number of ranks is loaded through DeepSpeed's
    # universal checkpoint, and the engine must be built for that.
    latest = checkpoint.newest_intact(ckpt_dir)
    reshard = latest is not None and universal.saved_world_size(ckpt_dir / checkpoint.tag_of(latest)) != world
    engine, schedule, args = build(recipe, meta["vocab_size"], world, device, load_universal=reshard)
    on_rank0(lambda: _claim_run_dir(recipe, run_dir, ckpt_dir))  # after the input checks: bad input writes nothing
    partition_layout = layout(engine)
    averager = (Averager(recipe.averaging, master_partitions(engine), padding=padding(engine))
                if recipe.averaging.averages else None)

    seq_len = recipe.data.seq_len
    train_windows = TokenWindows(recipe.data.dir, "train", seq_len)
    batches = TrainBatches(train_windows, rank, world, recipe.train.micro_batch, recipe.train.seed)
    held_out = val_batches(TokenWindows(recipe.data.dir, "val", seq_len), rank, world, recipe.train.micro_batch,
                           recipe.eval.batches)

    # Resume from the latest intact checkpoint, if any.
    start, bad_steps = 0, 0
    on_rank0(lambda: universal.prepare(ckpt_dir, latest if reshard else None))  # converted once, the others wait
    source = universal.UniversalEngine(engine, universal.root(ckpt_dir)) if reshard else engine
    load_averages = load_resharded_state if reshard else load_state
    if latest is not None:
        state = checkpoint.load(source, ckpt_dir, latest,
                                lambda d: averager and load_averages(averager, d, rank, world, partition_layout))
        batches.load_state_dict(state["sampler"])
        start, bad_steps = state["step"], state["bad_steps"]

    log = MetricsLog(recipe, run_dir, start, enabled=rank == 0)
    if latest is not None:
        log.note(f"resumed from {ckpt_dir / checkpoint.tag_of(latest)}")
    if reshard:
        for line in source.notes():
            log.note(line)
        if stop_after == start:  # resharding was all that was asked: saved again as this world size's checkpoint
            checkpoint.save(engine, ckpt_dir, start, state,
                            lambda d: averager and save_state(averager, partition_layout, d, rank, world))
    tokens_per_step = recipe.train.micro_batch * recipe.train.grad_accum * world * seq_len
    flops = flops_per_token(args, seq_len)
    peak = peak_flops(_device_name(device), recipe.train.precision, recipe.log.peak_tflops)

    last = recipe.train.steps if stop_after is None else min(stop_after, recipe.train.steps)
    for step in range(start + 1, last + 1):
        t0 = time.perf_counter()
        lr = schedule.get_last_lr()[0]
        loss = train_step(engine, batches, recipe.train.grad_accum, device)
        bad_steps = bad_steps + 1 if math.isnan(loss) else 0
        if bad_steps:
            schedule.step()  # a skipped step still counts, so the LR stays aligned with the step number
            log.note(f"step {step}: non-finite loss or gradients, update skipped ({bad_steps} in a row)")
            if bad_steps >= recipe.train.max_bad_steps:
                raise UserError(f"{bad_steps} non-finite losses or gradients in a row at step {step} "
                                f"(train.max_bad_steps={recipe.train.max_bad_steps}); the last good checkpoint: "
                                f"{checkpoint.describe_latest(ckpt_dir)}")

        events = averager.update(step, loss, master_partitions(engine)) if averager else []
        for event in events:
            log.note(f"step {step}: {event}")
        elapsed = time.perf_counter() - t0

        record = {"step": step, "loss": loss, "lr": lr,
                  "grad_norm": _grad_norm(engine), "tokens": step * tokens_per_step,
                  "tokens_per_s": tokens_per_step / elapsed, "step_time": elapsed,
                  "mfu": flops * tokens_per_step / elapsed / (peak * world) if peak else None}
        if _due(step, recipe.eval.every, recipe.train.steps):
            record["val_loss"] = evaluate(engine, held_out)
            for name in averager.names if averager else ():
                with swapped_in(engine, averager.weights(name)):
                    record[f"val_loss_{name}"] = evaluate(engine, held_out)
        # None during a run of skipped updates: it would hold the last good weights again and push them out.
        if (_due(step, recipe.checkpoint.every, recipe.train.steps) or step == last) and not bad_steps:
            trainer_state = {"step": step, "sampler": batches.state_dict(), "bad_steps": bad_steps,
                             "val_loss": record.get("val_loss")}
            checkpoint.save(engine, ckpt_dir, step, trainer_state,
                            lambda d: averager and save_state(averager, partition_layout, d, rank, world))
            if rank == 0:
                for removed in checkpoint.prune(ckpt_dir, recipe.checkpoint):
                    log.note(f"removed checkpoint {checkpoint.tag_of(removed)} (retention)")
        if step % recipe.log.every == 0 or "val_loss" in record:
            log.log(record)
        log.progress(step, loss, record["tokens_per_s"])
    log.close()
    dist.barrier()


def build(recipe: Recipe, vocab_size: int, world: int, device: torch.device, load_universal: bool = False):
    """The DeepSpeed engine, its LR schedule and the model's shape. The model is partitioned as it is constructed,
    so no rank ever holds it whole. `load_universal`: the engine is to load a universal checkpoint."""
    args = resolve(recipe.model, vocab_size, recipe.data.seq_len)
    need = estimate(recipe, args, world, int(os.environ.get("LOCAL_SIZE", 1)), device.type == "cuda")
    if dist.get_rank() == 0:
        print(f"memory estimate (model states and averages; activations extra): {need}", file=sys.stderr)
    check_fits(need, device.type == "cuda")
    ds_config = deepspeed_config(recipe, world, load_universal)
    torch.manual_seed(recipe.train.seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Llama(args, activation_checkpointing=recipe.zero.activation_checkpointing)
    t = recipe.train
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                  fused=device.type == "cuda")
    # The schedule is built on DeepSpeed's wrapped optimizer, whose param groups are the ones that step.
    engine, _, _, schedule = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(t, s)))
    if recipe.zero.compile:
        engine.compile()
    return engine, schedule, args


def train_step(engine, batches: TrainBatches, grad_accum: int, device: torch.device) -> float:
    """One optimizer step over `grad_accum` micro-batches; the mean loss, or NaN when the update was skipped."""
    losses, skipped = [], engine.skipped_steps
    for micro in range(grad_accum):
        x, y = (t.to(device, non_blocking=True) for t in batches.next())
        loss = engine(x, y)
        if not _all_finite(loss):
            for _ in range(grad_accum - micro - 1):
                batches.next()  # the data stays aligned with an uninterrupted run
            # Drop what was accumulated: the next micro-step overwrites the gradient partitions.
            engine.optimizer.zero_grad()
            engine.micro_steps += grad_accum - micro
            return math.nan
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        losses.append(loss.detach())
    if engine.skipped_steps > skipped:  # DeepSpeed dropped the update itself: the gradients were not finite
        return math.nan
    return _mean_over_ranks(losses)


@torch.no_grad()
def evaluate(engine, held_out: list) -> float:
    """Mean held-out token loss over every rank's share of the validation batches."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    for x, y in held_out:
        loss = engine(x.to(engine.device), y.to(engine.device))
        total += torch.stack([loss.double() * y.numel(), torch.tensor(float(y.numel()), device=engine.device)])
    engine.train()
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def init_distributed() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        deepspeed.init_distributed(dist_backend="nccl")
        return torch.device("cuda", local_rank)
    if "OMP_NUM_THREADS" not in os.environ:  # without core binding, every rank would start a thread per core
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_SIZE", 1))))
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce at start-up and maps a 66 MiB /dev/shm buffer
    # per rank that it never removes; a rank killed while it checks that build leaves torch's build lock behind, and
    # every later start waits on it forever. The op only serves inference_all_reduce, which training never calls:
    # gloo does every collective. Marked unavailable, it is neither built nor mapped.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    return torch.device("cpu")


def on_rank0(fn) -> None:
    """Run `fn` on rank 0 while the others wait; a UserError there stops every rank (printed once)."""
    failure = [None]
    if dist.get_rank() == 0:
        try:
            fn()
        except UserError as e:
            failure = [str(e)]
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise UserError(failure[0])


def _claim_run_dir(recipe: Recipe, run_dir: Path, ckpt_dir: Path) -> None:
    """Save the resolved recipe; refuse to resume checkpoints of a different model."""
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "recipe.yaml"
    if saved.exists() and checkpoint.latest_step(ckpt_dir) is not None:
        before = yaml.safe_load(saved.read_text())
        now = recipe_to_dict(recipe)
        for section in ("model", "data"):
            for key, value in now[section].items():
                if before.get(section, {}).get(key) != value:
                    raise UserError(f"{run_dir} holds checkpoints of another {section} ({section}.{key}: "
                                    f"{before.get(section, {}).get(key)!r} there, {value!r} now); "
                                    f"use another run.dir")
    save_recipe(recipe, saved)


class _Stopped(Exception):
    """SIGTERM: from the launcher when another rank died, or from the scheduler (time limit, preemption)."""


def _raise_stopped(signum, frame):
    raise _Stopped()


def _explain_stop(error: Exception, ckpt_dir: Path) -> None:
    """A rank that dies, or a SIGTERM, stops the others wherever they are. Instead of their tracebacks: one line
    (from the lowest surviving local rank) saying why and how to go on, and exit code 1."""
    lost, alive = _local_ranks()
    peer_gone = isinstance(error, torch.distributed.DistError) or "by peer" in str(error)
    if not (lost or peer_gone or isinstance(error, _Stopped)):
        return
    if int(os.environ.get("LOCAL_RANK", "0")) == min(alive):
        why = (f"rank {', '.join(map(str, lost))} died (killed, or crashed: see its output above)" if lost
               else "stopped by SIGTERM" if isinstance(error, _Stopped) else "a rank on another node died")
        print(f"error: {why}; run the same command again to resume from the last checkpoint: "
              f"{checkpoint.describe_latest(ckpt_dir)}", file=sys.stderr)
    sys.exit(1)


def _local_ranks() -> tuple[list[int], list[int]]:
    """The global ranks this node's launcher started that are gone, and the local ranks still running."""
    import psutil

    size = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or "1")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    alive = {local}
    for sibling in psutil.Process().parent().children():
        try:
            if sibling.status() != psutil.STATUS_ZOMBIE and "LOCAL_RANK" in (env := sibling.environ()):
                alive.add(int(env["LOCAL_RANK"]))
        except psutil.Error:
            pass  # gone while we looked, or not ours to read
    first = int(os.environ.get("RANK", "0")) - local  # the launcher numbers a node's ranks consecutively
    return [first + r for r in range(size) if r not in alive], sorted(alive)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on norms (the usual GPT recipe)."""
    # Under zero.Init a parameter's data is already an empty placeholder; its real shape is ds_shape.
    matrix = {id(p) for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) >= 2}
    decay = [p for p in model.parameters() if id(p) in matrix]
    no_decay = [p for p in model.parameters() if id(p) not in matrix]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _all_finite(loss: torch.Tensor) -> bool:
    """True when every rank's loss is finite (one tiny all-reduce, so all ranks skip together)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    dist.all_reduce(bad)
    return bad.item() == 0


def _mean_over_ranks(losses: list[torch.Tensor]) -> float:
    total = torch.stack(losses).float().mean().reshape(1)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    cli(main)
