"""BuPO: Bottom-up Policy Optimization (Tan et al., arXiv 2512.19673, Sec. 3), one run.

For the first s_inter steps BuPO optimizes the internal layer policy of a lower layer k,
pi_k = softmax(lm_head(h_k) / T) with h_k the raw residual after decoder layer k (the
authors' convention: hidden_states[k+1], no final norm), with the GRPO objective: the
importance ratio uses log-probs of the sampled tokens under pi_k, old and new. Rollouts
still come from the full model. Only the embeddings and layers 0..k run (early exit,
policy.layer_policy), so gradients reach only those layers and the (often tied) lm_head.
After s_inter steps it is plain GRPO. The layer comes from the entropy analysis
(entropy.py) or is given. PHASE_ONE names what the first s_inter steps can train (BuPO,
and the paper's ablations of Table 5 and 11); the experiment that compares them with
GRPO, PPO, RLOO and Reinforce++ on paired seeds is experiment.py.

    python bupo.py --out runs/bupo-one   # one BuPO run of the CPU preset (k=4, s_inter=3, 10 steps)
    python bupo.py --preset paper --out runs/bupo-paper   # the paper's setting: Qwen3-4B, k=5, s_inter=30, on one H200
    python experiment.py                 # the main job: BuPO vs GRPO on 3 paired seeds
    python bench.py bupo                 # one phase-1 update vs one full update, all positions scored (bench_train.py)
"""
from dataclasses import replace

import torch
from tqdm import tqdm

import distributed
import grpo
from cli import Diverged, Stopped, check, parse_config, run_main
from config import BUPO_PRESETS, BuPOConfig, check_config, preset_help
from models import load_model, model_config
from entropy import eic_stages, internal_entropy
from hardware import clock
from policy import check_layer, compute_precision, layer_logprobs, layer_policy, micro_slices, output_policy
from probe import probe
from problems import task_problems
from rollout import configure as configure_sampling
from update import rollout_step


# ----------------------------------------------------------------------------- BuPO

def resolve_layer(cfg, model, tok):
    """k: cfg.layer, or with cfg.layer None (auto) the end of the exploration stage found by entropy.py on this
    model."""
    if cfg.layer is not None:
        return cfg.layer
    dh = entropy_profile(model, tok, cfg)["dH_ffn"]
    stages = eic_stages(dh)
    check(stages["boundary_layer"] is not None,
          f"--layer auto: this model has no boundary layer by the paper's rule (Sec. 5.3): "
          f"its first FFN does not raise the entropy (dH_ffn = {', '.join(f'{d:+.3f}' for d in dh[:4])}, ...), "
          "so there is no exploration stage to end; pass --layer k (the paper: 5 for Qwen3, 26 for Llama/OctoThinker)")
    print(f"layer=auto: the boundary layer is k={stages['suggested_layer']} ({stages})")
    return stages["suggested_layer"]


@torch.no_grad()
def entropy_profile(model, tok, cfg):
    """internal_entropy (paper convention) over cfg.profile_samples fresh responses to training prompts."""
    problems = task_problems(cfg.task, cfg.profile_samples, cfg.seed + 1, "train")
    batch, _ = rollout_step(model, tok, problems, replace(cfg, group_size=1, rollout_dtype=""), step=-1)
    return internal_entropy(model, batch.input_ids, batch.response_mask, attention_mask=batch.attention_mask)


@torch.no_grad()
def readout_entropies(model, ids, att, resp, temperature, layers, precision, output=True):
    """Token-mean entropies of pi_k for each k in layers (and with `output` of the output policy), under `precision`,
    as the update runs them (pi_k: layers 0..k in float32, the lm_head under the autocast; see
    policy.layer_logprobs)."""
    n = max(int(resp[:, 1:].sum()), 1)
    with compute_precision(precision, ids.device):
        out = {"output": output_policy(model, ids, att, temperature, resp)[1].sum().item() / n} if output else {}
        return out | {k: layer_logprobs(model, ids, att, k, temperature, resp)[1].sum().item() / n for k in layers}


# What the first s_inter steps train, per variant: pi_k's policy fn given k (None: the output policy's), and the lr
# scale of the layers above k (None: one lr for all). After them every variant is plain GRPO.
PHASE_ONE = {
    "bupo": (layer_policy, None),                                    # Sec. 3: pi_k = softmax(lm_head(h_k) / T)
    "bupo_ln": (lambda k: layer_policy(k, final_norm=True), None),  # Table 5: pi_k = softmax(lm_head(norm(h_k)) / T)
    "grpo_frozen": (None, 0.0),    # Table 11 (a): the output policy, layers above k frozen (what pi_k reaches learns)
    "grpo_layer_lr": (None, 0.1),  # Table 11 (b): the output policy, the layers above k at 0.1x lr
}


def phase_one(methods):
    """The run's variant of PHASE_ONE: the one cfg.methods names, BuPO if it is a list naming bupo (bupo.py's default,
    the experiment's list); None for another method (GRPO, PPO, RLOO, ...: the output policy throughout)."""
    return methods if methods in PHASE_ONE else "bupo" if "bupo" in methods.split(",") else None


def train_bupo(cfg, k, model, tok, desc="BuPO", layers=(), probes=None):
    """grpo.train of one run (phase_one(cfg.methods)): its phase 1 for steps < inter_steps, then the output policy;
    logs the entropies of pi_k (k in layers) and of the output, and with probes (probe.probe_set's) layer k's
    feature refinement every cfg.probe_every steps (Fig. 5)."""
    layers = sorted(set(layers) | {k})
    variant = phase_one(cfg.methods)
    internal_policy, scale = PHASE_ONE.get(variant, (None, None))

    def policy_for_step(step):
        return internal_policy(k) if internal_policy and step < cfg.inter_steps else output_policy

    def on_step(step, runner, tok, batch, m):
        m["phase"] = "internal" if step < cfg.inter_steps and variant else "full"
        if step == cfg.inter_steps > 0 and variant and distributed.init().main:
            tqdm.write(f"step {step}: {desc}: phase 1 ends, plain GRPO from now on")
        _, ids, att, resp, _ = next(micro_slices(batch, range(batch.input_ids.shape[0]), cfg.micro_batch,
                                                 cfg.micro_tokens))
        with distributed.full_weights(runner) as model:
            # this rank's first micro-batch; the output policy's entropy is train_step's, over the whole batch (Fig. 7)
            ent = readout_entropies(model, ids, att, resp, cfg.temperature, layers, cfg.precision, output=False)
        n = distributed.all_sum([1.0])[0]
        for key, v in zip(ent, distributed.all_sum(list(ent.values()))):
            m[f"entropy_layer{key}"] = v / n
        if cfg.profile_every and ((step + 1) % cfg.profile_every == 0 or step == cfg.steps - 1):
            with distributed.full_weights(runner) as model:  # every rank profiles the same responses
                prof = entropy_profile(model, tok, cfg)
            m["profile_layer"], m["profile_dH_ffn"] = prof["layer"], prof["dH_ffn"]
        if probes and cfg.probe_every and ((step + 1) % cfg.probe_every == 0 or step == cfg.steps - 1):
            device = distributed.init().device
            t = clock(device)
            with distributed.full_weights(runner) as model:  # every rank probes the same responses
                m |= ({f"probe_{key}": v for key, v in probe(model, probes, k, tok.pad_token_id).items()}
                      | {"probe_layer": k})
            m["time_probe"] = clock(device) - t
    upper = {} if scale is None else dict(upper_k=k, upper_scale=lambda step: scale if step < cfg.inter_steps else 1.0)
    return grpo.train(cfg, policy_for_step, on_step, model=model, tok=tok, desc=desc, **upper)


def main(argv=None):
    """One BuPO run, as grpo.py runs one GRPO run; the experiment against GRPO on paired seeds is experiment.py."""
    cfg = parse_config(BuPOConfig, BUPO_PRESETS,
                       "One BuPO run (arXiv 2512.19673, Sec. 3); the BuPO-vs-GRPO experiment is "
                       "python experiment.py. " + preset_help(BUPO_PRESETS), argv)
    check(not cfg.bench, "bupo.py --bench moved: python bench.py bupo (the same flags)")
    check(phase_one(cfg.methods),
          f"bupo.py trains BuPO or a variant of its phase 1: --methods must be one of {', '.join(PHASE_ONE)} "
          f"(or a list naming bupo), got '{cfg.methods}'; the other methods: python experiment.py")
    config = model_config(cfg.model)
    if cfg.layer is not None:
        check_layer(config, cfg.layer)
    check_config(cfg, config)
    configure_sampling(cfg.compile, cfg.attention)  # the sampling before the run too (layer=auto's profile)
    d = distributed.init()
    try:
        model, tok = load_model(cfg.model, dtype=torch.float32, device=d.device)
        k = resolve_layer(cfg, model, tok)
        history, _, _ = train_bupo(replace(cfg, layer=k), k, model, tok)
    except (Stopped, Diverged):  # as grpo.py: every rank ends so, together; one line
        distributed.close()
        raise
    distributed.close()
    if d.main:
        first, last = history[0], history[-1]
        print(f"BuPO, k={k}, s_inter={cfg.inter_steps}: reward {first['reward_mean']:.3f} -> "
              f"{last['reward_mean']:.3f}; held-out {first.get('eval/avg_before', float('nan')):.1f}% -> "
              f"{last.get('eval/avg', float('nan')):.1f}%; wrote {cfg.out}/metrics.jsonl")


if __name__ == "__main__":
    run_main(main)
