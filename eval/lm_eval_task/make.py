"""Next-chunk completion items from a run's held-out val text, for the `polyak_next_chunk` lm-eval task.

    python -m eval.lm_eval_task.make --data-dir data/prepared/stdlib_bpe4096 --out reports/next_chunk.jsonl
    lm_eval --model hf --model_args pretrained=release/tiny_cpu --tasks polyak_next_chunk \\
        --include_path eval/lm_eval_task --metadata '{"data_file": "reports/next_chunk.jsonl"}'

Each item is a stretch of a val document cut at a single space: `context` is the `context_words` words before the
cut, and `choices` holds the `answer_words` words after it (at `label`) and as many spans of the same number of
words from other val documents. Words are runs of non-space characters and keep their original whitespace, so
context + " " + the right choice is the document's own text. The model picks the choice with the highest
log-likelihood (acc) or the highest log-likelihood per character (acc_norm); chance is 1 / choices.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import numpy as np

from data.loader import load_meta, split_tokens
from data.tokenizer import load_tokenizer
from polyak.errors import UserError, cli


def val_documents(data_dir: Path) -> list[str]:
    """The val split's documents as text: its token stream split at EOS, decoded with the folder's tokenizer."""
    meta, tokens, tokenizer = load_meta(data_dir), split_tokens(data_dir, "val"), load_tokenizer(data_dir)
    pieces = np.split(tokens, np.flatnonzero(tokens == meta["eos_id"]))
    return [tokenizer.decode(ids.tolist()) for ids in (p[p != meta["eos_id"]] for p in pieces) if len(ids)]


def make_items(docs: list[str], n_items: int, context_words: int, answer_words: int, n_choices: int,
               seed: int) -> list[dict]:
    spans = [[m.span() for m in re.finditer(r"\S+", doc)] for doc in docs]
    # A cut before word k is allowed where a single space separates it from word k - 1.
    cuts = [(i, k) for i, (doc, words) in enumerate(zip(docs, spans))
            for k in range(context_words, len(words) - answer_words + 1)
            if doc[words[k - 1][1]:words[k][0]] == " "]
    donors = [i for i, words in enumerate(spans) if len(words) >= answer_words]
    if not cuts or len(donors) < n_choices:
        raise UserError(f"the val split is too small for items of {context_words} + {answer_words} words with "
                        f"{n_choices} choices: {len(cuts)} cut points, {len(donors)} documents of "
                        f"{answer_words}+ words")
    rng = random.Random(seed)

    def chunk(i: int, k: int) -> str:
        return docs[i][spans[i][k][0]:spans[i][k + answer_words - 1][1]]

    items = []
    for i, k in rng.sample(cuts, min(n_items, len(cuts))):
        answer = chunk(i, k)
        choices = [answer]
        for j in rng.sample([d for d in donors if d != i], len(donors) - 1):
            distractor = chunk(j, rng.randrange(len(spans[j]) - answer_words + 1))
            if distractor not in choices:
                choices.append(distractor)
            if len(choices) == n_choices:
                break
        if len(choices) < n_choices:
            continue  # too few distinct spans in the other documents
        rng.shuffle(choices)
        items.append({"context": docs[i][spans[i][k - context_words][0]:spans[i][k - 1][1]],
                      "choices": choices, "label": choices.index(answer)})
    return items


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m eval.lm_eval_task.make", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, required=True, help="a prepared data folder (val.bin, tokenizer.json)")
    p.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--context-words", type=int, default=48)
    p.add_argument("--answer-words", type=int, default=8)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key in ("items", "context_words", "answer_words"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)}: must be at least 1")
    if args.choices < 2:
        raise UserError(f"--choices {args.choices}: must be at least 2")

    items = make_items(val_documents(args.data_dir), args.items, args.context_words, args.answer_words,
                       args.choices, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(item) + "\n" for item in items))
    print(f"wrote {len(items)} items to {args.out}")
    return items


if __name__ == "__main__":
    cli(main)
