"""A Llama-style decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases.

Module and parameter names match transformers' LlamaForCausalLM one-to-one, so a state dict loads into it as is.
Every weight is initialised inside the constructor of the module that owns it (`reset_parameters`), before
deepspeed.zero.Init partitions it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class LlamaArgs:
    """The model's shape (model/sizes.py names the usual ones)."""

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


class Linear(nn.Linear):
    """A bias-free linear layer drawn from N(0, std)."""

    def __init__(self, d_in: int, d_out: int, std: float):
        self.std = std  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(d_in, d_out, bias=False)

    def reset_parameters(self):
        nn.init.normal_(self.weight, mean=0.0, std=self.std)


class Embedding(nn.Embedding):
    """A token embedding drawn from N(0, std)."""

    def __init__(self, vocab_size: int, dim: int, std: float):
        self.std = std
        super().__init__(vocab_size, dim)

    def reset_parameters(self):
        nn.init.normal_(self.weight, mean=0.0, std=self.std)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 and scale in the input dtype, as transformers' LlamaRMSNorm does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, [seq_len, head_dim], in fp32 (the two halves repeat, for rotate_half)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, residual_std: float):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.q_proj = Linear(args.dim, args.n_heads * self.head_dim, args.init_std)
        self.k_proj = Linear(args.dim, args.n_kv_heads * self.head_dim, args.init_std)
        self.v_proj = Linear(args.dim, args.n_kv_heads * self.head_dim, args.init_std)
        self.o_proj = Linear(args.n_heads * self.head_dim, args.dim, residual_std)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: LlamaArgs, residual_std: float):
        super().__init__()
        self.gate_proj = Linear(args.dim, args.ffn_dim, args.init_std)
        self.up_proj = Linear(args.dim, args.ffn_dim, args.init_std)
        self.down_proj = Linear(args.ffn_dim, args.dim, residual_std)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: LlamaArgs, residual_std: float):
        super().__init__()
        self.self_attn = Attention(args, residual_std)
        self.mlp = MLP(args, residual_std)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding, blocks and final norm: transformers' LlamaModel."""

    def __init__(self, args: LlamaArgs, activation_checkpointing: bool):
        super().__init__()
        self.args = args
        self.activation_checkpointing = activation_checkpointing
        # Residual output projections are scaled down so the residual stream's variance does not grow with depth
        # (GPT-2, section 2.3).
        residual_std = args.init_std / math.sqrt(2 * args.n_layers)
        self.embed_tokens = Embedding(args.vocab_size, args.dim, args.init_std)
        self.layers = nn.ModuleList(Block(args, residual_std) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, tokens):
        T = tokens.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={self.args.max_seq_len}")
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(T, self.args.dim // self.args.n_heads, self.args.rope_theta, tokens.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            if self.activation_checkpointing:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.norm(x)


class Llama(nn.Module):
    def __init__(self, args: LlamaArgs, activation_checkpointing: bool = False):
        super().__init__()
        self.args = args
        self.model = Decoder(args, activation_checkpointing)
        self.lm_head = Linear(args.dim, args.vocab_size, args.init_std)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V]; or, given targets [B, T], the mean token cross-entropy in fp32."""
        logits = self.lm_head(self.model(tokens))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


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
