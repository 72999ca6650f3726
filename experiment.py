"""The BuPO-vs-GRPO experiment: paired seeds, the paper's methods and ablations, resume, and the report.

Tan et al., arXiv 2512.19673, Sec. 3, Tables 1, 2, 3, 5, 11. The experiment trains BuPO
and GRPO (and any of METHODS) from the same weights on paired seeds (a seed fixes the
data order and the sampling of both), evaluates them on one held-out set, and reports
each seed, the mean, and the paired difference BuPO - GRPO with its 95% interval
(results.py); --sweep repeats BuPO over values of the layer or of s_inter, the paper's
ablations. Interrupted, --resume skips the finished runs and continues the others.
One run of BuPO itself is bupo.py.

    python experiment.py                 # CPU: 3 seeds of BuPO (k=4, s_inter=3) and GRPO, 10 steps each (README)
    python experiment.py --resume --sweep layer=4,14,24   # then the layer ablation on the same seeds
    python experiment.py --preset paper --methods bupo   # the paper's setting: Qwen3-4B, k=5, s_inter=30, on one H200
    torchrun --nproc_per_node=8 experiment.py --preset paper-qwen3-8b
        # the other backbones: --preset paper-octothinker-3b, -8b
"""
import copy
import os
from dataclasses import asdict, replace

import torch

import distributed
import grpo
from bupo import PHASE_ONE, entropy_profile, resolve_layer, train_bupo
from checkpoints import RunDamaged, checkpoint_path, read_metrics, remove_checkpoint
from cli import (Diverged, InputError, Stopped, check, check_seed, claim_run_dir, parse_config, read_json, run_main,
                 settings_diff, write_json)
from config import BUPO_PRESETS, BuPOConfig, check_config, check_ppo_memory, preset_help, resume_safe
from models import load_model, model_config
from policy import check_layer
from probe import probe, probe_set
from results import report
from rollout import configure as configure_sampling

# The experiment's methods (the paper's Table 1, 5, 11): name in the report, verl's advantage estimator. Those of
# bupo.PHASE_ONE train their own phase 1 for s_inter steps, then GRPO; the others train the output policy throughout.
METHODS = {
    "grpo": ("GRPO", "grpo"),
    "bupo": ("BuPO", "grpo"),                                  # pi_k (raw residual h_k) for s_inter steps, then GRPO
    "ppo": ("PPO", "gae"),                                     # a critic from the same weights, GAE (critic.py)
    "rloo": ("RLOO", "rloo"),
    "reinforce_plus_plus": ("Reinforce++", "reinforce_plus_plus"),
    "bupo_ln": ("BuPO, final norm on h_k", "grpo"),           # Table 5: pi_k = softmax(lm_head(norm(h_k)))
    "grpo_frozen": ("GRPO, layers > k frozen", "grpo"),       # Table 11 (a): for s_inter steps only what pi_k reaches
    "grpo_layer_lr": ("GRPO, 0.1x lr above k", "grpo"),       # Table 11 (b): for s_inter steps 0.1x lr above k
}


def parse_seeds(cfg):
    """The experiment's seeds: N -> cfg.seed .. cfg.seed+N-1; a comma list as given."""
    try:
        seeds = ([int(s) for s in cfg.seeds.split(",") if s.strip()] if "," in cfg.seeds
                 else list(range(cfg.seed, cfg.seed + int(cfg.seeds))))
    except ValueError:
        seeds = []
    check(seeds and len(set(seeds)) == len(seeds),
          f"--seeds must be a count N >= 1 or a comma list of distinct seeds, got '{cfg.seeds}'")
    for seed in seeds:
        check_seed(seed, "--seeds" if "," in cfg.seeds else "--seed + --seeds - 1")
    return seeds


def parse_sweep(cfg):
    """(key, values) of --sweep key=v1,v2,...; (None, [None]) without one."""
    if not cfg.sweep:
        return None, [None]
    key, _, values = cfg.sweep.partition("=")
    check(key in ("layer", "inter_steps"), f"--sweep must be layer=... or inter_steps=..., got '{cfg.sweep}'")
    try:
        out = [int(v) for v in values.split(",")]
    except ValueError:
        raise InputError(f"--sweep {key}= needs comma-separated integers, got '{values}'") from None
    check(len(set(out)) == len(out), f"--sweep {key}= lists a value twice: '{values}'")
    return key, out


def plan(cfg, k, seeds):
    """[(group, seed, run config)]: per seed a run of each method, BuPO's once per sweep value (groups share seeds:
    paired)."""
    key, values = parse_sweep(cfg)
    methods = cfg.methods.split(",")
    runs = []
    for seed in seeds:
        base = replace(cfg, seed=seed, seeds=f"{seed},", sweep="", keep_checkpoints=False,
                       save_final=cfg.keep_checkpoints, eval_before=False, resume=False, overwrite=False, layer=k)
        for method in methods:
            name, estimator = METHODS[method]
            if method != "bupo":  # bupo's runs follow, one per sweep value
                runs.append((name, seed, replace(base, methods=method, adv_estimator=estimator,
                                                 out=os.path.join(cfg.out, f"seed{seed}", method),
                                                 inter_steps=cfg.inter_steps if method in PHASE_ONE else 0)))
        for v in values if "bupo" in methods else []:
            group = "BuPO" if key is None else f"BuPO {key}={v}"
            same = key is None or v == getattr(cfg, key)  # the unswept BuPO run: one dir, shared with a sweep over it
            run = replace(base, methods="bupo", adv_estimator="grpo",
                          out=os.path.join(cfg.out, f"seed{seed}", "bupo" if same else f"bupo-{key}{v}"),
                          **({key: v} if key == "inter_steps" else {}))
            runs.append((group, seed, replace(run, layer=v) if key == "layer" else run))
    return runs


def finished_run(cfg):
    """The metrics of a run that completed (the resumed experiment skips it), else None: a step's line is logged
    once its evaluation and profile are done, and the report needs nothing else of a run."""
    hist = read_metrics(os.path.join(cfg.out, "metrics.jsonl"), cfg.steps)
    return hist if len(hist) == cfg.steps else None


def check_run(cfg, run_cfg):
    """Refuse a run dir of this experiment that was trained with other settings (its config.json or the experiment's
    edited by hand), naming them: a report never mixes runs of two settings, finished ones included."""
    path = os.path.join(run_cfg.out, "config.json")
    diff = settings_diff(read_json(path), asdict(run_cfg), resume_safe(run_cfg)) if os.path.exists(path) else []
    saved = read_json(path) if diff else {}
    what = ", ".join(f"{k} ({saved.get(k)!r} in the run, {getattr(run_cfg, k, None)!r} in the experiment)"
                     for k in diff)
    check(not diff, f"{path} and {cfg.out}/config.json disagree: {what}; one was edited by hand: put back the value(s) "
          "the run was trained with, or start the experiment afresh with --overwrite (or another --out)")


def check_experiment(cfg):
    """Settings of the experiment, before any work: seeds, methods, sweep, layers against the model's config."""
    seeds = parse_seeds(cfg)
    methods = cfg.methods.split(",")
    check(methods and set(methods) <= set(METHODS) and len(set(methods)) == len(methods),
          f"--methods must be a comma list of distinct methods out of {', '.join(METHODS)}; got '{cfg.methods}'")
    check(cfg.eval_every >= 1,
          "--eval-every must be >= 1: the experiment compares the runs' held-out accuracy after the last step")
    key, values = parse_sweep(cfg)
    check(key is None or "bupo" in methods, "--sweep varies BuPO: include bupo in --methods")
    steps = [cfg.inter_steps] + (values if key == "inter_steps" else [])
    check(all(0 <= v <= cfg.steps for v in steps),
          f"--inter-steps must lie in 0..--steps ({cfg.steps}), got {', '.join(map(str, steps))}")
    check(cfg.profile_samples >= 1 and cfg.profile_every >= 0,
          "--profile-samples must be >= 1 and --profile-every >= 0")
    check(cfg.probe_samples >= 1 and cfg.probe_every >= 0, "--probe-samples must be >= 1 and --probe-every >= 0")
    config = model_config(cfg.model)
    for k in ([cfg.layer] if cfg.layer is not None else []) + (values if key == "layer" else []):
        check_layer(config, k)
    check_config(cfg, config)
    if "ppo" in methods:  # its runs' --adv-estimator is gae: refused now, not after the other methods trained
        check_ppo_memory(config)
    return seeds, config


def experiment(cfg):
    """BuPO and GRPO on paired seeds, from the same weights; per-seed results, intervals, curves (rank 0)."""
    d = distributed.init()
    seeds, _ = check_experiment(cfg)
    with claim_run_dir(cfg.out, cfg, resume=cfg.resume, overwrite=cfg.overwrite, mutable=resume_safe(cfg),
                       writer=d.main):
        model, tok = load_model(cfg.model, dtype=torch.float32, device=d.device)
        start = _initial(cfg, model, tok, d)  # the shared start: its layer k, held-out accuracy and profile
        init = model.cpu()  # the starting weights, kept off the device; each run trains a copy
        key, values = parse_sweep(cfg)
        layers = sorted({start["k"]} | (set(values) if key == "layer" else set()))
        runs = {}
        for group, seed, run_cfg in plan(cfg, start["k"], seeds):
            check_run(cfg, run_cfg)
            hist = finished_run(run_cfg)
            if hist is None:
                hist = train_run(cfg, run_cfg, init, tok, d, f"{group}, seed {seed}", layers, start.get("probe_set"))
            if not cfg.keep_checkpoints and d.main:
                # its metrics hold all the report needs (also one stopped after its last step)
                remove_checkpoint(run_cfg.out)
            runs.setdefault(group, {})[seed] = hist
        distributed.close()
        if d.main:
            report(cfg, start, runs, parse_sweep(cfg))


def train_run(cfg, run_cfg, init, tok, d, name, layers, probes):
    """One run of the experiment from its checkpoint, or afresh (killed before any checkpoint); its metrics. A stop
    request (also in its last step) stops the experiment; a non-finite stop or a damaged run names the experiment's
    way on."""
    has_ckpt = checkpoint_path(run_cfg.out) is not None
    run_cfg = replace(run_cfg, resume=has_ckpt, overwrite=not has_ckpt)
    try:
        hist, _, _ = train_bupo(run_cfg, run_cfg.layer, copy.deepcopy(init).to(d.device), tok, desc=name, layers=layers,
                                probes=probes)
    except Stopped as e:  # keep its checkpoint, report nothing
        raise Stopped(f"{name} {e.what}", f"continue the experiment with --resume --out {cfg.out}") from None
    except Diverged as e:
        raise Diverged(f"{name}: {e.what}", f"the experiment's runs share one lr: start it afresh with a lower --lr "
                       f"(e.g. --lr {cfg.lr / 10:g}) and --overwrite, or another --out") from None
    except RunDamaged as e:
        raise InputError(f"{name}: {e.what}; move {run_cfg.out} aside (mv it to a new name: nothing is lost) and "
                         f"continue the experiment with --resume --out {cfg.out}: that run is trained again") from None
    return hist


def _initial(cfg, model, tok, d):
    """{"k", "eval", "profile"} of the starting model, computed once and kept in out/initial.json; with
    --probe-every also the probe set (the same for every method and seed) and the start's probe of each layer."""
    path = os.path.join(cfg.out, "initial.json")
    start = read_json(path) if os.path.exists(path) else None
    if start is None:
        runner = distributed.Wrapped(model)
        start = {"k": resolve_layer(cfg, model, tok), "eval": grpo.evaluations(runner, tok, cfg, d, sampled=True),
                 "profile": entropy_profile(model, tok, cfg) if cfg.profile_every else None}
    elif not cfg.probe_every or "probe_set" in start:
        return start
    if cfg.probe_every:  # also when a resumed experiment starts probing
        dtype = getattr(torch, cfg.rollout_dtype) if cfg.rollout_dtype else None
        start["probe_set"] = probe_set(model, tok, cfg.eval_data, cfg.probe_samples, cfg.max_new_tokens, dtype)
        key, values = parse_sweep(cfg)
        start["probe"] = {str(k): probe(model, start["probe_set"], k, tok.pad_token_id)
                          for k in sorted({start["k"]} | (set(values) if key == "layer" else set()))}
    if d.main:
        write_json(path, start)
    return start


def main(argv=None):
    cfg = parse_config(BuPOConfig, BUPO_PRESETS,
                       "BuPO vs GRPO on paired seeds (arXiv 2512.19673). " + preset_help(BUPO_PRESETS), argv)
    check(not cfg.bench, "experiment.py --bench: the benchmark is python bench.py bupo (the same flags)")
    configure_sampling(cfg.compile, cfg.attention)  # the sampling before the runs too (profiles, probe set)
    experiment(cfg)


if __name__ == "__main__":
    run_main(main)
