"""BuPO: Bottom-up Policy Optimization (Tan et al., arXiv 2512.19673, Sec. 3), and the BuPO-vs-GRPO experiment.

For the first s_inter steps BuPO optimizes the internal layer policy of a lower layer k,
pi_k = softmax(lm_head(h_k) / T) with h_k the raw residual after decoder layer k (the
authors' convention: hidden_states[k+1], no final norm), with the GRPO objective: the
importance ratio uses log-probs of the sampled tokens under pi_k, old and new. Rollouts
still come from the full model. Only the embeddings and layers 0..k run (early exit), so
gradients reach only those layers and the (often tied) lm_head. After s_inter steps it is
plain GRPO. The layer comes from the entropy analysis (entropy.py) or is given.

    python bupo.py                       # BuPO vs GRPO on the default model, arithmetic task, CPU (~15 min)
    python bupo.py --bench               # one phase-1 update vs one full GRPO update
    python bupo.py --preset paper --model Qwen/Qwen3-4B --layer 5 --inter-steps 30   # the paper's setting
    torchrun --nproc_per_node=2 bupo.py  # the same, data parallel over 2 processes (distributed.py)
"""
import copy
import json
import os
import time
from dataclasses import dataclass, replace

import matplotlib
import torch
from tqdm import tqdm

import distributed
import grpo
from checkpoints import read_metrics
from decompose import check_inputs, load_model
from entropy import eic_stages, internal_entropy
from grpo import GRPOConfig, logprobs_from_hidden

matplotlib.use("Agg")  # figures to files, no display
import matplotlib.pyplot as plt  # noqa: E402


class _EarlyExit(Exception):
    def __init__(self, h):
        self.h = h


def layer_hidden(model, input_ids, attention_mask, k):
    """Raw residual (B, T, D) after decoder layer k (0-indexed); layers above k never run."""
    L = model.config.num_hidden_layers
    if not 0 <= k <= L - 2:
        raise ValueError(f"internal layer k={k} out of range: use 0..{L - 2} for this {L}-layer model "
                         f"(k={L - 1} is the last layer, whose policy GRPO already trains)")
    check_inputs(model, input_ids, attention_mask)

    def stop(module, args, out):
        raise _EarlyExit(out[0] if isinstance(out, tuple) else out)
    handle = model.model.layers[k].register_forward_hook(stop)
    try:
        model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _EarlyExit as e:
        return e.h
    finally:
        handle.remove()
    raise RuntimeError("the early-exit hook never fired")


def layer_logprobs(model, input_ids, attention_mask, k, temperature=1.0, mask=None):
    """Log-probs (B, T-1) of input_ids[:, 1:] and entropies under pi_k = softmax(lm_head(h_k) / T) (only where mask)."""
    h = layer_hidden(model, input_ids, attention_mask, k)
    return logprobs_from_hidden(model, h, input_ids, temperature, final_norm=False, mask=mask)


def layer_policy(k):
    """A policy fn for grpo.train: the internal layer policy pi_k."""
    return lambda model, ids, att, temperature, mask=None: layer_logprobs(model, ids, att, k, temperature, mask)


# ----------------------------------------------------------------------------- config

@dataclass
class BuPOConfig(GRPOConfig):
    layer: str = "auto"                # internal layer k (0-indexed; the paper's layer k+1), or auto: entropy.py's EIC suggestion
    inter_steps: int = 30              # s_inter: steps that optimize pi_k before plain GRPO
    profile_samples: int = 8           # responses used for the internal entropy profiles and layer=auto
    profile_every: int = 10            # log the full internal entropy profile every N steps (0 = only before/after)
    out: str = "runs/bupo"             # output dir: bupo/ and grpo/ runs, comparison.png, results.md

    bench: bool = False                # time one phase-1 update against one full GRPO update, then exit


PRESETS = {"paper": dict(layer="auto"), "cpu": {**grpo.PRESETS["cpu"], "layer": "4", "inter_steps": 5, "profile_every": 0, "out": "runs/bupo"}}


def resolve_layer(cfg, model, tok):
    """k as an int: given, or the end of the exploration stage found by entropy.py on this model."""
    if cfg.layer != "auto":
        return int(cfg.layer)
    prof = entropy_profile(model, tok, cfg)
    stages = eic_stages(prof["dH_ffn"])
    print(f"layer=auto: EIC analysis suggests k={stages['suggested_layer']} ({stages})")
    return stages["suggested_layer"]


@torch.no_grad()
def entropy_profile(model, tok, cfg):
    """internal_entropy (paper convention) over cfg.profile_samples fresh responses to training prompts."""
    problems = grpo.task_problems(cfg.task, cfg.profile_samples, cfg.seed + 1, "train")[:cfg.profile_samples]
    batch, _ = grpo.rollout_step(model, tok, problems, replace(cfg, group_size=1), step=-1)
    resp = torch.zeros_like(batch.input_ids)
    resp[:, 1:] = batch.response_mask
    return internal_entropy(model, batch.input_ids, resp, attention_mask=batch.attention_mask)


# ----------------------------------------------------------------------------- training

def train_bupo(cfg, k, model, tok, desc="BuPO"):
    """grpo.train with pi_k for steps < inter_steps, then the full policy; logs both entropies."""
    def policy_for_step(step):
        return layer_policy(k) if step < cfg.inter_steps else grpo.full_policy

    def on_step(step, runner, tok, batch, m):
        m["phase"] = "internal" if step < cfg.inter_steps else "full"
        if step == cfg.inter_steps > 0 and distributed.init().main:
            tqdm.write(f"step {step}: switching from pi_{k} to the full policy (plain GRPO)")
        log_entropies(runner, batch, k, cfg, m)
        if cfg.profile_every and (step + 1) % cfg.profile_every == 0:
            with distributed.full_weights(runner) as model:  # every rank profiles the same responses
                prof = entropy_profile(model, tok, cfg)
            m["profile_layer"], m["profile_dH_ffn"] = prof["layer"], prof["dH_ffn"]
    return grpo.train(cfg, policy_for_step, on_step, model=model, tok=tok, desc=desc)


@torch.no_grad()
def log_entropies(runner, batch, k, cfg, m):
    """Token-mean entropy of pi_k and of the output policy on this step's responses (each rank's first micro-batch)."""
    j, ids, att, resp, _ = next(grpo.micro_slices(batch, torch.arange(batch.input_ids.shape[0]), cfg.micro_batch))
    sums = [runner(policy, ids, att, cfg.temperature, resp)[1].sum().item() for policy in (layer_policy(k), grpo.full_policy)]
    h_k, h_out, n = distributed.all_sum(sums + [resp.sum().item()])
    m[f"entropy_layer{k}"], m["entropy_output"] = h_k / max(n, 1), h_out / max(n, 1)


def finished_run(cfg):
    """The metrics of a run that already completed (resume skips it), else None."""
    path = os.path.join(cfg.out, "metrics.jsonl")
    hist = read_metrics(path, cfg.steps)
    return hist if len(hist) == cfg.steps and os.path.exists(os.path.join(cfg.out, "checkpoint")) else None


def experiment(cfg):
    """BuPO and GRPO from the same weights, seed and data; curves, profiles and a results table (rank 0)."""
    d = distributed.init()
    model, tok = load_model(cfg.model, dtype=torch.float32, device=d.device)
    k = resolve_layer(cfg, model, tok)  # under torchrun every rank finds the same k
    init = model.cpu()  # the starting weights, kept off the device; each run trains a copy
    runs, models = {}, {}
    for name in ("BuPO", "GRPO"):
        run_cfg = replace(cfg, out=os.path.join(cfg.out, name.lower()))
        done = finished_run(run_cfg) if cfg.resume else None
        if done:
            runs[name], models[name] = done, load_model(os.path.join(run_cfg.out, "checkpoint", "model"), dtype=torch.float32, device="cpu")[0]
            continue
        run_cfg = replace(run_cfg, resume=cfg.resume and os.path.exists(os.path.join(run_cfg.out, "checkpoint")))
        start = copy.deepcopy(init).to(d.device)
        inter_steps = cfg.inter_steps if name == "BuPO" else 0
        runs[name], trained, _ = train_bupo(replace(run_cfg, inter_steps=inter_steps), k, start, tok, desc=name)
        models[name] = trained.cpu() if trained is not None else None  # FSDP: only rank 0 holds the full model
    distributed.close()
    if d.main:
        report(cfg, k, init, models, runs, tok, d.device)


def report(cfg, k, init, models, runs, tok, device=None):
    """comparison.png, profiles.png, results.md and results.json under cfg.out; profiles on `device`, one model at a time."""
    grpo.plot_curves(os.path.join(cfg.out, "curves.png"), runs)
    plot_comparison(os.path.join(cfg.out, "comparison.png"), runs, k, cfg.inter_steps)
    profiles = {}
    for name, m in [("initial", init)] + [(f"after {n}", m) for n, m in models.items()]:
        profiles[name] = entropy_profile(m.to(device or m.device), tok, cfg)
        m.cpu()
    plot_profiles(os.path.join(cfg.out, "profiles.png"), profiles, k)
    cols = [c for c in cfg.eval_data.split(",")]
    rows = {"initial": {c: runs["GRPO"][0].get(f"eval/{c}_before") for c in cols}}
    rows.update({name: {c: hist[-1].get(f"eval/{c}") for c in cols} for name, hist in runs.items()})
    table = "| model | " + " | ".join(cols) + " | avg |\n|---|" + "---|" * (len(cols) + 1) + "\n"
    for name, vals in rows.items():
        v = [vals[c] for c in cols]
        avg = sum(x for x in v if x is not None) / max(1, sum(x is not None for x in v))
        table += f"| {name} | " + " | ".join("-" if x is None else f"{x:.1f}" for x in v) + f" | {avg:.1f} |\n"
    summary = {"layer": k, "inter_steps": cfg.inter_steps, "steps": cfg.steps, "table": rows,
               "reward_first_last": {n: [h[0]["reward_mean"], h[-1]["reward_mean"]] for n, h in runs.items()},
               "profiles": {n: p["layer"] for n, p in profiles.items()}}
    open(os.path.join(cfg.out, "results.md"), "w").write(table)
    json.dump(summary, open(os.path.join(cfg.out, "results.json"), "w"), indent=1)
    print(f"\nheld-out accuracy (%), greedy, k={k}, s_inter={cfg.inter_steps} of {cfg.steps} steps:\n{table}")
    print(f"wrote {cfg.out}/comparison.png, profiles.png, curves.png, results.md, results.json")


def plot_comparison(path, runs, k, inter_steps):
    """Reward, held-out accuracy, pi_k entropy and output entropy over steps, BuPO vs GRPO."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    keys = [("reward_mean", "train reward"), (None, "held-out accuracy (%)"),
            (f"entropy_layer{k}", f"entropy of pi_{k} (layer {k + 1})"), ("entropy_output", "entropy of the output policy")]
    for name, hist in runs.items():
        steps = [m["step"] for m in hist]
        for ax, (key, title) in zip(axes, keys):
            if key is None:
                ev = grpo.eval_points(hist)
                if ev:
                    ax.plot(*zip(*ev), marker="o", label=name)
            else:
                ax.plot(steps, [m[key] for m in hist], label=name)
            ax.set(title=title, xlabel="step")
    for ax in axes:
        ax.axvline(inter_steps - 0.5, color="k", ls=":", lw=0.8)
        ax.legend(fontsize=8)
    fig.suptitle(f"BuPO (pi_{k} for the first {inter_steps} steps, then GRPO) vs GRPO; dotted: the switch", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_profiles(path, profiles, k):
    """Entropy of every internal layer policy (paper convention), before and after training."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for name, prof in profiles.items():
        axes[0].plot(prof["layer"], marker="o", ms=3, label=name)
        axes[1].plot(prof["dH_ffn"], marker="o", ms=3, label=name)
    axes[0].set(title="entropy of internal layer policy pi_l", xlabel="layer l (0 = embedding)", ylabel="nats")
    axes[1].set(title="FFN entropy change dH_ffn", xlabel="layer (0-indexed)", ylabel="nats")
    for ax in axes:
        ax.axvline(k + (1 if ax is axes[0] else 0), color="k", ls=":", lw=0.8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- benchmark

def bench(cfg, repeats=3):
    """Seconds of one phase-1 (pi_k) update vs one full GRPO update on the same batch."""
    model, tok = load_model(cfg.model, dtype=torch.float32)
    k, L = int(cfg.layer) if cfg.layer != "auto" else 4, model.config.num_hidden_layers
    problems = grpo.task_problems(cfg.task, cfg.prompts_per_step, cfg.seed, "train")[:cfg.prompts_per_step]
    batch, _ = grpo.rollout_step(model, tok, problems, cfg, 0)
    print(f"batch: {batch.input_ids.shape[0]} sequences x {batch.input_ids.shape[1]} tokens, k={k}, L={L}")
    times = {}
    for name, policy in (("phase 1 (pi_k)", layer_policy(k)), ("full GRPO", grpo.full_policy)):
        m = distributed.Policy(copy.deepcopy(model).train())
        opt = torch.optim.AdamW(m.parameters(), lr=cfg.lr)
        ts = []
        for r in range(repeats + 1):  # the first is a warm-up
            t = time.perf_counter()
            old, _ = grpo.policy_logprobs(policy, m, batch, cfg)
            grpo.ppo_update(m, opt, policy, batch, old, None, cfg)
            ts.append(time.perf_counter() - t)
        times[name] = min(ts[1:])
        print(f"{name:>16}: {times[name]:.2f} s per update (old log-probs + PPO update)")
    ratio = times["phase 1 (pi_k)"] / times["full GRPO"]
    print(f"ratio phase-1 / full = {ratio:.3f}   ((k+1)/L = {(k + 1) / L:.3f})")
    return ratio


def main():
    cfg = grpo.parse_config(BuPOConfig, description="BuPO vs GRPO (arXiv 2512.19673).", presets=PRESETS)
    if cfg.bench:
        return bench(cfg)
    experiment(cfg)


if __name__ == "__main__":
    main()
