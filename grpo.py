"""GRPO training: the baseline of BuPO, and the loop that bupo.py runs with an internal policy.

Tan et al., arXiv 2512.19673, Sec. 3. Each step samples a group of responses per prompt
with rollout.py, rewards them (grade.py), turns the rewards into group-relative
advantages, and runs PPO updates (update.py) with verl's clipped loss (loss.py) over mini-batches
of whole groups. The policy whose log-probs are optimized is a parameter of the loop (a
policy function, see policy.py), so BuPO swaps in pi_k without copying the loop.

A step, as verl and TRL run one: the first mini-batch is on-policy (no update yet), so
its old log-probs are the update's own, detached; only the later mini-batches need an
extra no-grad pass before the first update. The policy's forward and backward run under
bf16 autocast on CPUs and GPUs that have it (float32 master weights; log-softmax and the
PPO ratio in float32), where the drift from float32 is small (README). A run is one
dir: locked while written, resumed only with its own settings, checkpointed at the end
and on Ctrl-C (and every --save-every steps).

    python grpo.py                        # CPU preset: default model, arithmetic task, 10 steps, ~3 min
    python bench.py grpo                  # one step's parts, timed, against the matmul peak (bench_train.py)
    python grpo.py --preset paper         # the paper's setting (Qwen3-4B on one H200; see --help for the other models)
    torchrun --nproc_per_node=2 grpo.py   # the same, data parallel over 2 processes (distributed.py)
"""
import contextlib
import copy
import json
import os
import random
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

import distributed
from advantages import gae_advantages
from checkpoints import (StopRequest, check_resume, clear_divergence, load_checkpoint, lr_may_change, mark_divergence,
                         read_metrics, save_checkpoint)
from cli import Diverged, Stopped, check, claim_run_dir, parse_config, run_main, write_jsonl
from config import PRESETS, GRPOConfig, check_config, preset_help, resume_safe
from critic import critic_update, critic_values, make_critic
from models import load_model, model_config
from evaluate import evaluate, parse_k, pass_curve, summarize
from hardware import clock
from policy import output_policy
from problems import epoch_problems, task_problems, with_reward
from stats import CURVES, plot_panels, run_series
from rollout import configure as configure_sampling
from update import param_groups, policy_logprobs, ppo_update, rollout_metrics, rollout_step, scale_upper


# ----------------------------------------------------------------------------- the step

@dataclass
class Trainer:
    """A GRPO run's state, as setup builds it (fresh or resumed): what train_step trains, and where the run starts."""
    runner: torch.nn.Module  # the policy being trained: distributed.Wrapped(model), or its DDP/FSDP wrapper
    tok: object  # its tokenizer
    optimizer: torch.optim.Optimizer
    ref: torch.nn.Module | None = None  # the KL reference (the initial policy, frozen) if cfg.kl_coef, else None
    critic: tuple | None = None  # (Critic, its optimizer) for PPO (cfg.adv_estimator "gae"), else None
    start: int = 0  # the first step to run (a resumed run's checkpoint step)
    history: list = field(default_factory=list)  # the metrics of the steps before start; train appends each step's


def train_step(trainer, problems, cfg, step, policy, d):
    """One step of the Trainer on this rank's share of the prompts. Returns (batch, metrics of all ranks).

    PPO (trainer.critic given): the critic values the step's states, GAE turns values and rewards
    into advantages, and the critic is updated on the step's mini-batches before the
    policy, as verl orders them."""
    runner, tok, optimizer, ref, critic = trainer.runner, trainer.tok, trainer.optimizer, trainer.ref, trainer.critic
    t0 = clock(d.device)
    # 1. the step's prompts, shuffled into mini-batches (reproducible on resume); this rank's share of each
    order = torch.randperm(cfg.prompts_per_step, generator=torch.Generator().manual_seed(cfg.seed * 7919 + step))
    mine = distributed.rank_share(order, cfg.mini_batch_prompts, d.rank, d.world)  # (n / world,)
    # reshuffled each epoch
    step_problems = epoch_problems(problems, step, cfg.prompts_per_step, mine.tolist(), cfg.seed)
    # 2. sample and reward the groups
    with distributed.full_weights(runner) as model:
        batch, results = rollout_step(model, tok, step_problems, cfg, step, mine)
    m = rollout_metrics({k: distributed.gather_rows(v) for k, v in results.items()}, cfg.group_size)
    tc = clock(d.device)
    if critic is not None:
        values = critic_values(critic[0], batch, cfg)  # (N, T)
        batch.advantages, returns = gae_advantages(results["reward"], values, batch.response_mask, cfg.gamma, cfg.lam,
                                                   distributed.all_sum)
        m.update(critic_update(*critic, batch, returns, values, cfg), time_critic=clock(d.device) - tc)
    t1 = clock(d.device)
    # 3. old log-probs of the later mini-batches (the first is on-policy), reference log-probs
    first = cfg.mini_batch_prompts // d.world * cfg.group_size
    old_logp, ent = policy_logprobs(policy, runner, batch, cfg, rows=range(first, batch.input_ids.shape[0]),
                                    world=d.world)
    ref_logp = policy_logprobs(policy, ref, batch, cfg, world=d.world)[0] if ref is not None else None
    # Fig. 7: the output policy's entropy over the whole batch, before the update (as the authors log it); under
    # BuPO's pi_k an extra no-grad pass, under the output policy the entropies above
    ent_out = (policy_logprobs(output_policy, runner, batch, cfg, world=d.world)[1] if policy is not output_policy
               else None)
    t2 = clock(d.device)
    # 4. the PPO updates
    stats, ent_first = ppo_update(runner, optimizer, policy, batch, old_logp, ref_logp, cfg, d.world)
    m.update(stats)
    # (N, T) the policy's entropies before the update: the later mini-batches' from the pass above, the first's from
    # the update's on-policy forward (each 0 in the other's rows)
    ent = ent + ent_first
    resp = batch.response_mask
    sums = torch.stack([(ent * resp).sum().double(), ((ent if ent_out is None else ent_out) * resp).sum().double(),
                        resp.sum().double()])
    ent_sum, out_sum, n = distributed.all_sum(sums).tolist()  # one host read for the three, not three
    m.update(entropy=ent_sum / max(n, 1), entropy_output=out_sum / max(n, 1), lr=cfg.lr, time_rollout=tc - t0,
             time_old_logprobs=t2 - t1, time_update=clock(d.device) - t2)
    if d.device.type == "cuda":
        m["gpu_peak_gb"] = torch.cuda.max_memory_allocated(d.device) / 1e9
    return batch, m


# ----------------------------------------------------------------------------- the loop

def run_eval(runner, tok, cfg, d, sampled=False):
    """Held-out accuracy per set, as metrics; each rank answers 1/world of the problems.

    Greedy, one answer per question ("eval/<set>", "eval/avg"), or sampled: the paper's
    metric, cfg.eval_samples answers per question at temperature 1.0 on the first
    cfg.eval_samples_limit questions, giving Avg@K and the unbiased Pass@K curve
    ("sampled/<set>/avg@K", "sampled/<set>/pass@j", "sampled/avg/..."). The answers are
    sampled as the rollouts are, with --rollout-dtype's copy of the weights (bf16 in the
    CPU preset: 2x faster; a start, GRPO and BuPO are all measured so), --rollout-batch
    rows decoded at once (256 for 0) with continuous batching; evaluate keeps its Decoders
    apart, so the rollout's and their CUDA graphs live on.
    """
    names = cfg.eval_data.split(",")
    limit, temperature = (cfg.eval_samples_limit or cfg.eval_limit, 1.0) if sampled else (cfg.eval_limit, 0.0)
    # the paper: 32 on AIME, 16 else
    k = {name: eval_ks(cfg).get(name, cfg.eval_samples) if sampled else 1 for name in names}
    problems = with_reward([p for name in names for p in task_problems(name, limit, cfg.seed, "test")], cfg.reward)
    with distributed.full_weights(runner) as model:
        _, records = evaluate(model, tok, problems[d.rank::d.world], k=k, max_new_tokens=cfg.eval_max_new_tokens,
                              temperature=temperature, batch_size=cfg.rollout_batch or 256, progress=False,
                              seed=cfg.seed, dtype=getattr(torch, cfg.rollout_dtype) if cfg.rollout_dtype else None,
                              max_prompt_length=cfg.max_prompt_length)
    records = distributed.gather_lists(records)
    if not sampled:
        out = {f"eval/{src}": s["avg@1"] for src, s in sorted(summarize(records, 1).items())}
        return out | {"eval/avg": sum(out.values()) / len(out)}
    curve = pass_curve(records)  # each set at its own K
    out = {f"sampled/{src}/{key}": v for src, s in sorted(curve.items()) for key, v in s.items()}
    # each set's Avg@K
    avg = {f"avg@{cfg.eval_samples}": sum(next(iter(s.values())) for s in curve.values()) / len(curve)}
    common = set.intersection(*(set(s) for s in curve.values()))  # Pass@K averaged over the sets where all have that K
    return out | {f"sampled/avg/{key}": v for key, v in avg.items()} | {
        f"sampled/avg/{key}": sum(s[key] for s in curve.values()) / len(curve)
        for key in sorted(common) if key.startswith("pass@")}


def eval_ks(cfg):
    """{held-out set: K} of --eval-k (the paper's aime24=32,aime25=32,amc23=16,math500=16);
    sets not named: --eval-samples."""
    return parse_k(cfg.eval_k) if cfg.eval_k else {}


def setup(cfg, d, model=None, tok=None, find_unused=False, upper_k=None, mutable=()):
    """The run's Trainer, fresh or from out/checkpoint with --resume.

    model, tok: the initial policy (default: loaded from cfg.model). Resuming, the trained
    weights come from the checkpoint, and the KL reference is still the initial policy;
    the checkpoint's settings and the log are checked against the run's (all but `mutable`).
    upper_k: the parameters above layer k get a param group of their own (Table 11's controls).
    """
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if model is None and (not cfg.resume or cfg.kl_coef):
        model, tok = load_model(cfg.model, dtype=torch.float32, device=d.device)
    ref = (distributed.wrap(copy.deepcopy(model).eval().requires_grad_(False), d, cfg.fsdp, train=False) if cfg.kl_coef
           else None)
    state = None
    if cfg.resume:
        model, tok, state = load_checkpoint(cfg.out, d.device)
    # the policy's architecture (its state: below)
    critic = make_critic(model, cfg) if cfg.adv_estimator == "gae" else None
    check(tok is not None, f"{cfg.model} has no tokenizer to write prompts with; see models.random_model")
    if cfg.activation_checkpointing:  # Hugging Face's, per decoder layer (the old name before transformers 5.2x)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    runner = distributed.wrap(model.train(), d, cfg.fsdp, find_unused=find_unused)
    optimizer = torch.optim.AdamW(param_groups(runner, upper_k), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=not cfg.fsdp)  # fused: 5x faster on CPU
    start = 0
    if state is not None:
        distributed.load_optimizer_state(runner, optimizer, state["optimizer"])
        if critic is not None:
            critic[0].load_state_dict(state["critic"]["model"])
            critic[1].load_state_dict(state["critic"]["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        start = state["step"]
    path = os.path.join(cfg.out, "metrics.jsonl")
    history = read_metrics(path, start)
    if state is not None:
        check_resume(cfg.out, state, asdict(cfg), mutable, history)
        for group in optimizer.param_groups:
            # the run's (lowered after a non-finite stop), not the saved state's; scale_upper sets the upper group's
            group["lr"] = cfg.lr
    if d.main:
        write_jsonl(path, history)  # a resumed run drops what was logged after its checkpoint
    return Trainer(runner, tok, optimizer, ref, critic, start, history)


def train(cfg, policy_for_step=None, on_step=None, model=None, tok=None, desc="GRPO", upper_k=None, upper_scale=None):
    """The GRPO loop, on one process or on each rank under torchrun; returns (metrics of every step, model, tokenizer).

    policy_for_step(step) -> the policy fn whose log-probs the update uses (default: the
    output policy); on_step(step, runner, tok, batch, metrics) may add metrics; upper_k, upper_scale(step): the
    layers above k learn at lr * upper_scale(step) (0: frozen), logged as lr_upper (Table 11's controls). The
    model returned is the plain HF model (with FSDP: a full copy on rank 0, None elsewhere).
    """
    d = distributed.init()
    policy_for_step = policy_for_step or (lambda step: output_policy)
    check_config(cfg, model.config if model is not None else model_config(cfg.model), d.world)
    configure_sampling(cfg.compile, cfg.attention)  # every rollout and evaluation of the run
    # a policy that may skip parameters
    partial = any(policy_for_step(s) is not output_policy for s in range(cfg.steps))
    problems = with_reward(task_problems(cfg.task, 0, cfg.seed, "train"), cfg.reward)
    for name in cfg.eval_data.split(",") if cfg.eval_every or cfg.eval_samples else []:
        task_problems(name, 1, 0, "test")  # a bad held-out set fails now, not after the first step
    mutable = resume_safe(cfg) + (lr_may_change(cfg.out, cfg.lr) if cfg.resume else ())
    with claim_run_dir(cfg.out, cfg, resume=cfg.resume, overwrite=cfg.overwrite, mutable=mutable, writer=d.main):
        trainer = setup(cfg, d, model, tok, find_unused=partial, upper_k=upper_k, mutable=mutable)
        runner, tok, optimizer, history = trainer.runner, trainer.tok, trainer.optimizer, trainer.history
        bad_in_a_row, saved = 0, trainer.start if cfg.resume else None  # saved: where the checkpoint on disk resumes
        bar = tqdm(range(trainer.start, cfg.steps), desc=desc, initial=trainer.start, total=cfg.steps,
                   disable=not d.main)
        # only rank 0 writes
        log_file = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if d.main else contextlib.nullcontext()
        with StopRequest(d.world) as stop, log_file as log:
            for step in bar:
                t0, last = clock(d.device), step == cfg.steps - 1
                before = evaluations(runner, tok, cfg, d, sampled=True) if cfg.eval_before and step == 0 else {}
                before = {f"{k}_before": v for k, v in before.items()}
                # Table 11: the layers above k this step (the logged lr is the other group's)
                upper = {"lr_upper": scale_upper(optimizer, cfg.lr, upper_scale(step))} if upper_k is not None else {}
                batch, m = train_step(trainer, problems, cfg, step, policy_for_step(step), d)
                m = {"step": step, **before, **m, **upper}
                if on_step:
                    on_step(step, runner, tok, batch, m)
                if m["skipped_updates"] and d.main:
                    tqdm.write(f"step {step}: {m['skipped_updates']} update(s) skipped, non-finite loss or gradient")
                bad_in_a_row = bad_in_a_row + 1 if m["skipped_updates"] and not m["updates"] else 0
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 or last:
                    m.update(evaluations(runner, tok, cfg, d, sampled=last))
                m["time_step"] = clock(d.device) - t0
                history.append(m)
                if d.main:
                    log.write(json.dumps(m) + "\n")
                    log.flush()
                    os.fsync(log.fileno())  # on the disk before any checkpoint of a later step: the log never lags it
                bar.set_postfix(reward=f"{m['reward_mean']:.3f}", s_step=f"{m['time_step']:.1f}")
                if bad_in_a_row >= cfg.max_nonfinite:
                    raise diverged(cfg, step, bad_in_a_row, saved, d)
                stopping = distributed.any_rank(stop.requested)  # a Ctrl-C on any rank stops them all after this step
                due = cfg.save_every and (step + 1) % cfg.save_every == 0 or last and cfg.save_final or stopping
                if due and not bad_in_a_row:  # weights that gave only non-finite losses never replace a checkpoint
                    save_checkpoint(cfg.out, runner, tok, optimizer, step + 1, cfg, d, trainer.critic)
                    saved = step + 1
                    if d.main:
                        clear_divergence(cfg.out)
                if stopping:  # also in the last step: a stop request stops the caller (experiment.py's next run) too
                    raise stopped(cfg, step, saved)
    model = distributed.plain_model(runner)
    return history, model.eval() if model is not None else None, tok


def stopped(cfg, step, saved):
    """The stop request's end: the checkpoint saved after this step (or, in a run of non-finite steps, the last one)."""
    if saved is None:
        return Stopped(f"after step {step} of {cfg.steps}; its weights gave only non-finite losses "
                       "and no checkpoint is kept",
                       "start afresh with a lower --lr, rerunning with --overwrite")
    what = ("checkpoint saved" if saved == step + 1
            else f"the checkpoint after step {saved - 1} kept (later weights gave non-finite losses)")
    return Stopped(f"after step {step} of {cfg.steps}, {what}", f"continue with --resume --out {cfg.out}")


def diverged(cfg, step, bad, saved, d):
    """The non-finite stop: nothing is saved (the weights are lost); with a checkpoint from before the first bad step,
    out/nonfinite.json lets a --resume lower --lr (its metrics record the lr of each step), else start afresh."""
    first = step - bad + 1
    what = (f"steps {first}..{step} had only non-finite losses or gradients ({bad} in a row, --max-nonfinite "
            f"{cfg.max_nonfinite}): the run diverged at lr {cfg.lr:g}, "
            f"and its weights since step {first} are not saved")
    if saved is None or saved >= first:  # the checkpoint's weights gave step `first` its non-finite losses
        return Diverged(what, f"no checkpoint from before step {first} is kept "
                        "(--save-every N keeps one every N steps): "
                        f"start afresh with a lower learning rate, rerunning with --overwrite --lr {cfg.lr / 10:g}")
    if d.main:
        mark_divergence(cfg.out, {"lr": cfg.lr, "first_bad_step": first, "stopped_after": step,
                                  "checkpoint_step": saved})
    return Diverged(what, f"resume from the checkpoint after step {saved - 1} with a lower learning rate: "
                    f"--resume --out {cfg.out} --lr {cfg.lr / 10:g}")


def evaluations(runner, tok, cfg, d, sampled):
    """The greedy held-out metrics (if cfg.eval_every), and with `sampled` the sampled ones (if cfg.eval_samples)."""
    out = run_eval(runner, tok, cfg, d) if cfg.eval_every else {}
    return out | (run_eval(runner, tok, cfg, d, sampled=True) if sampled and cfg.eval_samples else {})


def main(argv=None):
    cfg = parse_config(GRPOConfig, PRESETS,
                       "GRPO training (the baseline of BuPO, arXiv 2512.19673). " + preset_help(PRESETS), argv)
    check(not cfg.bench, "grpo.py --bench moved: python bench.py grpo (the same flags)")
    d = distributed.init()
    try:
        history, _, _ = train(cfg)
    except (Stopped, Diverged):  # a stop request, or the non-finite stop: every rank ends so, together; one line
        distributed.close()
        raise
    distributed.close()
    if not d.main:
        return
    plot_panels(os.path.join(cfg.out, "curves.png"), {"GRPO": [run_series(history, [k for k, _ in CURVES])]}, CURVES)
    first, last = history[0], history[-1]
    print(f"reward {first['reward_mean']:.3f} -> {last['reward_mean']:.3f}; held-out "
          f"{first.get('eval/avg_before', float('nan')):.1f}% -> {last.get('eval/avg', float('nan')):.1f}%; "
          f"wrote {cfg.out}/metrics.jsonl, curves.png" + (", checkpoint/" if cfg.save_final else ""))


if __name__ == "__main__":
    run_main(main)
