"""decompose.py: the residual identity against Hugging Face's own hidden states and logits."""
import pytest
import torch

from conftest import tiny_model
from decompose import Decomposition, check_inputs, decompose as split, unembed


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
    # the norm before the MLP
    norm = "pre_feedforward_layernorm" if arch == "gemma3_text" else "post_attention_layernorm"
    hooks = [getattr(layer, norm).register_forward_pre_hook(lambda m, a: mids.append(a[0]))
             for layer in model.model.layers]
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
