"""The numbers a reader sees: markdown tables, means over seeds with 95% intervals, paired differences, curves.

A comparison of two training methods on a few seeds is read through the paired
difference d_s = a_s - b_s of each seed s (same data, same start): its mean, and the
95% interval mean +- t_{0.975, n-1} * sd / sqrt(n) of Student's t (the paired t-test).
An interval that contains 0 says: no significant difference at this number of seeds.

Imports nothing from the project: evaluate.py, grpo.py and experiment.py report through it.
"""
import math
import statistics

import matplotlib

matplotlib.use("Agg")  # figures to files, no display
import matplotlib.pyplot as plt  # noqa: E402


def markdown_table(header, rows):
    """A markdown table: header is a list of column names, rows a list of lists of cells (str or number)."""
    cell = lambda v: "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, r)) + " |" for r in rows]) + "\n"


def t_cdf(t, df):
    """P(T <= t) for Student's t with integer df, in closed form (Abramowitz & Stegun 26.7.3-4): exact in the tails."""
    th = math.atan(abs(t) / math.sqrt(df))
    c2, term, total = math.cos(th) ** 2, 1.0, 1.0
    for i in range(2 if df % 2 else 1, df - 1, 2):  # the series in cos^2, up to cos^(df-2)
        term *= c2 * i / (i + 1)
        total += term
    a = ((2 / math.pi) * (th + (math.sin(th) * math.cos(th) * total if df > 1 else 0.0)) if df % 2
         else math.sin(th) * total)
    return 0.5 + math.copysign(a / 2, t)


def t_quantile(p, df):
    """The p-quantile of Student's t with integer df (0.5 < p < 1), by bisection on t_cdf: e.g. t_{0.975, 2} = 4.3027,
    t_{0.975, 9} = 2.2622, t_{0.9995, 1} = 636.62 (any statistics table)."""
    if not (0.5 < p < 1 and df >= 1 and df == int(df)):
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and an integer df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, int(df)) < p:
        lo, hi = hi, hi * 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, int(df)) < p else (lo, mid)
    return (lo + hi) / 2


def mean_interval(xs, level=0.95):
    """{"mean", "sd", "lo", "hi", "n"} of xs, with the t interval of the mean (lo = hi = mean for one value)."""
    n, m = len(xs), statistics.fmean(xs)
    if n < 2:
        return {"mean": m, "sd": 0.0, "lo": m, "hi": m, "n": n}
    sd = statistics.stdev(xs)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": m, "sd": sd, "lo": m - half, "hi": m + half, "n": n}


def paired_difference(a, b, level=0.95):
    """mean_interval of a_s - b_s over paired seeds, plus whether the interval excludes 0."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} vs {len(b)}")
    out = mean_interval([x - y for x, y in zip(a, b)], level)
    # a zero-width interval (identical differences) is no evidence at this number of seeds
    out["significant"] = out["n"] > 1 and out["hi"] > out["lo"] and (out["lo"] > 0 or out["hi"] < 0)
    return out


def fmt_interval(s):
    """'12.3 [4.5, 20.1]' of a mean_interval (the mean alone for one value)."""
    return f"{s['mean']:+.1f} [{s['lo']:+.1f}, {s['hi']:+.1f}]" if s["n"] > 1 else f"{s['mean']:+.1f}"


# ----------------------------------------------------------------------------- curves of training runs (metrics.jsonl)

CURVES = [("reward_mean", "train reward (mean)"), ("eval", "held-out accuracy (%)"),
          ("entropy", "entropy of the output policy (nats)"), ("response_len_mean", "response length")]


def eval_points(hist):
    """(steps, held-out avg accuracy) of a run: before training (step 0), then after each evaluation's step."""
    before = [(0, hist[0]["eval/avg_before"])] if hist and "eval/avg_before" in hist[0] else []
    pts = before + [(m["step"] + 1, m["eval/avg"]) for m in hist if "eval/avg" in m]
    return [p[0] for p in pts], [p[1] for p in pts]


def run_series(hist, keys):
    """{key: (steps, values)} of a run's logged metrics; "eval" is the held-out accuracy (eval_points)."""
    out = {}
    for k in keys:
        pts = [(m["step"], m[k]) for m in hist if m.get(k) is not None]
        out[k] = eval_points(hist) if k == "eval" else ([p[0] for p in pts], [p[1] for p in pts])
    return out


def plot_panels(path, groups, panels, title=None, marks=(), xlabel="step", logx=False):
    """One panel per (key, title) of `panels`; per group, the mean over its runs as a line, their min-max as a band.

    groups: {name: [run_series(...) of each run]} (the runs of a group share their steps);
    marks: x positions of dotted vertical lines (e.g. BuPO's switch step); logx: a log2 x axis (Pass@K's K).
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    others = [name for name in groups if name != "initial"]  # a group keeps its colour in every panel and figure
    # tab10 has a grey of its own (C7)
    colors = {name: f"C{i % 10}" for i, name in enumerate(others)} | {"initial": "k"}
    for ax, (key, panel_title) in zip(axes[0], panels):
        for name, runs in groups.items():
            curves = [r[key] for r in runs if r.get(key) and r[key][0]]
            if not curves:
                continue
            n = min(len(c[0]) for c in curves)
            steps = curves[0][0][:n]
            vals = [[c[1][i] for c in curves] for i in range(n)]
            line, = ax.plot(steps, [statistics.fmean(v) for v in vals], marker="o" if n < 12 else None, ms=3,
                            color=colors[name], label=f"{name} (n={len(curves)})" if len(curves) > 1 else name)
            if len(curves) > 1:
                ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(),
                                alpha=0.15)
        for x in marks:
            ax.axvline(x, color="k", ls=":", lw=0.8)
        ax.set(title=panel_title, xlabel=xlabel)
        if logx:
            ax.set_xscale("log", base=2)
        if ax.lines:
            ax.legend(fontsize=7)
        else:  # nothing logged for this panel (e.g. no evaluation): say so, not an empty legend
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_intervals(path, xlabel, series, title):
    """Means with their 95% intervals as error bars: series = {name: [(x, mean_interval(...)), ...]}."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs0 = [x for x, _ in next(iter(series.values()))]
    shift = 0.02 * ((max(xs0) - min(xs0)) or 1)
    for j, (name, pts) in enumerate(series.items()):
        xs = [x + shift * (j - (len(series) - 1) / 2) for x, _ in pts]  # side by side at each x
        means = [s["mean"] for _, s in pts]
        err = [[s["mean"] - s["lo"] for _, s in pts], [s["hi"] - s["mean"] for _, s in pts]]
        ax.errorbar(xs, means, yerr=err, marker="o", capsize=4, label=f"{name} (n={pts[0][1]['n']})")
    ax.set(xlabel=xlabel, ylabel="held-out accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(xs0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
