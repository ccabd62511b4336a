"""Tokenise a corpus into flat token streams: `python -m data.prepare --recipe R [--set key=value ...]`.

data.dir receives train.bin and val.bin (every document's tokens followed by EOS), tokenizer.json, and meta.json.
Everything is written under a temporary name and renamed at the end, meta.json last: a directory with a
meta.json is complete; one without is an unfinished run, cleaned and started over.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
from functools import partial
from pathlib import Path

import datasets
import numpy as np
from tqdm import tqdm

from data.sources import Corpus, describe, load_corpus
from data.tokenizer import eos_id, pretrained_tokenizer, train_bpe
from polyak.errors import UserError, cli
from polyak.recipe import DataConfig, load_recipe

VERSION = 1
# The BPE learns its merges from the first train text: at most this much, and under a token budget one byte per
# token (about a third of the text the budget covers; four times more improves compression by only ~2%).
BPE_SAMPLE_BYTES = 256 * 2**20
CHUNK_BYTES = 16 * 2**20  # text per tokenising process in one map() call: bounds memory, lets a budget stop early
BYTES_PER_TOKEN = 4  # a generous guess, to size the work to a token budget
_FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")
_NOT_CONTENT = ("dir", "seq_len", "num_proc")  # config fields that leave the prepared data unchanged


def prepare(cfg: DataConfig) -> Path:
    """Prepare cfg.dir, or reuse it as is when it already holds this config's data."""
    out = Path(cfg.dir)
    description, source_hash = describe(cfg)
    if (out / "meta.json").is_file():
        _check_same(out, cfg, source_hash)
        print(f"{out}: already prepared")
        return out
    _clean_unfinished(out)

    tokenizer = None if cfg.tokenizer == "bpe" else pretrained_tokenizer(cfg.tokenizer)
    corpus = load_corpus(cfg)
    if tokenizer is None:
        sample = min(BPE_SAMPLE_BYTES, cfg.max_tokens or BPE_SAMPLE_BYTES)
        tokenizer = train_bpe(corpus.train_texts(sample), cfg.bpe_vocab_size)
    # documents are encoded whole, whatever a pretrained tokenizer.json says
    tokenizer.no_truncation()
    tokenizer.no_padding()
    eos = eos_id(tokenizer, cfg.tokenizer)
    vocab_size = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)

    if cfg.max_tokens is None:
        budgets = {"train": None, "val": None}
    else:
        val_budget = round(cfg.max_tokens * cfg.val_fraction)
        budgets = {"train": cfg.max_tokens - val_budget, "val": val_budget}
    out.mkdir(parents=True, exist_ok=True)
    writers = {split: _SplitWriter(out / f"{split}.bin.tmp", dtype, budgets[split]) for split in budgets}
    encode = partial(_encode, tokenizer=tokenizer, eos=eos)
    with tqdm(total=cfg.max_tokens, unit="tok", unit_scale=True, desc=f"tokenising into {out}", disable=None) as bar:
        if corpus.splits is not None:
            _tokenize_splits(corpus, encode, writers, cfg.num_proc, bar)
        else:
            _tokenize_stream(corpus, encode, writers, bar)
    for writer in writers.values():
        writer.file.close()
    for split, writer in writers.items():
        if writer.documents == 0:
            raise UserError(f"the {split} split of {description} came out empty (data.val_fraction="
                            f"{cfg.val_fraction}, data.max_tokens={cfg.max_tokens}); add documents or raise these")

    tokenizer.save(str(out / "tokenizer.json.tmp"))
    meta = {"version": VERSION, "tokenizer": cfg.tokenizer, "vocab_size": vocab_size, "eos_id": eos,
            "dtype": dtype.name}
    for split, writer in writers.items():
        meta |= {f"{split}_tokens": writer.tokens, f"{split}_bytes": writer.bytes,
                 f"{split}_documents": writer.documents}
    meta |= {"source": description, "source_hash": source_hash, "data": dataclasses.asdict(cfg)}
    (out / "meta.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    for name in _FILES:
        os.replace(out / f"{name}.tmp", out / name)
    print(f"prepared {out}: {meta['train_tokens']:,} train tokens ({meta['train_documents']:,} documents), "
          f"{meta['val_tokens']:,} val tokens ({meta['val_documents']:,} documents), vocabulary {vocab_size:,}")
    return out


class _SplitWriter:
    """Appends whole documents to a token file until the next one would exceed the split's token budget."""

    def __init__(self, path: Path, dtype: np.dtype, budget: int | None):
        self.file, self.dtype, self.budget = open(path, "wb"), dtype, budget
        self.tokens = self.bytes = self.documents = 0
        self.full = False

    def add(self, lengths: np.ndarray, tokens: np.ndarray, nbytes: np.ndarray) -> int:
        """Write documents given as their lengths, their tokens end to end, and their text's bytes."""
        if self.full:
            return 0
        fit = len(lengths)
        if self.budget is not None:
            fit = int(np.searchsorted(np.cumsum(lengths), self.budget - self.tokens, side="right"))
            self.full = fit < len(lengths)
        n = int(lengths[:fit].sum())
        self.file.write(tokens[:n].astype(self.dtype).tobytes())
        self.tokens += n
        self.bytes += int(nbytes[:fit].sum())
        self.documents += int(np.count_nonzero(lengths[:fit]))
        return n


def _encode(batch: dict, tokenizer, eos: int) -> dict:
    """Each document's token ids followed by EOS (none for an empty document), and its text's UTF-8 bytes."""
    # A literal "<|endoftext|>" inside a document is text, not the separator.
    tokenizer.encode_special_tokens = True
    texts = [text or "" for text in batch["text"]]
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    ids = [np.array(e.ids + [eos] if text else [], dtype=np.uint32) for e, text in zip(encodings, texts)]
    return {"ids": ids, "bytes": [len(text.encode()) for text in texts]}


def _tokenize_splits(corpus: Corpus, encode, writers: dict, num_proc: int, bar: tqdm) -> None:
    """Each split in chunks, each chunk tokenised by num_proc processes, until the split's budget is reached."""
    for split, documents in corpus.splits.items():
        writer = writers[split]
        table = documents.data  # the table behind the split: its mean document size turns bytes into documents
        mean_bytes = max(1, table.nbytes // max(1, table.num_rows))
        start = 0
        while start < len(documents) and not writer.full:
            want = CHUNK_BYTES * num_proc
            if writer.budget is not None:
                want = min(want, BYTES_PER_TOKEN * (writer.budget - writer.tokens))
            part = documents.select(range(start, min(start + max(1, want // mean_bytes), len(documents))),
                                    keep_in_memory=True)
            start += len(part)
            with _quiet_datasets():
                # one process: the tokenizer's own threads; more: that many processes (datasets turns threads off)
                tokenized = part.map(encode, batched=True, num_proc=min(num_proc, len(part)) if num_proc > 1 else None,
                                     keep_in_memory=True, remove_columns=part.column_names)
            ids = tokenized.data.column("ids").combine_chunks()
            lengths = ids.value_lengths().to_numpy(zero_copy_only=False)
            bar.update(writer.add(lengths, ids.flatten().to_numpy(), tokenized.data.column("bytes").to_numpy()))


def _tokenize_stream(corpus: Corpus, encode, writers: dict, bar: tqdm, batch_size: int = 1000) -> None:
    """One pass over the stream, each document to its split, until both budgets are reached."""
    for batch in corpus.stream.iter(batch_size):
        encoded = encode(batch)
        is_val = np.asarray(batch["val"], dtype=bool)
        for split, mask in (("train", ~is_val), ("val", is_val)):
            ids = [a for a, keep in zip(encoded["ids"], mask) if keep]
            lengths = np.array([len(a) for a in ids], dtype=np.int64)
            tokens = np.concatenate(ids) if ids else np.zeros(0, np.uint32)
            bar.update(writers[split].add(lengths, tokens, np.asarray(encoded["bytes"])[mask]))
        if all(writer.full for writer in writers.values()):
            break


@contextlib.contextmanager
def _quiet_datasets():
    """datasets' own progress bars off, so that ours is the one shown."""
    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _check_same(out: Path, cfg: DataConfig, source_hash: str) -> None:
    """Refuse a directory prepared from another config or source: it is never overwritten."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        prepared = {k: v for k, v in meta["data"].items() if k not in _NOT_CONTENT}
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"data.dir={str(out)!r} holds a meta.json this code did not write; "
                        "choose another data.dir or delete it") from None
    wanted = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_CONTENT}
    differ = [f"data.{k}" for k in sorted(wanted.keys() | prepared.keys()) if wanted.get(k) != prepared.get(k)]
    if meta.get("source_hash") != source_hash:
        differ.append("the source's files")
    if meta.get("version") != VERSION:
        differ.append("the format version")
    if differ:
        raise UserError(f"data.dir={str(out)!r} holds data prepared from a different config (differs in "
                        f"{', '.join(differ)}); choose another data.dir or delete it")


def _clean_unfinished(out: Path) -> None:
    """Remove what an interrupted run left; refuse files of ours that no run of ours left unfinished."""
    temporary = [out / f"{name}.tmp" for name in _FILES]
    finished = [out / name for name in _FILES if (out / name).exists()]
    if finished and not (out / "meta.json.tmp").exists():
        raise UserError(f"data.dir={str(out)!r} holds {finished[0].name} but no meta.json, so it was not "
                        "prepared here; choose another data.dir or delete it")
    for path in temporary + finished:
        path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="recipe YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    args = parser.parse_args()
    prepare(load_recipe(args.recipe, args.set).data)


if __name__ == "__main__":
    cli(main)
