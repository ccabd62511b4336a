"""A transformers release folder from any weights a checkpoint holds (averaging/weights.py), streamed.

The folder: config.json for `LlamaForCausalLM`, `model.safetensors` (sharded above a size, with its index),
generation_config.json, the run's tokenizer files, and `polyak.json`, its provenance (`read_provenance`). Each
tensor is assembled from its piece on every rank and streamed into its output shard, the shards written one after
another, the rank files mapped afresh for each tensor: peak memory stays near one tensor, whatever the model size.
Everything comes from the run folder alone (recipe.yaml, and the tokenizer the trainer copied into it), so a run
folder copied to another machine can be released there.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from averaging import tensorfile
from averaging.partitions import Layout, ParamSlice
from averaging.snapshots import SnapshotWeights
from averaging.state import SavedAverage
from averaging.weights import MasterWeights
from data.loader import load_meta
from data.tokenizer import write_hf_tokenizer_files
from model.llama import Llama, LlamaArgs, to_hf_config
from model.sizes import resolve
from polyak.errors import UserError
from polyak.files import temp_dir_beside
from polyak.recipe import Recipe, load_recipe

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVENANCE = "polyak.json"
# What can be released: anything with a partition layout and a slice reader, `read(rank, group, start, stop)`.
Weights = MasterWeights | SavedAverage | SnapshotWeights
# Where the trainer copies the prepared data's tokenizer.json and meta.json inside a run directory.
RUN_TOKENIZER = "tokenizer"


@dataclass
class Run:
    """The training run a checkpoints directory belongs to: its recipe, tokenizer and model shape."""

    dir: Path
    recipe: Recipe
    tokenizer_dir: Path  # holds tokenizer.json and meta.json
    meta: dict
    args: LlamaArgs

    @classmethod
    def of(cls, ckpt_dir: Path) -> Run:
        run_dir = Path(ckpt_dir).parent
        recipe = load_recipe(run_dir / "recipe.yaml")
        # Runs older than the copy inside the run folder: the prepared data folder the recipe names.
        tokenizer_dir = run_dir / RUN_TOKENIZER if (run_dir / RUN_TOKENIZER).is_dir() else Path(recipe.data.dir)
        meta = load_meta(tokenizer_dir)
        return cls(run_dir, recipe, tokenizer_dir, meta, resolve(recipe.model, meta["vocab_size"],
                                                                   recipe.data.seq_len))

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The model's parameters (a tied embedding once), in its own order."""
        with torch.device("meta"), _SkipInit():
            model = Llama(self.args)
        return {name: tuple(p.shape) for name, p in model.named_parameters()}

    def check(self, layout: Layout, directory: Path) -> None:
        """The checkpoint's files hold exactly this run's model."""
        expected, found = self.param_shapes(), dict(kv for group in layout.groups for kv in group)
        problems = ([f"{n} is missing" for n in expected if n not in found]
                    + [f"it has {n}, which the model has not" for n in found if n not in expected]
                    + [f"{n} is {list(found[n])}, the model's is {list(s)}"
                       for n, s in expected.items() if n in found and found[n] != s])
        if problems:
            raise UserError(f"{directory}: its files do not match the model of {self.dir / 'recipe.yaml'}: "
                            f"{problems[0]}" + (f" (and {len(problems) - 1} more differences)" if problems[1:] else ""))


class _SkipInit(TorchFunctionMode):
    """Skips torch.nn.init's initialisers: a meta tensor has no values to draw, and drawing them would first load
    torch's Python meta kernels, which takes longer than exporting a small model."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def refuse_existing(out: Path) -> None:
    if out.exists():
        raise UserError(f"{out}: already exists; a release is never overwritten, choose another folder")


def write_release(weights: Weights, run: Run, out: Path, dtype: str, max_shard_size: str, info: dict) -> None:
    """A transformers folder at `out`: config, weights, generation config, tokenizer and polyak.json (`info`
    describes the weights). Written into a temporary directory beside `out`, renamed into place once complete."""
    refuse_existing(out)
    params = {p.name: p for p in weights.layout.params()}
    order = run.param_shapes()  # embeddings, blocks, final norm, head: each shard holds neighbouring layers
    try:
        split = split_torch_state_dict_into_shards(
            {name: torch.empty(shape, dtype=DTYPES[dtype], device="meta") for name, shape in order.items()},
            filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    except ValueError:
        raise UserError(f"--max-shard-size {max_shard_size!r}: expected a size such as 5GB or 500MB") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    try:
        with tqdm(total=split.metadata["total_size"], unit="B", unit_scale=True, desc=f"writing {out}",
                  disable=None) as bar:
            for filename, names in split.filename_to_tensors.items():
                _write_shard(tmp / filename, weights, [params[name] for name in names], DTYPES[dtype], bar)
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            _write_json(tmp / "model.safetensors.index.json", index)
        eos = run.meta["eos_id"]
        config = to_hf_config(run.args, bos_token_id=None, eos_token_id=eos)
        config["dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {"bos_token_id": None, "eos_token_id": eos})
        write_hf_tokenizer_files(run.tokenizer_dir, tmp)
        _write_json(tmp / PROVENANCE, {"run_dir": str(run.dir.resolve()), **info,
                                       "data_dir": str(Path(run.recipe.data.dir).resolve()), "dtype": dtype})
        refuse_existing(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_shard(path: Path, weights: Weights, params: list[ParamSlice], dtype: torch.dtype, bar: tqdm) -> None:
    """One safetensors file, streamed: each tensor's pieces from the ranks, in rank order and cut where the parameter
    ends (ZeRO-3 pads the last ranks' pieces), one piece in memory at a time. The rank files are mapped afresh for
    each tensor, so that the pages read for one leave the process with it."""
    def pieces(p: ParamSlice):
        with weights.reader() as read:
            yield from p.unpadded(read(rank, p.group, p.start, p.stop) for rank in range(weights.layout.world_size))

    tensorfile.write(path, [tensorfile.Entry(p.name, dtype, p.shape, lambda p=p: pieces(p)) for p in params],
                     metadata={"format": "pt"}, progress=bar.update)


def read_provenance(model_dir: Path) -> dict | None:
    """A release folder's polyak.json; None for a folder this module did not write."""
    path = Path(model_dir) / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
