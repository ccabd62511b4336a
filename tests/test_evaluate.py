"""eval.evaluate: sliding-window loss equals transformers' own loss, bits per byte by hand, one-line errors."""

import json
import math
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.harness import run_cli
from eval.evaluate import evaluate_tokens, load_model, main
from polyak.errors import UserError

WORDS = ["the", "weight", "average", "of", "many", "steps", "follows", "a", "slow", "curve", "while", "learning",
         "rate", "decays", "to", "its", "floor", "and", "each", "token", "costs", "bits", "per", "byte", "naïve",
         "café", "über", "déjà", "vu", "—", "señor", "10", "20", "30", "loss"]


def corpus(n_docs: int, seed: int) -> list[str]:
    """Documents of made-up sentences, with non-ASCII letters so that bytes and characters differ."""
    rng = random.Random(seed)
    return [" ".join(" ".join(rng.choices(WORDS, k=rng.randint(5, 12))).capitalize() + "."
                     for _ in range(rng.randint(2, 5))) for _ in range(n_docs)]


def make_release(directory: Path, data_dir: Path | None = None, seed: int = 0) -> Path:
    """A release-like folder: a tiny random LlamaForCausalLM and a byte-level BPE trained on `corpus`.

    With `data_dir`, also a prepared val split there (val.bin, meta.json, tokenizer.json) and a polyak.json naming
    it; its documents are `corpus(12, seed + 1)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(60, seed), trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(directory)

    torch.manual_seed(seed)
    # A large init spread makes predictions depend strongly on context, so window mistakes show in the loss.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.3, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(directory)
    if data_dir is not None:
        docs = corpus(12, seed + 1)
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        val = np.array([t for d in ids for t in [*d, tokenizer.eos_token_id]], dtype=np.uint16)  # as data.prepare
        data_dir.mkdir(parents=True, exist_ok=True)
        tok.save(str(data_dir / "tokenizer.json"))
        val.tofile(data_dir / "val.bin")
        meta = {"vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id, "dtype": "uint16",
                "val_tokens": len(val), "val_bytes": sum(len(d.encode()) for d in docs)}
        (data_dir / "meta.json").write_text(json.dumps(meta))
        (directory / "polyak.json").write_text(json.dumps(
            {"run_dir": "runs/x", "checkpoint": "step_00000010", "step": 10, "weights": "raw",
             "data_dir": str(data_dir)}))
    return directory


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("release")
    return make_release(root / "model", root / "data")


@pytest.fixture(scope="module")
def model(release):
    return load_model(release, "cpu")


@pytest.fixture(scope="module")
def tokens(release) -> torch.Tensor:
    from transformers import AutoTokenizer

    text = " ".join(corpus(8, seed=7))
    return torch.tensor(AutoTokenizer.from_pretrained(release)(text, add_special_tokens=False)["input_ids"])


def hf_loss(model, tokens: torch.Tensor, seq_len: int) -> float:
    """The token-weighted mean of transformers' own losses over disjoint windows of seq_len tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(tokens), seq_len):
            ids = tokens[None, begin:begin + seq_len]
            if ids.shape[1] > 1:
                total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
    return total / count


def test_single_window_equals_transformers_loss(model, tokens):
    ids = tokens[:50]
    sum_nll, n = evaluate_tokens(model, ids, seq_len=64, stride=64, batch_size=4)
    assert n == 49
    with torch.no_grad():
        expected = model(input_ids=ids[None], labels=ids[None]).loss.item()
    assert sum_nll / n == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_disjoint_windows_equal_weighted_transformers_losses(model, tokens, batch_size):
    ids = tokens[:3 * 32 + 10]  # three full windows and a short one, batched with and without padding
    sum_nll, n = evaluate_tokens(model, ids, seq_len=32, stride=32, batch_size=batch_size)
    assert n == 3 * 31 + 9
    assert sum_nll / n == pytest.approx(hf_loss(model, ids, 32), abs=1e-5)


@pytest.mark.parametrize("seq_len, stride", [(32, 12), (32, 1), (20, 19)])
def test_sliding_windows_equal_the_transformers_perplexity_recipe(model, tokens, seq_len, stride):
    ids = tokens[:101]
    total, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):  # the loop of transformers' perplexity guide, one window at a time
            end = min(begin + seq_len, len(ids))
            window = ids[None, begin:end]
            labels = window.clone()
            labels[:, :-(end - prev_end)] = -100
            valid = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=window, labels=labels).loss.item() * valid
            count += valid
            prev_end = end
            if end == len(ids):
                break
    sum_nll, n = evaluate_tokens(model, ids, seq_len, stride, batch_size=3)
    assert n == count == len(ids) - 1
    assert sum_nll / n == pytest.approx(total / count, abs=1e-5)


def test_text_file_metrics_and_bits_per_byte(release, model, tmp_path, capsys):
    from transformers import AutoTokenizer

    text = "\n".join(corpus(6, seed=11))
    (tmp_path / "notes.txt").write_text(text, encoding="utf-8")
    result = main([str(release), "--text-file", str(tmp_path / "notes.txt"), "--batch-size", "2"])
    ids = torch.tensor(AutoTokenizer.from_pretrained(release)(text, add_special_tokens=False)["input_ids"])
    assert len(ids) > 2 * 64  # several windows at the default seq_len (max_position_embeddings)
    loss = hf_loss(model, ids, 64)
    n_bytes = len(text.encode("utf-8"))
    assert n_bytes > len(text)
    assert result["loss"] == pytest.approx(loss, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(loss * len(ids) / (math.log(2) * n_bytes), rel=1e-5)
    assert (result["tokens"], result["bytes"], result["seq_len"], result["stride"]) == (len(ids), n_bytes, 64, 64)
    assert json.loads((release / "eval_notes.json").read_text()) == result
    assert f"bits_per_byte {result['bits_per_byte']:.6g}" in capsys.readouterr().out.splitlines()


def test_jsonl_documents_are_joined_with_eos_and_capped(release, model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(release)
    docs = corpus(3, seed=5)
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)))
    out = tmp_path / "out.json"
    result = main([str(release), "--jsonl", str(tmp_path / "docs.jsonl"), "--field", "body", "--max-tokens", "60",
                   "--seq-len", "40", "--stride", "30", "--out", str(out)])
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    ids = [*encoded[0], tokenizer.eos_token_id, *encoded[1], tokenizer.eos_token_id, *encoded[2]]
    assert len(ids) > 60
    all_bytes = sum(len(d.encode()) for d in docs)
    sum_nll, n = evaluate_tokens(model, torch.tensor(ids[:60]), 40, 30, 1)
    assert (result["tokens"], result["scored_tokens"]) == (60, n)
    assert result["bytes"] == pytest.approx(all_bytes * 60 / len(ids))
    assert result["loss"] == pytest.approx(sum_nll / n, abs=1e-6)
    assert json.loads(out.read_text())["stride"] == 30


def test_val_split_is_the_default_with_polyak_json(release, model):
    meta = json.loads((release.parent / "data" / "meta.json").read_text())
    val = torch.from_numpy(np.fromfile(release.parent / "data" / "val.bin", dtype=np.uint16).astype(np.int64))
    result = main([str(release)])
    assert (result["source"], result["tokens"], result["bytes"]) == ("val", meta["val_tokens"], meta["val_bytes"])
    assert result["loss"] == pytest.approx(hf_loss(model, val, 64), abs=1e-5)
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] * meta["val_tokens"] / (math.log(2) * meta["val_bytes"]), rel=1e-12)
    capped = main([str(release), "--max-tokens", "100"])
    assert capped["bytes"] == pytest.approx(meta["val_bytes"] * 100 / meta["val_tokens"])
    assert capped["loss"] == pytest.approx(hf_loss(model, val[:100], 64), abs=1e-5)
    assert (release / "eval_val.json").is_file()


def test_errors_are_one_line(release, tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "empty").mkdir()
    bare = shutil.copytree(release, tmp_path / "bare", ignore=shutil.ignore_patterns("polyak.json", "eval_*"))
    (tmp_path / "blank.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "no"}\n')
    cases = [
        ([str(tmp_path / "nope")], "model folder not found: "),
        ([str(tmp_path / "empty")], "is not a transformers model folder (no config.json)"),
        ([str(tmp_path / "gpt2")], "model_type='gpt2', expected a Llama folder"),
        ([str(bare)], "no val split known for"),
        ([str(bare), "--text-file", str(tmp_path / "blank.txt")], "the text is empty"),
        ([str(bare), "--jsonl", str(tmp_path / "bad.jsonl")], "bad.jsonl:2: no text field 'text'"),
        ([str(release), "--stride", "65"], "--stride 65: must be between 1 and --seq-len (64)"),
        ([str(release), "--seq-len", "65"], "max_position_embeddings (64)"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError) as e:
            main(argv)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_prints_one_line_error(tmp_path):
    proc = run_cli([sys.executable, "-m", "eval.evaluate", str(tmp_path / "nope")], check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"error: model folder not found: {tmp_path / 'nope'}\n"
