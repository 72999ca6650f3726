"""PPO's critic: the policy's architecture with a scalar value head, its values per response token, its update.

The paper's PPO baseline (Tan et al., arXiv 2512.19673, Table 1) is verl's: a critic
initialized from the same weights as the policy (AutoModelForTokenClassification with one
label: the decoder plus a linear head on the final-normed residual), trained with its own
optimizer (lr 1e-5 in the paper) on the returns of GAE (advantages.gae_advantages) with
verl's clipped value loss (cliprange_value 0.5), on the same mini-batches as the policy,
before the policy's update of the same step.

Token alignment as policy.py: values[b, t] = V(prompt + response before token t), the value
of the state in which response token t is chosen, read from the residual at position t-1.
One process only (grpo.py refuses PPO under torchrun).
"""
import copy
from collections import defaultdict

import torch

from advantages import value_loss
from loss import aggregate
from policy import compute_precision, micro_slices, residuals, update_slices


class Critic(torch.nn.Module):
    """A copy of the policy's decoder with a linear value head (D -> 1), initialized as Hugging Face's heads:
    normal(0, initializer_range), bias 0."""
    def __init__(self, model):
        super().__init__()
        self.model = copy.deepcopy(model).float().train()
        D, std = model.config.hidden_size, getattr(model.config, "initializer_range", 0.02)
        self.head = torch.nn.Linear(D, 1, device=model.device)
        torch.nn.init.normal_(self.head.weight, std=std)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, mask, precision="float32"):
        """Values (B, T) at the response tokens (0 elsewhere), float32; the decoder runs under `precision`."""
        with compute_precision(precision, input_ids.device):
            h = residuals(self.model, input_ids, attention_mask, mask)  # (B, T, D), final-normed
        v = self.head(h.float())[..., 0]  # (B, T): v[:, t] values the state after token t
        return torch.cat([v.new_zeros(v.shape[0], 1), v[:, :-1]], 1) * mask  # (B, T): token t's state ends at t-1


def make_critic(model, cfg):
    """(critic, its AdamW) for a PPO run: the start weights plus a fresh head, lr cfg.critic_lr."""
    critic = Critic(model)
    return critic, torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=cfg.weight_decay, fused=True)


@torch.no_grad()
def critic_values(critic, batch, cfg):
    """Values (N, T) of every row of the step before any update (GAE's V and the value clip's V_old)."""
    out = torch.zeros(batch.input_ids.shape, device=batch.input_ids.device)
    rows = torch.arange(batch.input_ids.shape[0])
    for j, ids, att, resp, _ in update_slices(batch, rows, cfg.mini_batch_prompts * cfg.group_size, cfg.micro_batch,
                                              cfg.micro_tokens):
        # the update's micro-batches: V_old is the update's first V, also in bf16
        v = critic(ids, att, resp, cfg.precision)
        out[j, :v.shape[1]] = v
    return out


def critic_update(critic, optimizer, batch, returns, old_values, cfg):
    """One pass of value updates over the step's mini-batches (the policy's), micro-batch accumulation; mean stats."""
    rows = cfg.mini_batch_prompts * cfg.group_size
    stats = []
    for m in range(0, batch.input_ids.shape[0], rows):
        idx = torch.arange(m, m + rows)
        n_tokens = max(batch.response_mask[idx].sum().item(), 1.0)
        agg_kw = dict(n_tokens=n_tokens, n_seqs=rows, max_len=cfg.max_new_tokens)
        sums = defaultdict(float)
        for j, ids, att, resp, _ in micro_slices(batch, idx, cfg.micro_batch, cfg.micro_tokens):
            v = critic(ids, att, resp, cfg.precision)  # (n, T)
            T = v.shape[1]
            per_token, clipfrac = value_loss(v, returns[j, :T], old_values[j, :T], resp, cfg.cliprange_value)
            loss = aggregate(per_token, resp, cfg.loss_agg, **agg_kw)
            loss.backward()
            share = resp.sum().item() / n_tokens
            sums["critic_loss"] += loss.item()
            sums["critic_clipfrac"] += clipfrac.item() * share
            sums["value_mean"] += ((v.detach() * resp).sum() / resp.sum().clamp(min=1)).item() * share
        sums["critic_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.grad_clip))
        if all(map(torch.isfinite, map(torch.tensor, sums.values()))):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats.append(sums)
    return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
