"""Memory a recipe needs on a world size, before anything is allocated: DeepSpeed's ZeRO-3 estimate of the model
states plus the averages' buffers. Activations come on top and are not counted."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

from model.llama import LlamaArgs, count_params
from polyak.errors import UserError
from polyak.recipe import Recipe

GiB = 2**30
FIT_HINT = "use more ranks, zero.offload_optimizer: cpu, averaging.offload: cpu, or a smaller model"


@dataclass
class Estimate:
    per_device: int  # bytes on each accelerator (on a CPU-only node: in host memory, per rank)
    per_node: int  # bytes of host memory per node

    def __str__(self) -> str:
        return f"{self.per_device / GiB:.1f} GiB per device, {self.per_node / GiB:.1f} GiB host memory per node"


def averaging_bytes(recipe: Recipe, params: int, world: int) -> tuple[int, int]:
    """Each rank's averaging buffers, (beside the partitions, in host memory): 1/N of the model in fp32 per EMA
    (in host memory when offloaded) and per LAWA (its running sum, in host memory: its samples are on disk), and one
    host copy of the partitions that feeds whatever is in host memory and the snapshots."""
    averages = recipe.averaging.averages.values()
    beside = sum(a.kind == "ema" and recipe.averaging.offload == "none" for a in averages)
    host = len(averages) - beside
    if host or recipe.snapshots.every:
        host += 1
    copy = 4 * -(-params // world)
    return beside * copy, host * copy


def estimate(recipe: Recipe, args: LlamaArgs, world: int, ranks_per_node: int, on_gpu: bool) -> Estimate:
    params = count_params(args)
    largest_layer = args.vocab_size * args.dim
    offload = recipe.zero.offload_optimizer == "cpu"
    host, device, _ = estimate_zero3_model_states_mem_needs(
        params, largest_layer, num_gpus_per_node=ranks_per_node, num_nodes=max(1, world // ranks_per_node),
        cpu_offload=offload, cpu_offload_params=False, zero_init=True)
    beside, in_host = averaging_bytes(recipe, params, world)
    device += beside
    host += in_host * ranks_per_node
    if not on_gpu:  # a CPU rank's "device" memory is host memory too
        host += device * ranks_per_node
    return Estimate(per_device=device, per_node=host)


def check_fits(need: Estimate, on_gpu: bool) -> None:
    """Stop early, with what to change, when the estimate exceeds this node's memory."""
    if on_gpu:
        have = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if need.per_device > have:
            raise UserError(f"the recipe needs about {need.per_device / GiB:.1f} GiB per GPU for model states and "
                            f"averages, the GPU has {have / GiB:.1f} GiB: {FIT_HINT}")
    have = psutil.virtual_memory().total
    if need.per_node > have:
        raise UserError(f"the recipe needs about {need.per_node / GiB:.1f} GiB of host memory per node for model "
                        f"states and averages, this node has {have / GiB:.1f} GiB: {FIT_HINT}")
