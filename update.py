"""The parts of a training step of GRPO and of the paper's other methods: sample, reward, advantages, old log-probs,
PPO updates.

Tan et al., arXiv 2512.19673, Sec. 3 and Table 1. A step samples a group of responses per
prompt with rollout.py, rewards them (grade.py), turns the rewards into advantages by
verl's estimator (advantages.py: grpo, rloo, reinforce_plus_plus, or gae with PPO's
critic, critic.py), and runs PPO updates with verl's clipped loss (loss.py) over
mini-batches of whole groups. The policy whose log-probs are optimized is a parameter (a
policy function, see policy.py), so BuPO swaps in pi_k without copying the step.

A step, as verl and TRL run one: the first mini-batch is on-policy (no update yet), so
its old log-probs are the update's own, detached; only the later mini-batches need an
extra no-grad pass before the first update. grpo.train_step puts the parts together.
"""
import math

import torch

import distributed
from advantages import group_advantages, reinforce_pp_advantages, rloo_advantages
from rewards import problem_reward
from loss import aggregate, kl_penalty, policy_loss
from policy import Batch, compute_precision, micro_slices, pad_rows, scored_count, update_slices, upper_parameters
from problems import prompt_ids
from rollout import generate


def rollout_step(model, tok, problems, cfg, step, prompt_index=None):
    """Sample the groups of `problems`, reward them, compute advantages. Returns (batch, per-row results).

    prompt_index: (n,) the problems' places among the step's cfg.prompts_per_step prompts
    when this process samples only its share; each row then gets the random draws it
    gets when one process samples them all.
    """
    G = cfg.group_size
    prompts = [p for p in prompt_ids(tok, problems, cfg.max_prompt_length) for _ in range(G)]
    index = torch.arange(len(problems)) if prompt_index is None else prompt_index  # (n,)
    rows = (index[:, None] * G + torch.arange(G)).view(-1)  # (n*G,) rows of the whole step
    r = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=cfg.seed * 1_000_003 + step,
                 dtype=getattr(torch, cfg.rollout_dtype) if cfg.rollout_dtype else None, batch_index=rows,
                 batch_rows=(len(problems) if prompt_index is None else cfg.prompts_per_step) * G,
                 max_batch=cfg.rollout_batch)
    responses = [t[:n] for t, n in zip(r.tokens.tolist(), r.lengths.tolist())]
    texts = tok.batch_decode(responses, skip_special_tokens=True)
    rewards = torch.tensor([problem_reward(t, problems[i // G]) for i, t in enumerate(texts)])
    results = {"reward": rewards, "length": r.lengths.float().cpu(), "truncated": (~r.finished).float().cpu()}
    ids, att, resp = pad_rows(prompts, responses, tok.pad_token_id, model.device)
    # host: no sync later
    lengths = ([len(p) + len(r) for p, r in zip(prompts, responses)], [len(r) for r in responses])
    return Batch(ids, att, resp, outcome_advantages(cfg, rewards.to(model.device), resp), lengths), results


def outcome_advantages(cfg, rewards, mask):
    """The advantages of cfg.adv_estimator from the rewards (N,) alone: (N,) for grpo and rloo, (N, T) for
    reinforce_plus_plus (whitened over all ranks' tokens); zeros for gae, whose advantages need the critic
    (train_step)."""
    est, G = cfg.adv_estimator, cfg.group_size
    if est == "grpo":
        return group_advantages(rewards, G, scale=cfg.scale_adv)
    if est == "rloo":
        return rloo_advantages(rewards, G)
    if est == "reinforce_plus_plus":
        return reinforce_pp_advantages(rewards, mask, cfg.gamma, distributed.all_sum)
    return torch.zeros(mask.shape, device=mask.device)


def rollout_metrics(results, group_size):
    """Step metrics from the per-row results of rollout_step (of all ranks)."""
    rewards, lengths = results["reward"], results["length"]
    groups = rewards.view(-1, group_size)
    return {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "accuracy": (rewards == 1).float().mean().item(),
            "zero_std_groups": (groups.std(1) == 0).float().mean().item(),
            "response_len_mean": lengths.mean().item(), "response_len_max": lengths.max().item(),
            "truncated": results["truncated"].mean().item()}


@torch.no_grad()
def policy_logprobs(policy, runner, batch, cfg, rows=None, world=1):
    """Log-probs and entropies (N, T) of the batch under `policy` (0 outside `rows`, default all), in the micro-batches
    of the update (policy.update_slices: this rank's mini-batches of cfg.mini_batch_prompts // world groups).

    runner: distributed.Wrapped(model), or its DDP/FSDP wrapper; runner(policy, ...) = policy(model, ...).
    """
    logp = torch.zeros(batch.input_ids.shape, device=batch.input_ids.device)
    ent = torch.zeros_like(logp)
    rows = range(batch.input_ids.shape[0]) if rows is None else rows  # a range or list: no index read back
    for j, ids, att, resp, _ in update_slices(batch, rows, cfg.mini_batch_prompts // world * cfg.group_size,
                                              cfg.micro_batch, cfg.micro_tokens):
        with compute_precision(cfg.precision, ids.device):
            lp, en = runner(policy, ids, att, cfg.temperature, resp, n_scored=scored_count(batch, j))
        logp[j, :lp.shape[1]], ent[j, :lp.shape[1]] = lp, en
    return logp, ent


def ppo_update(runner, optimizer, policy, batch, old_logp, ref_logp, cfg, world=1, on_policy_first=True):
    """PPO updates of one step: consecutive mini-batches of whole groups (the rows come shuffled), micro-batch
    accumulation.
    Returns (metrics, the entropies (N, T) of the on-policy first mini-batch's rows, 0 elsewhere).

    old_logp (N, T) holds the log-probs of the rows from before the first update. The
    first mini-batch is on-policy (on_policy_first): its old log-probs are its own,
    detached (ratio 1, as verl and TRL when a batch is used once), so old_logp needs only
    the later mini-batches' rows, and its entropies, from before any update, are returned. With several
    ranks, each holds its 1/world of every mini-batch; the loss divides by the
    mini-batch's token count over all ranks (verl's global token-mean) and is scaled by
    world, so the gradient mean of DDP/FSDP is the gradient of one process over the whole
    mini-batch. Statistics are token-weighted and summed over ranks; they stay on the
    device until one read per mini-batch (with the gradient norm, which decides the step).
    """
    # this rank's rows of a mini-batch
    rows, N = cfg.mini_batch_prompts // world * cfg.group_size, batch.input_ids.shape[0]
    starts = range(0, N, rows)
    resp_len = batch.host_lengths()[1]
    # each mini-batch's tokens, all ranks
    counts = distributed.all_sum([float(sum(resp_len[m:m + rows])) for m in starts])
    stats, skipped = [], 0
    ent = torch.zeros(batch.input_ids.shape, device=batch.input_ids.device)  # (N, T) all 0 without on_policy_first
    for m, n_tokens in zip(starts, counts):
        # Dr. GRPO's is the budget
        agg_kw = dict(n_tokens=max(n_tokens, 1.0), n_seqs=rows * world, max_len=cfg.max_new_tokens)
        sums, entropies = micro_batch_steps(runner, policy, batch, range(m, min(m + rows, N)), old_logp, ref_logp, cfg,
                                            world, fresh=m == 0 and on_policy_first, agg_kw=agg_kw)
        for j, en in entropies:
            ent[j, :en.shape[1]] = en  # (n, t) of rows j: the on-policy forward's, before any update
        for group in getattr(optimizer, "param_groups", []):
            for p in group["params"] if group.get("frozen") else []:
                p.grad = None  # frozen this step: untouched by the step, the clip and AdamW's decay
        grad_norm = torch.nn.utils.clip_grad_norm_(runner.parameters(), cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        values = distributed.all_sum(torch.stack(list(sums.values())))  # on the device, summed over ranks
        *values, grad_norm = torch.cat([values, grad_norm.to(values)[None]]).tolist()  # the mini-batch's one host sync
        sums = dict(zip(sums, values))
        if not (math.isfinite(sums.pop("loss")) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)  # skip: never step on a NaN/inf
            skipped += 1
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats.append({**sums, "grad_norm": grad_norm})
    out = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]} if stats else {}
    return {**out, "updates": len(stats), "skipped_updates": skipped}, ent


def micro_batch_steps(runner, policy, batch, idx, old_logp, ref_logp, cfg, world, fresh, agg_kw):
    """Forward and backward of the micro-batches of one mini-batch (rows idx), gradients accumulated. Returns (the
    mini-batch's statistics as 0-d tensors on the device: loss terms (already / n_tokens) and token-weighted fractions,
    and, if fresh, each micro-batch's (rows j, entropies (n, t) detached)). fresh: the on-policy first mini-batch, whose
    old log-probs are its own."""
    sums, entropies = {}, []

    def add(key, v):  # a 0-d tensor, kept on the device
        sums[key] = sums[key] + v.detach().double() if key in sums else v.detach().double()
    micro = list(micro_slices(batch, idx, cfg.micro_batch, cfg.micro_tokens))
    for i, (j, ids, att, resp, adv) in enumerate(micro):
        n = scored_count(batch, j)
        with distributed.accumulate(runner, last=i == len(micro) - 1):
            with compute_precision(cfg.precision, ids.device):
                logp, en = runner(policy, ids, att, cfg.temperature, resp, entropy_grad=cfg.entropy_coef > 0,
                                  n_scored=n)
            old = logp.detach() if fresh else old_logp[j, :logp.shape[1]]
            if fresh:
                entropies.append((j, en.detach()))
            loss, st = policy_loss(logp, old, adv, resp, cfg.clip_low, cfg.clip_high, cfg.clip_c, cfg.loss_agg,
                                   **agg_kw)
            add("pg_loss", loss)
            if cfg.kl_coef:
                kl = aggregate(kl_penalty(logp, ref_logp[j, :logp.shape[1]], cfg.kl_estimator), resp, cfg.loss_agg,
                               **agg_kw)
                loss = loss + cfg.kl_coef * kl
                add("kl", kl)
            if cfg.entropy_coef:
                loss = loss - cfg.entropy_coef * aggregate(en, resp, cfg.loss_agg, **agg_kw)
            (loss * world).backward()
        add("loss", loss)
        for k, v in st.items():
            add(k, v * (n / agg_kw["n_tokens"]))  # v: a fraction of the micro-batch's n tokens
    return sums, entropies


def param_groups(runner, upper_k=None):
    """The optimizer's parameters: one group, or with upper_k two, the second ("upper") holding the layers above k."""
    if upper_k is None:
        return [{"params": list(runner.parameters())}]
    upper = set(upper_parameters(runner.named_parameters(), upper_k))
    named = list(runner.named_parameters())
    return [{"params": [p for n, p in named if n not in upper]},
            {"params": [p for n, p in named if n in upper], "upper": True}]


def scale_upper(optimizer, lr, scale):
    """Set the upper group's lr for this step, lr * scale, and return it; scale 0 freezes the group (no gradient,
    no Adam state change, no decay)."""
    for group in optimizer.param_groups:
        if group.get("upper"):
            group["lr"], group["frozen"] = lr * scale, scale == 0
    return lr * scale
