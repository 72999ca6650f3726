"""Tiny random-weight models of every supported architecture, built in-process (no download)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARCHS = ("llama", "qwen2", "qwen3", "gemma3_text")


def tiny_model(arch, seed=0, **overrides):
    """A 3-layer random model of `arch` with a 97-token vocabulary, float32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
              tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gemma3_text":
        kw.update(sliding_window=6, query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if arch == "qwen2":
        kw.update(tie_word_embeddings=False)
    kw.update(overrides)
    config = AutoConfig.for_model(arch, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; widen it so that policies are far from uniform
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def default_model():
    from decompose import load_model
    return load_model()
