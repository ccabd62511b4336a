"""The paths every GPU recipe takes, proven end to end on CPU ranks: bf16 with fp32 master weights (every GPU recipe),
gradient accumulation (350m, 7b), ZeRO-Offload of the optimizer (7b) and activation checkpointing (7b).

Each trained run is shared by the tests that read it, with a checkpoint every step: the offline oracle reads each
step's master weights, resumes and poisoned copies start from any of them."""

from __future__ import annotations

import math

import pytest
import torch

from averaging.consolidate import consolidate
from averaging.zero import layout, master_partitions
from averaging.zero import rank as zero_rank
from bench.faults import last_records
from bench.harness import ROOT, SMALL, assert_identical, full_average, pretrain, rank_states
from data.loader import TokenWindows, TrainBatches, load_meta, val_batches
from launch.engine import build, train_step
from model.llama import Llama
from model.sizes import resolve
from polyak import checkpoints
from polyak.recipe import load_recipe
from tests.distributed import run_ranks
from tests.oracles import (
    hf_logits,
    offline_averages,
    project_logits,
    relative_error,
    released,
    some_tokens,
    zero_to_fp32,
)
from tests.runs import copy_run, poison_token, sampler

BF16 = ["train.precision=bf16"]
ACCUMULATED = ["train.grad_accum=2"]  # SMALL's micro-batch of 4
ONE_MICRO_BATCH = ["train.micro_batch=8", "eval.batches=1"]  # the same 16 held-out windows as 4 × 2 batches
# recipes/7b.yaml's combination: bf16, accumulation, the optimizer and the averages' buffers offloaded, activations
# checkpointed.
OFFLOAD = BF16 + ACCUMULATED + ["zero.offload_optimizer=cpu", "averaging.offload=cpu",
                                "zero.activation_checkpointing=true"]
RECIPE = load_recipe(ROOT / "recipes" / "tiny_cpu.yaml", SMALL)  # what every run here starts from
STEPS = RECIPE.train.steps
RESUME_AT = 8  # the resumed runs: evaluated at 9, 10, 11 where the run was not; LAWA's ring wraps again at 12
POISON_AT = 6  # the poisoned copy: steps 8 to 11 are candidates for the skipped step


def _trained(tmp_path_factory, data_dir, name: str, ranks: int, overrides: list[str]):
    run_dir = tmp_path_factory.mktemp(name)
    pretrain(ranks, [f"data.dir={data_dir}", f"run.dir={run_dir}", "checkpoint.every=1", *overrides])
    return run_dir


def _resumed(tmp_path_factory, data_dir, name: str, source, ranks: int, overrides: list[str]):
    """`source` resumed from a copy of its step-8 checkpoint, evaluating the raw weights and every average at every
    step, where `source` evaluated every 4th: each evaluation swaps the averages into the compute partitions."""
    run_dir = tmp_path_factory.mktemp(name)
    copy_run(source, run_dir, steps=range(1, RESUME_AT + 1))
    proc = pretrain(ranks, [f"data.dir={data_dir}", f"run.dir={run_dir}", "checkpoint.every=1", "eval.every=1",
                            *overrides])
    assert f"resumed from {run_dir / 'checkpoints' / f'global_step{RESUME_AT}'}" in proc.stderr
    return run_dir


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, data_dir):
    return _trained(tmp_path_factory, data_dir, "bf16", 2, BF16)


@pytest.fixture(scope="module")
def bf16_resumed(tmp_path_factory, data_dir, bf16_run):
    return _resumed(tmp_path_factory, data_dir, "bf16_resumed", bf16_run, 2, BF16)


@pytest.fixture(scope="module")
def offload_run(tmp_path_factory, data_dir):
    return _trained(tmp_path_factory, data_dir, "offload", 3, OFFLOAD)


@pytest.fixture(scope="module")
def offload_resumed(tmp_path_factory, data_dir, offload_run):
    return _resumed(tmp_path_factory, data_dir, "offload_resumed", offload_run, 3, OFFLOAD)


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory, data_dir):
    return _trained(tmp_path_factory, data_dir, "accumulated", 2, ACCUMULATED)


@pytest.fixture(scope="module")
def one_micro_batch(tmp_path_factory, data_dir):
    return _trained(tmp_path_factory, data_dir, "one_micro_batch", 2, ONE_MICRO_BATCH + ["checkpoint.every=4"])


# bf16 with fp32 master weights, and ZeRO-Offload of the optimizer.

@pytest.mark.slow
def test_bf16_keeps_fp32_master_weights(bf16_run):
    """DeepSpeed's bf16 optimizer files hold fp32 master weights that are not bf16 numbers: they take updates below
    bf16's resolution, and the averages (next test) sample them, not the bf16 compute copy."""
    last = bf16_run / "checkpoints" / f"global_step{STEPS}"
    assert sorted(p.name for p in last.glob("*optim_states.pt")) == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    master = zero_to_fp32(bf16_run)
    assert {t.dtype for t in master.values()} == {torch.float32}
    inexact = sum((t != t.bfloat16().float()).sum().item() for t in master.values())
    assert inexact > 0.9 * sum(t.numel() for t in master.values())


@pytest.mark.slow
@pytest.mark.parametrize("run", ["bf16_run", "offload_run"])
def test_online_averages_equal_offline_averages_of_the_fp32_master(run, request):
    """EMA, LAWA and the power EMA on each rank's partition (bf16 on 2 ranks; 7b's combination, offloaded, on 3)
    equal their definitions applied offline to DeepSpeed's zero_to_fp32 export of every step."""
    run_dir = request.getfixturevalue(run)
    oracle = offline_averages(run_dir)
    assert sorted(oracle) == ["ema", "lawa", "p10"]
    for name, want in oracle.items():
        # Measured 1.6e-7 (EMA) and 1.1e-7 (LAWA) in bf16, 1.4e-7 and 1.2e-7 offloaded: fp32 rounding of the
        # online updates against a float64 oracle. The bf16 EMA against an oracle started from the fp32 θ0 rather
        # than the bf16-rounded one: 1.7e-4.
        assert relative_error(full_average(run_dir / "checkpoints" / f"global_step{STEPS}", name), want) < 1e-6, name


@pytest.mark.slow
@pytest.mark.parametrize("runs", [("bf16_run", "bf16_resumed"), ("offload_run", "offload_resumed")],
                         ids=["bf16", "offload"])
def test_resumed_run_evaluating_every_step_is_bitwise_the_run(runs, request):
    """Resumed at step 8 and evaluated (the averages swapped into the compute partitions, fp32→bf16, from host
    memory when offloaded, and restored) at every step where the run evaluated every 4th: losses, weights,
    optimizer state and averages equal the uninterrupted run's bit for bit, checked step by step so that a failure
    names the first step that differs. A swap that failed to restore the training weights would show in the next
    step's loss."""
    run_dir, resumed = (request.getfixturevalue(name) for name in runs)
    ours, theirs = last_records(resumed), last_records(run_dir)
    assert sorted(ours) == list(range(RESUME_AT + 1, STEPS + 1))
    for step in ours:
        assert ours[step]["val_loss_ema"] != ours[step]["val_loss"] != ours[step]["val_loss_lawa"]  # swapped in
        assert {k: ours[step][k] for k in theirs[step]} == theirs[step], f"step {step}"
        a, b = (d / "checkpoints" / checkpoints.tag_of(step) for d in (resumed, run_dir))
        assert_identical(rank_states(a), rank_states(b), f"step {step}: master weights and optimizer state")
        for name in ("ema", "lawa"):
            assert_identical(full_average(a, name), full_average(b, name), f"step {step}: {name}")
    assert [s for s in theirs if "val_loss" in theirs[s]] == [4, 8, 12]  # so steps 9, 10, 11 swapped extra


def test_runs_are_compared_by_their_bits():
    """The same NaN is equal to itself (ZeRO-3's uninitialised padding can hold one: it did in the offload run's rank
    2 master partition, in both runs, which torch.equal called different); 0.0 and -0.0, or bf16 and fp32, are not."""
    for dtype in (torch.float32, torch.bfloat16):
        held = torch.tensor([0.5, float("nan"), 0.0], dtype=dtype)
        assert_identical({"state": [held]}, {"state": [held.clone()]})
        for other in (torch.tensor([0.5, float("nan"), -0.0], dtype=dtype), torch.tensor([0.5, 1.0, 0.0], dtype=dtype),
                      held.float() if dtype == torch.bfloat16 else held.double()):
            with pytest.raises(AssertionError):
                assert_identical({"state": [held]}, {"state": [other]})


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["raw", "ema", "lawa"])
def test_bf16_exports_are_the_fp32_weights_and_give_transformers_our_logits(weights, bf16_run, tmp_path):
    """A bf16 run's release holds its fp32 weights (raw: DeepSpeed's zero_to_fp32 of the bf16 checkpoint, tensor
    for tensor; an average: the saved one), and transformers' Llama computes our model's logits from it."""
    out = consolidate(bf16_run / "checkpoints", None, weights, tmp_path / weights)
    state = released(out)
    expected = zero_to_fp32(bf16_run) if weights == "raw" else \
        full_average(bf16_run / "checkpoints" / f"global_step{STEPS}", weights)
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor), name
    tokens = some_tokens(load_meta(load_recipe(bf16_run / "recipe.yaml").data.dir)["vocab_size"])
    torch.testing.assert_close(hf_logits(out, tokens), project_logits(bf16_run, state, tokens), atol=1e-5, rtol=0)


# Gradient accumulation.

def _micro_batches(data_dir, micro_batch: int, grad_accum: int, steps: int, consumed: int = 0) -> list[dict]:
    """Per optimizer step, every micro-batch of every rank of a 2-rank run: {(rank, micro-step): (inputs, targets)}."""
    windows = TokenWindows(data_dir, "train", RECIPE.data.seq_len)
    ranks = [TrainBatches(windows, r, 2, micro_batch, RECIPE.train.seed, consumed=consumed) for r in range(2)]
    return [{(r, m): ranks[r].next() for m in range(grad_accum) for r in range(2)} for _ in range(steps)]


def _rows(batches) -> list[list[int]]:
    return sorted(row for x, _ in batches for row in x.tolist())


def test_accumulation_draws_the_same_windows_for_each_optimizer_step(data_dir):
    """Micro-batch 4 × accumulation 2 and micro-batch 8 × 1 on 2 ranks train every step on the same windows (one
    permutation cut into global micro-batches; 12 steps stay inside the first epoch), and hold out the same ones."""
    accumulated, whole = _micro_batches(data_dir, 4, 2, STEPS), _micro_batches(data_dir, 8, 1, STEPS)
    for step, (a, b) in enumerate(zip(accumulated, whole), 1):
        assert _rows(a.values()) == _rows(b.values()), f"step {step}"
    assert _rows(accumulated[0].values()) != _rows(accumulated[1].values())
    val = TokenWindows(data_dir, "val", RECIPE.data.seq_len)
    assert _rows(b for r in range(2) for b in val_batches(val, r, 2, 4, 2)) == \
        _rows(b for r in range(2) for b in val_batches(val, r, 2, 8, 1))


@pytest.mark.slow
def test_accumulation_trains_like_one_micro_batch_of_the_same_tokens(accumulated, one_micro_batch):
    """4 × 2 against 8 × 1, fp32: the same training up to the reassociation of fp32 sums. Measured: losses within
    9.1e-8 relative, gradient norms 1.1e-7, held-out losses 9.4e-8; weights (~0.1, a step's update ~1e-2 an element)
    within 1.2e-6 for 99.9% of them, the largest 6.5e-5 at step 12 on one machine (6.2e-7 on another): Adam divides
    by √v, so where a gradient element is near zero its update amplifies the reassociation error. A micro-batch lost
    or counted twice moves nearly every weight by ~1e-3."""
    ours, theirs = last_records(accumulated), last_records(one_micro_batch)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    for step in ours:
        assert ours[step].keys() == theirs[step].keys()
        assert (ours[step]["lr"], ours[step]["tokens"]) == (theirs[step]["lr"], theirs[step]["tokens"])
        # The gradient norm too: Adam is blind to a gradient scaled by the accumulation count, the norm is not.
        for key in ("loss", "grad_norm", "val_loss", "val_loss_ema", "val_loss_lawa"):
            if key in theirs[step]:
                assert ours[step][key] == pytest.approx(theirs[step][key], rel=1e-6, abs=0), f"step {step} {key}"
    for step in (4, 8, STEPS):
        a, b = zero_to_fp32(accumulated, f"global_step{step}"), zero_to_fp32(one_micro_batch, f"global_step{step}")
        assert a.keys() == b.keys()
        diff = torch.cat([(a[name] - b[name]).abs().flatten() for name in a])
        assert diff.quantile(0.99) < 1e-6 and diff.max() < 3e-4, f"step {step}"


@pytest.mark.slow
def test_a_non_finite_second_micro_batch_skips_the_step_on_every_rank(accumulated, data_dir, tmp_path):
    """From the accumulated run's step 6, with the input embedding of a token set to NaN that only one rank's second
    micro-batch of step `bad` holds: the first micro-batch's gradient is already accumulated when the loss turns
    non-finite. The step is skipped on every rank and counted; later steps draw the uninterrupted run's data at its
    learning rate, and the step after it starts clean from the weights before it."""
    ranks, accum = 2, 2
    steps = _micro_batches(data_dir, 4, accum, STEPS - POISON_AT, consumed=POISON_AT * accum)
    batch = {POISON_AT + 1 + i: step for i, step in enumerate(steps)}  # by step number
    inputs = {(s, r, m): set(x.unique().tolist()) for s, step in batch.items() for (r, m), (x, _) in step.items()}
    val = TokenWindows(data_dir, "val", RECIPE.data.seq_len)
    held_out = {t for r in range(ranks) for x, _ in val_batches(val, r, ranks, 4, 2) for t in x.unique().tolist()}
    # Not the last step: the step after the skip shows whether the accumulated gradient was dropped.
    bad, _, token = next((s, r, t) for s in range(POISON_AT + 2, STEPS) for r in range(ranks)
                         for t in sorted(inputs[s, r, 1])
                         if t not in held_out and all(t not in v for k, v in inputs.items() if k != (s, r, 1)))

    copy_run(accumulated, tmp_path, steps=range(1, POISON_AT + 1))
    poison_token(tmp_path / "checkpoints" / f"global_step{POISON_AT}", token)
    proc = pretrain(ranks, [f"data.dir={data_dir}", f"run.dir={tmp_path}", "checkpoint.every=1", *ACCUMULATED])
    assert f"step {bad}: non-finite loss or gradients, update skipped (1 in a row)" in proc.stderr.splitlines()
    ours, theirs = last_records(tmp_path), last_records(accumulated)
    assert [s for s in ours if ours[s]["loss"] is None] == [bad]
    assert [ours[s]["lr"] for s in ours] == [theirs[s]["lr"] for s in ours]
    assert all(ours[s] == theirs[s] for s in range(POISON_AT + 1, bad))  # the poisoned row is in no earlier batch
    saved = [s for s in range(1, STEPS + 1) if s != bad]  # none for the skipped step
    assert checkpoints.saved_steps(tmp_path / "checkpoints") == saved
    assert [sampler(tmp_path, s) for s in saved if s > POISON_AT] == \
        [sampler(accumulated, s) for s in saved if s > POISON_AT]

    # No rank stepped: every rank's AdamW took one update fewer than in the uninterrupted run, in both groups.
    def adam_steps(run_dir):
        return [group["step"].item() for state in rank_states(run_dir / "checkpoints" / f"global_step{STEPS}")
                for group in state["optimizer_state_dict"]["state"].values()]
    assert adam_steps(accumulated) == [STEPS] * 4 and adam_steps(tmp_path) == [STEPS - 1] * 4

    # The step after the skip, recomputed by our model in one process from the weights saved before the skipped
    # step, on that step's micro-batches of every rank. Measured: the same loss, the gradient norm within 2e-11.
    # Had the skipped step's first micro-batch stayed in the accumulated gradient, the norm would be 14% larger
    # here; had its update been applied, the weights and so the loss would differ.
    recipe = load_recipe(tmp_path / "recipe.yaml")
    model = Llama(resolve(recipe.model, load_meta(data_dir)["vocab_size"], recipe.data.seq_len))
    model.load_state_dict(zero_to_fp32(tmp_path, f"global_step{bad - 1}"))  # NaN only in the unused row
    after = batch[bad + 1].values()
    loss = model(torch.cat([x for x, _ in after]), torch.cat([y for _, y in after]))
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in model.parameters()]))
    assert ours[bad + 1]["loss"] == pytest.approx(loss.item(), rel=1e-6, abs=0)
    assert ours[bad + 1]["grad_norm"] == pytest.approx(norm.item(), rel=1e-6, abs=0)


# Activation checkpointing.

CHECKPOINTING_STEPS = 3


def _checkpointing_rank(rank: int, world_size: int, data_dir: str) -> dict:
    """The same steps with and without activation checkpointing, fp32, on engines built and stepped by the trainer's
    own functions (accumulating 2 micro-batches, as 7b does): per step the loss, the gradient norm and how often the
    blocks ran forward; then this rank's fp32 master weights and Adam moments (ZeRO-3's uninitialised padding left
    out)."""
    device, out = torch.device("cpu"), {}
    for checkpointing in (False, True):
        recipe = load_recipe(ROOT / "recipes" / "tiny_cpu.yaml", SMALL + ACCUMULATED + [
            f"data.dir={data_dir}", f"zero.activation_checkpointing={str(checkpointing).lower()}"])
        engine, _, _ = build(recipe, load_meta(data_dir)["vocab_size"], world_size, device)
        forwards = []
        for block in engine.module.model.layers:  # a pre-hook: the recomputation stops early, skipping post-hooks
            block.register_forward_pre_hook(lambda *_: forwards.append(1))
        t = recipe.train
        batches = TrainBatches(TokenWindows(data_dir, "train", recipe.data.seq_len), rank, world_size, t.micro_batch,
                               t.seed)
        steps = []
        for _ in range(CHECKPOINTING_STEPS):
            forwards.clear()
            loss = train_step(engine, batches, t.grad_accum, device)
            steps.append({"loss": loss, "grad_norm": float(engine.get_global_grad_norm()), "forwards": len(forwards)})
        master = master_partitions(engine)
        real = [torch.ones(p.numel(), dtype=torch.bool).index_fill_(0, pad, False)
                for p, pad in zip(master, layout(engine).padding(zero_rank(engine)))]
        adam = engine.optimizer.optimizer.state
        out[checkpointing] = {"steps": steps, "master": [p[r].clone() for p, r in zip(master, real)],
                              "moments": [(adam[p]["exp_avg"][r].clone(), adam[p]["exp_avg_sq"][r].clone())
                                          for p, r in zip(master, real)]}
    return out


@pytest.mark.slow
def test_activation_checkpointing_recomputes_the_blocks_and_changes_nothing(data_dir):
    """Under ZeRO-3 on 2 ranks: with checkpointing every block runs forward twice per micro-batch (the recomputation
    in backward re-gathers its partitioned weights), and losses, gradient norms, master weights and Adam moments (the
    gradients' running averages) are the same as without. The recomputation runs the same kernels on the same
    inputs, so on CPU ranks they are bitwise the same (measured, in bf16 too), which is what is asked here; a
    nondeterministic GPU kernel would need fp32 tolerance. bf16 with checkpointing and everything else 7b does: the
    offload run above."""
    n_layers = RECIPE.model.n_layers
    micro_steps = 2
    for rank in run_ranks(_checkpointing_rank, 2, str(data_dir)):
        plain, checkpointed = rank[False], rank[True]
        assert [s.pop("forwards") for s in plain["steps"]] == [n_layers * micro_steps] * CHECKPOINTING_STEPS
        assert [s.pop("forwards") for s in checkpointed["steps"]] == [2 * n_layers * micro_steps] * CHECKPOINTING_STEPS
        assert all(s["grad_norm"] > 0 for s in plain["steps"])
        assert_identical(checkpointed, plain)


def _non_finite_gradient_rank(rank: int, world_size: int, data_dir: str, offload: bool) -> dict:
    """Three steps on engines built and stepped by the trainer's own functions; in the second, rank 1 turns the
    gradient at the final norm's output to NaN while every loss stays finite. Per step: the loss returned, and
    whether this rank's fp32 master partitions and Adam state are those from before the step."""
    sets = SMALL + ACCUMULATED + [f"data.dir={data_dir}"] + (["zero.offload_optimizer=cpu"] if offload else [])
    recipe = load_recipe(ROOT / "recipes" / "tiny_cpu.yaml", sets)
    engine, _, _ = build(recipe, load_meta(data_dir)["vocab_size"], world_size, torch.device("cpu"))
    t = recipe.train
    batches = TrainBatches(TokenWindows(data_dir, "train", recipe.data.seq_len), rank, world_size, t.micro_batch,
                           t.seed)

    def poison(module, inputs, output):
        output.register_hook(lambda grad: torch.full_like(grad, float("nan")))

    adam = engine.optimizer.optimizer.state
    out = []
    for step in (1, 2, 3):
        before = [p.clone() for p in master_partitions(engine)]
        steps_before = [float(adam[p]["step"]) if "step" in adam[p] else 0.0 for p in master_partitions(engine)]
        hook = engine.module.model.norm.register_forward_hook(poison) if step == 2 and rank == 1 else None
        loss = train_step(engine, batches, t.grad_accum, torch.device("cpu"))
        if hook:
            hook.remove()
        master = master_partitions(engine)
        out.append({"loss": loss, "finite": all(bool(p.isfinite().all()) for p in master),
                    "unchanged": all(torch.equal(a, b) for a, b in zip(before, master))
                    and [float(adam[p]["step"]) for p in master] == steps_before})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("offload", [False, True], ids=["fp32", "offload"])
def test_a_finite_loss_with_non_finite_gradients_skips_the_step_on_every_rank(data_dir, offload):
    """DeepSpeed checks gradients only under fp16 loss scaling; here rank 1's second step has NaN gradients and a
    finite loss: no rank updates its partitions or Adam state, every rank reports the skip (NaN), and the next
    step trains from the weights before it."""
    for rank in run_ranks(_non_finite_gradient_rank, 2, str(data_dir), offload):
        first, skipped, after = rank
        assert math.isfinite(first["loss"]) and not first["unchanged"]
        assert math.isnan(skipped["loss"]) and skipped["unchanged"]
        assert math.isfinite(after["loss"]) and not after["unchanged"] and after["finite"]
