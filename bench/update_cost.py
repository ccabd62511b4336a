"""Our per-rank averages against the gathered-EMA pattern and the memory-bandwidth limit, in one run.

    .venv/bin/deepspeed --num_gpus 2 bench/update_cost.py --recipe recipes/tiny_cpu.yaml [--set ...]

One engine. Every pattern is timed in alternating blocks (so drift in the machine's speed hits all alike), each
timed call between barriers; a call's time is the slowest rank's, as the ranks wait for each other after it.
  Per update, over one rank's partitions: the bandwidth references (a copy_ of them into a scratch buffer, an
  in-place add_ of them into it, which moves a lerp's bytes, and a lerp_ of it toward them), a one-pass aminmax
  over them, and ours: Averager's non-finite check alone, the EMA's lerp alone, Averager.update with one EMA and
  with one LAWA (every: 1); against the gathered pattern: GatheredParameters over every parameter and a lerp into
  a full fp32 replica on every rank.
  Per training step: a step alone, and a step followed by each pattern's update.
Bytes sent are counted by wrapping every collective of deepspeed.comm and torch.distributed; memory is the buffers'
bytes and the resident set (VmRSS, VmHWM), grown by creating a pattern and at its peak during its updates.
Rank 0 prints two markdown tables and appends a JSON line to --out.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import shutil
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

from averaging.averager import Averager
from averaging.zero import averager as make_averager
from averaging.zero import master_partitions
from bench.harness import bench_parser, trainer
from model.llama import count_params
from polyak.errors import cli
from polyak.recipe import AverageConfig, AveragingConfig, load_recipe

MiB = 2**20

# Bytes each rank sends per byte of a collective's payload (its largest tensor argument: the gathered output, the
# reduced input) when a ring algorithm runs it on w ranks; 1 for point-to-point and the rest.
RING_VOLUME = {
    "all_gather": lambda w: (w - 1) / w,
    "all_gather_into_tensor": lambda w: (w - 1) / w,
    "all_gather_base": lambda w: (w - 1) / w,
    "_all_gather_base": lambda w: (w - 1) / w,
    "all_gather_coalesced": lambda w: (w - 1) / w,
    "reduce_scatter": lambda w: (w - 1) / w,
    "reduce_scatter_tensor": lambda w: (w - 1) / w,
    "_reduce_scatter_base": lambda w: (w - 1) / w,
    "all_to_all": lambda w: (w - 1) / w,
    "all_to_all_single": lambda w: (w - 1) / w,
    "all_reduce": lambda w: 2 * (w - 1) / w,
    "all_reduce_coalesced": lambda w: 2 * (w - 1) / w,
    "inference_all_reduce": lambda w: 2 * (w - 1) / w,
}
OTHER_COLLECTIVES = ("broadcast", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv",
                     "batch_isend_irecv", "broadcast_object_list", "all_gather_object", "barrier")


class CommMeter:
    """Counts the collectives issued while `counting`: calls, payload bytes and ring-volume bytes sent per rank.

    DeepSpeed's backend object (deepspeed.comm's `cdb`) and torch.distributed's functions are both wrapped, since
    code may call either; a call made inside another counted call (DeepSpeed forwarding to torch) counts once.
    """

    def __init__(self, world: int):
        self.world = world
        self.active = False
        self.depth = 0
        self.calls = self.payload = 0
        self.sent = 0.0
        backend = dist.comm.cdb
        for name in (*RING_VOLUME, *OTHER_COLLECTIVES):
            for owner in (backend, torch.distributed):
                if callable(getattr(owner, name, None)):
                    setattr(owner, name, self._wrap(name, getattr(owner, name)))

    def _wrap(self, name: str, fn):
        factor = RING_VOLUME.get(name, lambda w: 1.0)(self.world)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.active and self.depth == 0:
                nbytes = _payload(args, kwargs)
                self.calls += 1
                self.payload += nbytes
                self.sent += factor * nbytes
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1

        return counted

    @contextmanager
    def counting(self):
        """Yields a dict that holds, on exit, what was issued inside."""
        self.calls = self.payload = 0
        self.sent = 0.0
        self.active = True
        out = {}
        try:
            yield out
        finally:
            self.active = False
            out.update(calls=self.calls, payload_bytes=self.payload, sent_bytes=round(self.sent))


def _payload(args, kwargs) -> int:
    sizes = [0]
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, torch.Tensor):
            sizes.append(arg.numel() * arg.element_size())
        elif isinstance(arg, (list, tuple)) and arg and all(isinstance(t, torch.Tensor) for t in arg):
            sizes.append(sum(t.numel() * t.element_size() for t in arg))
    return max(sizes)


def settled_rss() -> int:
    """The resident set once the C heap has returned its free pages, so that what comes next shows in it."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss()


def _status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


def rss() -> int:
    return _status_bytes("VmRSS")


def reset_peak_rss() -> None:
    """Restart the kernel's high-water mark of the resident set (VmHWM) at the current size."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    return _status_bytes("VmHWM")


class GatheredEMA:
    """The usual EMA under DeepSpeed ZeRO-3: every parameter gathered whole, lerped into a full fp32 replica.

    The replica is plain tensors held by every rank, outside ZeRO, so its writes stick. (DeepSpeed's examples keep
    the EMA in a second ZeRO-3 model and write into its gathered copies without modifier_rank: those writes are
    dropped when the context releases them.) Gathering all parameters at once is the pattern as usually written.
    """

    def __init__(self, module: torch.nn.Module, beta: float, world: int):
        self.params = list(module.parameters())
        self.beta = beta
        self.world = world
        with deepspeed.zero.GatheredParameters(self.params):
            self.replica = [p.detach().float().clone() for p in self.params]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.replica)

    def gather_bytes(self) -> int:
        """Payload of the all-gathers an update issues: every partitioned (not persistent) parameter, padded."""
        return sum(p.ds_tensor.numel() * p.ds_tensor.element_size() * self.world for p in self.params
                   if p.ds_status == ZeroParamStatus.NOT_AVAILABLE)

    @torch.no_grad()
    def update(self) -> None:
        with deepspeed.zero.GatheredParameters(self.params):
            torch._foreach_lerp_(self.replica, [p.detach() for p in self.params], 1.0 - self.beta)


def averager(kind: str, engine, window: int, run_dir: Path) -> Averager:
    """One average with every: 1; a LAWA's samples go to <run_dir>/snapshots."""
    cfg = AverageConfig(kind=kind, beta=0.999, window=window, every=1)
    return make_averager(AveragingConfig(averages={kind: cfg}), engine, run_dir)


def created(make):
    """`make()` and the resident-set growth it leaves behind."""
    before = settled_rss()
    obj = make()
    return obj, rss() - before


def run_blocks(variants: dict, total: int, block: int, meter: CommMeter) -> dict:
    """Each variant `total` times, in alternating blocks of `block`: times, the bytes sent and the RSS peaks.

    A variant may return a dict of named sub-timings of its call (seconds), recorded beside its time.
    """
    out = {name: {"times": [], "parts": [], "sent_bytes": [], "payload_bytes": [], "calls": [], "rss_peak": 0}
           for name in variants}
    while len(out[next(iter(variants))]["times"]) < total:
        for name, fn in variants.items():
            record = out[name]
            dist.barrier()
            base = settled_rss()
            reset_peak_rss()
            for _ in range(block):
                dist.barrier()
                with meter.counting() as comm:
                    t0 = time.perf_counter()
                    parts = fn()
                    elapsed = time.perf_counter() - t0
                record["times"].append(elapsed)
                record["parts"].append(parts if isinstance(parts, dict) else {})
                for key in ("sent_bytes", "payload_bytes", "calls"):
                    record[key].append(comm[key])
            record["rss_peak"] = max(record["rss_peak"], peak_rss() - base)
    return out


def across_ranks(per_rank: list[dict]) -> dict:
    """Each call's time as the slowest rank's (the ranks wait for each other at the next collective), then its
    median and mean; bytes and memory as the largest on any rank."""
    merged = {}
    for name in per_rank[0]:
        records = [r[name] for r in per_rank]
        times = [max(ts) for ts in zip(*(r["times"] for r in records), strict=True)]
        entry = {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "n": len(times)}
        for part in records[0]["parts"][0]:
            part_times = [max(p[part] for p in ps) for ps in zip(*(r["parts"] for r in records), strict=True)]
            entry[f"{part}_median_s"] = statistics.median(part_times)
        for key in ("sent_bytes", "payload_bytes", "calls"):
            per_call = [max(values) for values in zip(*(r[key] for r in records), strict=True)]
            entry[key], entry[f"{key}_max"] = statistics.median(per_call), max(per_call)
        entry["rss_peak_bytes"] = max(r["rss_peak"] for r in records)
        for key in ("buffer_bytes", "rss_kept_bytes"):
            if key in records[0]:
                entry[key] = max(r[key] for r in records)
        merged[name] = entry
    return merged


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=20, help="timed updates per pattern")
    parser.add_argument("--update-block", type=int, default=5, help="updates per alternating block")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per variant")
    parser.add_argument("--block", type=int, default=2, help="training steps per alternating block")
    parser.add_argument("--step-updates", nargs="*", default=["ema", "lawa", "gathered_ema"],
                        choices=["ema", "lawa", "gathered_ema"], help="the updates timed after training steps")
    parser.add_argument("--window", type=int, default=10, help="LAWA window")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    load_start = os.getloadavg()
    run = trainer(recipe)
    engine, model_args, step = run.engine, run.model_args, run.step
    rank, world = dist.get_rank(), dist.get_world_size()
    meter = CommMeter(world)

    for _ in range(2):  # the first steps allocate the optimizer state and the gather buffers
        loss = step()

    partitions = master_partitions(engine)
    numel = sum(p.numel() for p in partitions)
    scratch = [torch.zeros_like(p) for p in partitions]  # the bandwidth references write here, reading partitions
    run_dir = Path(recipe.run.dir) / "bench-averaging"
    if rank == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    dist.barrier()
    ema, ema_kept = created(lambda: averager("ema", engine, args.window, run_dir))
    lawa, lawa_kept = created(lambda: averager("lawa", engine, args.window, run_dir))
    gathered, gathered_kept = created(lambda: GatheredEMA(engine.module, 0.999, world))
    gather_bytes = gathered.gather_bytes()
    count = iter(range(1, 2**62))

    updates = {
        "copy_": lambda: torch._foreach_copy_(scratch, partitions),
        "add_": lambda: torch._foreach_add_(scratch, partitions),
        "lerp_": lambda: torch._foreach_lerp_(scratch, partitions, 0.001),
        "aminmax": lambda: [torch.aminmax(p) for p in partitions],
        "finite_check": lambda: ema._all_finite(partitions),
        "ema_lerp": lambda: ema.averages["ema"].sample(0, partitions),
        "ema_update": lambda: ema.update(next(count), loss, partitions),
        "lawa_update": lambda: lawa.update(next(count), loss, partitions),
        "gathered_ema": gathered.update,
    }
    for fn in updates.values():  # first touch of every buffer
        fn()
    update_runs = run_blocks(updates, args.updates, args.update_block, meter)
    for name, nbytes, kept in (("ema_update", ema.nbytes, ema_kept), ("ema_lerp", ema.nbytes, ema_kept),
                               ("lawa_update", lawa.nbytes, lawa_kept), ("gathered_ema", gathered.nbytes,
                                                                         gathered_kept)):
        update_runs[name] |= {"buffer_bytes": nbytes, "rss_kept_bytes": kept}
    scratch.clear()  # the training steps need the memory

    def step_then(update):
        def run():
            t0 = time.perf_counter()
            step_loss = step()
            t1 = time.perf_counter()
            update(step_loss)
            return {"update": time.perf_counter() - t1, "train_step": t1 - t0}
        return run

    after_step = {
        "ema": lambda step_loss: ema.update(next(count), step_loss, partitions),
        "lawa": lambda step_loss: lawa.update(next(count), step_loss, partitions),
        "gathered_ema": lambda step_loss: gathered.update(),
    }
    if "gathered_ema" not in args.step_updates:
        gathered.replica.clear()  # the largest buffer here; a machine short of memory can leave it out of the steps
    steps = {"plain": step_then(lambda step_loss: None)} | {name: step_then(after_step[name])
                                                             for name in args.step_updates}
    step_runs = run_blocks(steps, args.steps, args.block, meter)

    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"update": update_runs, "step": step_runs, "threads": torch.get_num_threads()})
    if rank != 0:
        return
    result = {"recipe": args.recipe, "overrides": args.set, "ranks": world, "params": count_params(model_args),
              "partition_numel": numel, "torch_threads": per_rank[0]["threads"],
              "tokens_per_step": recipe.train.micro_batch * recipe.train.grad_accum * world * recipe.data.seq_len,
              "lawa_window": args.window, "step_updates": args.step_updates,
              "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
              "gathered_all_gather_bytes_expected": gather_bytes,
              "update": across_ranks([r["update"] for r in per_rank]),
              "step": across_ranks([r["step"] for r in per_rank])}
    # The lerp reads two streams and writes one. copy_ reads one and writes one, so at its bandwidth a lerp needs
    # 3/2 of its time; an in-place add_ moves exactly the lerp's streams. The bound is the faster of the two.
    bound = min(1.5 * result["update"]["copy_"]["median_s"], result["update"]["add_"]["median_s"])
    result["lerp_bound_s"] = bound
    print_tables(result, bound)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


def print_tables(result: dict, bound: float) -> None:
    world, up, st = result["ranks"], result["update"], result["step"]
    part_mib = result["partition_numel"] * 4 / MiB

    def mib(n):
        return "—" if n is None else f"{n / MiB:,.1f} MiB"

    print(f"\n{result['params'] / 1e6:.1f}M parameters, {world} ranks, {result['partition_numel']:,} values "
          f"({part_mib:,.1f} MiB fp32) per rank, {result['torch_threads']} torch threads per rank, load average "
          f"{result['loadavg_start'][0]:.2f} → {result['loadavg_end'][0]:.2f}; lerp bound min(1.5 × copy_, add_) "
          f"= {bound * 1e3:.1f} ms; the gathered pattern's all-gather payload: "
          f"{mib(up['gathered_ema']['payload_bytes'])} counted, {mib(result['gathered_all_gather_bytes_expected'])} "
          f"from its parameters\n")
    print("| ranks | per update | median | mean | × lerp bound | sent per rank | buffers per rank | RSS kept | "
          "RSS peak during |")
    print("|---|---|---|---|---|---|---|---|---|")
    labels = {"copy_": "copy_ of the partitions (read 1, write 1)", "add_": "add_ in place (read 2, write 1)",
              "lerp_": "lerp_ into a scratch buffer (read 2, write 1)", "aminmax": "aminmax (read 1)",
              "finite_check": "ours: the non-finite check alone", "ema_lerp": "ours: EMA.sample (the lerp)",
              "ema_update": "ours: Averager.update, EMA", "lawa_update": "ours: Averager.update, LAWA",
              "gathered_ema": "gathered EMA + full replica"}
    for name, label in labels.items():
        e = up[name]
        print(f"| {world} | {label} | {e['median_s'] * 1e3:,.1f} ms | {e['mean_s'] * 1e3:,.1f} ms | "
              f"{e['median_s'] / bound:.2f} | {mib(e['sent_bytes_max'])} | {mib(e.get('buffer_bytes'))} | "
              f"{mib(e.get('rss_kept_bytes'))} | {mib(e['rss_peak_bytes'])} |")
    plain = st["plain"]["median_s"]
    print("\n| ranks | per training step | step median | vs plain | update in the step (median) | "
          "update / plain step | sent per rank per step |")
    print("|---|---|---|---|---|---|---|")
    for name, e in st.items():
        update = e["update_median_s"]
        print(f"| {world} | {name} | {e['median_s']:,.2f} s | {e['median_s'] / plain - 1:+.1%} | "
              f"{update * 1e3:,.1f} ms | {update / plain:.2%} | {mib(e['sent_bytes'])} |")


if __name__ == "__main__":
    cli(main, rank_process=True)
