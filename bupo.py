"""BuPO: Bottom-up Policy Optimization (Tan et al., arXiv 2512.19673, Sec. 3), and the BuPO-vs-GRPO experiment.

For the first s_inter steps BuPO optimizes the internal layer policy of a lower layer k,
pi_k = softmax(lm_head(h_k) / T) with h_k the raw residual after decoder layer k (the
authors' convention: hidden_states[k+1], no final norm), with the GRPO objective: the
importance ratio uses log-probs of the sampled tokens under pi_k, old and new. Rollouts
still come from the full model. Only the embeddings and layers 0..k run (early exit,
policy.layer_policy), so gradients reach only those layers and the (often tied) lm_head.
After s_inter steps it is plain GRPO. The layer comes from the entropy analysis
(entropy.py) or is given.

The experiment trains BuPO and GRPO from the same weights on paired seeds (a seed fixes
the data order and the sampling of both), evaluates them on one held-out set, and
reports each seed, the mean, and the paired difference BuPO - GRPO with its 95% interval
(report.py); --sweep repeats BuPO over values of the layer or of s_inter, the paper's
ablations. Interrupted, --resume skips the finished runs and continues the others.

    python bupo.py                       # CPU: 3 seeds of BuPO (k=4, s_inter=3) and GRPO, 10 steps each (~16 min)
    python bupo.py --resume --sweep layer=4,14,24   # then the layer ablation on the same seeds
    python bupo.py --bench               # one phase-1 update vs one full update, all positions scored
    python bupo.py --preset paper --model Qwen/Qwen3-4B --layer 5 --inter-steps 30 --methods bupo   # the paper's setting
"""
import copy
import json
import os
import time
from dataclasses import replace

import torch
from tqdm import tqdm

import distributed
import grpo
from checkpoints import checkpoint_path, read_metrics, remove_checkpoint
from cli import InputError, check, claim_run_dir, parse_config, read_json, run_main
from config import BUPO_PRESETS, BuPOConfig
from decompose import load_model, model_config
from entropy import eic_stages, internal_entropy
from policy import check_layer, compute_precision, layer_logprobs, layer_policy, output_policy
from problems import task_problems
from report import (CURVES, fmt_interval, markdown_table, mean_interval, paired_difference, plot_intervals, plot_panels,
                    run_series)


# ----------------------------------------------------------------------------- BuPO

def resolve_layer(cfg, model, tok):
    """k as an int: given, or the end of the exploration stage found by entropy.py on this model."""
    if cfg.layer != "auto":
        return int(cfg.layer)
    stages = eic_stages(entropy_profile(model, tok, cfg)["dH_ffn"])
    print(f"layer=auto: EIC analysis suggests k={stages['suggested_layer']} ({stages})")
    return stages["suggested_layer"]


@torch.no_grad()
def entropy_profile(model, tok, cfg):
    """internal_entropy (paper convention) over cfg.profile_samples fresh responses to training prompts."""
    problems = task_problems(cfg.task, cfg.profile_samples, cfg.seed + 1, "train")
    batch, _ = grpo.rollout_step(model, tok, problems, replace(cfg, group_size=1, rollout_dtype=""), step=-1)
    return internal_entropy(model, batch.input_ids, batch.response_mask, attention_mask=batch.attention_mask)


@torch.no_grad()
def readout_entropies(model, ids, att, resp, temperature, layers, precision):
    """Token-mean entropies of the output policy (under `precision`, as the update runs it) and of pi_k for each k in
    layers (float32, as layer_logprobs runs it: in bf16 the raw residual's wide logits would move them)."""
    n = max(int(resp[:, 1:].sum()), 1)
    with compute_precision(precision, ids.device):
        out = {"output": output_policy(model, ids, att, temperature, resp)[1].sum().item() / n}
    return out | {k: layer_logprobs(model, ids, att, k, temperature, resp)[1].sum().item() / n for k in layers}


def train_bupo(cfg, k, model, tok, desc="BuPO", layers=()):
    """grpo.train with pi_k for steps < inter_steps, then the output policy; logs the entropies of pi_k (k in layers) and of the output."""
    layers = sorted(set(layers) | {k})

    def policy_for_step(step):
        return layer_policy(k) if step < cfg.inter_steps else output_policy

    def on_step(step, runner, tok, batch, m):
        m["phase"] = "internal" if step < cfg.inter_steps else "full"
        if step == cfg.inter_steps > 0 and distributed.init().main:
            tqdm.write(f"step {step}: switching from pi_{k} to the output policy (plain GRPO)")
        _, ids, att, resp, _ = next(grpo.micro_slices(batch, torch.arange(batch.input_ids.shape[0]), cfg.micro_batch))
        with distributed.full_weights(runner) as model:
            ent = readout_entropies(model, ids, att, resp, cfg.temperature, layers, cfg.precision)  # this rank's first micro-batch
        n = distributed.all_sum([1.0])[0]
        for key, v in zip(ent, distributed.all_sum(list(ent.values()))):
            m["entropy_output" if key == "output" else f"entropy_layer{key}"] = v / n
        if cfg.profile_every and ((step + 1) % cfg.profile_every == 0 or step == cfg.steps - 1):
            with distributed.full_weights(runner) as model:  # every rank profiles the same responses
                prof = entropy_profile(model, tok, cfg)
            m["profile_layer"], m["profile_dH_ffn"] = prof["layer"], prof["dH_ffn"]
    return grpo.train(cfg, policy_for_step, on_step, model=model, tok=tok, desc=desc)


# ----------------------------------------------------------------------------- the experiment

def parse_seeds(cfg):
    """The experiment's seeds: N -> cfg.seed .. cfg.seed+N-1; a comma list as given."""
    try:
        seeds = [int(s) for s in cfg.seeds.split(",") if s.strip()] if "," in cfg.seeds else list(range(cfg.seed, cfg.seed + int(cfg.seeds)))
    except ValueError:
        seeds = []
    check(seeds and len(set(seeds)) == len(seeds), f"--seeds must be a count N >= 1 or a comma list of distinct seeds, got '{cfg.seeds}'")
    return seeds


def parse_sweep(cfg):
    """(key, values) of --sweep key=v1,v2,...; (None, [None]) without one."""
    if not cfg.sweep:
        return None, [None]
    key, _, values = cfg.sweep.partition("=")
    check(key in ("layer", "inter_steps"), f"--sweep must be layer=... or inter_steps=..., got '{cfg.sweep}'")
    try:
        return key, [int(v) for v in values.split(",")]
    except ValueError:
        raise InputError(f"--sweep {key}= needs comma-separated integers, got '{values}'") from None


def plan(cfg, k, seeds):
    """[(group, seed, run config)]: per seed a GRPO run and a BuPO run per sweep value (groups share seeds: paired)."""
    key, values = parse_sweep(cfg)
    methods = cfg.methods.split(",")
    runs = []
    for seed in seeds:
        base = replace(cfg, seed=seed, seeds=f"{seed},", sweep="", keep_checkpoints=False, save_final=cfg.keep_checkpoints,
                       eval_before=False, resume=False, overwrite=False, layer=str(k))
        if "grpo" in methods:
            runs.append(("GRPO", seed, replace(base, methods="grpo", inter_steps=0, out=os.path.join(cfg.out, f"seed{seed}", "grpo"))))
        for v in values if "bupo" in methods else []:
            group = "BuPO" if key is None else f"BuPO {key}={v}"
            same = key is None or str(v) == str(getattr(cfg, key))  # the unswept BuPO run: one dir, shared with a sweep over it
            run = replace(base, methods="bupo", out=os.path.join(cfg.out, f"seed{seed}", "bupo" if same else f"bupo-{key}{v}"),
                          **({key: v} if key == "inter_steps" else {}))
            runs.append((group, seed, replace(run, layer=str(v)) if key == "layer" else run))
    return runs


def finished_run(cfg):
    """The metrics of a run that completed (the resumed experiment skips it), else None: a step's line is logged
    once its evaluation and profile are done, and the report needs nothing else of a run."""
    hist = read_metrics(os.path.join(cfg.out, "metrics.jsonl"), cfg.steps)
    return hist if len(hist) == cfg.steps else None


def check_experiment(cfg):
    """Settings of the experiment, before any work: seeds, methods, sweep, layers against the model's config."""
    seeds = parse_seeds(cfg)
    methods = cfg.methods.split(",")
    check(methods and set(methods) <= {"bupo", "grpo"} and len(set(methods)) == len(methods), f"--methods must be bupo, grpo or bupo,grpo, got '{cfg.methods}'")
    key, values = parse_sweep(cfg)
    check(key is None or "bupo" in methods, "--sweep varies BuPO: include bupo in --methods")
    check(cfg.inter_steps >= 0 and all(v is None or v >= 0 for v in values), "--inter-steps must be >= 0")
    check(cfg.profile_samples >= 1 and cfg.profile_every >= 0, "--profile-samples must be >= 1 and --profile-every >= 0")
    config = model_config(cfg.model)
    check(cfg.layer == "auto" or cfg.layer.lstrip("-").isdigit(), f"--layer must be an integer or auto, got '{cfg.layer}'")
    for k in ([int(cfg.layer)] if cfg.layer != "auto" else []) + (values if key == "layer" else []):
        check_layer(config, k)
    grpo.check_config(cfg, config)
    return seeds, config


def experiment(cfg):
    """BuPO and GRPO on paired seeds, from the same weights; per-seed results, intervals, curves (rank 0)."""
    d = distributed.init()
    seeds, _ = check_experiment(cfg)
    with claim_run_dir(cfg.out, cfg, resume=cfg.resume, overwrite=cfg.overwrite, mutable=cfg.SAFE_ON_RESUME, writer=d.main):
        model, tok = load_model(cfg.model, dtype=torch.float32, device=d.device)
        start = _initial(cfg, model, tok, d)  # the shared start: its layer k, held-out accuracy and profile
        init = model.cpu()  # the starting weights, kept off the device; each run trains a copy
        key, values = parse_sweep(cfg)
        layers = sorted({start["layer"]} | (set(values) if key == "layer" else set()))
        runs = {}
        for group, seed, run_cfg in plan(cfg, start["layer"], seeds):
            hist = finished_run(run_cfg)
            if hist is None:
                has_ckpt = checkpoint_path(run_cfg.out) is not None
                run_cfg = replace(run_cfg, resume=has_ckpt, overwrite=not has_ckpt)  # a run killed before any checkpoint restarts
                hist, _, _ = train_bupo(run_cfg, int(run_cfg.layer), copy.deepcopy(init).to(d.device), tok,
                                        desc=f"{group}, seed {seed}", layers=layers)
                if not cfg.keep_checkpoints and d.main:
                    remove_checkpoint(run_cfg.out)  # its metrics hold all the report needs
            runs.setdefault(group, {})[seed] = hist
        distributed.close()
        if d.main:
            report(cfg, start, runs)


def _initial(cfg, model, tok, d):
    """{"layer", "eval", "profile"} of the starting model, computed once and kept in out/initial.json."""
    path = os.path.join(cfg.out, "initial.json")
    if os.path.exists(path):
        return read_json(path)
    runner = distributed.Policy(model)
    start = {"layer": resolve_layer(cfg, model, tok), "eval": grpo.run_eval(runner, tok, cfg, d) if cfg.eval_every else {},
             "profile": entropy_profile(model, tok, cfg) if cfg.profile_every else None}
    if d.main:
        with open(path, "w") as f:
            json.dump(start, f, indent=1)
    return start


# ----------------------------------------------------------------------------- the report

def final_accuracy(hist):
    return hist[-1].get("eval/avg")


def summarize_runs(start, runs):
    """{"per_seed", "stats", "paired"}: final held-out accuracy of each group and seed, its mean and interval,
    and each BuPO group's paired difference from GRPO over the seeds both have."""
    per_seed = {g: {s: final_accuracy(h) for s, h in sorted(r.items())} for g, r in runs.items()}
    stats = {g: mean_interval(list(v.values())) for g, v in per_seed.items() if None not in v.values()}
    paired = {}
    for g, v in per_seed.items():
        if g != "GRPO" and "GRPO" in per_seed:
            seeds = [s for s in v if s in per_seed["GRPO"]]
            paired[g] = paired_difference([v[s] for s in seeds], [per_seed["GRPO"][s] for s in seeds])
    return {"initial": start["eval"].get("eval/avg"), "per_seed": per_seed, "stats": stats, "paired": paired}


def results_table(summary):
    """Markdown: one row per group with each seed's accuracy, mean +- sd, 95% interval; then the paired differences."""
    seeds = sorted({s for v in summary["per_seed"].values() for s in v})
    rows = [["initial"] + [summary["initial"]] * len(seeds) + ["", ""]]
    for g, v in summary["per_seed"].items():
        st = summary["stats"].get(g)
        rows.append([g] + [v.get(s) for s in seeds] + ([f"{st['mean']:.1f} ± {st['sd']:.1f}", f"[{st['lo']:.1f}, {st['hi']:.1f}]"] if st else ["", ""]))
    for g, p in summary["paired"].items():
        diffs = [summary["per_seed"][g][s] - summary["per_seed"]["GRPO"][s] for s in seeds if s in summary["per_seed"][g]]
        rows.append([f"{g} − GRPO (paired)"] + [f"{x:+.1f}" for x in diffs] + [f"{p['mean']:+.1f} ± {p['sd']:.1f}",
                     f"[{p['lo']:+.1f}, {p['hi']:+.1f}]" + (" *" if p["significant"] else "")])
    return markdown_table(["held-out accuracy (%)"] + [f"seed {s}" for s in seeds] + ["mean ± sd", "95% interval"], rows)


def report(cfg, start, runs):
    """results.md / results.json, comparison.png (mean curves with min-max bands), profiles.png, sweep.png."""
    k, summary = start["layer"], summarize_runs(start, runs)
    panels = [("eval", "held-out accuracy (%)"), ("reward_mean", "train reward"), ("entropy_output", "entropy of the output policy"),
              (f"entropy_layer{k}", f"entropy of pi_{k} (layer {k + 1})")]
    groups = {g: [_with_start(run_series(h, [p for p, _ in panels]), start) for h in r.values()] for g, r in runs.items()}
    plot_panels(os.path.join(cfg.out, "comparison.png"), groups, panels, marks=[cfg.inter_steps - 0.5] if cfg.inter_steps else (),
                title=f"BuPO (pi_{k} for {cfg.inter_steps} steps, then GRPO) vs GRPO; mean over seeds, band: min-max; dotted: the switch")
    plot_panels(os.path.join(cfg.out, "curves.png"), {g: [run_series(h, [c for c, _ in CURVES]) for h in r.values()]
                                                      for g, r in runs.items()}, CURVES)
    if start["profile"]:
        _plot_profiles(os.path.join(cfg.out, "profiles.png"), start, runs, k)
    key, values = parse_sweep(cfg)
    if key:
        _plot_sweep(os.path.join(cfg.out, "sweep.png"), key, values, summary)
    table = results_table(summary)
    verdict = "\n".join(f"{g} − GRPO: {fmt_interval(p)} points ({'significant' if p['significant'] else 'no significant difference'} "
                        f"at 95%, {p['n']} paired seeds)" for g, p in summary["paired"].items())
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(table + "\n" + verdict + "\n")
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump({"layer": k, "inter_steps": cfg.inter_steps, "steps": cfg.steps, "sweep": cfg.sweep, **summary,
                   "reward_first_last": {g: {s: [h[0]["reward_mean"], h[-1]["reward_mean"]] for s, h in r.items()} for g, r in runs.items()},
                   "profile_initial": start["profile"] and start["profile"]["layer"]}, f, indent=1)
    print(f"\nheld-out accuracy (%), greedy, after {cfg.steps} steps; k={k}, s_inter={cfg.inter_steps}:\n{table}\n{verdict}")
    print(f"wrote {cfg.out}/results.md, results.json, comparison.png, curves.png" + (", profiles.png" if start["profile"] else "")
          + (", sweep.png" if key else ""))


def _with_start(series, start):
    """The held-out curve of a run begins at the shared start's accuracy (step 0)."""
    steps, vals = series["eval"]
    if "eval/avg" in start["eval"] and steps[:1] != [0]:
        series["eval"] = ([0] + steps, [start["eval"]["eval/avg"]] + vals)
    return series


def _plot_profiles(path, start, runs, k):
    """Entropy of every internal layer policy and dH_ffn before and after training (mean over seeds)."""
    profiles = {"initial": [start["profile"]]} | {f"after {g}": [{"layer": h[-1]["profile_layer"], "dH_ffn": h[-1]["profile_dH_ffn"]}
                                                              for h in r.values()] for g, r in runs.items()}
    groups = {n: [{key: (list(range(len(p[key]))), p[key]) for key in ("layer", "dH_ffn")} for p in ps] for n, ps in profiles.items()}
    plot_panels(path, groups, [("layer", "entropy of pi_l (0 = embedding)"), ("dH_ffn", "FFN entropy change dH_ffn")],
                marks=[k + 1], xlabel="layer")


def _plot_sweep(path, key, values, summary):
    """Final held-out accuracy against the swept value: BuPO's mean with its 95% interval, and GRPO's (one value)."""
    series = {"BuPO": [(v, summary["stats"][f"BuPO {key}={v}"]) for v in values]}
    if "GRPO" in summary["stats"]:
        series["GRPO"] = [(v, summary["stats"]["GRPO"]) for v in values]
    plot_intervals(path, key, series, f"after training, by {key}: mean and 95% interval over seeds")


# ----------------------------------------------------------------------------- benchmark

def bench(cfg, repeats=2):
    """Seconds of one phase-1 update (pi_k) against a full one and a plain HF forward+backward, all positions scored."""
    model, tok = load_model(cfg.model, dtype=torch.float32)
    k, L = int(cfg.layer) if cfg.layer != "auto" else 4, model.config.num_hidden_layers
    check_layer(model.config, k)
    problems = task_problems("math500", 8, 0, "test")
    batch, _ = grpo.rollout_step(model, tok, problems, replace(cfg, group_size=1, max_new_tokens=256), 0)
    batch.response_mask = batch.attention_mask.bool()  # every position scored
    ids, att = batch.input_ids, batch.attention_mask

    def update(policy):
        lp, _ = policy(model, ids, att, 1.0, batch.response_mask)
        grpo.policy_loss(lp, lp.detach(), batch.advantages, batch.response_mask)[0].backward()

    def plain():
        logits = model(ids, attention_mask=att).logits[:, :-1].float()
        logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).sum().backward()
    times = {}
    for name, fn in (("phase 1 (pi_k)", lambda: update(layer_policy(k))), ("full (output policy)", lambda: update(output_policy)),
                     ("plain HF forward+backward", plain)):
        ts = []
        for _ in range(repeats + 1):  # the first is a warm-up
            t = time.perf_counter()
            with compute_precision(cfg.precision, model.device):
                fn()
            model.zero_grad(set_to_none=True)
            ts.append(time.perf_counter() - t)
        times[name] = min(ts[1:])
    D, V = model.config.hidden_size, model.config.vocab_size
    per_layer = sum(m.weight.numel() for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    bound = ((k + 1) * per_layer + D * V) / (L * per_layer + D * V)
    print(f"batch: {ids.shape[0]} sequences x {ids.shape[1]} tokens, every position scored; k={k}, L={L}, {cfg.precision}")
    for name, t in times.items():
        print(f"{name:>28}: {t:.2f} s forward+backward")
    print(f"phase 1 / plain = {times['phase 1 (pi_k)'] / times['plain HF forward+backward']:.3f}, phase 1 / full = "
          f"{times['phase 1 (pi_k)'] / times['full (output policy)']:.3f}  (FLOP bound ((k+1) layers + lm_head) / (L layers + lm_head) = {bound:.3f})")
    return times


def main(argv=None):
    cfg = parse_config(BuPOConfig, BUPO_PRESETS, "BuPO vs GRPO on paired seeds (arXiv 2512.19673).", argv)
    if cfg.bench:
        return bench(cfg)
    experiment(cfg)


if __name__ == "__main__":
    run_main(main)
