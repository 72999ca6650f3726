"""Advantage estimators of the paper's baselines (Table 1), with verl's names and conventions, and the critic's loss.

BuPO (Tan et al., arXiv 2512.19673, Sec. 6, Table 1) compares against PPO, RLOO and
Reinforce++ run with verl's estimators (algorithm.adv_estimator): the outcome reward r of a
response is the reward of its last token, no KL in the reward.

- grpo: (r - mean_group) / (std_group + 1e-6), unbiased std (Shao et al. 2024); scale=False: Dr. GRPO.
- rloo: r_i - mean_{j != i} r_j = (r_i - mean_group) * n / (n - 1) (Ahmadian et al. 2024).
- reinforce_plus_plus: the discounted return of every token, whitened over all the response
  tokens of the batch (Hu 2025, REINFORCE++): with gamma = 1 each token gets r, whitened token-weighted.
- gae: PPO's generalized advantage estimation (Schulman et al. 2016) with a learned value per
  token, whitened over the batch; the returns A + V are the critic's targets. verl's defaults
  gamma = lambda = 1 make A_t = r - V(s_t).

Every (B, T) tensor is token-aligned as in policy.py: mask[b, t] is True at response token t,
values[b, t] = V(prompt + response before token t). Pure functions on tensors; `reduce`
sums a list of floats over all ranks (distributed.all_sum) so that a batch split over
processes is whitened as one. grpo.py calls them.
"""
import torch

ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus", "gae")


def group_advantages(rewards, group_size, eps=1e-6, scale=True):
    """(r - mean_group) / (std_group + eps), unbiased std as verl; scale=False gives r - mean (Dr. GRPO).

    rewards: (N,) with the group_size samples of each prompt adjacent. A group of equal
    rewards gets advantage 0. A group of one sample has no baseline: advantage 0.
    """
    r = rewards.float().view(-1, group_size)  # (prompts, G)
    centered = r - r.mean(1, keepdim=True)
    if scale and group_size > 1:
        centered = centered / (r.std(1, keepdim=True) + eps)
    return centered.view(-1) if group_size > 1 else torch.zeros_like(rewards, dtype=torch.float)


def rloo_advantages(rewards, group_size):
    """Leave-one-out baseline: r_i minus the mean of the other n-1 rewards of its group, (N,); 0 for a group of one."""
    if group_size < 2:
        return torch.zeros_like(rewards, dtype=torch.float)
    r = rewards.float().view(-1, group_size)  # (prompts, n)
    return ((r - r.mean(1, keepdim=True)) * group_size / (group_size - 1)).view(-1)


def outcome_token_rewards(rewards, mask):
    """(B, T): each row's reward at its last response token, 0 elsewhere (verl's token_level_rewards)."""
    B, T = mask.shape
    last = T - 1 - mask.flip(1).int().argmax(1)  # (B,) index of the last True
    out = torch.zeros(B, T, dtype=torch.float, device=mask.device)
    has = mask.any(1)
    out[has, last[has]] = rewards.float().to(mask.device)[has]
    return out


def masked_whiten(x, mask, reduce=None):
    """(x - mean) / sqrt(var + 1e-8) with mean and unbiased variance over the masked entries (verl's masked_whiten).

    reduce(list of floats) -> their sums over all ranks; None: this process holds the whole batch.
    """
    m = mask.float()
    n, s = (m.sum().item(), (x * m).sum().item())
    n, s = reduce([n, s]) if reduce else (n, s)
    mean = s / max(n, 1.0)
    sq = (((x - mean) ** 2) * m).sum().item()
    sq = reduce([sq])[0] if reduce else sq
    var = sq / max(n, 1.0) * (n / (n - 1) if n > 1 else 1.0)  # Bessel's correction, as torch.var and verl
    return (x - mean) * (var + 1e-8) ** -0.5 * m


def reinforce_pp_advantages(rewards, mask, gamma=1.0, reduce=None):
    """REINFORCE++: per token the discounted return to the end of its response, whitened over the batch. (B, T)."""
    tok = outcome_token_rewards(rewards, mask)  # (B, T)
    m = mask.float()
    returns, running = torch.zeros_like(tok), torch.zeros(tok.shape[0], device=tok.device)
    for t in reversed(range(tok.shape[1])):
        running = (tok[:, t] + gamma * running) * m[:, t]  # outside the response: 0 (verl resets after EOS)
        returns[:, t] = running
    return masked_whiten(returns, mask, reduce)


def gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0, reduce=None):
    """(advantages whitened over the batch, returns), both (B, T), as verl's compute_gae_advantage_return.

    delta_t = r_t + gamma V_{t+1} - V_t over the response tokens (V after the last token is 0);
    A_t = delta_t + gamma lam A_{t+1}; returns = A + V (unwhitened: the critic's targets).
    """
    tok = outcome_token_rewards(rewards, mask)  # (B, T)
    m, values = mask.float(), values.float()
    adv = torch.zeros_like(tok)
    next_v, last = torch.zeros(tok.shape[0], device=tok.device), torch.zeros(tok.shape[0], device=tok.device)
    for t in reversed(range(tok.shape[1])):
        delta = tok[:, t] + gamma * next_v - values[:, t]
        a = delta + gamma * lam * last
        next_v = torch.where(m[:, t] > 0, values[:, t], next_v)  # positions outside the response are skipped
        last = torch.where(m[:, t] > 0, a, last)
        adv[:, t] = last
    returns = (adv + values) * m
    return masked_whiten(adv, mask, reduce), returns


def value_loss(vpreds, returns, old_values, mask, cliprange=0.5):
    """verl's clipped value loss per token, 0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2); returns (loss (B, T),
    clipfrac).

    The caller aggregates the per-token loss as the policy's (loss.aggregate)."""
    clipped = old_values + (vpreds - old_values).clamp(-cliprange, cliprange)
    l1, l2 = (vpreds - returns) ** 2, (clipped - returns) ** 2
    m = mask.bool()
    clipfrac = ((l2 > l1) & m).sum() / m.sum().clamp(min=1)
    return 0.5 * torch.maximum(l1, l2), clipfrac.detach()
