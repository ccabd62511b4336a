"""Consolidate a ZeRO-3 checkpoint into a transformers release folder: the raw training weights or one average.

    python -m averaging.consolidate runs/tiny_cpu/checkpoints [--tag global_step300] --weights ema --out release/ema
    python -m averaging.consolidate runs/tiny_cpu/checkpoints --snapshot 120 --weights raw --out release/s120

Everything comes from the run folder alone: no DeepSpeed engine, no process group, peak memory near one tensor
(averaging/release.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from averaging.release import DTYPES, Run, refuse_existing, write_release
from averaging.snapshots import Snapshot, SnapshotWeights, saved_steps
from averaging.state import SavedAverage
from averaging.weights import open_weights
from polyak import checkpoints
from polyak.errors import UserError, cli


def consolidate(ckpt_dir: Path, tag: str | None, weights: str, out: Path, dtype: str = "fp32",
                max_shard_size: str = "5GB", snapshot: int | None = None) -> Path:
    """Export one checkpoint's raw weights or average `weights` (or what snapshot `snapshot` holds) as a
    transformers folder `out`."""
    refuse_existing(out)
    directory = checkpoints.find(ckpt_dir, tag) if snapshot is None else None
    run = Run.of(ckpt_dir)
    if snapshot is not None:
        directory = run.dir / "snapshots" / f"step{snapshot}"
        if not directory.is_dir():
            raise UserError(f"--snapshot {snapshot}: no {directory} (snapshots of steps "
                            f"{', '.join(map(str, saved_steps(run.dir / 'snapshots'))) or 'none'})")
        source = SnapshotWeights(Snapshot(directory).check(), weights)
        step = snapshot
    else:
        source = open_weights(directory, weights)
        trainer = checkpoints.read_trainer_state(directory)
        step = trainer["step"] if trainer else source.step
    run.check(source.layout, directory)
    info = {"checkpoint": str(directory.resolve()), "step": step, "weights": weights}
    if isinstance(source, SavedAverage):
        info["average"] = source.entry
    write_release(source, run, out, dtype, max_shard_size, info)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, help="a run's checkpoints directory (<run.dir>/checkpoints)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tag", help="the checkpoint, e.g. global_step300 (default: the latest)")
    where.add_argument("--snapshot", type=int, metavar="STEP", help="the snapshot of this step instead")
    parser.add_argument("--weights", required=True, help="raw (the training weights) or the name of an average")
    parser.add_argument("--out", type=Path, required=True, help="the release folder to create (never overwritten)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="model.safetensors is split into shards of at most this size (default: 5GB)")
    args = parser.parse_args()
    consolidate(args.checkpoints, args.tag, args.weights, args.out, args.dtype, args.max_shard_size, args.snapshot)


if __name__ == "__main__":
    cli(main)
