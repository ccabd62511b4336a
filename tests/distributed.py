"""Run a function on N CPU ranks (gloo, deepspeed.init_distributed) in fresh processes; collect each rank's result."""

from __future__ import annotations

import faulthandler
import os
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from deepspeed.constants import default_pg_timeout

from launch.dist import free_port
from polyak.errors import leave


def run_ranks(fn, world_size: int, *args, timeout: float = 600, collective_timeout: timedelta = default_pg_timeout):
    """`fn(rank, world_size, *args)` on every rank; returns their return values in rank order. `collective_timeout`:
    the process group's.

    `fn` and `args` must be picklable (a module-level function). A rank that raises fails the test with its
    traceback; the other ranks are then stopped, as they would wait forever in a collective.
    """
    port = free_port()
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        procs = [context.Process(target=_rank_main, daemon=True,
                                 args=(fn, rank, world_size, port, out, args, timeout, collective_timeout))
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                if any(p.exitcode not in (None, 0) for p in procs):
                    break  # the others would wait for it forever
                time.sleep(0.1)
        finally:
            alive = [rank for rank, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
        # The first rank to fail is the cause; the others usually failed in a collective because of it.
        errors = sorted(out.glob("rank*.error"), key=lambda f: f.stat().st_mtime_ns)
        if errors:
            pytest.fail("\n".join(f"{f.stem} of {world_size} failed:\n{f.read_text()}" for f in errors), pytrace=False)
        for rank, p in enumerate(procs):
            if p.exitcode != 0 and rank not in alive:
                pytest.fail(f"rank {rank} of {world_size} exited with code {p.exitcode}", pytrace=False)
        if alive:
            stacks = "\n".join(f"rank {rank}:\n{(out / f'rank{rank}.stacks').read_text()}" for rank in alive)
            pytest.fail(f"ranks {alive} of {world_size} still running after {timeout:g} s; where they were:\n{stacks}",
                        pytrace=False)
        return [torch.load(out / f"rank{rank}.pt") for rank in range(world_size)]


def _rank_main(fn, rank: int, world_size: int, port: int, out: Path, args: tuple, timeout: float,
               collective_timeout: timedelta) -> None:
    stacks = open(out / f"rank{rank}.stacks", "w")  # faulthandler writes to it until the process ends
    faulthandler.dump_traceback_later(max(1.0, timeout - 5), file=stacks)  # just before the parent gives up
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), LOCAL_SIZE=str(world_size))
    code = 0
    try:
        from launch.dist import init_distributed

        init_distributed(collective_timeout)  # as training does: the ranks share the cores, gloo does every collective
        result = fn(rank, world_size, *args)
        torch.save(result, out / f"rank{rank}.pt")
    except Exception:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        code = 1
    leave(code)  # as launch/pretrain.py's ranks leave
