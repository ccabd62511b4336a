"""EMA, LAWA, the Averager's guard and state, the snapshot store, and the ZeRO-3 partition math, on plain tensors
(one rank, the store in a temporary directory)."""

from __future__ import annotations

import math
import shutil
from collections import deque
from pathlib import Path

import pytest
import torch

from averaging.averager import Averager
from averaging.partitions import Layout, chunk_size
from averaging.snapshots import SnapshotStore
from polyak.errors import UserError
from polyak.recipe import AverageConfig, AveragingConfig, SnapshotConfig, SpikeGuardConfig

SIZES = (37, 11)  # two param groups' flat partitions


def one_rank(sizes=SIZES) -> Layout:
    return Layout([[(f"p{g}", (n,))] for g, n in enumerate(sizes)], world_size=1)


def make(cfg: AveragingConfig, directory: Path, initial=None, layout=None, rank=0,
             snapshots=SnapshotConfig()) -> Averager:
    """An Averager of one rank whose snapshot store is `directory`."""
    layout = layout or one_rank()
    store = SnapshotStore(directory, snapshots, layout, rank)
    return Averager(cfg, initial if initial is not None else weights_at(0), layout, rank, store)


def weights_at(step: int) -> list[torch.Tensor]:
    """Distinct, reproducible partitions for each step: a drift plus noise."""
    g = torch.Generator().manual_seed(step)
    return [1.0 + 0.1 * step + torch.randn(n, generator=g) for n in SIZES]


def ema(beta: float, every: int = 1) -> AverageConfig:
    return AverageConfig(kind="ema", beta=beta, every=every)


def lawa(window: int, every: int = 1) -> AverageConfig:
    return AverageConfig(kind="lawa", window=window, every=every)


def config(offload="none", guard=None, **averages) -> AveragingConfig:
    return AveragingConfig(offload=offload, spike_guard=guard or SpikeGuardConfig(),
                           averages=averages)


def oracle(kind: str, sampled: list[int], beta=0.0, window=0) -> list[torch.Tensor]:
    """The average, in float64, of the weights at the `sampled` steps (θ_0 first for EMA, and when none for LAWA)."""
    if kind == "ema":
        ema = [t.double() for t in weights_at(0)]
        for step in sampled:
            ema = [beta * e + (1 - beta) * w.double() for e, w in zip(ema, weights_at(step))]
        return ema
    if not sampled:
        return [t.double() for t in weights_at(0)]
    last = [weights_at(step) for step in sampled[-window:]]
    return [torch.stack([w[g].double() for w in last]).mean(0) for g in range(len(SIZES))]


def assert_relative(got: list[torch.Tensor], want: list[torch.Tensor], tol=1e-6):
    for a, b in zip(got, want, strict=True):
        error = (a.double() - b).abs().max().item()
        assert error <= tol * b.abs().max().item(), f"max error {error:.3g}"


def run(averager: Averager, steps, losses=None) -> list[str]:
    events = []
    for step in steps:
        loss = 3.0 if losses is None else losses.get(step, 3.0)
        events += averager.update(step, loss, weights_at(step))
    return events


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_ema_and_lawa_follow_the_definition_every_step(offload, tmp_path):
    cfg = config(offload, ema=ema(0.9, every=3), lawa=lawa(4, every=2), fast=ema(0.5))
    averager = make(cfg, tmp_path)
    assert averager.names == ["ema", "lawa", "fast"]
    assert_relative(averager.weights("lawa"), oracle("lawa", []))  # no sample yet: the initial weights
    for step in range(1, 21):
        assert averager.update(step, 3.0, weights_at(step)) == []
        assert_relative(averager.weights("ema"), oracle("ema", list(range(3, step + 1, 3)), beta=0.9))
        assert_relative(averager.weights("fast"), oracle("ema", list(range(1, step + 1)), beta=0.5))
        # Fewer than `window` samples at first (steps 2, 4, 6), then the last four.
        assert_relative(averager.weights("lawa"), oracle("lawa", list(range(2, step + 1, 2)), window=4))


def test_lawa_running_sum_stays_exact_over_a_long_run(tmp_path):
    window, samples = 10, 2_000
    averager = make(config(lawa=lawa(window)), tmp_path, initial=[torch.zeros(n) for n in SIZES])
    ring = deque(maxlen=window)
    g = torch.Generator().manual_seed(0)
    level = [torch.randn(n, generator=g) for n in SIZES]
    for i in range(1, samples + 1):
        # Weights that wander (a random walk) around a large offset: each add and subtract rounds.
        level = [x + 0.01 * torch.randn(x.shape, generator=g) for x in level]
        sample = [100.0 + x for x in level]
        averager.update(i, 3.0, sample)
        ring.append([s.double() for s in sample])
        if i % 197 == 0 or i == samples or i < window:
            want = [torch.stack([r[k] for r in ring]).mean(0) for k in range(len(SIZES))]
            assert_relative(averager.weights("lawa"), want)
    lawa_state = averager.state_dict()["meta"]["averages"]["lawa"]
    assert lawa_state["samples"] == samples and lawa_state["steps"] == list(range(samples - window + 1, samples + 1))
    # The store holds the window, and at most the two samples evicted last (kept while other ranks may read them).
    stored = sorted(int(p.name.removeprefix("step")) for p in tmp_path.iterdir())
    assert stored == list(range(samples - window - 1, samples + 1))


def test_lawa_memory_does_not_grow_with_its_window(tmp_path):
    small, large = (make(config(lawa=lawa(w)), tmp_path / str(w)) for w in (2, 20))
    for step in range(1, 31):
        small.update(step, 3.0, weights_at(step))
        large.update(step, 3.0, weights_at(step))
    assert small.nbytes == large.nbytes == 4 * sum(SIZES) * 2  # the running sum and the host copy


def test_spike_guard_skips_the_spike_and_the_next_samples(tmp_path):
    guard = SpikeGuardConfig(enabled=True, factor=2.0, history=3, skip=2)
    cfg = config(guard=guard, ema=ema(0.7), lawa=lawa(3, every=2))
    averager = make(cfg, tmp_path)
    events = run(averager, range(1, 13), losses={4: 6.5, 11: 5.9})
    # Step 4: 6.5 > 2 × median(3, 3, 3). The EMA skips 4, then 5 and 6; LAWA (due at even steps) 4, then 6 and 8.
    # Step 11: 5.9 is below 2 × median 3 (the spike left the history of three): sampled.
    assert_relative(averager.weights("ema"), oracle("ema", [1, 2, 3, 7, 8, 9, 10, 11, 12], beta=0.7))
    assert_relative(averager.weights("lawa"), oracle("lawa", [2, 10, 12], window=3))
    assert len(events) == 1 + 2 + 2
    assert events[0].startswith("loss spike 6.5 > 2 × median 3") and "next 2 samples skipped" in events[0]
    assert sum("ema: sample skipped after a loss spike" in e for e in events) == 2
    assert sum("lawa: sample skipped after a loss spike" in e for e in events) == 2
    state = averager.state_dict()["meta"]["averages"]
    assert state["ema"]["skipped"] == 3 and state["lawa"]["skipped"] == 3


def test_spike_guard_off_samples_spikes():
    averager = Averager(config(ema=ema(0.7)), weights_at(0))  # an EMA alone needs no store
    assert run(averager, range(1, 7), losses={4: 100.0}) == []
    assert_relative(averager.weights("ema"), oracle("ema", [1, 2, 3, 4, 5, 6], beta=0.7))


@pytest.mark.parametrize("enabled", [False, True])
def test_non_finite_loss_is_never_sampled(enabled):
    guard = SpikeGuardConfig(enabled=enabled, skip=1)
    averager = Averager(config(guard=guard, ema=ema(0.7)), weights_at(0))
    events = run(averager, range(1, 7), losses={3: math.nan, 4: math.inf})
    # With the guard, a non-finite loss is a spike: the sample after it is skipped too.
    assert_relative(averager.weights("ema"), oracle("ema", [1, 2, 6] if enabled else [1, 2, 5, 6], beta=0.7))
    assert events[0].startswith("non-finite loss nan: weights not sampled")
    assert events[1].startswith("non-finite loss inf: weights not sampled")
    assert len(events) == (3 if enabled else 2)


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_non_finite_weights_never_enter_an_average(offload, tmp_path):
    # Three ranks' cut of two parameters: the last rank holds 35 elements of "a" and 2 of padding, 11 of "b".
    layout = Layout([[("a", (109,))], [("b", (33,))]], world_size=3)
    padding = layout.padding(2)
    assert [p.tolist() for p in padding] == [[35, 36], []]
    cfg = config(offload, ema=ema(0.7), lawa=lawa(2))
    averager = make(cfg, tmp_path, layout=layout, rank=2)
    events = []
    for step in range(1, 6):
        w = weights_at(step)
        w[0][35] = math.nan  # padding: ZeRO-3 leaves it uninitialised, it never counts
        if step == 3:
            w[1][4] = math.inf
        events += averager.update(step, 3.0, w)
    assert events == ["non-finite weights: not sampled into ema, lawa"]
    real = torch.ones(SIZES[0], dtype=torch.bool).index_fill_(0, padding[0], False)
    for name, want in [("ema", oracle("ema", [1, 2, 4, 5], beta=0.7)), ("lawa", oracle("lawa", [4, 5], window=2))]:
        got = averager.weights(name)
        assert_relative([got[0][real], got[1]], [want[0][real], want[1]])
        assert torch.isfinite(got[1]).all()


def test_offload_matches_buffers_beside_the_partitions_bitwise(tmp_path):
    guard = SpikeGuardConfig(enabled=True, factor=2.0, history=4, skip=1)
    averages = {"ema": ema(0.9), "lawa": lawa(3, every=2)}
    beside, offloaded = (make(config(offload, guard, **averages), tmp_path / offload) for offload in ("none", "cpu"))
    losses = {5: 9.0}
    assert run(beside, range(1, 12), losses) == run(offloaded, range(1, 12), losses)
    for name in averages:
        assert all(torch.equal(a, b) for a, b in zip(beside.weights(name), offloaded.weights(name)))
    # The EMA (beside the partitions, or in host memory), the LAWA's sum and the host copy that feeds it.
    assert beside.nbytes == offloaded.nbytes == 4 * sum(SIZES) * 3


def test_state_dict_round_trip_is_exact_and_resumes_identically(tmp_path):
    guard = SpikeGuardConfig(enabled=True, factor=2.0, history=4, skip=2)
    cfg = config(guard=guard, ema=ema(0.9), lawa=lawa(4, every=2))
    averager = make(cfg, tmp_path / "a")
    run(averager, range(1, 12), losses={8: 50.0})  # mid-skip, LAWA window full
    state = averager.state_dict()
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the samples in the window, as a resumed run finds them
    restored = make(cfg, tmp_path / "b", initial=weights_at(99))
    restored.load_state_dict(state)
    again = restored.state_dict()
    assert again["meta"] == state["meta"]
    assert again["tensors"].keys() == state["tensors"].keys()
    assert all(torch.equal(again["tensors"][k], t) for k, t in state["tensors"].items())
    # Both go on alike: counters, the guard's history and the pending skips came back too.
    losses = {14: 40.0}
    assert run(averager, range(12, 20), losses) == run(restored, range(12, 20), losses)
    for name in averager.names:
        assert all(torch.equal(a, b) for a, b in zip(averager.weights(name), restored.weights(name)))


def test_load_state_dict_mismatches_are_user_errors(tmp_path):
    cfg = config(ema=ema(0.9), lawa=lawa(4))
    state = make(cfg, tmp_path).state_dict()
    with pytest.raises(UserError, match=r"averages \['ema', 'lawa'\] saved, but the recipe configures \['ema'\]"):
        Averager(config(ema=ema(0.9)), weights_at(0)).load_state_dict(state)
    other = config(ema=ema(0.99), lawa=lawa(4))
    with pytest.raises(UserError, match=r"average 'ema' was saved as .*'beta': 0.9.*the recipe says .*'beta': 0.99"):
        make(other, tmp_path).load_state_dict(state)
    smaller = [t[:-1] for t in weights_at(0)]
    with pytest.raises(UserError, match=r"ema.average.0 is of shape \[37\], this rank's partition needs \[36\]"):
        make(cfg, tmp_path, initial=smaller, layout=one_rank([n - 1 for n in SIZES])).load_state_dict(state)


SHAPES = [(), (1,), (5,), (7, 3), (2, 3, 4), (1, 1), (13,), (4, 6)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_partition_cut_and_rebuild_round_trip(world_size):
    groups = [[(f"p{i}", s) for i, s in enumerate(SHAPES[:5])], [(f"q{i}", s) for i, s in enumerate(SHAPES[5:])]]
    layout = Layout(groups, world_size)
    g = torch.Generator().manual_seed(world_size)
    full = {name: torch.randn(shape, generator=g) for group in groups for name, shape in group}
    flats = [layout.cut(full, rank) for rank in range(world_size)]
    for rank in range(world_size):
        for k, group in enumerate(groups):
            # Oracle: each parameter zero-padded to N·c elements, rank r taking row r of the [N, c] table.
            rows, real = [], []
            for name, shape in group:
                numel = math.prod(shape)
                c = chunk_size(numel, world_size)
                padded = torch.cat([full[name].reshape(-1), torch.zeros(world_size * c - numel)])
                rows.append(padded.view(world_size, c)[rank])
                is_real = torch.arange(world_size * c) < numel
                real.append(is_real.view(world_size, c)[rank])
            assert torch.equal(flats[rank][k], torch.cat(rows))
            assert flats[rank][k].numel() == layout.partition_numel(k)
            assert torch.equal(layout.padding(rank)[k], (~torch.cat(real)).nonzero().flatten())
    # Whatever the padding holds, the rebuilt tensors are the originals.
    for rank in range(world_size):
        for k in range(len(groups)):
            flats[rank][k][layout.padding(rank)[k]] = math.nan
    rebuilt = layout.rebuild(flats)
    assert rebuilt.keys() == full.keys()
    assert all(torch.equal(rebuilt[n], full[n]) for n in full)
    assert Layout.from_dict(layout.to_dict()) == layout


def test_padding_sits_at_the_tail_of_the_last_ranks():
    layout = Layout([[("a", (5,)), ("b", (8,))]], world_size=4)  # a: chunks 2, 2, 1+1, 0+2; b: 2 each
    assert [layout.padding(r)[0].tolist() for r in range(4)] == [[], [], [1], [0, 1]]
