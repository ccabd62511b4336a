"""Loss, perplexity and bits per byte of a transformers Llama folder on held-out text, with sliding windows.

    python -m eval.evaluate release/1b_lawa                          # the run's val split (from polyak.json)
    python -m eval.evaluate release/1b_lawa --text-file notes.txt --seq-len 1024 --stride 512
    python -m eval.evaluate release/1b_lawa --jsonl held_out.jsonl --field text --max-tokens 1000000

A stream of N tokens is cut into windows of `seq_len` tokens starting every `stride` tokens (the transformers
perplexity recipe): the first window scores all its predictions, every later one only its last `stride` tokens,
so each scored token sees at least `seq_len - stride` tokens of context. With stride == seq_len the windows are
disjoint and the first token of each window is not scored (it has no context inside its window).

loss is the mean negative log-likelihood in nats per scored token, and bits_per_byte = loss * tokens / (ln 2 * bytes)
with `tokens` and `bytes` the tokens and UTF-8 bytes of the evaluated stream: the mean bits per token times the
stream's tokens per byte, which does not depend on the tokenizer. EOS tokens between documents carry no bytes.
With --max-tokens the stream is cut to its first N tokens and its bytes are scaled proportionally (bytes * N / all
tokens), for the val split (whose bytes are known only as a total) and for text alike.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from averaging.release import read_provenance
from data.loader import load_meta, split_tokens
from polyak.errors import UserError, cli

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Stream:
    """Tokens to score and the UTF-8 bytes of the text they encode."""

    tokens: torch.Tensor  # int64, [N]
    n_bytes: float
    source: str

    def head(self, n: int) -> Stream:
        if n >= len(self.tokens):
            return self
        return Stream(self.tokens[:n], self.n_bytes * n / len(self.tokens), self.source)


def windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) for each window over n tokens: the last `scored` predictions of tokens[begin:end]."""
    out, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + seq_len, n)
        scored = min(end - prev_end, end - begin - 1)
        if scored > 0:
            out.append((begin, end, scored))
        if end == n:
            return out
        begin, prev_end = begin + stride, end


@torch.inference_mode()
def evaluate_tokens(model, tokens: torch.Tensor, seq_len: int, stride: int, batch_size: int) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and number of scored tokens of a causal LM over a token stream."""
    device = next(model.parameters()).device
    spans = windows(len(tokens), seq_len, stride)
    sum_nll, n_scored = 0.0, 0
    for i in range(0, len(spans), batch_size):
        batch = spans[i:i + batch_size]
        # Only the last window can be shorter; right padding leaves the real positions exact under a causal mask.
        width = max(end - begin for begin, end, _ in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        scored = torch.zeros(len(batch), width - 1, dtype=torch.bool)
        for row, (begin, end, k) in enumerate(batch):
            x[row, :end - begin] = tokens[begin:end]
            scored[row, end - begin - 1 - k:end - begin - 1] = True
        x, scored = x.to(device), scored.to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        sum_nll += nll[scored].double().sum().item()
        n_scored += int(scored.sum())
    return sum_nll, n_scored


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device(device)


def read_config(model_dir: Path) -> dict:
    """The folder's config.json, refusing anything but a Llama model."""
    if not model_dir.is_dir():
        raise UserError(f"model folder not found: {model_dir}")
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir} is not a transformers model folder (no config.json)")
    config = json.loads(path.read_text())
    if config.get("model_type") != "llama":
        raise UserError(f"{path}: model_type={config.get('model_type')!r}, expected a Llama folder ('llama')")
    return config


def load_model(model_dir: Path, device: str = "auto", dtype: str = "fp32"):
    """The folder's model (one `read_config` accepted), in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=DTYPES[dtype])
    return model.to(resolve_device(device)).eval()


def val_stream(model_dir: Path) -> Stream:
    """The val split of the run the folder came from: the prepared data folder its polyak.json names."""
    provenance = read_provenance(model_dir)
    data_dir = provenance.get("data_dir") if provenance else None
    if not data_dir:
        raise UserError(f"no val split known for {model_dir}: it has no polyak.json naming a data_dir; "
                        "pass --text-file or --jsonl")
    tokens = split_tokens(data_dir, "val")
    return Stream(torch.from_numpy(tokens.astype(np.int64)), load_meta(data_dir)["val_bytes"], "val")


def read_documents(text_file: Path | None, jsonl: Path | None, field: str) -> list[str]:
    path = text_file or jsonl
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    if text_file:
        return [text_file.read_text(encoding="utf-8")]
    docs = []
    for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{jsonl}:{number}: not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise UserError(f"{jsonl}:{number}: no text field {field!r} (choose one with --field)")
        docs.append(record[field])
    return docs


def text_stream(model_dir: Path, docs: list[str], source: str) -> Stream:
    """Documents tokenised with the folder's tokenizer (no BOS), joined with EOS; bytes are the documents' bytes."""
    from transformers import AutoTokenizer

    docs = [d for d in docs if d]
    if not docs:
        raise UserError(f"{source}: the text is empty")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir}: no tokenizer loadable by AutoTokenizer ({type(e).__name__})") from None
    eos = tokenizer.eos_token_id
    if eos is None and len(docs) > 1:
        raise UserError(f"{model_dir}: the tokenizer has no EOS token to join documents with")
    tokens = []
    for i, ids in enumerate(tokenizer(docs, add_special_tokens=False)["input_ids"]):
        tokens += ids if i == 0 else [eos, *ids]
    return Stream(torch.tensor(tokens, dtype=torch.long), sum(len(d.encode("utf-8")) for d in docs), source)


def score(model, stream: Stream, seq_len: int | None = None, stride: int | None = None,
          batch_size: int = 4) -> dict:
    """The metrics of `model` on `stream`; seq_len defaults to the model's context, stride to seq_len."""
    max_len = model.config.max_position_embeddings
    seq_len = seq_len or max_len
    stride = stride or seq_len
    if not 2 <= seq_len <= max_len:
        raise UserError(f"--seq-len {seq_len}: must be between 2 and the model's max_position_embeddings ({max_len})")
    if not 1 <= stride <= seq_len:
        raise UserError(f"--stride {stride}: must be between 1 and --seq-len ({seq_len})")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if len(stream.tokens) < 2:
        raise UserError(f"{stream.source}: fewer than 2 tokens to evaluate")
    if int(stream.tokens.max()) >= model.config.vocab_size:
        raise UserError(f"{stream.source}: token id {int(stream.tokens.max())} is outside the model's vocabulary "
                        f"({model.config.vocab_size}); was it tokenised with another tokenizer?")
    sum_nll, n_scored = evaluate_tokens(model, stream.tokens, seq_len, stride, batch_size)
    loss = sum_nll / n_scored
    tokens = len(stream.tokens)
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": loss * tokens / (math.log(2) * stream.n_bytes),
            "tokens": tokens, "scored_tokens": n_scored, "bytes": stream.n_bytes,
            "seq_len": seq_len, "stride": stride, "source": stream.source}


def evaluate_release(model_dir: str | Path, device: str = "auto", dtype: str = "fp32", batch_size: int = 4) -> dict:
    """A release folder on its run's val split, with the model's full context (as eval.compare reports it)."""
    model_dir = Path(model_dir)
    read_config(model_dir)
    stream = val_stream(model_dir)
    return score(load_model(model_dir, device, dtype), stream, batch_size=batch_size)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m eval.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("model_dir", type=Path, help="a transformers Llama folder (e.g. a release folder)")
    source = p.add_mutually_exclusive_group()  # neither: the run's val split, named by the folder's polyak.json
    source.add_argument("--text-file", type=Path, help="a UTF-8 text file, one document")
    source.add_argument("--jsonl", type=Path, help="a JSONL file, one document per line")
    p.add_argument("--field", default="text", help="the text field of --jsonl records")
    p.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of the stream")
    p.add_argument("--seq-len", type=int, help="window length (default: the model's max_position_embeddings)")
    p.add_argument("--stride", type=int, help="window step; each window scores its last `stride` tokens")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="model weights and activations")
    p.add_argument("--out", type=Path, help="JSON output (default MODEL_DIR/eval_<source>.json)")
    args = p.parse_args(argv)

    read_config(args.model_dir)
    if args.text_file or args.jsonl:
        path = args.text_file or args.jsonl
        stream = text_stream(args.model_dir, read_documents(args.text_file, args.jsonl, args.field), str(path))
        name = path.stem
    else:
        stream, name = val_stream(args.model_dir), "val"
    if args.max_tokens is not None:
        if args.max_tokens < 2:
            raise UserError(f"--max-tokens {args.max_tokens}: must be at least 2")
        stream = stream.head(args.max_tokens)
    model = load_model(args.model_dir, args.device, args.dtype)
    result = score(model, stream, args.seq_len, args.stride, args.batch_size)
    result["model_dir"], result["dtype"] = str(args.model_dir), args.dtype
    for key, value in result.items():
        print(f"{key} {value:.6g}" if isinstance(value, float) else f"{key} {value}")
    out = args.out or args.model_dir / f"eval_{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    cli(main)
