"""Oracles the end-to-end tests share, none of them the code under test: DeepSpeed's own zero_to_fp32, the averages'
definitions applied offline in float64 to its exports, and transformers' LlamaForCausalLM."""

from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from averaging.averages import gamma_of, power_weights
from averaging.release import Run
from data.loader import load_meta
from model.llama import Llama
from model.sizes import resolve
from polyak.recipe import Recipe, load_recipe


def zero_to_fp32(run_dir: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """DeepSpeed's fp32 master weights of a checkpoint (the latest without a tag), rebuilt by DeepSpeed."""
    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)


def initial_weights(recipe: Recipe) -> dict[str, torch.Tensor]:
    """θ0 as the run's fp32 master weights hold it, in float64: the model built as pretrain builds it. In bf16 runs
    zero.Init creates the parameters in bf16 and the master partitions are copied from them, so θ0 is the fp32
    initialisation rounded to bf16 (measured: equal to the last bit)."""
    dtype = torch.bfloat16 if recipe.train.precision == "bf16" else torch.float32
    with torch.random.fork_rng():
        torch.manual_seed(recipe.train.seed)
        model = Llama(resolve(recipe.model, load_meta(recipe.data.dir)["vocab_size"], recipe.data.seq_len))
    return {k: v.to(dtype).double() for k, v in model.state_dict().items()}


def offline_averages(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every average of a run at its last step, by definition (README, Weight averaging), in float64, from the fp32
    master weights that zero_to_fp32 rebuilds from each step's checkpoint (so the run must checkpoint every step).
    EMA: θ ← β·θ + (1−β)·θ_t from θ0; LAWA: the mean of the last `window` samples; power: its closed form, Σ w_k θ_k
    over the n samples with w_k = (k^(γ+1) − (k−1)^(γ+1)) / n^(γ+1); all sample when t % every = 0."""
    recipe = load_recipe(run_dir / "recipe.yaml")
    configs = recipe.averaging.averages
    theta0 = initial_weights(recipe)
    emas = {name: theta0 for name, cfg in configs.items() if cfg.kind == "ema"}
    windows = {name: [] for name, cfg in configs.items() if cfg.kind == "lawa"}
    sampled = {name: [] for name, cfg in configs.items() if cfg.kind == "power"}
    for step in range(1, recipe.train.steps + 1):
        due = [name for name, cfg in configs.items() if step % cfg.every == 0]
        if not due:
            continue
        full = {k: v.double() for k, v in zero_to_fp32(run_dir, f"global_step{step}").items()}
        for name in due:
            cfg = configs[name]
            if name in emas:
                emas[name] = {k: cfg.beta * v + (1 - cfg.beta) * full[k] for k, v in emas[name].items()}
            elif name in windows:
                windows[name] = (windows[name] + [full])[-cfg.window:]
            else:
                sampled[name].append(full)
    lawas = {name: {k: sum(s[k] for s in samples) / len(samples) for k in theta0} if samples else theta0
             for name, samples in windows.items()}
    powers = {}
    for name, samples in sampled.items():
        w = power_weights(gamma_of(configs[name].sigma_rel), len(samples))
        powers[name] = {k: sum(float(w_k) * s[k] for w_k, s in zip(w, samples)) for k in theta0} if samples else theta0
    return {**emas, **lawas, **powers}


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest error over all tensors, each relative to its own largest element."""
    assert got.keys() == want.keys()
    return max(((got[k].double() - want[k].double()).abs().max() / want[k].double().abs().max()).item()
               for k in want)


def released(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a release folder, whether in one file or in shards."""
    tensors = {}
    for f in sorted(out.glob("model*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def project_logits(run_dir: Path, weights: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Our model's logits on `weights`."""
    model = Llama(Run.of(run_dir / "checkpoints").args)
    if model.args.tie_embeddings:
        weights = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}
    model.load_state_dict(weights)
    with torch.no_grad():
        return model(tokens)


def hf_logits(out: Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits of a release folder."""
    # Imported here: its models take seconds to import, which ranks spawned from a test module would pay too.
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, LlamaForCausalLM)
    with torch.no_grad():
        return model(tokens).logits


def some_tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
