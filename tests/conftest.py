"""Shared fixtures: tiny random-weight models of every supported architecture (built in-process, no download),
a tokenizer stand-in, a reward of the text alone, and small training settings."""
import os
import sys

import pytest
import torch

torch.set_flush_denormal(True)  # as cli.run_main does for every script: before the first parallel op
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARCHS = ("llama", "qwen2", "qwen3", "gemma3_text")


def tiny_model(arch, seed=0, **overrides):
    """A 3-layer random model of `arch` with a 97-token vocabulary, float32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
              tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gemma3_text":
        kw.update(sliding_window=6, query_pre_attn_scalar=8,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])
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


class FakeTok:
    """Token ids as text: digits 3..12 decode to '0'..'9', the rest to letters; eos = 2."""
    eos_token_id, pad_token_id, chat_template = 2, 0, "fake"

    def apply_chat_template(self, messages, **kw):
        text = messages[-1]["content"]
        return {"input_ids": [1] + [3 + int(c) if c.isdigit() else 20 + ord(c) % 50 for c in text][:12]}

    def batch_decode(self, rows, **kw):
        return ["".join(str(t - 3) if 3 <= t <= 12 else chr(97 + t % 26) for t in r if t != 2) for r in rows]

    def decode(self, row, **kw):
        return self.batch_decode([row])[0]

    def save_pretrained(self, path):
        pass


def text_reward(text, problem):
    """A reward of the response text alone (the tiny random model never does the arithmetic), in [0, 1].

    It differs between almost any two responses, so a group's rewards do not tie and every
    mini-batch has a gradient. (With all advantages 0 the gradient is rounding noise,
    which Adam scales up to steps of ~lr: two runs would then differ by more than rounding.)
    """
    return sum(map(ord, text)) % 101 / 100


def tiny_cfg(tmp_path, cls=None, **kw):
    """Small GRPO (or BuPO, cls=bupo.BuPOConfig) settings for the tiny models, writing under tmp_path/run."""
    import grpo
    base = dict(task="arithmetic", eval_data="arithmetic", eval_limit=4, eval_every=0, eval_max_new_tokens=4,
                steps=3, prompts_per_step=4, group_size=4, mini_batch_prompts=2, micro_batch=5, max_new_tokens=6,
                precision="float32", lr=1e-2, save_every=1, out=str(tmp_path / "run"), seed=0, eval_samples=0)
    return (cls or grpo.GRPOConfig)(**{**base, **kw})


def fake_load(path=None, **kw):
    """models.load_model for checkpoints of tiny models: the saved weights, the FakeTok."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), FakeTok()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def default_model():
    from models import load_model
    return load_model()
