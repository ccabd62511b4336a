"""Named model sizes, and the model shape a recipe's model section gives."""

from __future__ import annotations

import math

from model.llama import LlamaArgs
from polyak.errors import UserError
from polyak.recipe import ModelConfig


def swiglu_ffn_dim(dim: int) -> int:
    """8/3 * dim keeps SwiGLU's three matrices at the cost of a 4 * dim two-matrix MLP; rounded up to 256."""
    return math.ceil(8 * dim / 3 / 256) * 256


GPT2_VOCAB = 50304  # GPT-2's 50257 tokens padded to a multiple of 64


def _size(dim, n_layers, n_heads, n_kv_heads=None, ffn_dim=None, vocab_size=GPT2_VOCAB) -> LlamaArgs:
    return LlamaArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads or n_heads,
                     ffn_dim=ffn_dim or swiglu_ffn_dim(dim), vocab_size=vocab_size, max_seq_len=2048)


# Untied embeddings throughout, so that model.tie_embeddings (default false) keeps each count near its name;
# vocab_size here only fixes the count, a run takes its vocabulary from the tokenizer.
SIZES: dict[str, LlamaArgs] = {
    "tiny": _size(128, 4, 4, vocab_size=4096),  # 2.1M
    "125m": _size(640, 12, 10),  # 125M
    "350m": _size(1024, 20, 16),  # 360M
    "760m": _size(1536, 22, 24),  # 777M
    "1b": _size(2048, 18, 32, n_kv_heads=8),  # 1.02B
    "3b": _size(3072, 26, 24, n_kv_heads=8),  # 2.93B
    "7b": _size(4096, 32, 32, n_kv_heads=8, ffn_dim=13824),  # 7.19B
}


def resolve(cfg: ModelConfig, tokenizer_vocab: int, seq_len: int) -> LlamaArgs:
    """The model shape for a recipe: the named size's dimensions, overridden by any set explicitly."""
    dims = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")
    explicit = {key: getattr(cfg, key) for key in dims if getattr(cfg, key) is not None}
    if cfg.size is not None:
        if cfg.size not in SIZES:
            raise UserError(f"model.size={cfg.size!r} is not a known size (one of {', '.join(SIZES)})")
        shape = {key: getattr(SIZES[cfg.size], key) for key in dims} | explicit
    else:
        for key in ("dim", "n_layers", "n_heads"):
            if key not in explicit:
                raise UserError(f"model.{key} must be set when model.size is null")
        shape = {"n_kv_heads": explicit["n_heads"], "ffn_dim": swiglu_ffn_dim(explicit["dim"])} | explicit

    if shape["dim"] % shape["n_heads"]:
        raise UserError(f"model.dim={shape['dim']} must be divisible by model.n_heads ({shape['n_heads']})")
    if (shape["dim"] // shape["n_heads"]) % 2:
        raise UserError(f"model.dim={shape['dim']} gives an odd head size ({shape['dim'] // shape['n_heads']}); "
                        "rotary embeddings need an even one")
    if shape["n_heads"] % shape["n_kv_heads"]:
        raise UserError(f"model.n_heads={shape['n_heads']} must be divisible by "
                        f"model.n_kv_heads ({shape['n_kv_heads']})")
    if cfg.vocab_size is not None and cfg.vocab_size < tokenizer_vocab:
        raise UserError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                        f"({tokenizer_vocab})")
    vocab_size = cfg.vocab_size or math.ceil(tokenizer_vocab / 64) * 64
    return LlamaArgs(**shape, vocab_size=vocab_size, max_seq_len=seq_len, rope_theta=cfg.rope_theta,
                     norm_eps=cfg.norm_eps, tie_embeddings=cfg.tie_embeddings, init_std=cfg.init_std)
