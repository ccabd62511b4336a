"""Consolidate a ZeRO-3 checkpoint into a transformers release folder: the raw training weights or one average.

    python -m averaging.consolidate runs/tiny_cpu/checkpoints [--tag global_step300] --weights ema --out release/ema

Everything comes from the files alone: no DeepSpeed engine, no process group. Each rank's flat partitions are
memory-mapped and only sliced: every tensor is assembled from its piece on each rank (averaging/partitions.py) and
streamed into its output shard, the shards written one after another. The rank files are mapped afresh for each
tensor, so that the pages read for one leave the process before the next: peak memory stays near one tensor, far
below one output shard, whatever the model size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from averaging.partitions import Layout, ParamSlice
from averaging.state import AverageFiles, description_file
from data.loader import load_meta
from data.tokenizer import write_hf_tokenizer_files
from launch.errors import UserError, cli
from launch.recipe import Recipe, load_recipe
from model.llama import Llama
from model.sizes import LlamaArgs, resolve, to_hf_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}
# DeepSpeed's per-rank files of a ZeRO-3 checkpoint (the optimizer's carry a bf16_ prefix in bf16 runs).
_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
_OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


@dataclass
class Run:
    """The training run a checkpoints directory belongs to: its recipe, prepared data and model shape."""

    dir: Path
    recipe: Recipe
    meta: dict
    args: LlamaArgs

    @classmethod
    def of(cls, ckpt_dir: Path) -> Run:
        run_dir = Path(ckpt_dir).parent
        recipe = load_recipe(run_dir / "recipe.yaml")
        meta = load_meta(recipe.data.dir)
        return cls(run_dir, recipe, meta, resolve(recipe.model, meta["vocab_size"], recipe.data.seq_len))

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


class MasterWeights:
    """The raw training weights: DeepSpeed's fp32 master partitions (`fp32_flat_groups` in each rank's optimizer
    states file), laid out as its model states file records (`param_shapes`, one dict per flat partition)."""

    def __init__(self, directory: Path):
        self.directory = directory
        model_states = directory / _MODEL_STATES
        if not model_states.is_file():
            raise UserError(f"{model_states}: not found; {directory} holds no DeepSpeed ZeRO-3 checkpoint")
        states = _load(model_states)
        self.step = states["global_steps"]
        self.layout = Layout([list(shapes.items()) for shapes in states["param_shapes"]],
                             world_size=states["dp_world_size"])
        ranks = {int(m.group(1)): directory / m.group(0)
                 for p in directory.iterdir() if (m := _OPTIM_STATES.match(p.name))}
        if sorted(ranks) != list(range(self.layout.world_size)):
            raise UserError(f"{directory}: optimizer states of ranks {sorted(ranks)}, but it was written by "
                            f"{self.layout.world_size} ranks; the checkpoint is incomplete")
        self.files = [ranks[rank] for rank in range(self.layout.world_size)]
        for rank in range(self.layout.world_size):
            self.partitions(rank)

    def partitions(self, rank: int) -> list[torch.Tensor]:
        """One rank's fp32 flat partitions, memory-mapped (read from disk only where sliced)."""
        state = _load(self.files[rank])["optimizer_state_dict"]
        flats = state["fp32_flat_groups"]
        have = [t.numel() for t in flats]
        want = [self.layout.partition_numel(g) for g in range(len(self.layout.groups))]
        if int(state["zero_stage"]) != 3 or have != want:
            raise UserError(f"{self.files[rank]}: flat partitions of {have} elements (ZeRO stage "
                            f"{int(state['zero_stage'])}), its model states file gives ZeRO-3 partitions of {want}")
        return flats

    @contextmanager
    def reader(self):
        """`read(rank, group, start, stop)`: elements [start, stop) of a rank's flat partition of a group."""
        flats = [self.partitions(rank) for rank in range(self.layout.world_size)]
        yield lambda rank, group, start, stop: flats[rank][group][start:stop]


def _load(path: Path) -> dict:
    # DeepSpeed's checkpoint files are pickles: the one documented exception where weights_only=False is allowed
    # (files the run's own trainer wrote). mmap: a tensor's bytes are read only when sliced.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def find_checkpoint(ckpt_dir: Path, tag: str | None) -> Path:
    """The checkpoint directory of `tag` (default: the one `latest` names) inside a run's checkpoints directory."""
    if not ckpt_dir.is_dir():
        raise UserError(f"{ckpt_dir}: no such checkpoints directory")
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            raise UserError(f"{latest}: not found; name a checkpoint with --tag (saved: {_saved(ckpt_dir)})")
        tag = latest.read_text().strip()
    directory = ckpt_dir / tag
    if not tag or not directory.is_dir():
        raise UserError(f"{ckpt_dir}: no checkpoint '{tag}' (saved: {_saved(ckpt_dir)})")
    return directory


def _saved(ckpt_dir: Path) -> str:
    def natural(name: str) -> list:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    tags = sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=natural)
    return ", ".join(tags) or "none"


def available_weights(directory: Path) -> list[str]:
    """`raw` where DeepSpeed's files are, then the averages saved in the checkpoint."""
    names = ["raw"] if (directory / _MODEL_STATES).is_file() else []
    if description_file(directory).is_file():
        names += list(json.loads(description_file(directory).read_text())["averages"])
    return names


def open_weights(directory: Path, name: str) -> MasterWeights | AverageFiles:
    available = available_weights(directory)
    if name not in available:
        raise UserError(f"--weights {name}: not in {directory} (available: {', '.join(available) or 'none'})")
    return MasterWeights(directory) if name == "raw" else AverageFiles(directory, name)


def refuse_existing(out: Path) -> None:
    if out.exists():
        raise UserError(f"{out}: already exists; a release is never overwritten, choose another folder")


def write_release(weights: MasterWeights | AverageFiles, run: Run, out: Path, dtype: str, max_shard_size: str,
                  info: dict) -> None:
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
        write_hf_tokenizer_files(run.recipe.data.dir, tmp)
        _write_json(tmp / "polyak.json", {"run_dir": str(run.dir.resolve()), **info,
                                          "data_dir": str(Path(run.recipe.data.dir).resolve()), "dtype": dtype})
        refuse_existing(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_shard(path: Path, weights: MasterWeights | AverageFiles, params: list[ParamSlice], dtype: torch.dtype,
                 bar: tqdm) -> None:
    """One safetensors file, streamed: the header first (every size is known), then each tensor's pieces from the
    ranks, in rank order and cut where the parameter ends (ZeRO-3 pads the last ranks' pieces). safetensors' own
    save_file wants the whole shard in memory; this holds a piece at a time. The rank files are mapped afresh for each
    tensor, so that the pages read for one leave the process with it."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for p in params:
        nbytes = math.prod(p.shape) * itemsize
        header[p.name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(p.shape),
                          "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for p in params:
            with weights.reader() as read:
                pieces = [read(rank, p.group, p.start, p.stop) for rank in range(weights.layout.world_size)]
                for part in p.unpadded(pieces):
                    # safetensors is little-endian, as is every machine torch runs on
                    f.write(part.to(dtype).contiguous().view(torch.uint8).numpy())
                    bar.update(part.numel() * itemsize)


def temp_dir_beside(path: Path) -> Path:
    """A new hidden directory next to `path` (to be renamed into it), with mkdir's modes, not mkdtemp's private ones."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def consolidate(ckpt_dir: Path, tag: str | None, weights: str, out: Path, dtype: str = "fp32",
                max_shard_size: str = "5GB") -> Path:
    """Export one checkpoint's raw weights or average `weights` as a transformers folder `out`."""
    refuse_existing(out)
    directory = find_checkpoint(ckpt_dir, tag)
    run = Run.of(ckpt_dir)
    source = open_weights(directory, weights)
    run.check(source.layout, directory)
    trainer = directory / "trainer.json"
    step = json.loads(trainer.read_text())["step"] if trainer.is_file() else source.step
    info = {"checkpoint": str(directory.resolve()), "step": step, "weights": weights}
    if isinstance(source, AverageFiles):
        info["average"] = source.entry
    write_release(source, run, out, dtype, max_shard_size, info)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, help="a run's checkpoints directory (<run.dir>/checkpoints)")
    parser.add_argument("--tag", help="the checkpoint, e.g. global_step300 (default: the latest)")
    parser.add_argument("--weights", required=True, help="raw (the training weights) or the name of an average")
    parser.add_argument("--out", type=Path, required=True, help="the release folder to create (never overwritten)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="model.safetensors is split into shards of at most this size (default: 5GB)")
    args = parser.parse_args()
    consolidate(args.checkpoints, args.tag, args.weights, args.out, args.dtype, args.max_shard_size)


if __name__ == "__main__":
    cli(main)
