"""Run directories the end-to-end tests make from others': a copy of some checkpoints to resume from, one of them
with a token's input embedding poisoned; and what a checkpoint says of the data position."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from averaging.weights import MasterWeights
from polyak import checkpoints


def copy_run(source: Path, run_dir: Path, steps=None) -> None:
    """A run directory holding `source`'s recipe, snapshots (its LAWAs' samples among them) and checkpoints (those
    of `steps` only, if given)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(source / "recipe.yaml", run_dir / "recipe.yaml")
    if (source / "snapshots").is_dir():
        shutil.copytree(source / "snapshots", run_dir / "snapshots")
    for step in steps or checkpoints.saved_steps(source / "checkpoints"):
        shutil.copytree(source / "checkpoints" / f"global_step{step}", run_dir / "checkpoints" / f"global_step{step}")
    last = max(steps) if steps else checkpoints.latest_step(source / "checkpoints")
    (run_dir / "checkpoints" / "latest").write_text(f"global_step{last}")


def poison_token(directory: Path, token: int) -> None:
    """Set the input embedding of `token` to NaN in the fp32 master weights of a checkpoint (on every rank holding a
    piece of it) and seal its manifest again: a run resumed from it has a non-finite loss exactly on the micro-batches
    whose inputs hold that token."""
    layout = MasterWeights(directory).layout  # as DeepSpeed's own model states file records it
    embedding = next(p for p in layout.params() if p.name == "model.embed_tokens.weight")
    dim, chunk = embedding.shape[1], embedding.stop - embedding.start
    for rank in {e // chunk for e in range(token * dim, (token + 1) * dim)}:
        path = next(directory.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))  # bf16_ prefix in bf16
        # DeepSpeed's own pickle, rewritten here to poison the fp32 master weights the resume restores.
        states = torch.load(path, map_location="cpu", weights_only=False)
        flat = states["optimizer_state_dict"]["fp32_flat_groups"][embedding.group].detach()
        for e in range(token * dim, (token + 1) * dim):
            if e // chunk == rank:
                flat[embedding.start + e % chunk] = float("nan")
        torch.save(states, path)
    manifest = json.loads((directory / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (directory / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def sampler(run_dir: Path, step: int) -> dict:
    """The data position a checkpoint resumes from (global micro-batches consumed)."""
    return json.loads((run_dir / "checkpoints" / f"global_step{step}" / "trainer.json").read_text())["sampler"]
