"""Model shapes: the named sizes, resolving a recipe's model section, parameter and FLOP counts, peak FLOPs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from launch.errors import UserError
from launch.recipe import ModelConfig
from model.llama import Llama


@dataclass
class LlamaArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02


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
    "tiny": _size(256, 4, 4, vocab_size=4096),  # 5.5M
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


def count_params(args: LlamaArgs) -> int:
    """Unique parameters (a tied embedding counts once), counted on the meta device."""
    with torch.device("meta"):
        model = Llama(args)
    return sum(p.numel() for p in model.parameters())


def flops_per_token(args: LlamaArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N + 12 * n_layers * dim * seq_len.

    N counts the weights used in matrix multiplies: every projection of every block and lm_head (tied or not), but
    not the embedding lookup or the norms. 6 = 2 for the forward multiply-add and 4 for the two backward matmuls.
    The second term is attention's QK^T and AV products over a full (not causally halved) seq_len x seq_len map,
    the convention of PaLM (Chowdhery et al., 2022), appendix B; with it MFU is comparable across papers.
    """
    head_dim = args.dim // args.n_heads
    attention = args.dim * head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    mlp = 3 * args.dim * args.ffn_dim
    n_matmul = args.n_layers * (attention + mlp) + args.dim * args.vocab_size
    return 6.0 * n_matmul + 12.0 * args.n_layers * args.dim * seq_len


# Dense (no sparsity) peak FLOP/s by device-name substring, first match wins; fp32 means plain fp32, no TF32.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp32": 67e12}),  # SXM, reported as "H100 80GB HBM3"
    ("H200", {"bf16": 989e12, "fp32": 67e12}),
    ("H800", {"bf16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp32": 19.5e12}),
    ("A800", {"bf16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp32": 30.3e12}),
    ("A10", {"bf16": 125e12, "fp32": 31.2e12}),  # A10 and A10G; after A100, which it is a substring of
    ("MI300X", {"bf16": 1307e12, "fp32": 163.4e12}),
]


def peak_flops(device_name: str, precision: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device for MFU: the override (in TFLOP/s) if given, else the table; None if unknown."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for key, peaks in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return peaks.get(precision)
    return None


def to_hf_config(args: LlamaArgs, bos_token_id: int | None, eos_token_id: int | None) -> dict:
    """config.json for transformers' LlamaForCausalLM (transformers 5 field names)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.dim // args.n_heads,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": args.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "dtype": "float32",
    }
