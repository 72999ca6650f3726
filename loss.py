"""The GRPO objective: verl's clipped policy loss with the dual clip, its loss aggregations, a KL penalty.

GRPO (Shao et al. 2024, DeepSeekMath) scores a group of responses per prompt and uses the
group-normalized reward as every token's advantage in a PPO clipped objective; BuPO (Tan
et al., arXiv 2512.19673, Sec. 3) uses the same objective on an internal policy. Settings
as the paper's: advantages (r - mean) / (std + 1e-6) with the unbiased std, clip 0.2 / 0.2,
dual clip c = 10 for negative advantages, token-mean aggregation over the mini-batch, no
KL. Pure functions on tensors; grpo.py runs them (advantages.py estimates the advantages).
"""
import torch

AGGREGATIONS = ("token-mean", "micro-token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k3")


def aggregate(loss, mask, agg="token-mean", n_seqs=None, n_tokens=None, max_len=None):
    """Reduce per-token losses (B, T) with mask (B, T) as verl's agg_loss.

    token-mean: sum / tokens; seq-mean-token-mean: mean over sequences of each one's token
    mean; seq-mean-token-sum: mean over sequences of token sums; seq-mean-token-sum-norm
    (Dr. GRPO): token sum / max_len. n_seqs / n_tokens override the denominators so that
    micro-batches add up to the mini-batch's value (gradient accumulation).

    micro-token-mean is the authors' fork (BuPO's verl, dp_actor.py): each micro-batch's own
    token mean (masked_mean) scaled by its rows / the mini-batch's rows (n_seqs), summed over
    the micro-batches. It equals token-mean when every micro-batch has the same number of
    tokens per row; otherwise a token of a short micro-batch weighs more. Not verl's global
    token-mean, whose denominator is the whole mini-batch's token count (n_tokens).
    """
    mask = mask.to(loss.dtype)
    if agg == "token-mean":
        return (loss * mask).sum() / (n_tokens if n_tokens is not None else mask.sum().clamp(min=1))
    n_seqs = n_seqs if n_seqs is not None else loss.shape[0]
    if agg == "micro-token-mean":
        return (loss * mask).sum() / mask.sum().clamp(min=1) * loss.shape[0] / n_seqs
    if agg == "seq-mean-token-mean":
        return ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if agg == "seq-mean-token-sum":
        return (loss * mask).sum() / n_seqs
    if agg == "seq-mean-token-sum-norm":
        return (loss * mask).sum() / (max_len if max_len is not None else loss.shape[1]) / n_seqs
    raise ValueError(f"unknown loss aggregation '{agg}': use one of {', '.join(AGGREGATIONS)}")


def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, clip_c=10.0, agg="token-mean", **agg_kw):
    """verl's vanilla PPO loss with dual clip (BuPO paper Sec. 3, as verl's compute_policy_loss). Returns (loss, stats).

    logp, old_logp, mask: (B, T); advantages: (B,) or (B, T). Per token, r = exp(logp - old):
    L1 = -A r, L2 = -A clip(r, 1-clip_low, 1+clip_high), Lc = max(L1, L2);
    for A < 0 the dual clip bounds it: min(-A c, Lc).
    """
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(logp)  # (B, T)
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # as verl: keeps exp finite
    ratio = log_ratio.exp()
    l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(l1, l2)
    dual = torch.minimum(-adv * clip_c, clipped)
    per_token = torch.where(adv < 0, dual, clipped)
    loss = aggregate(per_token, mask, agg, **agg_kw)
    with torch.no_grad():
        m = mask.bool()
        n = m.sum().clamp(min=1)
        stats = {"clip_frac_upper": ((ratio > 1 + clip_high) & (adv > 0) & m).sum() / n,
                 "clip_frac_lower": ((ratio < 1 - clip_low) & (adv < 0) & m).sum() / n,
                 "dual_clip_frac": ((-adv * clip_c < clipped) & (adv < 0) & m).sum() / n,
                 "approx_kl": ((-log_ratio) * m).sum() / n}  # k1 estimate of KL(old || new) on the samples
    return loss, stats


def kl_penalty(logp, ref_logp, kind="k3"):
    """Per-token estimate of KL(pi || ref) on tokens sampled from pi (Schulman 2020,
    http://joschu.net/blog/kl-approx.html).

    With r = ref / pi on the token: k1 = -log r = log pi - log ref (unbiased, can be < 0);
    k3 = r - 1 - log r (unbiased, always >= 0).
    """
    d = ref_logp - logp
    if kind == "k1":
        return -d
    if kind == "k3":
        d = d.clamp(-20, 20)
        return (d.exp() - 1 - d).clamp(-10, 10)  # as verl's low_var_kl: bounded, so one rare token cannot dominate
    raise ValueError(f"unknown KL estimator '{kind}': use k1 or k3")
