"""Averaging on real DeepSpeed ZeRO-3 partitions, on 1, 2 and 3 CPU ranks: one shared run per world size."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import deepspeed
import deepspeed.comm
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from averaging.averager import Averager
from averaging.partitions import Layout
from averaging.zero import averager as make_averager
from averaging.zero import layout, master_partitions, swapped_in
from averaging.zero import rank as zero_rank
from bench.harness import full_average
from polyak.errors import UserError
from polyak.recipe import AverageConfig, AveragingConfig
from tests.distributed import run_ranks

STEPS = 8  # LAWA (every 2, window 3) samples at 2, 4, 6, 8: the ring fills, wraps and evicts
EXTRA = 2  # steps after the swap, compared with a run that never swapped
VOCAB = 13
PERSISTENCE = 13  # head.bias (13 elements) stays gathered on every rank; everything else is partitioned
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": PERSISTENCE},
    "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9,
}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_base", "all_gather_object",
               "all_gather_coalesced", "all_reduce_coalesced", "all_to_all", "all_to_all_single", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_fn", "allgather_fn", "broadcast",
               "broadcast_object_list", "gather", "scatter", "barrier", "monitored_barrier", "send", "recv",
               "isend", "irecv", "batch_isend_irecv", "inference_all_reduce")


class Net(nn.Module):
    """No parameter size divides by 2 or 3; two param groups; one persistent parameter (head.bias)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 5)  # 65
        self.up = nn.Linear(5, 25)  # 125 + 25
        self.norm = nn.LayerNorm(25)  # 25 + 25
        self.head = nn.Linear(25, VOCAB)  # 325 + 13

    def forward(self, x, targets=None):
        logits = self.head(self.norm(F.gelu(self.up(self.embed(x)))))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def averaging_config(offload: str, names=("ema", "lawa")) -> AveragingConfig:
    averages = {"ema": AverageConfig(kind="ema", beta=0.8), "lawa": AverageConfig(kind="lawa", window=3, every=2)}
    return AveragingConfig(offload=offload, averages={n: averages[n] for n in names})


def eval_input() -> torch.Tensor:
    return torch.randint(VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))


def _engine():
    torch.manual_seed(0)
    model = Net()
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=0.05)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=DS_CONFIG)
    return engine


def _train_step(engine, step: int, rank: int, world_size: int) -> float:
    g = torch.Generator().manual_seed(1000 * step + rank)  # every rank its own batch
    tokens = torch.randint(VOCAB, (4, 7), generator=g)
    loss = engine(tokens[:, :-1], tokens[:, 1:])
    engine.backward(loss)
    engine.step()
    mean = loss.detach().clone()
    torch.distributed.all_reduce(mean)
    return mean.item() / world_size


def _full_weights(engine) -> dict[str, torch.Tensor]:
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


@contextmanager
def _counting_collectives():
    """Record every call of a collective of torch.distributed or deepspeed.comm made inside the block."""
    calls, patched = [], []
    for module in (torch.distributed, torch.distributed.distributed_c10d, deepspeed.comm, deepspeed.comm.comm):
        for name in COLLECTIVES:
            original = getattr(module, name, None)
            if callable(original):
                def spy(*args, _name=name, _original=original, **kwargs):
                    calls.append(_name)
                    return _original(*args, **kwargs)

                setattr(module, name, spy)
                patched.append((module, name, original))
    try:
        yield calls
    finally:
        for module, name, original in patched:
            setattr(module, name, original)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)  # bitwise comparison, NaN padding included


def _rank_run(rank: int, world_size: int, offload: str, directory: str) -> dict:
    out = {}
    engine = _engine()
    cfg = averaging_config(offload)
    run_dir = Path(directory) / "run"  # the snapshot store: run_dir / "snapshots"
    averager = make_averager(cfg, engine, run_dir)
    partition_layout = layout(engine)
    assert zero_rank(engine) == rank
    out["layout"] = partition_layout.to_dict()
    out["partition_numel"] = [t.numel() for t in master_partitions(engine)]
    out["persistent"] = [p.ds_id for p in engine.optimizer.persistent_parameters]
    buffers = Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{os.environ['MASTER_PORT']}_*")
    out["shm"] = (deepspeed.comm.comm.cdb.shm_comm_op, sorted(p.name for p in buffers))
    full, losses, events, update_calls = [_full_weights(engine)], [], [], []
    for step in range(1, STEPS + 1):
        with _counting_collectives() as step_calls:  # the spy does see the training step's collectives
            losses.append(_train_step(engine, step, rank, world_size))
        with _counting_collectives() as calls:
            events += averager.update(step, losses[-1], master_partitions(engine))
        update_calls.append(calls)
        full.append(_full_weights(engine))
    out.update(full=full if rank == 0 else None, events=events, update_calls=update_calls, step_calls=step_calls,
               nbytes=averager.nbytes)

    averager.save(Path(directory)).result()
    torch.distributed.barrier()
    fresh = make_averager(cfg, engine, run_dir)
    fresh.load(Path(directory))
    before, after = averager.state_dict(), fresh.state_dict()
    out["state_meta_equal"] = before["meta"] == after["meta"]
    out["state_keys"] = sorted(before["tensors"])
    out["state_bitwise"] = before["tensors"].keys() == after["tensors"].keys() and all(
        torch.equal(_bits(before["tensors"][k]), _bits(after["tensors"][k])) for k in before["tensors"])
    errors = {}
    for case, call in {
        "names": lambda: make_averager(averaging_config(offload, ["ema"]), engine, run_dir).load(Path(directory)),
        "layout": lambda: Averager(averaging_config(offload, ["ema"]), master_partitions(engine), Layout(
            [[("renamed" if n == "head.weight" else n, s) for n, s in g] for g in partition_layout.groups],
            world_size), rank).load(Path(directory)),
    }.items():
        try:
            call()
            errors[case] = None
        except UserError as e:
            errors[case] = str(e)
    out["errors"] = errors

    x = eval_input()
    training = [t.clone() for t in engine.optimizer.fp16_partitioned_groups_flat]
    with torch.no_grad():
        out["logits_raw"] = engine(x)
        for name in averager.names:
            with swapped_in(engine, averager.weights(name)):
                out[f"logits_{name}"] = engine(x)
    out["restored_bitwise"] = all(torch.equal(_bits(a), _bits(b))
                                  for a, b in zip(training, engine.optimizer.fp16_partitioned_groups_flat))
    for step in range(STEPS + 1, STEPS + EXTRA + 1):
        losses.append(_train_step(engine, step, rank, world_size))
    out["losses"] = losses
    out["master"] = [t.clone() for t in master_partitions(engine)]

    # The same training without averaging or swapping.
    reference = _engine()
    out["reference_losses"] = [_train_step(reference, step, rank, world_size) for step in range(1, STEPS + EXTRA + 1)]
    out["reference_master"] = [t.clone() for t in master_partitions(reference)]
    return out


def _offline(full: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """EMA (β 0.8, every step) and LAWA (window 3, every 2nd step) of the gathered full weights, in float64."""
    ema = {n: t.double() for n, t in full[0].items()}
    for weights in full[1:]:
        ema = {n: 0.8 * ema[n] + 0.2 * weights[n].double() for n in ema}
    window = [full[t] for t in range(1, len(full)) if t % 2 == 0][-3:]
    lawa = {n: torch.stack([w[n].double() for w in window]).mean(0) for n in ema}
    return {"ema": ema, "lawa": lawa}


def _assert_relative(got: torch.Tensor, want: torch.Tensor, what: str):
    error = (got.double() - want.double()).abs().max().item()
    assert error <= 1e-6 * want.abs().max().item(), f"{what}: max error {error:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("world_size, offload", [(1, "none"), (2, "cpu"), (3, "none")])
def test_averaging_on_zero3_partitions(tmp_path, world_size, offload):
    ranks = run_ranks(_rank_run, world_size, offload, str(tmp_path))
    first = ranks[0]
    saved = Layout.from_dict(first["layout"])
    model = Net()
    named = list(model.named_parameters())
    assert [[n for n, _ in group] for group in saved.groups] == [  # the optimizer's groups, in its order
        [n for n, p in named if p.dim() == 2], [n for n, p in named if p.dim() < 2]]
    assert all(r["persistent"] for r in ranks)  # the swap below had a persistent parameter to refresh
    assert [e for r in ranks for e in r["events"]] == []
    assert all(r["shm"] == (None, []) for r in ranks)  # gloo does every collective: no shared-memory op, no buffers

    # (a) The saved partitions, stitched back together, are the averages of the full weights at the same steps.
    want = _offline(first["full"])
    for name in ("ema", "lawa"):
        got = full_average(tmp_path, name)
        assert got.keys() == want[name].keys()
        for n in got:
            _assert_relative(got[n], want[name][n], f"{name} {n}")
        assert not torch.equal(got["head.weight"], first["full"][-1]["head.weight"])

    # (b) Each update, one scalar all-reduce (every rank makes the same choice about non-finite weights; the spy
    # sees it twice where deepspeed.comm hands it to torch.distributed) and nothing else, though the same spy sees
    # the training step's collectives.
    assert all(set(calls) == {"all_reduce"} and len(calls) <= 2 for r in ranks for calls in r["update_calls"])
    assert all("all_reduce" in r["step_calls"] for r in ranks)
    if world_size > 1:
        assert all({"all_gather_into_tensor", "reduce_scatter_tensor"} <= set(r["step_calls"]) for r in ranks)

    # (c) Each rank's buffers: 1/N of the parameters (up to padding) for the EMA, the LAWA's running sum (its
    # samples are on disk), and the host copy that feeds the LAWA and the snapshots.
    total = sum(p.numel() for p in model.parameters())
    for r in ranks:
        local = sum(r["partition_numel"])
        assert local == sum(saved.partition_numel(g) for g in range(len(saved.groups)))
        assert total / world_size <= local <= total / world_size + len(saved.names)
        assert r["nbytes"] == 4 * local * 3

    # (d) Inside swapped_in the model computes with the averaged weights; afterwards training is untouched.
    x = eval_input()
    for name in ("ema", "lawa"):
        reference = Net()
        reference.load_state_dict(full_average(tmp_path, name))
        with torch.no_grad():
            expected = reference(x)
        for r in ranks:
            torch.testing.assert_close(r[f"logits_{name}"], expected, rtol=1e-6, atol=1e-6)
            assert not torch.allclose(r[f"logits_{name}"], r["logits_raw"], rtol=1e-3, atol=1e-3)
    for rank, r in enumerate(ranks):
        assert r["restored_bitwise"]
        assert r["losses"] == r["reference_losses"]
        for a, b, pad in zip(r["master"], r["reference_master"], saved.padding(rank)):
            real = torch.ones(a.numel(), dtype=torch.bool).index_fill_(0, pad, False)  # padding is uninitialised
            assert torch.equal(_bits(a[real]), _bits(b[real]))

    # (e) A fresh Averager loads back exactly; mismatches are clear errors naming the file.
    for rank, r in enumerate(ranks):
        assert r["state_meta_equal"] and r["state_bitwise"]
        assert r["state_keys"] == ["ema.average.0", "ema.average.1", "lawa.sum.0", "lawa.sum.1"]
        errors = r["errors"]
        assert errors["names"] is not None
        assert f"rank{rank:05d}.safetensors" in errors["names"] and "['ema', 'lawa'] saved" in errors["names"]
        assert errors["layout"] is not None
        assert "averaging.json" in errors["layout"] and "head.weight" in errors["layout"]
        assert "renamed" in errors["layout"]
