"""GRPO: group-relative advantages, the clipped policy loss and the training loop.

The baseline of BuPO (Tan et al., arXiv 2512.19673, Sec. 3) and the trainer that bupo.py
extends. GRPO (Shao et al. 2024, DeepSeekMath) samples a group of responses per prompt,
scores them, and uses the group-normalized reward as every token's advantage in a PPO
clipped objective. The loss is verl's vanilla policy loss: asymmetric clipping, the dual
clip (Ye et al. 2020) for negative advantages, and token-mean aggregation over the whole
mini-batch. The policy whose log-probs are optimized is a parameter of the update, so
bupo.py can swap in an internal layer policy without copying the loop.

    python grpo.py                        # CPU preset: default model, arithmetic task, ~10 min
    python grpo.py --preset paper --model Qwen/Qwen3-4B --task deepmath   # the paper's setting
    torchrun --nproc_per_node=2 grpo.py   # the same, data parallel over 2 processes (distributed.py)
"""
import argparse
import contextlib
import copy
import inspect
import json
import math
import os
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, fields

import matplotlib
import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import distributed
from checkpoints import StopRequest, load_checkpoint, read_metrics, save_checkpoint
from decompose import load_model, unembed
from entropy import entropy_of_logp
from evaluate import arithmetic_problems, evaluate, load_problems, problem_reward, summarize
from rollout import chat_prompts, generate

matplotlib.use("Agg")  # figures to files, no display
import matplotlib.pyplot as plt  # noqa: E402

LOGIT_CHUNK_ELEMENTS = 1 << 22  # logits materialized at once when computing token log-probs (16 MB fp32)


# ----------------------------------------------------------------------------- the math

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


def aggregate(loss, mask, agg="token-mean", n_seqs=None, n_tokens=None, max_len=None):
    """Reduce per-token losses (B, T) with mask (B, T) as verl's agg_loss.

    token-mean: sum / tokens; seq-mean-token-mean: mean over sequences of each one's token
    mean; seq-mean-token-sum: mean over sequences of token sums; seq-mean-token-sum-norm
    (Dr. GRPO): token sum / max_len. n_seqs / n_tokens override the denominators so that
    micro-batches add up to the mini-batch's value (gradient accumulation).
    """
    mask = mask.to(loss.dtype)
    if agg == "token-mean":
        return (loss * mask).sum() / (n_tokens if n_tokens is not None else mask.sum().clamp(min=1))
    n_seqs = n_seqs if n_seqs is not None else loss.shape[0]
    if agg == "seq-mean-token-mean":
        return ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if agg == "seq-mean-token-sum":
        return (loss * mask).sum() / n_seqs
    if agg == "seq-mean-token-sum-norm":
        return (loss * mask).sum() / (max_len if max_len is not None else loss.shape[1]) / n_seqs
    raise ValueError(f"unknown loss aggregation '{agg}': use token-mean, seq-mean-token-mean, seq-mean-token-sum or seq-mean-token-sum-norm")


def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, clip_c=10.0, agg="token-mean", **agg_kw):
    """verl's vanilla PPO loss with dual clip (PAPER.md Sec. 3). Returns (loss, stats).

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
    """Per-token KL(pi || ref) estimate on samples of pi: k1 = log r, k3 = r - 1 - log r with r = ref/pi (Schulman 2020)."""
    d = ref_logp - logp
    if kind == "k1":
        return -d
    if kind == "k3":
        return d.clamp(-20, 20).exp() - 1 - d
    raise ValueError(f"unknown KL estimator '{kind}': use k1 or k3")


# ----------------------------------------------------------------------------- log-probs

def _chunk_logprobs(model, h, targets, temperature, final_norm):
    logits = unembed(model, h, final_norm).float() / temperature  # (c, V)
    logp = logits.log_softmax(-1)
    ent = entropy_of_logp(logp)  # (c,)
    return logp.gather(-1, targets[:, None])[:, 0], ent


def logprobs_from_hidden(model, h, input_ids, temperature=1.0, final_norm=False, mask=None):
    """Log-probs (B, T-1) of input_ids[:, 1:] and entropies (B, T-1) of pi(h) at each position.

    h: residuals (B, T, D), unembedded as decompose.unembed(h, final_norm). mask (B, T-1):
    compute only there (the response), 0 elsewhere. Chunked over positions, each chunk
    under activation checkpointing, so at most one (chunk, V) block of logits exists at a
    time, in the forward and in the backward pass.
    """
    B, T, D = h.shape
    keep = torch.ones(B, T - 1, dtype=torch.bool, device=h.device) if mask is None else mask.bool()
    flat, targets = h[:, :-1][keep], input_ids[:, 1:][keep]  # (n, D), (n,)
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // model.config.vocab_size)
    outs = []
    for i in range(0, flat.shape[0], chunk):
        args = (model, flat[i:i + chunk], targets[i:i + chunk], temperature, final_norm)
        outs.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk_logprobs(*args))
    logp, ent = (torch.cat(x) if x else flat.new_zeros(0) for x in (zip(*outs) if outs else ([], [])))
    full = lambda v: torch.zeros(B, T - 1, dtype=v.dtype, device=h.device).masked_scatter(keep, v)  # (B, T-1)
    return full(logp), full(ent)


def token_logprobs(model, input_ids, attention_mask, temperature=1.0, mask=None):
    """Log-probs and entropies (B, T-1) of input_ids[:, 1:] under the model's output policy (only where mask).

    verl divides the logits by the rollout temperature here too, so that old and new
    log-probs are those of the distribution the tokens were sampled from.
    """
    h = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, D), final-normed
    return logprobs_from_hidden(model, h, input_ids, temperature, final_norm=False, mask=mask)


# ----------------------------------------------------------------------------- config

@dataclass
class GRPOConfig:
    """Defaults are the paper's (PAPER.md Sec. 3); PRESETS["cpu"] fits a 2-core CPU."""
    model: str = None                  # HF checkpoint dir or hub id; None: embedded SmolLM2-135M-Instruct
    task: str = "deepmath"             # training problems: arithmetic, deepmath, math500, ... or a parquet path
    eval_data: str = "aime24,aime25,amc23,math500"  # held-out sets (comma list; "arithmetic" = held-out arithmetic)
    eval_limit: int = 0                # first N problems of each held-out set (0 = all)
    eval_every: int = 10               # evaluate every N steps (and before the first, after the last; 0 = never)
    eval_max_new_tokens: int = 8192    # response limit of the evaluation
    steps: int = 300                   # training steps
    prompts_per_step: int = 128        # prompts per step (the paper's batch)
    group_size: int = 8                # responses per prompt
    mini_batch_prompts: int = 32       # prompts per PPO update (128 / 32 = 4 updates a step)
    micro_batch: int = 8               # sequences per forward/backward (gradient accumulation)
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward: memory for long responses, ~1/3 more compute
    max_new_tokens: int = 8192         # response limit of the rollouts
    temperature: float = 1.0           # rollout temperature (also divides the training logits, as verl)
    top_p: float = 1.0                 # rollout nucleus
    rollout_dtype: str = ""            # sample with a copy of the weights in this dtype (e.g. bfloat16); "" = the model's
    rollout_batch: int = 0             # sequences sampled at a time, a multiple of group_size (0 = all at once): bounds the KV cache
    lr: float = 1e-6                   # AdamW learning rate (constant)
    weight_decay: float = 0.01         # AdamW weight decay (verl's default)
    grad_clip: float = 1.0             # max gradient norm
    clip_low: float = 0.2              # PPO ratio clip below 1
    clip_high: float = 0.2             # PPO ratio clip above 1
    clip_c: float = 10.0               # dual clip for negative advantages
    loss_agg: str = "token-mean"       # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    scale_adv: bool = True             # divide by the group std (False: Dr. GRPO)
    kl_coef: float = 0.0               # KL penalty to the frozen initial policy (0 = off, as the paper)
    kl_estimator: str = "k3"           # k1 | k3
    entropy_coef: float = 0.0          # entropy bonus (0 = off, as the paper)
    max_nonfinite: int = 3             # stop after this many non-finite updates in a row
    save_every: int = 10               # checkpoint every N steps
    seed: int = 0                      # data order, sampling and mini-batch shuffles
    out: str = "runs/grpo"             # output dir: metrics.jsonl, checkpoint/, curves.png
    resume: bool = False               # continue from out/checkpoint (saved by any number of ranks)
    fsdp: bool = False                 # under torchrun: shard parameters, gradients and optimizer state (FSDP2)


PRESETS = {
    "paper": {},
    "cpu": dict(task="arithmetic", eval_data="arithmetic", eval_limit=64, eval_every=10, eval_max_new_tokens=64,
                steps=20, prompts_per_step=4, group_size=8, mini_batch_prompts=2, micro_batch=16,
                max_new_tokens=64, lr=2e-5, save_every=5),
}


def parse_config(cls=None, argv=None, description=None, presets=None):
    """A config from --preset (default cpu) plus --flag overrides, one per dataclass field."""
    cls, presets = cls or GRPOConfig, presets or PRESETS
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cpu", choices=sorted(presets), help="cpu: minutes on a laptop CPU; paper: the authors' settings")
    known, _ = pre.parse_known_args(argv)
    base = cls(**presets[known.preset])
    p = argparse.ArgumentParser(description=description, parents=[pre])
    src = "".join(inspect.getsource(c) for c in cls.__mro__ if c is not object)  # help = the comment beside each field
    for f in fields(cls):
        help_text = next((line.split("#", 1)[1].strip() for line in src.splitlines() if line.strip().startswith(f"{f.name}:")), "")
        default = getattr(base, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool) or f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            typ = {int: int, float: float}.get(type(default), str)
            p.add_argument(flag, type=typ, default=default, help=f"{help_text} (default: {default})")
    args = p.parse_args(argv)
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def task_problems(name, n, seed, split):
    """Problems of a task: generated arithmetic (train/test split) or a data set, shuffled by seed."""
    if name == "arithmetic":
        return arithmetic_problems(n, seed=seed + (0 if split == "train" else 10_000), split=split)
    problems = load_problems(name)
    if split == "train":
        random.Random(seed).shuffle(problems)
    return problems[:n] if n else problems


# ----------------------------------------------------------------------------- one step

@dataclass
class Batch:
    input_ids: torch.Tensor       # (N, T) prompt + response, right-padded
    attention_mask: torch.Tensor  # (N, T)
    response_mask: torch.Tensor   # (N, T-1) True where input_ids[:, 1:] is a response token
    advantages: torch.Tensor      # (N,)


def make_batch(prompts, rollout, pad_id, advantages):
    """Right-padded training batch of prompt + response rows."""
    rows = [p + rollout.tokens[i, :rollout.lengths[i]].tolist() for i, p in enumerate(prompts)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    att = torch.zeros(len(rows), T, dtype=torch.long)
    resp = torch.zeros(len(rows), T - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        ids[i, :len(r)], att[i, :len(r)] = torch.tensor(r), 1
        resp[i, len(p) - 1:len(r) - 1] = True  # position t predicts token t+1
    dev = rollout.tokens.device
    return Batch(ids.to(dev), att.to(dev), resp.to(dev), advantages.to(dev))


def full_policy(model, input_ids, attention_mask, temperature, mask=None):
    """The policy GRPO optimizes: the model's output distribution (log-probs only where mask)."""
    return token_logprobs(model, input_ids, attention_mask, temperature, mask)


def micro_slices(batch, idx, size):
    """Micro-batches of rows idx, each trimmed to its longest row: (ids, att, resp, adv)."""
    for i in range(0, len(idx), size):
        j = idx[i:i + size]
        T = int(batch.attention_mask[j].sum(1).max())
        yield j, batch.input_ids[j, :T], batch.attention_mask[j, :T], batch.response_mask[j, :T - 1], batch.advantages[j]


@torch.no_grad()
def policy_logprobs(policy, runner, batch, cfg):
    """Log-probs and entropies (N, T-1) of the batch under `policy`, micro-batch by micro-batch.

    runner: distributed.Policy(model), or its DDP/FSDP wrapper; runner(policy, ...) = policy(model, ...).
    """
    N, T = batch.input_ids.shape
    logp = torch.zeros(N, T - 1, device=batch.input_ids.device)
    ent = torch.zeros_like(logp)
    for j, ids, att, resp, _ in micro_slices(batch, torch.arange(N), cfg.micro_batch):
        lp, en = runner(policy, ids, att, cfg.temperature, resp)
        logp[j, :lp.shape[1]], ent[j, :lp.shape[1]] = lp, en
    return logp, ent


def ppo_update(runner, optimizer, policy, batch, old_logp, ref_logp, cfg, world=1):
    """PPO updates of one step: consecutive mini-batches of whole groups (the rows come shuffled), micro-batch accumulation.

    With several ranks, each holds its 1/world of every mini-batch. The loss divides by
    the mini-batch's token count over all ranks (verl's global token-mean) and is scaled
    by world, so the gradient mean of DDP/FSDP is the gradient of one process over the
    whole mini-batch. Statistics are token-weighted and summed over ranks.
    """
    rows = cfg.mini_batch_prompts // world * cfg.group_size  # this rank's rows of a mini-batch
    stats, skipped = [], 0
    for m in range(0, batch.input_ids.shape[0], rows):
        idx = torch.arange(m, m + rows)
        n_tokens = max(distributed.all_sum([batch.response_mask[idx].sum().item()])[0], 1.0)
        agg_kw = dict(n_tokens=n_tokens, n_seqs=rows * world, max_len=cfg.max_new_tokens)  # Dr. GRPO's is the budget
        sums = defaultdict(float)  # loss terms (already / n_tokens) and token-weighted fractions
        micro = list(micro_slices(batch, idx, cfg.micro_batch))
        for i, (j, ids, att, resp, adv) in enumerate(micro):
            with distributed.accumulate(runner, last=i == len(micro) - 1):
                logp, ent = runner(policy, ids, att, cfg.temperature, resp)
                loss, st = policy_loss(logp, old_logp[j, :logp.shape[1]], adv, resp, cfg.clip_low, cfg.clip_high, cfg.clip_c, cfg.loss_agg, **agg_kw)
                sums["pg_loss"] += loss.item()
                if cfg.kl_coef:
                    kl = aggregate(kl_penalty(logp, ref_logp[j, :logp.shape[1]], cfg.kl_estimator), resp, cfg.loss_agg, **agg_kw)
                    loss = loss + cfg.kl_coef * kl
                    sums["kl"] += kl.item()
                if cfg.entropy_coef:
                    loss = loss - cfg.entropy_coef * aggregate(ent, resp, cfg.loss_agg, **agg_kw)
                (loss * world).backward()
            sums["loss"] += loss.item()
            for k, v in st.items():
                sums[k] += v.item() * resp.sum().item() / n_tokens
        sums = dict(zip(sums, distributed.all_sum(list(sums.values()))))
        grad_norm = torch.nn.utils.clip_grad_norm_(runner.parameters(), cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP: a DTensor
        if not (math.isfinite(sums.pop("loss")) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)  # skip: never step on a NaN/inf
            skipped += 1
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats.append({**sums, "grad_norm": grad_norm})
    out = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]} if stats else {}
    return {**out, "updates": len(stats), "skipped_updates": skipped}


def rollout_step(model, tok, problems, cfg, step, prompt_index=None):
    """Sample the groups of `problems`, reward them, compute advantages. Returns (batch, per-row results).

    prompt_index: (n,) the problems' places among the step's cfg.prompts_per_step prompts
    when this process samples only its share; each row then gets the random draws it
    gets when one process samples them all.
    """
    G = cfg.group_size
    prompts = [p for p in chat_prompts(tok, problems) for _ in range(G)]
    index = torch.arange(len(problems)) if prompt_index is None else prompt_index  # (n,)
    rows = (index[:, None] * G + torch.arange(G)).view(-1)  # (n*G,) rows of the whole step
    r = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=cfg.seed * 1_000_003 + step,
                 dtype=getattr(torch, cfg.rollout_dtype) if cfg.rollout_dtype else None, batch_index=rows,
                 batch_rows=(len(problems) if prompt_index is None else cfg.prompts_per_step) * G,
                 max_batch=cfg.rollout_batch)
    texts = tok.batch_decode([t[:n] for t, n in zip(r.tokens.tolist(), r.lengths.tolist())], skip_special_tokens=True)
    rewards = torch.tensor([problem_reward(t, problems[i // G]) for i, t in enumerate(texts)])
    adv = group_advantages(rewards, G, scale=cfg.scale_adv)
    results = {"reward": rewards, "length": r.lengths.float().cpu(), "truncated": (~r.finished).float().cpu()}
    return make_batch(prompts, r, tok.pad_token_id, adv), results


def rollout_metrics(results, group_size):
    """Step metrics from the per-row results of rollout_step (of all ranks)."""
    rewards, lengths = results["reward"], results["length"]
    groups = rewards.view(-1, group_size)
    return {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "accuracy": (rewards == 1).float().mean().item(), "zero_std_groups": (groups.std(1) == 0).float().mean().item(),
            "response_len_mean": lengths.mean().item(), "response_len_max": lengths.max().item(),
            "truncated": results["truncated"].mean().item()}


# ----------------------------------------------------------------------------- the loop

def run_eval(runner, tok, cfg, d):
    """Held-out accuracy (greedy, one sample) per set, as metrics; each rank answers 1/world of the problems."""
    problems = [p for name in cfg.eval_data.split(",") for p in task_problems(name, cfg.eval_limit, cfg.seed, "test")]
    with distributed.full_weights(runner) as model:
        _, records = evaluate(model, tok, problems[d.rank::d.world], k=1, max_new_tokens=cfg.eval_max_new_tokens,
                              temperature=0.0, batch_size=cfg.rollout_batch or 64, progress=False)
    summary = summarize(distributed.gather_lists(records), 1)
    out = {f"eval/{src}": s["avg@1"] for src, s in sorted(summary.items())}
    out["eval/avg"] = sum(out.values()) / len(out)
    return out


def setup(cfg, d, model=None, tok=None, find_unused=False):
    """(runner, tok, optimizer, ref runner, first step, metrics so far): fresh, or from out/checkpoint with --resume."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if d.main:
        os.makedirs(cfg.out, exist_ok=True)
        json.dump(asdict(cfg), open(os.path.join(cfg.out, "config.json"), "w"), indent=1)
    state = None
    if cfg.resume:
        model, tok, state = load_checkpoint(cfg.out, d.device)
    elif model is None:
        model, tok = load_model(cfg.model, dtype=torch.float32, device=d.device)
    check_config(cfg, model, d.world)
    if cfg.activation_checkpointing:  # Hugging Face's, per decoder layer (the old name before transformers 5.2x)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    ref = distributed.wrap(copy.deepcopy(model).eval().requires_grad_(False), d, cfg.fsdp, train=False) if cfg.kl_coef else None
    runner = distributed.wrap(model.train(), d, cfg.fsdp, find_unused=find_unused)
    optimizer = torch.optim.AdamW(runner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if state is not None:
        distributed.load_optimizer_state(runner, optimizer, state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        start = state["step"]
    path = os.path.join(cfg.out, "metrics.jsonl")
    history = read_metrics(path, start)
    if d.main:
        with open(path, "w") as f:  # a resumed run drops what was logged after its checkpoint
            f.writelines(json.dumps(m) + "\n" for m in history)
    return runner, tok, optimizer, ref, start, history


def train_step(runner, tok, optimizer, ref, problems, cfg, step, policy, d):
    """One step on this rank's share of the prompts. Returns (batch, metrics of all ranks)."""
    t0 = time.perf_counter()
    # 1. the step's prompts, shuffled into mini-batches (reproducible on resume); this rank's share of each
    order = torch.randperm(cfg.prompts_per_step, generator=torch.Generator().manual_seed(cfg.seed * 7919 + step))
    mine = distributed.rank_share(order, cfg.mini_batch_prompts, d.rank, d.world)  # (n / world,)
    step_problems = [problems[(step * cfg.prompts_per_step + i) % len(problems)] for i in mine.tolist()]
    # 2. sample and reward the groups
    with distributed.full_weights(runner) as model:
        batch, results = rollout_step(model, tok, step_problems, cfg, step, mine)
    m = rollout_metrics({k: distributed.gather_rows(v) for k, v in results.items()}, cfg.group_size)
    t1 = time.perf_counter()
    # 3. old (and reference) log-probs under `policy`
    old_logp, ent = policy_logprobs(policy, runner, batch, cfg)
    ref_logp = policy_logprobs(policy, ref, batch, cfg)[0] if ref is not None else None
    # 4. the PPO updates
    m.update(ppo_update(runner, optimizer, policy, batch, old_logp, ref_logp, cfg, d.world))
    resp = batch.response_mask
    ent_sum, n = distributed.all_sum([(ent * resp).sum().item(), resp.sum().item()])
    m.update(entropy=ent_sum / max(n, 1), lr=cfg.lr, time_rollout=t1 - t0, time_update=time.perf_counter() - t1)
    return batch, m


def train(cfg, policy_for_step=None, on_step=None, model=None, tok=None, desc="GRPO"):
    """The GRPO loop, on one process or on each rank under torchrun; returns (metrics of every step, model, tokenizer).

    policy_for_step(step) -> the policy fn whose log-probs the update uses (default: the
    full output policy); on_step(step, runner, tok, batch, metrics) may add metrics. The
    model returned is the plain HF model (with FSDP: a full copy on rank 0, None elsewhere).
    """
    d = distributed.init()
    policy_for_step = policy_for_step or (lambda step: full_policy)
    partial = any(policy_for_step(s) is not full_policy for s in range(cfg.steps))  # a policy that may skip parameters
    runner, tok, optimizer, ref, start, history = setup(cfg, d, model, tok, find_unused=partial)
    problems = task_problems(cfg.task, cfg.steps * cfg.prompts_per_step if cfg.task == "arithmetic" else 0, cfg.seed, "train")
    bad_in_a_row, bar = 0, tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps, disable=not d.main)
    log_file = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if d.main else contextlib.nullcontext()  # only rank 0 writes
    with StopRequest(d.world) as stop, log_file as log:
        for step in bar:
            t0, last = time.perf_counter(), step == cfg.steps - 1
            before = {f"{k}_before": v for k, v in run_eval(runner, tok, cfg, d).items()} if cfg.eval_every and step == 0 else {}
            batch, m = train_step(runner, tok, optimizer, ref, problems, cfg, step, policy_for_step(step), d)
            m = {"step": step, **before, **m}
            if on_step:
                on_step(step, runner, tok, batch, m)
            if m["skipped_updates"] and d.main:
                tqdm.write(f"step {step}: {m['skipped_updates']} update(s) skipped, non-finite loss or gradient")
            bad_in_a_row = bad_in_a_row + 1 if m["skipped_updates"] and not m["updates"] else 0
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last):
                m.update(run_eval(runner, tok, cfg, d))
            m["time_step"] = time.perf_counter() - t0
            history.append(m)
            if d.main:
                log.write(json.dumps(m) + "\n")
                log.flush()
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", s_step=f"{m['time_step']:.0f}")
            if bad_in_a_row >= cfg.max_nonfinite:
                raise RuntimeError(f"{bad_in_a_row} steps in a row had only non-finite losses or gradients; stopped. "
                                   f"The last good checkpoint is in {cfg.out}/checkpoint: lower --lr and --resume")
            stopping = distributed.any_rank(stop.requested)  # a Ctrl-C on any rank stops them all after this step
            if (step + 1) % cfg.save_every == 0 or last or stopping:
                save_checkpoint(cfg.out, runner, tok, optimizer, step + 1, cfg, d)
            if stopping:
                if d.main:
                    tqdm.write(f"stopped after step {step}; continue with --resume --out {cfg.out}")
                break
    model = distributed.plain_model(runner)
    return history, model.eval() if model is not None else None, tok


def check_config(cfg, model, world=1):
    if cfg.prompts_per_step % cfg.mini_batch_prompts:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} is not a multiple of mini_batch_prompts={cfg.mini_batch_prompts}")
    distributed.check_split(cfg.mini_batch_prompts, world)
    if cfg.rollout_batch % cfg.group_size:
        raise ValueError(f"rollout_batch={cfg.rollout_batch} must be a multiple of group_size={cfg.group_size} (a group is sampled together)")
    if cfg.fsdp and cfg.rollout_dtype:
        raise ValueError("--rollout-dtype copies the model, which --fsdp does not allow: drop one of them")
    if cfg.temperature <= 0:
        raise ValueError(f"temperature must be > 0 for training (the log-probs divide by it), got {cfg.temperature}")
    if cfg.group_size < 2:
        raise ValueError("group_size must be >= 2: GRPO's baseline is the group mean")
    aggregate(torch.zeros(1, 1), torch.ones(1, 1), cfg.loss_agg)  # raises on an unknown mode
    kl_penalty(torch.zeros(1), torch.zeros(1), cfg.kl_estimator)


def eval_points(hist):
    """(step, held-out avg accuracy) pairs of a run: before training, then at each evaluation."""
    before = [(0, hist[0]["eval/avg_before"])] if "eval/avg_before" in hist[0] else []
    return before + [(m["step"] + 1, m["eval/avg"]) for m in hist if "eval/avg" in m]


def plot_curves(path, runs):
    """Reward, held-out accuracy, entropy and response length over steps, one line per run."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for name, hist in runs.items():
        steps = [m["step"] for m in hist]
        axes[0].plot(steps, [m["reward_mean"] for m in hist], label=name)
        ev = eval_points(hist)
        if ev:
            axes[1].plot(*zip(*ev), marker="o", label=name)
        axes[2].plot(steps, [m["entropy"] for m in hist], label=name)
        axes[3].plot(steps, [m["response_len_mean"] for m in hist], label=name)
    for ax, title in zip(axes, ["train reward (mean)", "held-out accuracy (%)", "policy entropy (nats)", "response length"]):
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    cfg = parse_config(GRPOConfig, description="GRPO training (the baseline of BuPO, arXiv 2512.19673).")
    d = distributed.init()
    history, _, _ = train(cfg)
    distributed.close()
    if not d.main:
        return
    plot_curves(os.path.join(cfg.out, "curves.png"), {"GRPO": history})
    first, last = history[0], history[-1]
    print(f"reward {first['reward_mean']:.3f} -> {last['reward_mean']:.3f}; held-out "
          f"{first.get('eval/avg_before', float('nan')):.1f}% -> {last.get('eval/avg', float('nan')):.1f}%; "
          f"wrote {cfg.out}/metrics.jsonl, curves.png, checkpoint/")


if __name__ == "__main__":
    main()
