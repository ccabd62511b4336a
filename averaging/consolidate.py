"""Consolidate a ZeRO-3 checkpoint into a transformers release folder: the raw training weights or one average.

    python -m averaging.consolidate runs/tiny_cpu/checkpoints [--tag global_step300] --weights ema --out release/ema

Everything comes from the run folder alone: no DeepSpeed engine, no process group, peak memory near one tensor
(averaging/release.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from averaging.release import DTYPES, Run, refuse_existing, write_release
from averaging.state import SavedAverage
from averaging.weights import open_weights
from polyak import checkpoints
from polyak.errors import cli


def consolidate(ckpt_dir: Path, tag: str | None, weights: str, out: Path, dtype: str = "fp32",
                max_shard_size: str = "5GB") -> Path:
    """Export one checkpoint's raw weights or average `weights` as a transformers folder `out`."""
    refuse_existing(out)
    directory = checkpoints.find(ckpt_dir, tag)
    run = Run.of(ckpt_dir)
    source = open_weights(directory, weights)
    run.check(source.layout, directory)
    trainer = checkpoints.read_trainer_state(directory)
    info = {"checkpoint": str(directory.resolve()), "step": trainer["step"] if trainer else source.step,
            "weights": weights}
    if isinstance(source, SavedAverage):
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
