"""The Llama model and its sizes: parity with transformers, init, checkpointing, resolve(), FLOP and peak tables."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from launch.metrics import peak_flops
from model.llama import Llama, LlamaArgs, count_params, flops_per_token, to_hf_config
from model.sizes import SIZES, resolve
from polyak.errors import UserError
from polyak.recipe import ModelConfig

ROOT = Path(__file__).resolve().parents[1]

# GQA (4 query heads share 2 key/value heads), an ffn_dim off the SwiGLU rule, non-default theta and eps.
SMALL = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=128, max_seq_len=32,
                  rope_theta=500.0, norm_eps=1e-6)


def build(args, seed=0, **kwargs):
    torch.manual_seed(seed)
    return Llama(args, **kwargs)


def randomize(model):
    """Weights large enough that any mismatch in the forward shows far above 1e-5 (init_std=0.02 hides them)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)


def hf_model(args, attn_implementation):
    return LlamaForCausalLM(LlamaConfig(**to_hf_config(args, None, None), attn_implementation=attn_implementation))


def size_in_params(name: str) -> float:
    return float(name[:-1]) * {"m": 1e6, "b": 1e9}[name[-1]]


@pytest.mark.parametrize("name", [n for n in SIZES if n != "tiny"])
def test_named_size_counts_match_their_names(name):
    assert abs(count_params(SIZES[name]) / size_in_params(name) - 1) < 0.05


def test_tiny_is_a_few_million_params_with_a_small_vocabulary():
    assert 1e6 <= count_params(SIZES["tiny"]) <= 10e6
    assert SIZES["tiny"].vocab_size == 4096


def test_gqa_for_1b_and_up():
    for name in ("1b", "3b", "7b"):
        assert SIZES[name].n_kv_heads < SIZES[name].n_heads


def test_count_params_counts_a_tied_embedding_once():
    tied = dataclasses.replace(SMALL, tie_embeddings=True)
    assert count_params(SMALL) - count_params(tied) == SMALL.vocab_size * SMALL.dim


@pytest.mark.parametrize("tie", [False, True])
def test_state_dict_keys_equal_transformers(tie):
    args = dataclasses.replace(SMALL, tie_embeddings=tie)
    ours = build(args).state_dict()
    theirs = hf_model(args, "eager").state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("tie", [False, True])
def test_logits_and_loss_match_transformers(tie, attn_implementation):
    args = dataclasses.replace(SMALL, tie_embeddings=tie)
    ours = build(args).eval()
    randomize(ours)
    theirs = hf_model(args, attn_implementation).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    tokens = torch.randint(0, args.vocab_size, (3, 24), generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        logits = ours(tokens)
        out = theirs(tokens, labels=tokens)
        loss = ours(tokens[:, :-1], tokens[:, 1:])
    assert logits.abs().max() > 1  # the comparison is not between near-zero numbers
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=0)


def test_tied_lm_head_is_the_embedding_parameter():
    model = build(dataclasses.replace(SMALL, tie_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_activation_checkpointing_gives_identical_loss_and_gradients():
    tokens = torch.randint(0, SMALL.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    results = []
    for ckpt in (False, True):
        model = build(SMALL, activation_checkpointing=ckpt)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_init_is_seeded_and_scales_residual_projections():
    args = LlamaArgs(dim=256, n_layers=8, n_heads=4, n_kv_heads=4, ffn_dim=512, vocab_size=512, max_seq_len=16,
                     init_std=0.05)
    a, b = build(args, seed=7).state_dict(), build(args, seed=7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], build(args, seed=8).state_dict()["lm_head.weight"])

    residual_std = 0.05 / (2 * 8) ** 0.5
    for name, w in a.items():
        if name.endswith("norm.weight"):
            assert torch.equal(w, torch.ones_like(w)), name
        else:
            expected = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.05
            assert abs(w.mean()) < 0.05 * expected, name
            assert abs(w.std() / expected - 1) < 0.02, name


def test_init_survives_deepspeed_zero_init():
    """Under zero.Init each weight is partitioned as its module's constructor returns; the init must come first."""
    script = textwrap.dedent("""
        import os
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        import deepspeed, torch
        from launch.dist import init_distributed
        from model.llama import Llama, LlamaArgs

        init_distributed()
        args = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=128, max_seq_len=32,
                         tie_embeddings=True)
        torch.manual_seed(0)
        expected = Llama(args).state_dict()
        torch.manual_seed(0)
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = Llama(args)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert all(p.data.numel() == 0 for p in model.parameters())  # really partitioned
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            for name, value in model.state_dict().items():
                assert torch.equal(value, expected[name]), name
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PORT=str(29500 + os.getpid() % 1000))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_bf16_model_returns_fp32_loss():
    model = build(SMALL).to(torch.bfloat16)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    assert model(tokens).dtype == torch.bfloat16
    loss = model(tokens[:, :-1], tokens[:, 1:])
    assert loss.dtype == torch.float32 and loss.shape == ()
    expected = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).float().flatten(0, 1), tokens[:, 1:].flatten())
    assert torch.equal(loss, expected)


def test_longer_than_max_seq_len_is_refused():
    with pytest.raises(ValueError, match="max_seq_len=32"):
        build(SMALL)(torch.zeros(1, 33, dtype=torch.long))


# resolve()


def test_resolve_named_size_takes_vocab_and_seq_len_from_the_data():
    args = resolve(ModelConfig(size="125m", rope_theta=1e6, tie_embeddings=True), tokenizer_vocab=50257,
                   seq_len=1024)
    assert args == dataclasses.replace(SIZES["125m"], vocab_size=50304, max_seq_len=1024, rope_theta=1e6,
                                       tie_embeddings=True)


def test_resolve_explicit_dims_override_a_named_size():
    args = resolve(ModelConfig(size="1b", n_layers=2, ffn_dim=1000, vocab_size=4096), tokenizer_vocab=4000,
                   seq_len=128)
    one_b = SIZES["1b"]
    assert (args.dim, args.n_heads, args.n_kv_heads) == (one_b.dim, one_b.n_heads, one_b.n_kv_heads)
    assert (args.n_layers, args.ffn_dim, args.vocab_size) == (2, 1000, 4096)


def test_resolve_without_a_size_fills_kv_heads_and_ffn_dim():
    args = resolve(ModelConfig(size=None, dim=200, n_layers=3, n_heads=4), tokenizer_vocab=4096, seq_len=64)
    assert (args.n_kv_heads, args.vocab_size, args.max_seq_len) == (4, 4096, 64)
    assert args.ffn_dim == 768  # 8/3 * 200 = 533.3, rounded up to a multiple of 256


@pytest.mark.parametrize("cfg, message", [
    (ModelConfig(size="13b"), "model.size='13b' is not a known size"),
    (ModelConfig(size=None, n_layers=2, n_heads=4), "model.dim must be set when model.size is null"),
    (ModelConfig(size="tiny", dim=250), r"model.dim=250 must be divisible by model.n_heads \(4\)"),
    (ModelConfig(size="tiny", dim=36, n_heads=4), r"model.dim=36 gives an odd head size \(9\)"),
    (ModelConfig(size="tiny", n_kv_heads=3), r"model.n_heads=4 must be divisible by model.n_kv_heads \(3\)"),
    (ModelConfig(size="tiny", vocab_size=4000),
     r"model.vocab_size=4000 is smaller than the tokenizer's vocabulary \(4096\)"),
])
def test_resolve_rejects_bad_shapes(cfg, message):
    with pytest.raises(UserError, match=message) as e:
        resolve(cfg, tokenizer_vocab=4096, seq_len=64)
    assert "\n" not in str(e.value)


# FLOPs and peaks


def test_flops_per_token_by_hand():
    # per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288, mlp 3*64*96 = 18432; lm_head 128*64 = 8192
    n_matmul = 2 * (12288 + 18432) + 8192
    attention = 12 * 2 * 64 * 32
    assert flops_per_token(SMALL, seq_len=32) == 6 * n_matmul + attention == 466944
    # the same whether or not lm_head shares the embedding's weight
    assert flops_per_token(dataclasses.replace(SMALL, tie_embeddings=True), 32) == 466944


def test_peak_flops():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16", None) == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32", None) == 67e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16", None) == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32", None) == 19.5e12
    assert peak_flops("NVIDIA A10G", "bf16", None) == 125e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16", 400.0) == 400e12
    assert peak_flops("Some Future Accelerator", "bf16", 123.0) == 123e12
    assert peak_flops("Some Future Accelerator", "bf16", None) is None
    assert peak_flops("cpu", "fp32", None) is None


def test_hf_config_carries_the_shape():
    args = dataclasses.replace(SMALL, tie_embeddings=True)
    config = LlamaConfig(**to_hf_config(args, bos_token_id=1, eos_token_id=2))
    assert config.rope_parameters["rope_theta"] == 500.0
    assert (config.num_key_value_heads, config.intermediate_size, config.rms_norm_eps) == (2, 96, 1e-6)
    assert config.tie_word_embeddings and (config.bos_token_id, config.eos_token_id) == (1, 2)
