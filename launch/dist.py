"""The process group: starting it on GPUs (NCCL) or CPU ranks (gloo), rank-0 work the others wait for, agreement
across ranks, and a one-line diagnosis when a rank dies or the job is stopped."""

from __future__ import annotations

import atexit
import os
import socket
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import psutil
import torch
from deepspeed.constants import default_pg_timeout

from polyak import checkpoints
from polyak.errors import UserError


# How long the other ranks wait for rank-0-only work (data preparation of billions of tokens, the universal
# conversion of a 7B checkpoint): hours, not the collectives' timeout. A rank 0 that dies ends the wait at once (its
# sockets close), so this bounds only a rank 0 that hangs.
RANK0_PATIENCE = timedelta(hours=48)


def init_distributed(timeout: timedelta = default_pg_timeout) -> torch.device:
    """The process group; `timeout` is how long a collective waits for the slowest rank."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        _init_process_group("nccl", timeout)
        return torch.device("cuda", local_rank)
    if "OMP_NUM_THREADS" not in os.environ:  # without core binding, every rank would start a thread per core
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_SIZE", 1))))
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce at start-up and maps a 66 MiB /dev/shm buffer
    # per rank that it never removes; a rank killed while it checks that build leaves torch's build lock behind, and
    # every later start waits on it forever. The op only serves inference_all_reduce, which training never calls:
    # gloo does every collective. Marked unavailable, it is neither built nor mapped.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    _init_process_group("gloo", timeout)
    return torch.device("cpu")


def _init_process_group(backend: str, timeout: timedelta) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group(backend, store=_rendezvous(rank, world, timeout), rank=rank,
                                         world_size=world, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts the group above


def _rendezvous(rank: int, world: int, timeout: timedelta) -> torch.distributed.Store:
    """Where the ranks meet. Two jobs on one node given the same MASTER_PORT (the launcher's default 29500) must
    neither meet nor harm each other. On one node under DeepSpeed's launcher, the ranks are siblings and meet in a
    file named after their parent, the launcher, as `torchrun --standalone` needs no port. Across nodes they meet at
    MASTER_ADDR:MASTER_PORT, and each rank claims its slot there first: a slot already claimed is another job's."""
    if os.environ.get("CROSS_SIZE") == "1":
        launcher = psutil.Process().parent()
        path = Path(tempfile.gettempdir()) / f"polyak-rendezvous-{launcher.pid}-{launcher.create_time():.3f}"
        atexit.register(path.unlink, missing_ok=True)  # at exit every rank is past the store: the last barrier
        return torch.distributed.FileStore(str(path), world)
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    hint = f"pass a free one, e.g. deepspeed --master_port {free_port()} ... (or set MASTER_PORT)"
    try:
        store = torch.distributed.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout,
                                           wait_for_workers=False)
    except torch.distributed.DistNetworkError as e:
        if rank == 0 and "address already in use" in str(e).lower():
            raise UserError(f"{host}:{port} is taken, by another job or program: {hint}") from None
        raise
    claim = f"{socket.gethostname()}:{os.getpid()}"
    if store.compare_set(f"polyak/rank{rank}", "", claim).decode() != claim:
        raise UserError(f"{host}:{port} is another job's rendezvous (its rank {rank} is there already): {hint}")
    return store


def free_port() -> int:
    """A TCP port nobody listens on now (bound on every interface, so free on loopback too)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def on_rank0(fn) -> None:
    """Run `fn` on rank 0 while the others wait, however long it takes; a UserError there stops every rank (printed
    once). The others wait in a group of their own (gloo, on the host): a wait on the training group would end at its
    collective timeout."""
    patient = torch.distributed.new_group(backend="gloo", timeout=RANK0_PATIENCE)
    failure = [None]
    if dist.get_rank() == 0:
        try:
            fn()
        except UserError as e:
            failure = [str(e)]
    torch.distributed.broadcast_object_list(failure, src=0, group=patient)
    torch.distributed.destroy_process_group(patient)
    if failure[0] is not None:
        raise UserError(failure[0])


class Stopped(Exception):
    """SIGTERM: from the launcher when another rank died, or from the scheduler (time limit, preemption)."""


def raise_stopped(signum, frame):
    raise Stopped()


def explain_stop(error: Exception, ckpt_dir: Path) -> None:
    """A rank that dies, or a SIGTERM, stops the others wherever they are. Instead of their tracebacks: one line
    (from the lowest surviving local rank) saying why and how to go on, and exit code 1."""
    lost, alive = _local_ranks()
    peer_gone = isinstance(error, torch.distributed.DistError) or "by peer" in str(error)
    if not (lost or peer_gone or isinstance(error, Stopped)):
        return
    if int(os.environ.get("LOCAL_RANK", "0")) == min(alive):
        why = (f"rank {', '.join(map(str, lost))} died (killed, or crashed: see its output above)" if lost
               else "stopped by SIGTERM" if isinstance(error, Stopped)
               else "a rank on another node died" if int(os.environ.get("CROSS_SIZE", "1")) > 1
               else "a rank's connection was lost")
        print(f"error: {why}; run the same command again to resume from the last checkpoint: "
              f"{checkpoints.describe_latest(ckpt_dir)}", file=sys.stderr)
    sys.exit(1)


def _local_ranks() -> tuple[list[int], list[int]]:
    """The global ranks this node's launcher started that are gone, and the local ranks still running."""
    size = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or "1")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    alive = {local}
    for sibling in psutil.Process().parent().children():
        try:
            if sibling.status() != psutil.STATUS_ZOMBIE and "LOCAL_RANK" in (env := sibling.environ()):
                alive.add(int(env["LOCAL_RANK"]))
        except psutil.Error:
            pass  # gone while we looked, or not ours to read
    first = int(os.environ.get("RANK", "0")) - local  # the launcher numbers a node's ranks consecutively
    return [first + r for r in range(size) if r not in alive], sorted(alive)


def all_finite(loss: torch.Tensor) -> bool:
    """True when every rank's loss is finite (one tiny all-reduce, so all ranks skip together)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    dist.all_reduce(bad)
    return bad.item() == 0


def mean_over_ranks(losses: list[torch.Tensor]) -> float:
    total = torch.stack(losses).float().mean().reshape(1)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


