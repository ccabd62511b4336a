"""What a recipe asks of the hardware it names, before anything runs: memory per GPU and per node, tokens needed
against tokens available, checkpoint and snapshot sizes, and each average's horizon as a share of the run.

    python -m launch.plan --recipe recipes/1b_lawa.yaml [--set key=value ...] [--world N]

No process group and no GPU: it runs on any machine. A recipe that does not fit its hardware is a one-line error.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from data.loader import load_meta
from launch.memory import FIT_HINT, GiB, estimate
from model.llama import count_params
from model.sizes import resolve
from polyak.errors import UserError, cli
from polyak.recipe import AverageConfig, DataConfig, Recipe, load_recipe

# Tokens of the hub datasets the recipes stream, in GPT-2 tokens as their dataset cards round them: approximate.
HUB_TOKENS = {
    ("HuggingFaceFW/fineweb-edu", "sample-10BT"): 10 * 10**9,
    ("HuggingFaceFW/fineweb-edu", "sample-100BT"): 100 * 10**9,
    ("HuggingFaceFW/fineweb-edu", "sample-350BT"): 350 * 10**9,
}


def tokens_needed(recipe: Recipe, world: int) -> int:
    t = recipe.train
    return t.steps * t.micro_batch * t.grad_accum * world * recipe.data.seq_len


def tokens_per_pass(recipe: Recipe, world: int, train_tokens: int) -> int:
    """Tokens one pass over a train split gives: data/loader.py's sampler drops the windows left over at its end."""
    seq_len, global_batch = recipe.data.seq_len, world * recipe.train.micro_batch
    return (train_tokens - 1) // seq_len // global_batch * global_batch * seq_len


def repeat_warning(recipe: Recipe, world: int, train_tokens: int) -> str | None:
    """One line when the run will see its train split more than once, else None."""
    needed, once = tokens_needed(recipe, world), tokens_per_pass(recipe, world, train_tokens)
    if needed <= once:
        return None
    passes = f"{needed / once:.2f} times" if once else "more than once"
    return (f"warning: data repeats: the run needs {needed:,} tokens, one pass over the train split gives "
            f"{once:,}, so it sees its data {passes}")


def available_tokens(data: DataConfig) -> tuple[int | None, str]:
    """The train split's tokens and where the number comes from: the prepared meta.json when data.dir holds one,
    else a shipped hub dataset's known size; None when only preparing the data can tell."""
    if (Path(data.dir) / "meta.json").is_file():
        return load_meta(data.dir)["train_tokens"], f"prepared in {data.dir}"
    known = HUB_TOKENS.get((data.name, data.subset)) if data.source == "hub" and data.tokenizer == "gpt2" else None
    cap = "" if data.max_tokens is None else f", data.max_tokens={data.max_tokens:,}"
    if known is None:
        return None, f"unknown until the data is prepared (python -m data.prepare){cap}"
    total = min(known, data.max_tokens or known)
    return round(total * (1 - data.val_fraction)), (f"approximate: {data.name} {data.subset} has about "
                                                    f"{known / 1e9:.0f}B GPT-2 tokens{cap}, less the val split")


def plan(recipe: Recipe, world: int) -> tuple[list[str], str | None]:
    """The plan's lines, and why the recipe does not fit its hardware (None when it does)."""
    hw, t, data = recipe.hardware, recipe.train, recipe.data
    ranks_per_node = min(world, hw.ranks_per_node)
    args = resolve(recipe.model, _vocab_size(recipe), data.seq_len)
    params = count_params(args)
    need = estimate(recipe, args, world, ranks_per_node, on_gpu=hw.gpu is not None)
    named = f"{hw.nodes} node{'s' * (hw.nodes > 1)} × {hw.ranks_per_node} {hw.gpu or 'CPU ranks'}"
    lines = [f"world: {world} ranks" + (f" = {named}" if world == hw.ranks_per_node * hw.nodes else
                                        f" (--world; the recipe names {named})"),
             f"parameters: {params:,} ({_count(params)})"]
    what = "(model states and averages; activations come on top)"
    if hw.gpu:
        lines.append(f"memory per GPU: {_gib(need.per_device)} of {hw.gpu_memory_gib:g} GiB {what}")
    else:
        lines.append(f"memory per rank: {_gib(need.per_device)}, in host memory {what}")
    lines.append(f"memory per node: {_gib(need.per_node)} of {hw.host_memory_gib:g} GiB host memory "
                 f"({ranks_per_node} ranks a node)")

    needed = tokens_needed(recipe, world)
    lines.append(f"tokens needed: {needed:,} = {t.steps} steps × {t.micro_batch} micro_batch × {t.grad_accum} "
                 f"grad_accum × {world} ranks × {data.seq_len} seq_len")
    available, source = available_tokens(data)
    lines.append(f"tokens available: {source}" if available is None else
                 f"tokens available: {available:,} train tokens ({source})")
    if available is not None and (warning := repeat_warning(recipe, world, available)):
        lines.append(warning)

    averages = recipe.averaging.averages
    # ZeRO-3's model-state files hold no weights: the fp32 master partitions in the optimizer files are the weights.
    per_param = 12 + 4 * len(averages)
    optimizer = "the fp32 master weights and Adam's two moments"
    lines.append(f"checkpoint size: {_gib(params * per_param)} ({per_param} bytes a parameter: "
                 + (f"12 for {optimizer}, 4 for each average: {', '.join(averages)})" if averages else f"{optimizer})"))
    s = recipe.snapshots
    if s.every:
        size = params * (4 if s.dtype == "fp32" else 2) * len(s.weights)
        lines.append(f"snapshot size: {_gib(size)} every {s.every} steps ({', '.join(s.weights)}, {s.dtype})")
    for name, a in averages.items():
        lines.append(f"horizon {name}: {_horizon(a, t.steps)}")
        if a.kind == "lawa":
            lines.append(f"snapshots of {name}: {a.window} samples × {_gib(params * 4)} on disk (fp32)")

    if hw.gpu and need.per_device > hw.gpu_memory_gib * GiB:
        return lines, (f"the recipe needs about {_gib(need.per_device)} per GPU for model states and "
                       f"averages on {world} ranks, more than hardware.gpu_memory_gib={hw.gpu_memory_gib:g}: "
                       f"{FIT_HINT}")
    if need.per_node > hw.host_memory_gib * GiB:
        return lines, (f"the recipe needs about {_gib(need.per_node)} of host memory per node "
                       f"({ranks_per_node} ranks a node), more than hardware.host_memory_gib={hw.host_memory_gib:g}: "
                       f"{FIT_HINT}")
    return lines, None


def _horizon(a: AverageConfig, steps: int) -> str:
    if a.kind == "power":  # on eval.sweep's axis: a uniform window of the same spread
        return (f"sigma_rel {a.sigma_rel:g} = {a.sigma_rel:.1%} of the steps so far, as wide as a uniform window of "
                f"{math.sqrt(12) * a.sigma_rel:.1%} of them (a power EMA grows with the run)")
    if a.kind == "ema":
        length, how = a.every / (1 - a.beta), f"every {a.every} / (1 - beta {a.beta})"
    else:
        length, how = a.window * a.every, f"window {a.window} × every {a.every}"
    return f"{length:g} steps = {length / steps:.1%} of {steps} steps ({how})"


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _vocab_size(recipe: Recipe) -> int:
    """The tokenizer's vocabulary without loading it: the prepared meta's, else what the recipe says it is."""
    data = recipe.data
    if (Path(data.dir) / "meta.json").is_file():
        return load_meta(data.dir)["vocab_size"]
    if recipe.model.vocab_size is not None:
        return recipe.model.vocab_size
    if data.tokenizer == "bpe":
        return data.bpe_vocab_size
    raise UserError(f"data.tokenizer={data.tokenizer!r}: its vocabulary is known once the data is prepared "
                    "(python -m data.prepare) or when model.vocab_size is set")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="a YAML recipe from recipes/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (dotted), e.g. --set model.size=7b; repeatable")
    parser.add_argument("--world", type=int, default=None, metavar="N",
                        help="ranks in all (default: hardware.ranks_per_node × hardware.nodes)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    world = recipe.hardware.ranks_per_node * recipe.hardware.nodes if args.world is None else args.world
    if world < 1:
        raise UserError(f"--world {world}: must be at least 1")
    lines, misfit = plan(recipe, world)
    print("\n".join(lines), flush=True)
    if misfit:
        raise UserError(misfit)


if __name__ == "__main__":
    cli(main)
