"""grpo.py: advantages and loss against hand-computed cases; the loop, resume and NaN handling on a tiny model."""
import json
import math
import os
import signal
from dataclasses import replace

import pytest
import torch

import checkpoints
import grpo
from conftest import tiny_model
from distributed import Policy
from grpo import GRPOConfig, aggregate, group_advantages, kl_penalty, policy_loss, token_logprobs


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 4)
    std = math.sqrt(0.25)  # unbiased std of [1, 0, 0, 0] = sqrt(((.75)^2 + 3 (.25)^2) / 3) = 0.5
    assert a[:4].tolist() == pytest.approx([0.75 / (std + 1e-6), -0.25 / (std + 1e-6)] + [-0.25 / (std + 1e-6)] * 2)
    assert a[4:].tolist() == [0.0] * 4  # zero-std group: 0, never NaN
    assert group_advantages(r, 4, scale=False)[:4].tolist() == [0.75, -0.25, -0.25, -0.25]


def one_token(logp, old, adv, **kw):
    loss, st = policy_loss(torch.tensor([[logp]]), torch.tensor([[old]]), torch.tensor([adv]), torch.ones(1, 1), **kw)
    return loss.item(), st


@pytest.mark.parametrize("ratio,adv,expected", [
    (1.1, 1.0, -1.1),         # inside the clip range: -A r
    (1.5, 1.0, -1.2),         # upper clip: -A (1 + 0.2)
    (0.5, 1.0, -0.5),         # A > 0, r below the range: max(-0.5, -0.8) = -0.5 (unclipped side)
    (0.5, -1.0, 0.8),         # lower clip: max(0.5, 0.8) = 0.8
    (1.5, -1.0, 1.5),         # A < 0, r above: max(1.5, 1.2) = 1.5
    (20.0, -1.0, 10.0),       # dual clip: min(-A c, 20) = 10
    (20.0, 1.0, -1.2),        # A > 0 is never dual-clipped
])
def test_policy_loss_cases(ratio, adv, expected):
    loss, st = one_token(math.log(ratio), 0.0, adv)
    assert loss == pytest.approx(expected, rel=1e-5)
    if ratio == 20.0 and adv < 0:
        assert st["dual_clip_frac"] == 1.0
    if ratio == 1.5 and adv > 0:
        assert st["clip_frac_upper"] == 1.0
    if ratio == 0.5 and adv < 0:
        assert st["clip_frac_lower"] == 1.0


def test_asymmetric_clip():
    assert one_token(math.log(1.5), 0.0, 1.0, clip_high=0.28)[0] == pytest.approx(-1.28)
    assert one_token(math.log(0.5), 0.0, -1.0, clip_low=0.1)[0] == pytest.approx(0.9)


def test_aggregation_modes_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx((6 + 4) / 3 / 2)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(loss, mask, "mean")
    # micro-batches with the mini-batch's denominators add up to the whole
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        kw = dict(n_tokens=mask.sum(), n_seqs=2, max_len=3)
        parts = aggregate(loss[:1], mask[:1], agg, **kw) + aggregate(loss[1:], mask[1:], agg, **kw)
        assert parts.item() == pytest.approx(aggregate(loss, mask, agg).item())


def test_gradient_flows_only_through_logp():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.0]], requires_grad=True)
    adv = torch.tensor([0.5], requires_grad=True)
    loss, _ = policy_loss(logp, old.detach(), adv.detach(), torch.ones(1, 2))
    loss.backward()
    assert logp.grad is not None and old.grad is None and adv.grad is None
    # d/dlogp of -A r / n at r = exp(logp - old): -A r / n
    assert logp.grad[0, 1].item() == pytest.approx(-0.5 * 1.0 / 2)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    assert kl_penalty(logp, logp, "k3").item() == 0.0


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_chunked_token_logprobs_equal_direct(arch, monkeypatch):
    model = tiny_model(arch)
    ids = torch.randint(3, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    att = torch.ones_like(ids)
    att[1, 8:] = 0
    monkeypatch.setattr(grpo, "LOGIT_CHUNK_ELEMENTS", 5 * 97)  # 5 positions per chunk
    logp, ent = token_logprobs(model, ids, att, temperature=0.7)
    logits = model(ids, attention_mask=att).logits[:, :-1] / 0.7
    want = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1), atol=1e-5, rtol=1e-5)
    only = torch.rand(logp.shape, generator=torch.Generator().manual_seed(1)) > 0.5  # (B, T-1) response positions
    lp2, ent2 = token_logprobs(model, ids, att, temperature=0.7, mask=only)
    torch.testing.assert_close(lp2, torch.where(only, logp, 0.0).detach(), atol=1e-5, rtol=0)
    assert (ent2[~only] == 0).all()
    # gradients through the checkpointed chunks equal the direct ones
    logp.sum().backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want2 = (model(ids, attention_mask=att).logits[:, :-1] / 0.7).log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    want2.sum().backward()
    for a, b in zip(g1, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


class FakeTok:
    """Token ids as text: digits 3..12 decode to '0'..'9', the rest to letters; eos = 2."""
    eos_token_id, pad_token_id = 2, 0

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


def tiny_cfg(tmp_path, **kw):
    base = dict(task="arithmetic", eval_data="arithmetic", eval_limit=4, eval_every=0, eval_max_new_tokens=4,
                steps=3, prompts_per_step=4, group_size=4, mini_batch_prompts=2, micro_batch=5, max_new_tokens=6,
                lr=1e-2, save_every=1, out=str(tmp_path / "run"), seed=0)
    base.update(kw)
    return GRPOConfig(**base)


def test_updates_on_a_fixed_batch_lower_the_loss():
    model = tiny_model("qwen3")
    model.train()
    cfg = GRPOConfig(group_size=4, mini_batch_prompts=1, micro_batch=3, lr=3e-3, max_new_tokens=8, temperature=1.0)
    from rollout import generate
    prompts = [[5, 6, 7]] * 4
    r = generate(model, prompts, max_new_tokens=8, seed=0)
    batch = grpo.make_batch(prompts, r, 0, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    runner = Policy(model)
    old, _ = grpo.policy_logprobs(grpo.full_policy, runner, batch, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = [grpo.ppo_update(runner, opt, grpo.full_policy, batch, old, None, cfg)["pg_loss"]
              for _ in range(4)]
    assert losses[-1] < losses[0]


def test_rollout_in_chunks_samples_what_one_call_samples():
    """rollout_batch bounds the KV cache; every row keeps its random draws, so the batch is the same."""
    model, problems = tiny_model("llama"), grpo.task_problems("arithmetic", 3, 0, "train")
    cfg = GRPOConfig(group_size=4, max_new_tokens=6, seed=2)
    whole, res = grpo.rollout_step(model, FakeTok(), problems, cfg, step=1)
    parts, res2 = grpo.rollout_step(model, FakeTok(), problems, replace(cfg, rollout_batch=4), step=1)
    for f in ("input_ids", "attention_mask", "response_mask", "advantages"):
        assert torch.equal(getattr(whole, f), getattr(parts, f)), f
    assert all(torch.equal(res[k], res2[k]) for k in res)
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo.check_config(replace(cfg, rollout_batch=6), model)


def fake_load(path=None, **kw):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), FakeTok()


def test_ctrl_c_then_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "problem_reward", text_reward)
    full, _, _ = grpo.train(tiny_cfg(tmp_path / "a"), model=tiny_model("llama"), tok=FakeTok())

    def ctrl_c(step, model, tok, batch, metrics):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
    part, _, _ = grpo.train(tiny_cfg(tmp_path / "b"), on_step=ctrl_c, model=tiny_model("llama"), tok=FakeTok())
    assert [m["step"] for m in part] == [0, 1]  # stopped at the end of step 1, checkpoint saved
    monkeypatch.setattr(checkpoints, "load_model", fake_load)
    resumed, _, _ = grpo.train(tiny_cfg(tmp_path / "b", resume=True))
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("time")}
    assert [strip(m) for m in resumed] == [strip(m) for m in full]  # bit-identical metrics after the interruption
    assert all(m["reward_std"] > 0 and m["pg_loss"] != 0 for m in full)  # real updates, so resuming restored the optimizer
    lines = [json.loads(x) for x in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [0, 1, 2]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        grpo.train(tiny_cfg(tmp_path, resume=True))


def test_nan_loss_is_skipped_and_reported(tmp_path, monkeypatch, capsys):
    def nan_policy(model, ids, att, temperature, mask=None):
        logp, ent = grpo.full_policy(model, ids, att, temperature, mask)
        return logp * float("nan"), ent
    model = tiny_model("llama")
    before = [p.clone() for p in model.parameters()]
    cfg = tiny_cfg(tmp_path, steps=1, max_nonfinite=5)
    hist, _, _ = grpo.train(cfg, policy_for_step=lambda s: nan_policy, model=model, tok=FakeTok())
    assert hist[0]["skipped_updates"] == 2 and hist[0]["updates"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert "skipped" in capsys.readouterr().out
    cfg = tiny_cfg(tmp_path / "2", steps=3, max_nonfinite=2)
    with pytest.raises(RuntimeError, match="non-finite"):
        grpo.train(cfg, policy_for_step=lambda s: nan_policy, model=tiny_model("llama"), tok=FakeTok())
