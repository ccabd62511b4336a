"""The DeepSpeed ZeRO-3 side: where a rank's partitions live, their layout, and evaluating averaged weights in place."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

from averaging.averager import Averager
from averaging.partitions import Layout
from averaging.snapshots import SnapshotStore
from polyak.recipe import AveragingConfig, SnapshotConfig


def master_partitions(engine) -> list[torch.Tensor]:
    """This rank's fp32 master partitions, one flat tensor per param (sub-)group, updated in place by each step."""
    return list(engine.optimizer.fp32_partitioned_groups_flat)


def layout(engine) -> Layout:
    """Names (as in model.named_parameters(), tied parameters once) and full shapes, in the optimizer's order."""
    names = {param: name for name, param in engine.module.named_parameters()}
    groups = [[(names[param], tuple(param.ds_shape)) for param in group] for group in engine.optimizer.fp16_groups]
    return Layout(groups, world_size=engine.optimizer.partition_count)


def rank(engine) -> int:
    """This rank's place in the partitioning (its data-parallel rank)."""
    return dist.get_rank(group=engine.optimizer.dp_process_group)


@contextmanager
def swapped_in(engine, partitions: list[torch.Tensor]):
    """Run the model on averaged weights: copy fp32 `partitions` into the compute partitions, restore bitwise on exit.

    Collective: every rank must enter together (persistent parameters are re-gathered on entry and exit).
    """
    optimizer = engine.optimizer
    compute = optimizer.fp16_partitioned_groups_flat  # each parameter's ds_tensor is a view into these
    training = [t.clone() for t in compute]
    # As around a checkpoint load: release every gathered parameter, rewrite the partitions, gather the persistent
    # ones (which stay whole on every rank) again from the new partitions.
    optimizer.checkpoint_event_prologue()
    try:
        for t, p in zip(compute, partitions):
            t.copy_(p)  # host→device when the averages are offloaded; fp32→bf16 in bf16 runs
        # The all-gathers read the partitions on DeepSpeed's own streams: the copies must have landed.
        get_accelerator().synchronize()
        optimizer.checkpoint_event_epilogue()
        yield
    finally:
        optimizer.checkpoint_event_prologue()
        torch._foreach_copy_(compute, training)
        get_accelerator().synchronize()
        optimizer.checkpoint_event_epilogue()


def averager(cfg: AveragingConfig, engine, run_dir: Path, snapshots: SnapshotConfig = SnapshotConfig()) -> Averager:
    """The engine's averager: every average over this rank's master partitions, and the run's snapshot store
    (<run_dir>/snapshots) where a LAWA or `snapshots.every` needs it."""
    partition_layout, me = layout(engine), rank(engine)
    store = None
    if snapshots.every or any(a.kind == "lawa" for a in cfg.averages.values()):
        store = SnapshotStore(run_dir / "snapshots", snapshots, partition_layout, me, run_dir / "checkpoints")
    averager = Averager(cfg, master_partitions(engine), partition_layout, me, store, agree=_sum_over_ranks)
    # DeepSpeed steps the wrapped torch optimizer once per partition; each step writes the master partitions.
    engine.optimizer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: averager.fence())
    return averager


def _sum_over_ranks(flag: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(flag)
    return flag
