"""The in-process parts of bench/gpu.py, one subprocess each: timed training blocks on one DeepSpeed engine (or on the
plain PyTorch anchor), the initial weights θ0 for the averages' oracle, and the device probes.

    python -m bench.gpu_worker SPEC.json RESULT.json

bench/gpu.py writes SPEC.json and starts this with a world of one rank in its environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT): no launcher, as on one GPU. SPEC's `kind`:

- `ds`: the engine `launch/engine.py` builds for SPEC's recipe (`recipe` and `sets`), then `blocks` of steps, each
  with its own Averager (a block's `sets` configure its `averaging` section; none: no averaging) built fresh on the
  same engine, so that blocks compare the same model, memory and data path. `theta0`: first write the initial fp32
  master weights there (safetensors), before any step.
- `anchor`: the same model as a plain PyTorch loop (model.llama.Llama with fp32 parameters under bf16 autocast,
  fused AdamW, the same clipping and schedule), optionally under torch.compile (`compile`, `backend`).
- `probe`: the device, its measured bf16 matrix rate and pinned device-to-host copy rate.

A step is timed on the host from its start to the end of the averaging update, the device synchronized after it;
`warmup` steps first (compilation happens there), then up to `steps` timed steps, fewer when the block's `max_s`
or the spec's `deadline` (wall-clock, time.time()) comes first. RESULT.json is rewritten after every step, so a
worker stopped from outside still leaves what it measured.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

GiB = 2**30


class Result:
    """The worker's result file, rewritten whole (atomically) whenever it changes."""

    def __init__(self, path: Path):
        self.path, self.data = path, {"status": "running", "blocks": {}, "notes": []}

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = Result(Path(sys.argv[2]))
    try:
        {"ds": ds_worker, "anchor": anchor_worker, "probe": probe_worker}[spec["kind"]](spec, result)
        result.data["status"] = "ok"
    except BaseException as e:
        result.data["status"] = "error"
        result.data["error"] = f"{type(e).__name__}: {e}"
        result.data["traceback"] = traceback.format_exc()[-6000:]
        result.save()
        raise
    result.save()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_info(recipe, args, device: torch.device, world: int) -> dict:
    from launch.metrics import peak_flops
    from model.llama import count_params, flops_per_token

    t, seq = recipe.train, recipe.data.seq_len
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"params": count_params(args), "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
            "n_kv_heads": args.n_kv_heads, "ffn_dim": args.ffn_dim, "vocab_size": args.vocab_size, "seq_len": seq,
            "micro_batch": t.micro_batch, "grad_accum": t.grad_accum, "world": world, "precision": t.precision,
            "tokens_per_step": t.micro_batch * t.grad_accum * world * seq,
            "flops_per_token": flops_per_token(args, seq), "device": name,
            "peak_flops": peak_flops(name, t.precision, recipe.log.peak_tflops)}


def run_block(block: dict, step_fn, device: torch.device, info: dict, deadline: float, make_averager=None,
              on_step=None) -> dict:
    """Warm-up then timed steps of `step_fn()` (which returns the loss), each followed by the block's averaging
    update when `make_averager()` gives an Averager; the numbers of the timed steps."""
    from averaging.zero import master_partitions

    out = {"status": "running", "warmup": block["warmup"], "steps": 0}
    if time.time() > deadline:
        return {**out, "status": "skipped", "reason": "out of time: the phase's deadline had passed"}
    averager, engine = (make_averager() if make_averager else (None, None))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, updates, losses = [], [], []
    started, timed_from, before = time.monotonic(), None, None
    for i in range(block["warmup"] + block["steps"]):
        if time.time() > deadline or (timed_from is not None and times and
                                      time.monotonic() - timed_from > block.get("max_s", float("inf"))):
            out["stopped"] = "deadline" if time.time() > deadline else f"max_s {block['max_s']} s"
            break
        if i == block["warmup"]:
            timed_from = time.monotonic()
            before = _worker_times(averager)
        t0 = time.perf_counter()
        loss = step_fn()
        u0 = time.perf_counter()
        if averager is not None:
            averager.update(i + 1, loss, master_partitions(engine))
        u1 = time.perf_counter()
        _sync(device)
        dt = time.perf_counter() - t0
        losses.append(loss)
        if i == 0:
            out["first_step_s"] = dt
        if i >= block["warmup"]:
            times.append(dt)
            updates.append(u1 - u0)
            out.update(_summary(times, updates if averager is not None else None, info))
            if on_step:
                on_step(out)
    out["block_s"] = time.monotonic() - started
    out["loss_first"], out["loss_last"] = (losses[0], losses[-1]) if losses else (None, None)
    if averager is not None:
        t0 = time.perf_counter()
        averager.close()  # the worker's queued work
        out["close_s"] = time.perf_counter() - t0
        after = _worker_times(averager)
        if before is not None:
            timed = {k: after[k] - before[k] for k in after}
            jobs = max(timed["jobs"], 1)
            out["worker"] = {"waits": timed["waits"], "wait_s": timed["wait_s"], "jobs": timed["jobs"],
                             "copy_s_per_job": timed["copy_s"] / jobs, "work_s_per_job": timed["work_s"] / jobs}
        out["averaging_bytes"] = averager.nbytes
        out["averages"] = {name: averager.cfg.averages[name].__dict__ for name in averager.names}
        out["offload"] = averager.cfg.offload
        del averager
        gc.collect()  # its buffers (gigabytes of pinned host memory at 1B parameters) go before the next block's
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / GiB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GiB
    out["status"] = "ok" if times else "skipped"
    if not times:
        out["reason"] = "out of time before a timed step"
    return out


def _worker_times(averager) -> dict | None:
    if averager is None:
        return None
    return dict(averager.times.__dict__)


def _summary(times: list[float], updates: list[float] | None, info: dict) -> dict:
    median = statistics.median(times)
    tokens_per_s = info["tokens_per_step"] / median
    peak = info["peak_flops"]
    out = {"steps": len(times), "step_s": times, "step_s_median": median, "step_s_max": max(times),
           "tokens_per_s": tokens_per_s,
           "mfu": tokens_per_s * info["flops_per_token"] / (peak * info["world"]) if peak else None}
    if updates:
        out.update(update_s=updates, update_s_median=statistics.median(updates), update_s_max=max(updates),
                   update_share=statistics.median(updates) / median)
    return out


def ds_worker(spec: dict, result: Result) -> None:
    from averaging import zero
    from bench.harness import trainer
    from polyak.recipe import load_recipe

    recipe = load_recipe(spec["recipe"], spec["sets"])
    r = result.data
    if recipe.zero.deepcompile and torch.cuda.is_available():
        # DeepCompile's native op (deepspeed/ops/csrc/compile) is built just in time on first use: time it apart.
        from deepspeed.compile.util import get_deepcompile_handle

        include = _nccl_include()  # its sources include torch's NCCL headers, which include nccl.h
        if include:
            os.environ["CPATH"] = os.pathsep.join(filter(None, [include, os.environ.get("CPATH")]))
        r["deepcompile_nccl_include"] = include
        b0 = time.perf_counter()
        get_deepcompile_handle()
        r["deepcompile_op_build_s"] = time.perf_counter() - b0
    t0 = time.perf_counter()
    run = trainer(recipe)  # the engine and batches as launch/pretrain.py builds them (bench/harness.py)
    engine, device = run.engine, run.device
    r["model"] = info = _model_info(recipe, run.model_args, device, torch.distributed.get_world_size())
    r["setup_s"] = time.perf_counter() - t0
    if spec.get("theta0"):
        from safetensors.torch import save_file

        full = zero.layout(engine).rebuild([[t.detach().float().cpu() for t in zero.master_partitions(engine)]])
        save_file({k: v.contiguous() for k, v in full.items()}, spec["theta0"])
    result.save()
    work = Path(spec["work"])
    for block in spec["blocks"]:
        block_dir = work / block["name"]
        shutil.rmtree(block_dir, ignore_errors=True)
        averaging = load_recipe(spec["recipe"], spec["sets"] + block.get("sets", [])).averaging
        wanted = block.get("averaging", True) and bool(averaging.averages)

        def make_averager(averaging=averaging, block_dir=block_dir, wanted=wanted):
            if not wanted:
                return None, None
            return zero.averager(averaging, engine, block_dir), engine

        def on_step(partial, name=block["name"]):
            r["blocks"][name] = partial
            result.save()

        r["blocks"][block["name"]] = run_block(block, run.step, device, info, spec["deadline"], make_averager,
                                               on_step)
        shutil.rmtree(block_dir, ignore_errors=True)  # a LAWA's snapshots: gigabytes at 1B parameters
        result.save()
    r["graph_breaks"] = _graph_breaks()


def _nccl_include() -> str | None:
    """The folder of nccl.h in the nvidia-nccl wheel beside torch, if any: not on a compiler's default path."""
    import glob
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for header in sorted(glob.glob(os.path.join(root, "**", "include", "nccl.h"), recursive=True)):
            return os.path.dirname(header)
    return None


def anchor_worker(spec: dict, result: Result) -> None:
    from data.loader import TokenWindows, TrainBatches, load_meta
    from launch.engine import param_groups
    from launch.schedule import lr_multiplier
    from model.llama import Llama
    from model.sizes import resolve
    from polyak.recipe import load_recipe

    t0 = time.perf_counter()
    recipe = load_recipe(spec["recipe"], spec["sets"])
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    t, seq = recipe.train, recipe.data.seq_len
    args = resolve(recipe.model, load_meta(recipe.data.dir)["vocab_size"], seq)
    torch.manual_seed(t.seed)
    with device:  # built where it trains (1B parameters initialised on one CPU thread would take a while)
        model = Llama(args, activation_checkpointing=recipe.zero.activation_checkpointing)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                  fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(t, s))
    forward = torch.compile(model, backend=spec["backend"]) if spec.get("compile") else model
    r = result.data
    r["model"] = info = _model_info(recipe, args, device, 1)
    r["precision"] = "fp32 parameters, gradients and AdamW state; bf16 autocast" if t.precision == "bf16" else "fp32"
    r["compile"] = {"enabled": bool(spec.get("compile")), "backend": spec.get("backend")}
    r["setup_s"] = time.perf_counter() - t0
    result.save()
    batches = TrainBatches(TokenWindows(recipe.data.dir, "train", seq), 0, 1, t.micro_batch, t.seed)

    def step() -> float:
        total = 0.0
        for _ in range(t.grad_accum):
            x, y = (b.to(device, non_blocking=True) for b in batches.next())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
                loss = forward(x, y) / t.grad_accum
            loss.backward()
            total += loss.detach()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        return float(total)

    for block in spec["blocks"]:
        def on_step(partial, name=block["name"]):
            r["blocks"][name] = partial
            result.save()

        r["blocks"][block["name"]] = run_block(block, step, device, info, spec["deadline"], on_step=on_step)
        result.save()
    r["graph_breaks"] = _graph_breaks()


def _graph_breaks() -> dict:
    """torch.compile's graph breaks by reason (the five most frequent), if anything was compiled."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    breaks = sorted(counters["graph_break"].items(), key=lambda kv: -kv[1])
    return {"total": sum(n for _, n in breaks), "top": [[str(k)[:300], n] for k, n in breaks[:5]]}


def probe_worker(spec: dict, result: Result) -> None:
    """The device as found: name, memory, and two ceilings measured on random data (METHOD.md: never on zeros)."""
    r = result.data
    if not torch.cuda.is_available():
        r["device"] = "cpu"
        return
    device = torch.device("cuda", 0)
    props = torch.cuda.get_device_properties(device)
    r.update(device=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / GiB,
             multiprocessors=props.multi_processor_count)
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    r["matmul_bf16_tflops"] = _timed(lambda: a @ b, 2 * n**3) / 1e12
    src = torch.randn(2**28, device=device)  # 1 GiB of fp32
    dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    r["d2h_pinned_gb_s"] = _timed(lambda: dst.copy_(src, non_blocking=True), src.numel() * 4) / 1e9


def _timed(fn, work: float, reps: int = 10) -> float:
    """Work per second of `fn`, timed with CUDA events after warm-up: the median of `reps` runs."""
    for _ in range(3):
        fn()
    rates = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        rates.append(work / (start.elapsed_time(end) / 1e3))
    return statistics.median(rates)


if __name__ == "__main__":
    main()
