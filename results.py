"""The experiment's report: from the runs' metrics to results.md, results.json and the figures of experiment.py.

Each method and seed contributes its last logged step (experiment.py keeps nothing else of a
run). The tables follow the paper: held-out accuracy after training per method (Table 1;
here greedy on the held-out set, and the paper's Avg@K from K samples at temperature 1),
each seed, the mean, its 95% interval, and every method's paired difference from GRPO
(stats.paired_difference); the unbiased Pass@K curve of each method (Fig. 6); the
curves per step of reward, entropies and response length (Fig. 4, Fig. 7); and with
--probe-every the feature-refinement probes of layer k (Fig. 5, probe.py).
"""
import json
import os
import statistics

from stats import (fmt_interval, markdown_table, mean_interval, paired_difference, plot_intervals, plot_panels,
                   run_series)

GREEDY = "eval/avg"


def sampled_key(n, what="avg"):
    """The metric name of the sampled evaluation's average over the held-out sets: Avg@n, or Pass@K with what=K."""
    return f"sampled/avg/avg@{n}" if what == "avg" else f"sampled/avg/pass@{what}"


def summarize_runs(start, runs, key=GREEDY):
    """{"initial", "per_seed", "stats", "paired"} of the metric `key` after the last step: each group and seed, the
    mean and interval of each group, and each other group's paired difference from GRPO over the seeds both have."""
    per_seed = {g: {s: h[-1].get(key) for s, h in sorted(r.items())} for g, r in runs.items()}
    stats = {g: mean_interval(list(v.values())) for g, v in per_seed.items() if None not in v.values()}
    paired = {}
    base = per_seed.get("GRPO", {})
    for g, v in per_seed.items():
        seeds = [s for s in v if s in base and v[s] is not None and base[s] is not None]
        if g != "GRPO" and seeds:
            paired[g] = paired_difference([v[s] for s in seeds], [base[s] for s in seeds])
    return {"initial": start["eval"].get(key), "per_seed": per_seed, "stats": stats, "paired": paired}


def _interval_cells(st, signed=False):
    """[mean ± sd, 95% interval] cells; one seed has no interval and says so."""
    f = "+.1f" if signed else ".1f"
    if st["n"] < 2:
        return [f"{st['mean']:{f}}", "one seed: no interval"]
    star = " *" if st.get("significant") else ""
    return [f"{st['mean']:{f}} ± {st['sd']:.1f}", f"[{st['lo']:{f}}, {st['hi']:{f}}]" + star]


def results_table(summary, title="held-out accuracy (%)"):
    """Markdown: one row per group with each seed's value, mean ± sd, 95% interval; then the paired differences."""
    seeds = sorted({s for v in summary["per_seed"].values() for s in v})
    rows = [["initial"] + [summary["initial"]] * len(seeds) + ["", ""]]
    for g, v in summary["per_seed"].items():
        st = summary["stats"].get(g)
        rows.append([g] + [v.get(s) for s in seeds] + (_interval_cells(st) if st else ["", ""]))
    for g, p in summary["paired"].items():
        diffs = {s: summary["per_seed"][g][s] - summary["per_seed"]["GRPO"][s] for s in seeds
                 if summary["per_seed"][g].get(s) is not None and summary["per_seed"]["GRPO"].get(s) is not None}
        rows.append([f"{g} − GRPO (paired)"] + [f"{diffs[s]:+.1f}" if s in diffs else "-" for s in seeds]
                    + _interval_cells(p, signed=True))
    return markdown_table([title] + [f"seed {s}" for s in seeds] + ["mean ± sd", "95% interval"], rows)


def verdicts(summary, what):
    """One line per paired comparison: the difference, its interval, significant or not."""
    return "\n".join(f"{g} − GRPO, {what}: {fmt_interval(p)} points ("
                     + ("one seed: no test" if p["n"] < 2
                        else "significant" if p["significant"] else "no significant difference")
                     + f" at 95%, {p['n']} paired seeds)" for g, p in summary["paired"].items())


def pass_curves(start, runs, n):
    """{group: {K: mean over seeds of Pass@K}} after training, with "initial" first; Ks of the sampled evaluation."""
    ks = [int(key.rsplit("@", 1)[1]) for key in start["eval"] if key.startswith("sampled/avg/pass@")]
    out = {"initial": {k: start["eval"][sampled_key(n, k)] for k in ks}} if ks else {}
    for g, r in runs.items():
        last = [h[-1] for h in r.values()]
        ks = ks or sorted(int(key.rsplit("@", 1)[1]) for key in last[0] if key.startswith("sampled/avg/pass@"))
        if all(sampled_key(n, k) in m for m in last for k in ks):
            out[g] = {k: statistics.fmean(m[sampled_key(n, k)] for m in last) for k in ks}
    return out


def passk_table(curves, seeds):
    """Markdown: Pass@K (%) per group (rows) and K (columns), mean over the seeds."""
    ks = sorted({k for c in curves.values() for k in c})
    return markdown_table([f"Pass@K (%), mean of {seeds} seeds"] + [f"K={k}" for k in ks],
                          [[g] + [c.get(k) for k in ks] for g, c in curves.items()])


def with_start(series, start):
    """The held-out curve of a run begins at the shared start's accuracy (step 0)."""
    steps, vals = series["eval"]
    if GREEDY in start["eval"] and steps[:1] != [0]:
        series["eval"] = ([0] + steps, [start["eval"][GREEDY]] + vals)
    return series


def plot_comparison(path, start, runs, k, inter_steps):
    """One panel per quantity, each line one quantity: held-out accuracy (from the start), train reward, the output
    policy's entropy, pi_k's entropy, response length; mean over seeds with the min-max band (Fig. 4, Fig. 7)."""
    panels = [("eval", "held-out accuracy (%), greedy"), ("reward_mean", "train reward"),
              ("entropy_output", "entropy of the output policy (nats)"),
              (f"entropy_layer{k}", f"entropy of pi_{k} (layer {k + 1})"),
              ("response_len_mean", "response length (tokens)")]
    groups = {g: [with_start(run_series(h, [p for p, _ in panels]), start) for h in r.values()]
              for g, r in runs.items()}
    plot_panels(path, groups, panels, marks=[inter_steps - 0.5] if inter_steps else (),
                title=f"mean over seeds, band: min-max; dotted: end of phase 1 ({inter_steps} steps on pi_{k})")


def plot_profiles(path, start, runs, k):
    """Entropy of every internal layer policy and dH_ffn before and after training (mean over seeds)."""
    profiles = {"initial": [start["profile"]]} | {
        f"after {g}": [{"layer": h[-1]["profile_layer"], "dH_ffn": h[-1]["profile_dH_ffn"]} for h in r.values()]
        for g, r in runs.items()}
    groups = {n: [{key: (list(range(len(p[key]))), p[key]) for key in ("layer", "dH_ffn")} for p in ps]
              for n, ps in profiles.items()}
    plot_panels(path, groups, [("layer", "entropy of pi_l (0 = embedding)"), ("dH_ffn", "FFN entropy change dH_ffn")],
                marks=[k + 1], xlabel="layer")


def probe_points(start, hist, k):
    """[(steps done, probe)] of a run that probed layer k: the shared start's probe (step 0), then each probed step's
    (Fig. 5); [] for a run that probed another layer (a sweep's BuPO at its own k)."""
    if any(m.get("probe_layer", k) != k for m in hist if "probe_cos" in m):
        return []
    first = (start.get("probe") or {}).get(str(k))
    pts = [(0, first)] if first else []
    return pts + [(m["step"] + 1, {key: m[f"probe_{key}"] for key in ("cos", "dH", "ppl", "kl")})
                  for m in hist if "probe_cos" in m]


def probe_summary(start, runs, k):
    """({group: {steps done: {"cos", "cos_top", "dH", "ppl", "kl", "kl_top"}}} with means over seeds (cos and kl
    averaged over the later layers j; _top: with the last layer), {group: [probe_points of each run]})."""
    flat = lambda p: {"cos": statistics.fmean(p["cos"]), "cos_top": p["cos"][-1], "dH": p["dH"], "ppl": p["ppl"],
                      "kl": statistics.fmean(p["kl"]), "kl_top": p["kl"][-1]}
    out, points = {}, {}
    for g, r in runs.items():
        per_run = [probe_points(start, h, k) for h in r.values()]
        if all(len(pts) >= 2 for pts in per_run):
            points[g] = per_run
            out[g] = {step: {q: statistics.fmean(flat(pts[i][1])[q] for pts in per_run) for q in flat(p)}
                      for i, (step, p) in enumerate(per_run[0])}
    return out, points


def plot_probes(out_dir, start, runs, k):
    """probes.png (Fig. 5b-d, and 5a's mean over the later layers, against the step, a line per method) and
    probe_layers.png (Fig. 5a: cos(h_k, h_j) against the target layer j, a panel per method, a line per probed step)."""
    summary, points = probe_summary(start, runs, k)
    if not summary:
        return summary
    steps_of = lambda pts: [st for st, _ in pts]
    by_step = {g: [{q: (steps_of(pts), [statistics.fmean(p[q]) if isinstance(p[q], list) else p[q] for _, p in pts])
                    for q in ("cos", "dH", "ppl", "kl")} for pts in per_run] for g, per_run in points.items()}
    plot_panels(os.path.join(out_dir, "probes.png"), by_step,
                [("cos", f"(a) mean cos(h_{k}, h_j), j > {k}"), ("dH", f"(b) dH_{k} = H(pi_{k}) - H(pi_{k - 1})"),
                 ("ppl", "(c) output-policy perplexity"), ("kl", f"(d) mean KL(pi_{k} || pi_j), j > {k}")],
                title="on the fixed probe set: mean over seeds, band: min-max")
    first = next(iter(points.values()))
    by_layer = {f"after {st} steps": [{g: (list(range(k + 1, k + 1 + len(per_run[r][i][1]["cos"]))),
                                           per_run[r][i][1]["cos"])
                                       for g, per_run in points.items() if r < len(per_run) and i < len(per_run[r])}
                                      for r in range(len(first))] for i, st in enumerate(steps_of(first[0]))}
    plot_panels(os.path.join(out_dir, "probe_layers.png"), by_layer, [(g, f"(a) {g}: cos(h_{k}, h_j)") for g in points],
                xlabel="layer j", title="on the fixed probe set: mean over seeds, a line per probed step")
    return summary


def probe_table(summary, k):
    """Markdown: each method's probe at the start and after the last step (means over seeds)."""
    rows = []
    for g, by_step in summary.items():
        for step in (min(by_step), max(by_step)):
            p = by_step[step]
            rows.append([g, step] + [f"{p[q]:.4f}" for q in ("cos", "cos_top", "dH")]
                        + [f"{p[q]:.3f}" for q in ("ppl", "kl", "kl_top")])
    return markdown_table([f"probe of layer {k} (Fig. 5)", "steps", "mean cos(h_k, h_j)", "cos with the top layer",
                           "dH_k", "output PPL", "mean KL(pi_k||pi_j)", "KL to the output policy"], rows)


def plot_sweep(path, key, values, summary):
    """Final held-out accuracy against the swept value: BuPO's mean with its 95% interval, and GRPO's (one value)."""
    series = {"BuPO": [(v, summary["stats"][f"BuPO {key}={v}"]) for v in values]}
    if "GRPO" in summary["stats"]:
        series["GRPO"] = [(v, summary["stats"]["GRPO"]) for v in values]
    plot_intervals(path, key, series, f"after training, by {key}: mean and 95% interval over seeds")


def report(cfg, start, runs, sweep):
    """results.md / results.json, comparison.png, passk.png, profiles.png, sweep.png in cfg.out; prints the tables.

    sweep: (key, values) of the experiment's --sweep, or (None, [None])."""
    k, n, (key, values) = start["k"], cfg.eval_samples, sweep
    greedy = summarize_runs(start, runs)
    sampled = summarize_runs(start, runs, sampled_key(n)) if n else None
    curves = pass_curves(start, runs, n) if n else {}
    tables = [results_table(greedy, "held-out accuracy (%), greedy"), verdicts(greedy, "greedy")]
    if sampled and sampled["stats"]:
        tables += [results_table(sampled, f"held-out Avg@{n} (%), temperature 1"), verdicts(sampled, f"Avg@{n}")]
    if len(curves) > 1:
        tables.append(passk_table(curves, len(next(iter(runs.values())))))
        plot_panels(os.path.join(cfg.out, "passk.png"),
                    {g: [{"passk": (list(c), list(c.values()))}] for g, c in curves.items()},
                    [("passk", f"unbiased Pass@K (%), n = {n} per question")], xlabel="K", logx=True)
    plot_comparison(os.path.join(cfg.out, "comparison.png"), start, runs, k, cfg.inter_steps)
    if start["profile"]:
        plot_profiles(os.path.join(cfg.out, "profiles.png"), start, runs, k)
    if key:
        plot_sweep(os.path.join(cfg.out, "sweep.png"), key, values, greedy)
    probes = plot_probes(cfg.out, start, runs, k)
    if probes:
        tables.append(probe_table(probes, k))
    tables.append(f"reward: {cfg.reward} (rewards.py); loss aggregation: {cfg.loss_agg}; "
                  f"prompts cut at: {cfg.max_prompt_length or 'no cap'}")
    text = "\n".join(t for t in tables if t)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump({"layer": k, "inter_steps": cfg.inter_steps, "steps": cfg.steps, "sweep": cfg.sweep,
                   "reward": cfg.reward, **greedy, "sampled": sampled, "pass_at_k": curves, "probes": probes,
                   "reward_first_last": {g: {s: [h[0]["reward_mean"], h[-1]["reward_mean"]] for s, h in r.items()}
                                         for g, r in runs.items()},
                   "profile_initial": start["profile"] and start["profile"]["layer"]}, f, indent=1)
    print(f"\nafter {cfg.steps} steps; k={k}, s_inter={cfg.inter_steps}:\n{text}")
    print(f"wrote {cfg.out}/results.md, results.json, comparison.png" + (", passk.png" if len(curves) > 1 else "")
          + (", profiles.png" if start["profile"] else "") + (", sweep.png" if key else "")
          + (", probes.png, probe_layers.png" if probes else ""))
