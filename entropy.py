"""Entropy of internal policies and the Exploration-Integration-Convergence analysis (BuPO Sec. 2).

Tan et al., arXiv 2512.19673. For every layer l the internal layer policy pi(h_l) and,
for each module, the policy of its input and of its output are unembedded (decompose.py)
and their entropy H = -sum_v pi_v log pi_v is averaged over the response tokens. The
entropy change of a module is dH = H(output) - H(input): > 0 exploration, ~ 0
integration, < 0 convergence. Inputs and outputs follow the authors' hooks: attention
input = input_layernorm(layer input), attention output = what the block adds to the
residual; FFN input = the MLP's input, FFN output = what the FFN block adds. Only the
final layer's policy gets the model's final norm, unless --final-norm (logit lens).

Streams: the entropies are computed inside forward hooks, one chunk of response tokens
at a time, so the extra memory is one (chunk, V) block of logits whatever L and T are.
Several models (--model smollm2,gemma3-270m) are drawn on one figure with depth
normalized to 0..1, the paper's comparison of families.

    python entropy.py --data math500 --n 16 --max-new-tokens 256 --compare-norm
    python entropy.py --model smollm2,gemma3-270m --compare-norm      # two families side by side
"""
import argparse
import csv
import json
import math
import os

import matplotlib
import torch
from tqdm import tqdm

from cli import InputError, check, claim_run_dir, read_json, read_jsonl, run_main
from decompose import capture, check_inputs, entropy, unembed
from models import EMBEDDED, load_model, model_config
from policy import LOGITS_BUDGET, chunk_rows, pad_rows
from problems import TASKS, prompt_ids, task_problems
from rollout import configure, generate

matplotlib.use("Agg")  # figures to files, no display
import matplotlib.pyplot as plt  # noqa: E402

# bytes of float32 logits per chunk: ~4 such blocks exist at once (logits, log-softmax, exp, product)
CHUNK_BUDGET = LOGITS_BUDGET // 8
KEYS = {"attn_in": "attn_in", "attn": "attn_out", "ffn_in": "ffn_in", "ffn": "ffn_out"}
# per layer, in tables and CSVs
COLUMNS = ("attn_in", "attn_out", "dH_attn", "ffn_in", "ffn_out", "dH_ffn", "cos_attn", "cos_ffn")


def _entropy_sum(model, x, final_norm, chunk):
    """Sum over the rows of x (N, D) of the entropy of pi(x), `chunk` rows at a time."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], chunk):
        total += entropy(unembed(model, x[i:i + chunk], final_norm)).sum().double()
    return total


@torch.no_grad()
def entropy_sums(model, input_ids, response_mask, attention_mask=None, final_norm=False):
    """Summed entropies of every internal policy over the response positions, and their count.

    response_mask (B, T) marks response tokens (policy.py's convention); the policy that
    produces token t+1 sits at position t, so positions t with response_mask[:, t+1] are
    scored (as verl's entropy).
    Returns ({key: (L or L+1,) float64 sums}, n_tokens); keys as internal_entropy.
    """
    check_inputs(model, input_ids, attention_mask)
    if response_mask.shape != input_ids.shape:
        raise InputError(f"response_mask shape {tuple(response_mask.shape)} "
                         f"!= input_ids shape {tuple(input_ids.shape)}")
    L, V = model.config.num_hidden_layers, model.config.vocab_size
    pos = torch.zeros_like(response_mask, dtype=torch.bool)
    pos[:, :-1] = response_mask[:, 1:].bool()  # (B, T): positions predicting a response token
    chunk = chunk_rows(V, CHUNK_BUDGET)
    sums = {k: torch.zeros(L, dtype=torch.float64) for k in KEYS.values()}
    sums["layer"] = torch.zeros(L + 1, dtype=torch.float64)
    sums["cos_attn"], sums["cos_ffn"] = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    h = {}  # the residual the next module writes into: h_l, then h_l + A_l

    def on(kind, l, x):
        x = x[pos]  # (N, D) response positions only
        if kind in ("attn", "ffn"):  # Fig. 12: cos(A_l, h_l) and cos(F_l, h_l + A_l), token sums
            sums[f"cos_{kind}"][l] = torch.cosine_similarity(x.double(), h["cur"].double(), dim=-1).sum()
            h["cur"] = h["cur"] + x
        if kind == "embed":
            sums["layer"][0] = _entropy_sum(model, x, final_norm, chunk)
            h["cur"] = x
        elif kind == "layer":  # h_{l+1}; the last one is the model's output policy, with the final norm
            sums["layer"][l + 1] = _entropy_sum(model, x, final_norm or l == L - 1, chunk)
            h["cur"] = x
        else:
            sums[KEYS[kind]][l] = _entropy_sum(model, x, final_norm, chunk)
    with capture(model, on):
        model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return sums, int(pos.sum())


def finish(sums, n_tokens):
    """Means from summed entropies, plus the per-module changes dH_attn and dH_ffn."""
    if n_tokens == 0:
        raise InputError("the response mask selects no token: nothing to average")
    out = {k: (v / n_tokens).tolist() for k, v in sums.items()}
    out["dH_attn"] = [o - i for o, i in zip(out["attn_out"], out["attn_in"])]
    out["dH_ffn"] = [o - i for o, i in zip(out["ffn_out"], out["ffn_in"])]
    return out


def internal_entropy(model, input_ids, response_mask, final_norm=False, attention_mask=None):
    """Per-layer mean entropies over the response tokens (paper Sec. 2).

    Returns {"layer": L+1 values (h_0..h_L, the last with the final norm: the output
    policy), "attn_in", "attn_out", "ffn_in", "ffn_out", "dH_attn", "dH_ffn": L values,
    and the residual cosines of Fig. 12, "cos_attn" = cos(A_l, h_l), "cos_ffn" =
    cos(F_l, h_l + A_l) (token means, L values: ~0 writes new orthogonal features, < 0
    suppresses, > 0 amplifies what the residual holds)}.
    """
    return finish(*entropy_sums(model, input_ids, response_mask, attention_mask, final_norm))


def boundary_layer(dh_ffn, rel_tol=0.1):
    """The paper's layer for BuPO (Sec. 5.3): the LAST layer with dH_FFN > 0 before the FFN dynamics turn to
    integration (~0) or convergence (< 0), i.e. the end of the run of FFNs that raise the entropy from layer 0 on.
    A rise counts when it exceeds rel_tol x the largest rise: a Qwen-like integration stage (changes ~0 beside
    exploring FFNs of ~1 nat) ends the run, while a Llama-like profile of weak rises up to an abrupt collapse at
    the top ([0.3] * 27 + [-0.2] * 3 + [-1, -3]) keeps them all: 26, the authors' k for Llama. (Measured against
    the largest |dH|, as before, the collapse would hide the rises and give no boundary.) None when the first FFN
    does not raise the entropy (no exploration stage): callers say so, never fall back to a silent 0."""
    tol = rel_tol * max([d for d in dh_ffn if d > 0], default=0.0)
    b = -1
    while b + 1 < len(dh_ffn) and dh_ffn[b + 1] > tol:
        b += 1
    return b if b >= 0 else None


def eic_stages(dh_ffn, rel_tol=0.1):
    """Exploration / Integration / Convergence layer ranges from the FFN entropy changes.

    Rule: a change counts when |dH| > rel_tol * max_l |dH| (smaller ones are treated as 0).
    Exploration = layers 0..e: the boundary layer (the paper's rule, boundary_layer) where
    one exists, else the layer at which the cumulative significant change peaks (the FFNs
    have added the most uncertainty; -1 when it never rises). Convergence starts at the
    first layer after e with a significant negative change; Integration is what lies
    between. The suggested BuPO layer is e (paper Sec. 3: Qwen3-4B's layer 6), capped to
    0..L-2 so that it stays an internal layer.
    Returns {"exploration", "integration", "convergence": [first, last] or None, "boundary_layer", "suggested_layer"}.
    """
    L = len(dh_ffn)
    tol = rel_tol * max(abs(d) for d in dh_ffn)
    sig = [d if abs(d) > tol else 0.0 for d in dh_ffn]
    cum = torch.tensor(sig).cumsum(0)
    b = boundary_layer(dh_ffn, rel_tol)
    e = b if b is not None else int(cum.argmax()) if cum.max() > 0 else -1
    c = next((l for l in range(e + 1, L) if sig[l] < 0), L)
    span = lambda a, b: [a, b] if a <= b else None
    return {"exploration": span(0, e), "integration": span(e + 1, c - 1), "convergence": span(c, L - 1),
            "boundary_layer": b, "suggested_layer": min(max(e, 0), L - 2)}


def stage_of(l, stages):
    for name in ("exploration", "integration", "convergence"):
        r = stages[name]
        if r and r[0] <= l <= r[1]:
            return name
    return ""


# ----------------------------------------------------------------------------- reporting

def table(result, stages):
    """Plain-text table, one row per layer (row L: the output policy)."""
    L, cols = len(result["dH_ffn"]), [c for c in COLUMNS if c in result]
    rows = [f"{'layer':>5} {'H(h_l)':>8} " + " ".join(f"{c:>8}" for c in cols) + "  stage"]
    for l in range(L + 1):
        cells = [f"{result['layer'][l]:8.3f}"]
        if l < L:
            cells += [f"{result[k][l]:8.3f}" for k in cols]
        rows.append(f"{l:>5} " + " ".join(cells) + (f"  {stage_of(l, stages)}" if l < L else "  (output)"))
    return "\n".join(rows)


def write_csv(path, result, stages):
    L = len(result["dH_ffn"])
    cols = [c for c in COLUMNS if c in result]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "H_layer"] + cols + ["stage"])
        for l in range(L + 1):
            w.writerow([l, result["layer"][l]] + [result[k][l] if l < L else "" for k in cols]
                       + [stage_of(l, stages) if l < L else "output"])


def plot(path, results, title):
    """Paper-style figure: per convention, the layer-policy entropy and dH_attn / dH_ffn per layer."""
    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 7), squeeze=False)
    colors = {"exploration": "tab:green", "integration": "tab:gray", "convergence": "tab:red"}
    for j, (name, (res, stages)) in enumerate(results.items()):
        L = len(res["dH_ffn"])
        top, bottom = axes[0, j], axes[1, j]
        top.plot(range(L + 1), res["layer"], marker="o", ms=3)
        top.set(title=f"{title}\n{name}: entropy of internal layer policy",
                xlabel="layer l (0 = embedding, L = output)", ylabel="H (nats)")
        x = torch.arange(L)
        bottom.bar(x - 0.2, res["dH_attn"], width=0.4, label="dH attention")
        bottom.bar(x + 0.2, res["dH_ffn"], width=0.4, label="dH FFN")
        for stage, color in colors.items():
            if stages[stage]:
                bottom.axvspan(stages[stage][0] - 0.5, stages[stage][1] + 0.5, color=color, alpha=0.08, label=stage)
        bottom.axhline(0, color="k", lw=0.5)
        bottom.axvline(stages["suggested_layer"], color="k", ls="--", lw=0.8,
                       label=f"suggested k={stages['suggested_layer']}")
        bottom.set(title="entropy change of each module", xlabel="layer (0-indexed)", ylabel="dH (nats)")
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def flow_points(res):
    """Fig. 2's continuous entropy flow: (x, H) through layer input -> attention output -> FFN output -> next layer
    input, x = l, l + 1/3, l + 2/3, l + 1 for layer l (the last point is the output policy)."""
    L = len(res["dH_ffn"])
    xs, hs = [0.0], [res["layer"][0]]
    for l in range(L):
        xs += [l + 1 / 3, l + 2 / 3, l + 1.0]
        hs += [res["attn_out"][l], res["ffn_out"][l], res["layer"][l + 1]]
    return xs, hs


def plot_flow(path, results, title):
    """Fig. 2 and Fig. 12 for one model: the continuous entropy flow, and the residual cosines per layer
    (convention-free)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7))
    for name, (res, _) in results.items():
        top.plot(*flow_points(res), marker=".", ms=3, lw=0.9, label=name)
    top.set(title=f"{title}\ncontinuous entropy flow: layer input -> ATTN output -> FFN output -> next layer",
            xlabel="layer (fractions: inside the layer)", ylabel="H (nats)")
    top.legend(fontsize=8)
    res = next(iter(results.values()))[0]
    x = torch.arange(len(res["cos_attn"]))
    bottom.bar(x - 0.2, res["cos_attn"], width=0.4, label="cos(A_l, h_l)  attention")
    bottom.bar(x + 0.2, res["cos_ffn"], width=0.4, label="cos(F_l, h_l + A_l)  FFN")
    bottom.axhline(0, color="k", lw=0.5)
    bottom.set(title="residual cosine: > 0 amplifies, ~ 0 writes new features, < 0 suppresses",
               xlabel="layer (0-indexed)", ylabel="cosine")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_families(path, families, title):
    """The comparison of families: per convention, layer entropy and dH_ffn of each model with depth
    normalized to 0..1."""
    convs = list(next(iter(families.values())))
    fig, axes = plt.subplots(len(convs), 2, figsize=(12, 4 * len(convs)), squeeze=False)
    for i, conv in enumerate(convs):
        for name, results in families.items():
            res, stages = results[conv]
            L, k = len(res["dH_ffn"]), stages["suggested_layer"]
            axes[i, 0].plot([l / L for l in range(L + 1)], res["layer"], marker="o", ms=3, label=f"{name} ({L} layers)")
            line, = axes[i, 1].plot([(l + 0.5) / L for l in range(L)], res["dH_ffn"], marker="o", ms=3,
                                    label=f"{name}, k={k}")
            axes[i, 1].axvline((k + 0.5) / L, color=line.get_color(), ls="--", lw=0.8)
        axes[i, 0].set(title=f"{conv}: entropy of the internal layer policy",
                       xlabel="depth l / L (0 = embedding, 1 = output)", ylabel="H (nats)")
        axes[i, 1].set(title=f"{conv}: FFN entropy change (dashed: suggested k)", xlabel="depth (layer + 0.5) / L",
                       ylabel="dH (nats)")
        axes[i, 1].axhline(0, color="k", lw=0.5)
        for ax in axes[i]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def sample_responses(model, tok, problems, max_new_tokens, temperature, seed, path, batch=8):
    """Prompt and response token ids per problem, kept in a JSONL file and resumed from it (the run dir keys the
    settings)."""
    done = read_jsonl(path)[:len(problems)]
    prompts = prompt_ids(tok, problems)
    with open(path, "w") as f:  # rewritten: drops a line cut off by a kill
        f.writelines(json.dumps(r) + "\n" for r in done)
        for i in tqdm(range(len(done), len(problems), batch), desc="sample answers", initial=len(done) // batch,
                      total=(len(problems) + batch - 1) // batch):
            r = generate(model, prompts[i:i + batch], max_new_tokens=max_new_tokens, temperature=temperature,
                         seed=seed + i, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for p, toks, n in zip(prompts[i:i + batch], r.tokens.tolist(), r.lengths.tolist()):
                done.append({"prompt": p, "response": toks[:n]})
                f.write(json.dumps(done[-1]) + "\n")
            f.flush()
    return done


def analyse(model, samples, final_norm, batch_size=4):
    """internal_entropy over all samples (token-weighted), right-padded batches, with a progress bar."""
    total, n = None, 0
    for i in tqdm(range(0, len(samples), batch_size),
                  desc=f"entropy ({'logit lens' if final_norm else 'raw residual'})"):
        batch = samples[i:i + batch_size]
        ids, att, resp = pad_rows([s["prompt"] for s in batch], [s["response"] for s in batch], 0, model.device)
        sums, count = entropy_sums(model, ids, resp, att, final_norm)
        total = sums if total is None else {k: total[k] + sums[k] for k in sums}
        n += count
    return finish(total, n)


def analyse_model(name, args, out):
    """Sample answers with one model, analyse them in each convention; writes CSVs, a summary and a figure under out.
    A convention already in out/summary.json is read back, so an interrupted comparison resumes where it stopped."""
    model, tok = load_model(name)
    label = os.path.basename(str(model.config._name_or_path).rstrip("/"))
    problems = task_problems(args.data, args.n, 0, "test")
    samples = sample_responses(model, tok, problems, args.max_new_tokens, args.temperature, args.seed,
                               os.path.join(out, "responses.jsonl"))
    path = os.path.join(out, "summary.json")
    summary = (read_json(path) if os.path.exists(path)
               else {"model": label, "num_layers": model.config.num_hidden_layers})
    results = {}
    for fn in ([False, True] if args.compare_norm else [args.final_norm]):
        conv, tag = ("logit lens (final norm)", "final_norm") if fn else ("raw residual (paper)", "raw")
        if tag not in summary:
            res = analyse(model, samples, fn)
            summary[tag] = {"stages": eic_stages(res["dH_ffn"]), "entropy": res}
            write_csv(os.path.join(out, f"entropy_{tag}.csv"), res, summary[tag]["stages"])
            with open(path + ".tmp", "w") as f:
                json.dump(summary, f, indent=1)
            os.replace(path + ".tmp", path)
        res, stages = summary[tag]["entropy"], summary[tag]["stages"]
        results[conv] = (res, stages)
        print(f"\n{label}, {conv}, {len(samples)} answers:\n{table(res, stages)}\nstages: {stages}")
    plot(os.path.join(out, "entropy.png"), results, f"{label}, {args.data}, n={len(samples)}")
    if all("cos_attn" in res for res, _ in results.values()):  # summaries written before the cosines existed lack them
        plot_flow(os.path.join(out, "flow.png"), results, f"{label}, {args.data}, n={len(samples)}")
    return label, results


def family_dir(name):
    """The sub-dir of one model in a comparison: its short name, or the last part of its path or hub id."""
    return os.path.basename(os.path.normpath(name)) if name else "smollm2"


def main(argv=None):
    p = argparse.ArgumentParser(description="Entropy of internal layer and modular policies (BuPO Sec. 2).")
    p.add_argument("--model", default=None,
                   help=f"HF checkpoint dir, hub id or short name ({', '.join(EMBEDDED)}; default: smollm2); "
                        "a comma list compares the models on one figure")
    p.add_argument("--data", default="math500",
                   help=f"problem set ({', '.join(TASKS)}), a parquet, JSON, JSONL or CSV file or a hub dataset id")
    p.add_argument("--n", type=int, default=16, help="number of problems to answer")
    p.add_argument("--max-new-tokens", type=int, default=256, help="response length limit")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the answers")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--final-norm", action="store_true",
                   help="apply the final norm to every policy (logit lens) instead of the paper's raw residual")
    p.add_argument("--compare-norm", action="store_true", help="compute both conventions and draw them side by side")
    p.add_argument("--out", default="runs/entropy",
                   help="output dir; rerun with the same settings to resume the sampling")
    p.add_argument("--overwrite", action="store_true", help="empty --out first (it holds another analysis)")
    p.add_argument("--compile", action="store_true",
                   help="compile the rollout's decode step with torch.compile (opt-in; graphs.py)")
    p.add_argument("--attention", default="",
                   help="the rollout's attention: sdpa or eager (default: sdpa on CUDA, eager on CPU)")
    args = p.parse_args(argv)
    configure(args.compile, args.attention)
    check(args.n >= 1 and args.max_new_tokens >= 1, "--n and --max-new-tokens must be >= 1")
    check(math.isfinite(args.temperature) and args.temperature >= 0,
          f"--temperature must be a finite number >= 0, got {args.temperature}")
    names = args.model.split(",") if args.model else [None]
    check(len({family_dir(n) for n in names}) == len(names),
          f"--model {args.model}: name each model once (by distinct dir names)")
    for name in names:  # a bad --model fails here, before any work, and so does a response limit beyond its context
        n_ctx = getattr(model_config(name), "max_position_embeddings", None)
        check(n_ctx is None or args.max_new_tokens < n_ctx,
              f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt "
              f"in the context of {name or 'smollm2'} ({n_ctx} tokens); lower it")
    task_problems(args.data, 1, 0, "test")  # and a bad --data
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite")}
    with claim_run_dir(args.out, settings, resume=True, overwrite=args.overwrite):
        families = {}
        for name in names:
            out = args.out if len(names) == 1 else os.path.join(args.out, family_dir(name))
            os.makedirs(out, exist_ok=True)
            label, results = analyse_model(name, args, out)
            families[label] = results
        if len(names) > 1:
            plot_families(os.path.join(args.out, "families.png"), families,
                          f"{args.data}, n={args.n} answers per model")
    print(f"wrote {args.out}: entropy.png, flow.png, summary.json and the CSVs"
          + (", families.png" if len(names) > 1 else ""))


if __name__ == "__main__":
    run_main(main)
