"""Consolidation into transformers folders, checked against DeepSpeed's zero_to_fp32, transformers and our model."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from averaging.consolidate import consolidate
from bench.harness import full_average, pretrain, run_cli
from data.tokenizer import load_tokenizer
from polyak.errors import UserError
from tests.oracles import hf_logits, project_logits, released, some_tokens, zero_to_fp32

TEXTS = ["def main():\n    return 0\n", "Ünïcödé, tabs\tand  spaces; <|endoftext|> mid-text.", ""]


def link_copy(run_dir: Path, to: Path) -> Path:
    """A copy of a run directory to doctor: the heavy weight files are symlinks (only ever read)."""
    def link_or_copy(src, dst):
        if src.endswith((".pt", ".safetensors")):
            os.symlink(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(run_dir, to, copy_function=link_or_copy)
    return to


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_raw_weights_equal_zero_to_fp32(ranks, request, tmp_path):
    run_dir = request.getfixturevalue(f"run{ranks}")
    out = consolidate(run_dir / "checkpoints", "global_step7", "raw", tmp_path / "raw")
    ours, theirs = released(out), zero_to_fp32(run_dir, "global_step7")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    assert json.loads((out / "polyak.json").read_text())["step"] == 7


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["raw", "ema", "lawa"])
def test_export_loads_in_transformers_with_our_logits(weights, run3, tmp_path):
    out = consolidate(run3 / "checkpoints", None, weights, tmp_path / weights)
    state = released(out)
    latest = run3 / "checkpoints" / "global_step12"
    expected = zero_to_fp32(run3) if weights == "raw" else full_average(latest, weights)
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    tokens = some_tokens(json.loads((out / "config.json").read_text())["vocab_size"])
    torch.testing.assert_close(hf_logits(out, tokens), project_logits(run3, state, tokens), atol=1e-5, rtol=0)

    polyak = json.loads((out / "polyak.json").read_text())
    recipe = yaml.safe_load((run3 / "recipe.yaml").read_text())
    assert {k: polyak[k] for k in ("run_dir", "checkpoint", "step", "weights", "data_dir", "dtype")} == {
        "run_dir": str(run3.resolve()), "checkpoint": str(latest.resolve()), "step": 12, "weights": weights,
        "data_dir": str(Path(recipe["data"]["dir"]).resolve()), "dtype": "fp32"}
    if weights != "raw":
        description = json.loads((latest / "averaging" / "averaging.json").read_text())
        assert polyak["average"] == description["averages"][weights]


def test_tokenizer_loads_with_identical_ids(run1, data_dir, tmp_path):
    out = consolidate(run1 / "checkpoints", None, "ema", tmp_path / "ema")
    hf, ours = AutoTokenizer.from_pretrained(out), load_tokenizer(data_dir)
    for text in TEXTS:
        assert hf(text)["input_ids"] == ours.encode(text).ids
        assert hf.decode(hf(text)["input_ids"]) == text
    meta = json.loads((data_dir / "meta.json").read_text())
    assert hf.eos_token_id == meta["eos_id"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == meta["eos_id"]


def test_bf16_export_is_the_fp32_one_cast(run1, tmp_path):
    fp32 = released(consolidate(run1 / "checkpoints", None, "lawa", tmp_path / "fp32"))
    out = consolidate(run1 / "checkpoints", None, "lawa", tmp_path / "bf16", dtype="bf16")
    bf16 = released(out)
    assert bf16.keys() == fp32.keys()
    for name, tensor in fp32.items():
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], tensor.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_small_max_shard_size_gives_shards_and_an_index(run1, tmp_path):
    whole = consolidate(run1 / "checkpoints", None, "raw", tmp_path / "whole")
    out = consolidate(run1 / "checkpoints", None, "raw", tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("model*.safetensors"))
    assert len(shards) > 2
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert not (out / "model.safetensors").exists() and (whole / "model.safetensors").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    expected = released(whole)
    assert set(index["weight_map"]) == set(expected) and set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        names = [name for name, file in index["weight_map"].items() if file == shard]
        assert len(names) == 1 or sum(expected[name].nbytes for name in names) <= 100_000  # only big tensors alone
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in expected.values())
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.slow
def test_tied_embeddings_are_written_once(data_dir, tmp_path):
    run_dir = tmp_path / "tied"
    pretrain(3, [f"data.dir={data_dir}", f"run.dir={run_dir}", "model.tie_embeddings=true", "train.steps=2"])
    theirs = zero_to_fp32(run_dir)
    for weights in ("raw", "ema"):
        out = consolidate(run_dir / "checkpoints", None, weights, tmp_path / weights)
        state = released(out)
        assert "lm_head.weight" not in state and json.loads((out / "config.json").read_text())["tie_word_embeddings"]
        if weights == "raw":
            assert all(torch.equal(state[name], theirs[name]) for name in state)
            assert torch.equal(theirs.get("lm_head.weight", state["model.embed_tokens.weight"]),
                               state["model.embed_tokens.weight"])
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        tokens = some_tokens(model.config.vocab_size)
        torch.testing.assert_close(hf_logits(out, tokens), project_logits(run_dir, state, tokens), atol=1e-5, rtol=0)


def consolidate_cli(*args: str):
    return run_cli([sys.executable, "-m", "averaging.consolidate", *map(str, args)], check=False)


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_cli_refuses_an_existing_out_and_changes_nothing(run1, tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = sorted(tmp_path.rglob("*"))
    message = one_line_error(consolidate_cli(run1 / "checkpoints", "--weights", "raw", "--out", out))
    assert str(out) in message and "already exists" in message
    assert sorted(tmp_path.rglob("*")) == before and (out / "keep.txt").read_text() == "mine"


def test_cli_lists_the_available_weights(run1, tmp_path):
    message = one_line_error(consolidate_cli(run1 / "checkpoints", "--weights", "emma", "--out", tmp_path / "r"))
    assert "--weights emma" in message and "available: raw, ema, lawa" in message
    assert list(tmp_path.iterdir()) == []


def test_cli_names_a_missing_tag_and_the_saved_ones(run1, tmp_path):
    proc = consolidate_cli(run1 / "checkpoints", "--tag", "global_step99", "--weights", "raw", "--out", tmp_path / "r")
    message = one_line_error(proc)
    assert "'global_step99'" in message and "global_step1, global_step2," in message and "global_step12" in message
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoints_or_latest(tmp_path):
    with pytest.raises(UserError, match="no such checkpoints directory"):
        consolidate(tmp_path / "nowhere", None, "raw", tmp_path / "out")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match=r"latest: not found; name a checkpoint with --tag \(saved: none\)"):
        consolidate(tmp_path / "checkpoints", None, "raw", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_a_checkpoint_of_another_model_shape_is_refused(run1, tmp_path):
    copy = link_copy(run1, tmp_path / "run")
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["model"]["n_layers"] += 1
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    for weights in ("raw", "ema"):
        with pytest.raises(UserError, match=r"do not match the model of .*recipe.yaml: "
                                            r"model\.layers\.2\.self_attn\.q_proj\.weight is missing"):
            consolidate(copy / "checkpoints", None, weights, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))

