"""The DeepSpeed config, generated from the recipe (never hand-templated)."""

from polyak.recipe import Recipe


def deepspeed_config(recipe: Recipe, world_size: int, load_universal: bool = False) -> dict:
    t, z = recipe.train, recipe.zero
    zero = {
        "stage": 3,
        "overlap_comm": world_size > 1,
        "contiguous_gradients": True,
        "reduce_bucket_size": z.reduce_bucket_size,
        "stage3_prefetch_bucket_size": z.prefetch_bucket_size,
        "stage3_param_persistence_threshold": z.param_persistence_threshold,
        # Without this the 16-bit weights are gathered into every checkpoint, a full model per save.
        "stage3_gather_16bit_weights_on_model_save": False,
    }
    if z.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        # ZeRO-3 adds up the micro-batches' gradient partitions in the model's dtype unless told otherwise: in bf16,
        # an accumulation of 4 would round every partial sum to 8 bits of mantissa.
        "data_types": {"grad_accum_dtype": "fp32"},
        # True only to resume from a checkpoint of another world size, converted by launch/universal.py.
        "checkpoint": {"load_universal": load_universal},
        # DeepSpeed's DeepCompile: engine.compile() (launch/engine.py, zero.compile) then uses its ZeRO-3 passes.
        "compile": {"deepcompile": z.deepcompile},
        # Our torch AdamW is the optimizer on every device; DeepSpeed would otherwise insist on its CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
