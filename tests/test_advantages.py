"""The baselines' estimators (advantages.py) and PPO's critic (critic.py): hand-computed cases, verl's formulas written
as verl states them (per-group loops, the reverse GAE recursion), and a critic that learns a constant reward."""
import math
from dataclasses import replace

import pytest
import torch

import grpo
from advantages import (gae_advantages, group_advantages, masked_whiten, outcome_token_rewards, reinforce_pp_advantages,
                        rloo_advantages, value_loss)
from conftest import tiny_model
from critic import Critic, critic_update, critic_values
from policy import Batch, pad_rows
from rollout import generate


def test_rloo_hand_computed_and_as_verl_states_it():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    a = rloo_advantages(r, 4)
    assert a[:4].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])  # 1 - (0+0+1)/3, 0 - (1+0+1)/3, ...
    for i in range(8):  # the definition: r_i minus the mean of the other n - 1 rewards of its group
        g = r[i // 4 * 4:i // 4 * 4 + 4]
        assert a[i].item() == pytest.approx(r[i].item() - (g.sum() - r[i]).item() / 3)
    assert rloo_advantages(torch.tensor([1.0, 0.0]), 1).tolist() == [0.0, 0.0]


def test_grpo_advantages_hand_computed():
    """[1, 0, 0, 0]: mean 0.25, unbiased sd sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5."""
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    assert a.tolist() == pytest.approx([0.75 / (0.5 + 1e-6)] + [-0.25 / (0.5 + 1e-6)] * 3)


def test_outcome_rewards_sit_on_the_last_response_token():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert (outcome_token_rewards(torch.tensor([2.0, 3.0, 4.0]), mask).tolist()
            == [[0, 0, 2, 0], [0, 0, 0, 3], [0, 0, 0, 0]])


def test_reinforce_pp_hand_computed():
    """Rewards 1 and 0 on responses of 2 and 3 tokens: returns 1,1 and 0,0,0; token mean 0.4, unbiased variance
    (2 * 0.36 + 3 * 0.16) / 4 = 0.3; whitened (1 - 0.4) / sqrt(0.3) and -0.4 / sqrt(0.3)."""
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    a = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), mask)
    hi, lo = 0.6 / math.sqrt(0.3 + 1e-8), -0.4 / math.sqrt(0.3 + 1e-8)
    assert a.flatten().tolist() == pytest.approx([0, hi, hi, 0, 0, lo, lo, lo], abs=1e-6)
    # gamma 0.5: the first token of row 0 returns 0.5 (verl's discounted return, reset outside the response)
    g = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), mask, gamma=0.5)
    x = torch.tensor([0.5, 1.0, 0.0, 0.0, 0.0])
    w = (x - x.mean()) / (x.var() + 1e-8).sqrt()
    assert g[mask].tolist() == pytest.approx(w.tolist(), abs=1e-6)


def test_masked_whiten_over_ranks_equals_one_batch():
    """reduce sums over ranks: each half of a batch, whitened with sums over both halves, equals the whole
    batch whitened."""
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(6, 5, generator=g), torch.rand(6, 5, generator=g) > 0.3
    whole = masked_whiten(x, mask)
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    n, s = mask.sum().item(), x[mask].sum().item()
    sq = ((x[mask] - s / n) ** 2).sum().item()

    def reduce(vals):  # what distributed.all_sum returns on either rank: the sums over both
        return [n, s] if len(vals) == 2 else [sq]
    got = torch.cat([masked_whiten(v, m, reduce) for v, m in halves])
    assert torch.allclose(got, whole, atol=1e-6)
    assert (whole[mask].mean().item() == pytest.approx(0, abs=1e-6)
            and whole[mask].std().item() == pytest.approx(1, abs=1e-5))


def gae_by_the_book(r, v, gamma, lam):
    """GAE for one response of n tokens: delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma lam)^l delta_{t+l}."""
    n = len(v)
    rewards = [0.0] * (n - 1) + [r]
    delta = [rewards[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] for t in range(n)]
    return [sum((gamma * lam) ** l * delta[t + l] for l in range(n - t)) for t in range(n)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8)])
def test_gae_against_the_definition(gamma, lam):
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    # 9s are outside the responses: unread
    values = torch.tensor([[9.0, 0.2, 0.5, 0.1, 9.0], [9.0, 9.0, -0.3, 0.4, 0.6]])
    rewards = torch.tensor([1.0, 0.0])
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    raw = [gae_by_the_book(1.0, [0.2, 0.5, 0.1], gamma, lam), gae_by_the_book(0.0, [-0.3, 0.4, 0.6], gamma, lam)]
    flat = torch.tensor(raw[0] + raw[1])
    assert ret[mask].tolist() == pytest.approx((flat + values[mask]).tolist(), abs=1e-6)  # returns = A + V
    assert adv[mask].tolist() == pytest.approx(((flat - flat.mean()) / (flat.var() + 1e-8).sqrt()).tolist(), abs=1e-5)
    if gamma == lam == 1:  # verl's defaults: A_t = r - V_t, returns = r
        assert ret[mask].tolist() == pytest.approx([1.0] * 3 + [0.0] * 3, abs=1e-6)


def test_value_loss_hand_computed():
    """V 1.0 from V_old 0 toward R 2: clipped to 0.5, max(1, 2.25) / 2 = 1.125 (clipped); V 0.2 toward 0.3: 0.005."""
    v, old, R = torch.tensor([[1.0, 0.2, 5.0]]), torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[2.0, 0.3, 0.0]])
    loss, clipfrac = value_loss(v, R, old, torch.tensor([[True, True, False]]), cliprange=0.5)
    assert loss[0, :2].tolist() == pytest.approx([1.125, 0.005])
    assert clipfrac.item() == pytest.approx(0.5)


def ppo_batch(model, seed=0):
    prompts = [[5, 6, 7, 8]] * 4 + [[9, 10, 11]] * 4
    r = generate(model, prompts, max_new_tokens=6, seed=seed, eos_token_id=[5, 6])
    ids, att, resp = pad_rows(prompts, [r.tokens[i, :r.lengths[i]].tolist() for i in range(8)], 0)
    return Batch(ids, att, resp, torch.zeros(8))


def test_critic_values_read_only_the_tokens_before():
    """values[b, t] values the state before response token t: changing token t leaves it, and all before it,
    unchanged."""
    model = tiny_model("qwen3")
    critic, batch = Critic(model), ppo_batch(model)
    cfg = grpo.GRPOConfig(group_size=4, mini_batch_prompts=1, micro_batch=8, max_new_tokens=6, precision="float32")
    v = critic_values(critic, batch, cfg)
    b, t = 0, int(batch.response_mask[0].nonzero()[1])  # the second response token of row 0
    batch.input_ids[b, t] = (batch.input_ids[b, t] + 1) % 90 + 3
    v2 = critic_values(critic, batch, cfg)
    assert torch.equal(v[b, :t + 1], v2[b, :t + 1]) and not torch.equal(v[b, t + 1:], v2[b, t + 1:])
    assert (v[~batch.response_mask] == 0).all() and (v[batch.response_mask] != 0).all()


def test_the_critic_learns_a_constant_reward():
    """Returns of 1 on every response token: after some updates every value is near 1 (from near 0)."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    critic, batch = Critic(model), ppo_batch(model)
    cfg = replace(grpo.GRPOConfig(group_size=4, mini_batch_prompts=1, micro_batch=3, max_new_tokens=6,
                                  precision="float32"),
                  cliprange_value=0.5)
    opt = torch.optim.AdamW(critic.parameters(), lr=3e-3, weight_decay=0.0)
    returns = batch.response_mask.float()
    start = critic_values(critic, batch, cfg)
    for _ in range(40):
        old = critic_values(critic, batch, cfg)
        stats = critic_update(critic, opt, batch, returns, old, cfg)
    end = critic_values(critic, batch, cfg)[batch.response_mask]
    assert start[batch.response_mask].abs().max() < 0.5
    assert (end - 1).abs().max() < 0.05, end
    assert stats["critic_loss"] < 1e-3
