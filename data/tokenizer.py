"""Tokenizers: a byte-level BPE trained on the train split, or a pretrained one; and the files transformers loads."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.loader import load_meta
from polyak.errors import UserError

EOS = "<|endoftext|>"
# End-of-text tokens of common pretrained tokenizers (GPT-2/NeoX/Qwen, Llama 3, Llama 2/Mistral, Gemma).
_EOS_TOKENS = (EOS, "<|end_of_text|>", "</s>", "<eos>")


def train_bpe(batches: Iterable[list[str]], vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE: every byte is a token, so any text encodes and decodes back exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(batches, trainer)
    return tokenizer


def pretrained_tokenizer(name: str) -> Tokenizer:
    """A tokenizer.json file (or a folder holding one), else a tokenizer on the Hugging Face hub."""
    path = Path(name)
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if path.suffix == ".json":
        raise UserError(f"data.tokenizer: file not found: {path}")
    try:
        return Tokenizer.from_pretrained(name)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise UserError(f"data.tokenizer={name!r}: cannot reach the Hugging Face hub to download it; "
                        "use data.tokenizer: bpe, or the path of a local tokenizer.json") from None
    except (RepositoryNotFoundError, HFValidationError):
        raise UserError(f"data.tokenizer={name!r}: neither a local tokenizer.json nor a tokenizer on the "
                        "Hugging Face hub") from None


def eos_id(tokenizer: Tokenizer, name: str) -> int:
    """The id of the end-of-text token: ours, or the usual one of a pretrained tokenizer."""
    for token in _EOS_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise UserError(f"data.tokenizer={name!r} has no end-of-text token (looked for {', '.join(_EOS_TOKENS)})")


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    load_meta(data_dir)
    return Tokenizer.from_file(str(Path(data_dir) / "tokenizer.json"))


def copy_tokenizer(data_dir: str | Path, out_dir: str | Path) -> None:
    """tokenizer.json and meta.json of a prepared folder (no tokens): what a run folder needs to be released."""
    load_meta(data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "meta.json"):
        shutil.copyfile(Path(data_dir) / name, out / f".{name}.tmp")
        os.replace(out / f".{name}.tmp", out / name)


def write_hf_tokenizer_files(data_dir: str | Path, out_dir: str | Path) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json: what AutoTokenizer.from_pretrained reads."""
    meta = load_meta(data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(data_dir) / "tokenizer.json", out / "tokenizer.json")
    special = {"eos_token": load_tokenizer(data_dir).id_to_token(meta["eos_id"])}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
              # decode must give back the exact text, spaces before punctuation included
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
