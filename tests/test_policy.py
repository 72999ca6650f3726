"""policy.py: log-probs of the output policy and of pi_k against Hugging Face's forward, chunking, precision,
denormals."""
import subprocess
import sys

import pytest
import torch

import policy
from conftest import tiny_model
from policy import compute_precision, layer_logprobs, layer_policy, output_policy, pad_rows


def rand_batch(seed=0, B=3, T=11):
    ids = torch.randint(3, 97, (B, T), generator=torch.Generator().manual_seed(seed))
    att = torch.ones_like(ids)
    att[1, 8:] = 0
    return ids, att


def direct(logits, ids, temperature):
    """Token-aligned log-probs and entropies (B, T) from full logits (B, T, V): position t-1 produces token t."""
    lp = (logits[:, :-1] / temperature).log_softmax(-1)
    out = torch.zeros(ids.shape), torch.zeros(ids.shape)
    out[0][:, 1:] = lp.gather(-1, ids[:, 1:, None])[..., 0]
    out[1][:, 1:] = -(lp.exp() * lp).sum(-1)
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("budget", [5 * 97 * 4, 1 << 30], ids=["chunked", "one-chunk"])
def test_output_policy_equals_the_hf_logits(arch, budget, monkeypatch):
    model = tiny_model(arch)
    ids, att = rand_batch()
    monkeypatch.setattr(policy, "LOGITS_BUDGET", budget)  # 5 rows a chunk (each checkpointed), or all at once
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) > 0.3
    logp, ent = output_policy(model, ids, att, 0.7, mask)
    want_lp, want_ent = direct(model(ids, attention_mask=att).logits, ids, 0.7)
    scored = mask.clone()
    scored[:, 0] = False
    torch.testing.assert_close(logp[scored], want_lp[scored], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[scored], want_ent[scored].detach(), atol=1e-5, rtol=1e-5)
    # no entropy graph unless asked
    assert (logp[~scored] == 0).all() and (ent[~scored] == 0).all() and not ent.requires_grad
    logp.sum().backward()  # gradients through the (checkpointed) chunks equal the direct ones
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    direct(model(ids, attention_mask=att).logits, ids, 0.7)[0][scored].sum().backward()
    for a, b in zip(g1, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert output_policy(model, ids, att, 0.7, mask, entropy_grad=True)[1].requires_grad


@pytest.mark.parametrize("k", [0, 1])
def test_layer_logprobs_equal_the_hidden_states_route(arch, k):
    """The authors' pi_k: lm_head(hidden_states[k+1]), no final norm."""
    model = tiny_model(arch, num_hidden_layers=3)
    ids, att = rand_batch(k, B=2, T=9)
    logp, ent = layer_logprobs(model, ids, att, k, temperature=0.8)
    h = model(ids, attention_mask=att, output_hidden_states=True).hidden_states[k + 1]
    want_lp, want_ent = direct(model.lm_head(h), ids, 0.8)
    torch.testing.assert_close(logp, want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, want_ent.detach(), atol=1e-5, rtol=1e-5)


def test_early_exit_runs_only_layers_up_to_k():
    model = tiny_model("qwen3", num_hidden_layers=4)
    ran = []
    for l, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda m, a, o, l=l: ran.append(l))
    layer_logprobs(model, torch.randint(3, 97, (1, 5)), None, 1)
    assert ran == [0, 1]


def test_early_exit_with_a_response_mask_and_shared_prompts():
    """A GRPO group (one prompt, three responses of other lengths) under a response mask: pi_1's log-probs and entropies
    at the response tokens are HF's, 0 elsewhere, and layers above 1 never run (the shared-prompt path, not the plain
    one)."""
    model = tiny_model("qwen3", num_hidden_layers=4)
    ids, att, resp = pad_rows([[5, 6, 7, 8]] * 3, [[9, 10, 11], [12], [13, 14]], pad_id=0)
    ran = []
    for l, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda m, a, o, l=l: ran.append(l))
    logp, ent = layer_logprobs(model, ids, att, 1, temperature=0.7, mask=resp)
    assert set(ran) == {0, 1}
    with torch.no_grad():
        h = model(ids, attention_mask=att, output_hidden_states=True).hidden_states[2]
    want_lp, want_ent = direct(model.lm_head(h), ids, 0.7)
    torch.testing.assert_close(logp, torch.where(resp, want_lp, 0.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, torch.where(resp, want_ent, 0.0), atol=1e-5, rtol=1e-5)


def test_layer_out_of_range_is_a_clear_error():
    model = tiny_model("llama")  # 3 layers: k in 0..1
    for k in (-1, 2, 7):
        with pytest.raises(ValueError, match="0..1"):
            layer_logprobs(model, torch.randint(3, 97, (1, 5)), None, k)


def test_pad_rows_marks_the_response_tokens():
    ids, att, resp = pad_rows([[5, 6], [7]], [[8, 9, 10], [11]], pad_id=0)
    assert ids.tolist() == [[5, 6, 8, 9, 10], [7, 11, 0, 0, 0]]
    assert att.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert resp.tolist() == [[False, False, True, True, True], [False, True, False, False, False]]


def real_batch(model, tok):
    from problems import prompt_ids, task_problems
    from rollout import generate
    prompts = prompt_ids(tok, task_problems("math500", 4, 0, "test"))
    r = generate(model, prompts, max_new_tokens=48, seed=0, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id)
    return pad_rows(prompts, [r.tokens[i, :r.lengths[i]].tolist() for i in range(4)], tok.pad_token_id)


@torch.no_grad()
def test_bf16_autocast_drift_on_the_default_model(default_model):
    """The output policy under bf16 autocast stays within 0.05 nats of float32 on average (README: 0.028 measured).
    pi_k under the autocast: its layers in float32, its lm_head a bf16 GEMM, its log-softmax in float32; against that
    route from Hugging Face's float32 hidden_states[5] to float rounding, and away from all-float32 pi_k
    (README: 0.15)."""
    model, tok = default_model
    ids, att, resp = real_batch(model, tok)
    lp32 = output_policy(model, ids, att, 1.0, resp)[0]
    with compute_precision("bfloat16", "cpu"):
        lp16 = output_policy(model, ids, att, 1.0, resp)[0]
        k16 = layer_policy(4)(model, ids, att, 1.0, resp)[0]
    d = (lp16 - lp32)[resp].abs()
    assert 0 < d.mean() < 0.05 and d.max() < 0.5
    h = model(ids, attention_mask=att, output_hidden_states=True).hidden_states[5]  # (B, T, D) float32, after layer 4
    # (B, T, V) the bf16 GEMM
    logits = torch.nn.functional.linear(h.bfloat16(), model.lm_head.weight.bfloat16()).float()
    want = direct(logits, ids, 1.0)[0]
    scored = resp.clone()
    scored[:, 0] = False
    assert (k16 - want)[scored].abs().mean() < 1e-4
    assert (k16 - layer_policy(4)(model, ids, att, 1.0, resp)[0])[scored].abs().mean() > 0.05


FLUSH_PROBE = """
import sys, torch
torch.set_flush_denormal(sys.argv[1] == "1")
sys.path.insert(0, ".")
from models import load_model
from policy import layer_logprobs
model, tok = load_model()
ids = torch.tensor(tok(["The sum of 12 and 7 is 19, because 12 + 7 = 19."] * 2)["input_ids"])
lp, ent = layer_logprobs(model, ids, None, 4)
lp.sum().backward()
torch.save({"lp": lp, "ent": ent, "grad": model.model.layers[2].mlp.up_proj.weight.grad}, sys.argv[2])
"""


def test_flushing_denormals_leaves_the_results_unchanged(default_model, tmp_path):
    """pi_k's peaked softmax underflows into subnormal floats; flushing them to zero (3.5x faster) changes no result."""
    for flag in ("0", "1"):
        subprocess.run([sys.executable, "-c", FLUSH_PROBE, flag, str(tmp_path / f"{flag}.pt")], check=True,
                       capture_output=True)
    a, b = (torch.load(tmp_path / f"{f}.pt") for f in ("0", "1"))
    for key in ("lp", "ent", "grad"):
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert a["lp"].min() < -80  # the peaked case: probabilities far below float32's normal range (1e-38)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("k", [None, 1])
def test_shared_prompts_give_the_full_forward(arch, k):
    """GRPO groups (prompts repeated, of several lengths, longer than Gemma's sliding window of 6): each prompt run
    once with its keys and values shared gives the log-probs, entropies and gradients of one forward of every row."""
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (9, 4, 7)]
    rows = [p for p in prompts for _ in range(3)]
    responses = [torch.randint(3, 97, (int(n),), generator=g).tolist() for n in torch.randint(1, 8, (9,), generator=g)]
    ids, att, resp = pad_rows(rows, responses, 0)
    pol = output_policy if k is None else layer_policy(k)
    lp, ent = pol(model, ids, att, 0.9, resp)
    lp.sum().backward()
    g1 = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    # renamed in 5.2x
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})  # the one-forward path (checkpointing drops the cache)
    model.train()
    lp2, ent2 = pol(model, ids, att, 0.9, resp)
    lp2.sum().backward()
    torch.testing.assert_close(lp, lp2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent2, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, [p.grad for p in model.parameters()]):
        assert (a is None) == (b is None) and (a is None or (a - b).norm() <= 1e-5 * a.norm())


@pytest.mark.parametrize("share", [True, False])
def test_decoder_tokens_counts_what_the_decoder_runs(share, monkeypatch):
    """bench.py grpo counts FLOPs with decoder_tokens: it equals the positions the first decoder layer receives,
    with a group's prompt run once (3 prompts x 3 rows) and with sharing off (every padded position of every row)."""
    monkeypatch.setattr(policy, "SHARE_PROMPTS", ("cpu",) if share else ())
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (9, 4, 7)]
    responses = [torch.randint(3, 97, (int(n),), generator=g).tolist() for n in torch.randint(1, 8, (9,), generator=g)]
    ids, att, resp = pad_rows([p for p in prompts for _ in range(3)], responses, 0)
    seen = []
    model.model.layers[0].register_forward_hook(lambda m, a, out: seen.append(a[0].shape[0] * a[0].shape[1]))
    with torch.no_grad():
        output_policy(model, ids, att, 1.0, resp)
    assert sum(seen) == policy.decoder_tokens(ids, att, resp)
    assert (sum(seen) == ids.numel()) != share


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_logprobs_and_entropies_equal_autograd(dtype, temperature):
    """TokenLogprobs (one float32 pass, hand-written backward) against log_softmax in float32 through autograd:
    values and gradients of a loss on both outputs, for float32 and bf16 logits, with -inf logits
    (they contribute 0, no NaN)."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 97, generator=g) * 30).to(dtype)
    logits[0, 5:9] = float("-inf")
    logits.requires_grad_(True)
    targets = torch.randint(9, 97, (6,), generator=g)
    a, b = torch.randn(6, generator=g), torch.randn(6, generator=g)
    lp, ent = policy.TokenLogprobs.apply(logits, targets, temperature, True)
    (a * lp + b * ent).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    logp = (logits.float() / temperature).log_softmax(-1)
    want_lp = logp.gather(-1, targets[:, None])[:, 0]
    want_ent = -(logp.exp() * logp.clamp(min=torch.finfo(torch.float32).min)).sum(-1)
    (a * want_lp + b * want_ent).sum().backward()
    torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=1e-5)
    # row 0: autograd's entropy gradient is NaN
    torch.testing.assert_close(got[1:], logits.grad[1:], atol=1e-5, rtol=1e-5)
    assert got.dtype == dtype and torch.isfinite(got).all() and (got[0, 5:9] == 0).all()
    _, ent = policy.TokenLogprobs.apply(logits, targets, temperature, False)
    assert not ent.requires_grad  # no entropy graph unless asked
    # the update's autocast: the entropies stay float32, not bf16-rounded
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp_ac, ent_ac = policy.TokenLogprobs.apply(logits, targets, temperature, False)
    assert lp_ac.dtype == ent_ac.dtype == torch.float32
    torch.testing.assert_close(ent_ac, want_ent.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("k", [None, 1])
def test_the_trainers_path_gives_the_checked_path(arch, k, monkeypatch):
    """With n_scored (the trainer's right-padded rows) a policy runs one forward with no attention mask (no host read):
    the same log-probs, entropies and gradients as with the mask, on rows longer than Gemma's sliding window of 6."""
    monkeypatch.setattr(policy, "SHARE_PROMPTS", ())
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 97, (int(n),), generator=g).tolist() for n in (14, 9, 5, 11)]
    ids, att, resp = pad_rows([r[:3] for r in rows], [r[3:] for r in rows], 0)
    pol = output_policy if k is None else layer_policy(k)
    out = []
    for n in (None, int(resp[:, 1:].sum())):
        lp, ent = pol(model, ids, att, 0.9, resp, n_scored=n)
        lp.sum().backward()
        out.append((lp, ent, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        model.zero_grad(set_to_none=True)
    (lp1, ent1, g1), (lp2, ent2, g2) = out
    torch.testing.assert_close(lp1, lp2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent1, ent2, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
