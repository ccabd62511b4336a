"""The memory estimate printed before training, and the early stop when a recipe cannot fit."""

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

from bench.harness import ROOT, pretrain
from launch.memory import averaging_bytes, estimate
from model.llama import count_params
from model.sizes import resolve
from polyak.recipe import load_recipe


def test_averaging_buffers_are_one_nth_of_the_model_per_copy_whatever_the_window():
    recipe = load_recipe(ROOT / "recipes/tiny_cpu.yaml")  # ema + lawa
    # The EMA beside the partitions; in host memory the LAWA's sum and the copy that feeds it.
    assert averaging_bytes(recipe, params=1001, world=2) == (1 * 4 * 501, 2 * 4 * 501)
    recipe.averaging.averages["lawa"].window = 1000
    assert averaging_bytes(recipe, params=1001, world=2) == (1 * 4 * 501, 2 * 4 * 501)
    recipe.averaging.offload = "cpu"
    assert averaging_bytes(recipe, params=1001, world=2) == (0, 3 * 4 * 501)
    del recipe.averaging.averages["lawa"]
    assert averaging_bytes(recipe, params=1001, world=2) == (0, 2 * 4 * 501)
    recipe.averaging.offload = "none"
    assert averaging_bytes(recipe, params=1001, world=2) == (4 * 501, 0)
    recipe.snapshots.every = 100
    assert averaging_bytes(recipe, params=1001, world=2) == (4 * 501, 4 * 501)


def test_estimate_adds_the_averages_to_deepspeeds_zero3_estimate():
    recipe = load_recipe(ROOT / "recipes/1b_lawa.yaml")
    args = resolve(recipe.model, 50257, recipe.data.seq_len)
    params = count_params(args)
    host, device, _ = estimate_zero3_model_states_mem_needs(params, args.vocab_size * args.dim, num_gpus_per_node=8,
                                                            num_nodes=2, cpu_offload=False, zero_init=True)
    need = estimate(recipe, args, world=16, ranks_per_node=8, on_gpu=True)
    assert need.per_device == device  # the averages are offloaded to CPU in this recipe
    assert need.per_node == host + 8 * averaging_bytes(recipe, params, 16)[1]


@pytest.mark.slow
def test_a_recipe_that_cannot_fit_stops_before_allocating(data_dir, tmp_path):
    proc = pretrain(2, [f"data.dir={data_dir}", f"run.dir={tmp_path}", "model.size=7b", "model.dim=null",
                        "model.n_layers=null", "model.n_heads=null", "model.n_kv_heads=null"], check=False)
    assert proc.returncode == 2
    assert "error: the recipe needs about" in proc.stderr
    assert "GiB of host memory per node for model states and averages, this node has" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
