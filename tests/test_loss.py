"""loss.py: advantages, the clipped loss in every regime and its gradients, aggregations, KL, by hand."""
import math

import pytest
import torch

from loss import aggregate, kl_penalty, policy_loss
from advantages import group_advantages


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


@pytest.mark.parametrize("ratio,adv,grad", [
    (1.1, 1.0, -1.1),    # unclipped: d(-A r)/dlogp = -A r
    (1.5, 1.0, 0.0),     # clipped above (A > 0): the clipped term wins, no gradient
    (0.5, 1.0, -0.5),    # A > 0, r below the range: the unclipped term, -A r
    (0.5, -1.0, 0.0),    # clipped below (A < 0)
    (1.5, -1.0, 1.5),    # A < 0, r above: unclipped, -A r = r
    (20.0, -1.0, 0.0),   # dual clip: the constant -A c
])
def test_policy_loss_gradient_by_hand(ratio, adv, grad):
    """d loss / d logp in every clip regime, one token (token-mean over one token: no scaling)."""
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    policy_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1))[0].backward()
    assert logp.grad.item() == pytest.approx(grad, rel=1e-5, abs=1e-7)


def test_token_mean_gradient_weights_each_token_equally():
    logp = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    policy_loss(logp, logp.detach(), torch.tensor([0.5]), torch.tensor([[1, 1, 0]]))[0].backward()
    assert logp.grad.tolist() == [[pytest.approx(-0.25), pytest.approx(-0.25), 0.0]]  # -A r / n with r = 1, n = 2


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    assert kl_penalty(logp, logp, "k3").item() == 0.0


def test_micro_token_mean_is_the_authors_fork_by_hand():
    """Issue 30.8: the fork's dp_actor.py: per micro-batch masked_mean x rows / mini-batch rows, summed; by hand.
    Mini-batch of 3 rows in micro-batches [row 0, row 1] and [row 2]; per-token losses and masks:
    row 0: 1, 2 (2 tokens), row 1: 3 (1 token), row 2: 4, 5, 6 (3 tokens).
    fork: (1+2+3)/3 * 2/3 + (4+5+6)/3 * 1/3 = 4/3 + 5/3 = 3; verl's global token-mean: 21/6 = 3.5."""
    l1, m1 = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    l2, m2 = torch.tensor([[4.0, 5.0, 6.0]]), torch.tensor([[1, 1, 1]])
    fork = sum(aggregate(l, m, "micro-token-mean", n_seqs=3) for l, m in ((l1, m1), (l2, m2)))
    verl = sum(aggregate(l, m, "token-mean", n_tokens=6) for l, m in ((l1, m1), (l2, m2)))
    assert fork.item() == pytest.approx(3.0) and verl.item() == pytest.approx(3.5)
    # one micro-batch: token-mean
    one = aggregate(torch.cat([l1, l2]), torch.cat([m1, m2]), "micro-token-mean", n_seqs=3)
    assert one.item() == pytest.approx(3.5)
