"""The DeepSpeed engine of a recipe: built with the model partitioned as it is constructed, one optimizer step over
the accumulated micro-batches, and the held-out loss."""

from __future__ import annotations

import math
import os
import sys

import deepspeed
import deepspeed.comm as dist
import torch

from data.loader import TrainBatches
from launch.dist import all_finite, mean_over_ranks
from launch.ds_config import deepspeed_config
from launch.memory import check_fits, estimate
from launch.schedule import lr_multiplier
from model.llama import Llama
from model.sizes import resolve
from polyak.recipe import Recipe


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
    losses = []
    for micro in range(grad_accum):
        x, y = (t.to(device, non_blocking=True) for t in batches.next())
        loss = engine(x, y)
        if not all_finite(loss):
            for _ in range(grad_accum - micro - 1):
                batches.next()  # the data stays aligned with an uninterrupted run
            # Drop what was accumulated: the next micro-step overwrites the gradient partitions.
            engine.optimizer.zero_grad()
            engine.micro_steps += grad_accum - micro
            return math.nan
        engine.backward(loss)
        # A finite loss can still give non-finite gradients. DeepSpeed checks them only under fp16 loss scaling;
        # in fp32 and bf16 it would apply them (NaN weights from then on). At the boundary the reduced gradient
        # partitions are complete: one flag, all-reduced, so that every rank skips together.
        if micro == grad_accum - 1 and engine.optimizer.has_overflow():
            engine.optimizer.zero_grad()
            engine.micro_steps += 1
            return math.nan
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        losses.append(loss.detach())
    return mean_over_ranks(losses)


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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on norms (the usual GPT recipe)."""
    # Under zero.Init a parameter's data is already an empty placeholder; its real shape is ds_shape.
    matrix = {id(p) for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) >= 2}
    decay = [p for p in model.parameters() if id(p) in matrix]
    no_decay = [p for p in model.parameters() if id(p) not in matrix]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


