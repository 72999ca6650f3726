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

    python entropy.py --data math500 --n 16 --max-new-tokens 256 --compare-norm
"""
import argparse
import csv
import json
import os

import matplotlib
import torch
from tqdm import tqdm

from decompose import capture, check_inputs, load_model, unembed
from evaluate import load_problems
from rollout import chat_prompts, generate

matplotlib.use("Agg")  # figures to files, no display
import matplotlib.pyplot as plt  # noqa: E402

CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MB of float32, below glibc's mmap threshold, so buffers are reused
KEYS = {"attn_in": "attn_in", "attn": "attn_out", "ffn_in": "ffn_in", "ffn": "ffn_out"}


def entropy(logits):
    """Entropy in nats over the last dim, in float32; -inf logits contribute 0 (no NaN)."""
    return entropy_of_logp(logits.float().log_softmax(-1))


def entropy_of_logp(logp):
    """-sum_v p_v log p_v from log-probs (..., V); -inf entries contribute 0."""
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


def _entropy_sum(model, x, final_norm, chunk):
    """Sum over the rows of x (N, D) of the entropy of pi(x), `chunk` rows at a time."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], chunk):
        total += entropy(unembed(model, x[i:i + chunk], final_norm)).sum().double()
    return total


@torch.no_grad()
def entropy_sums(model, input_ids, response_mask, attention_mask=None, final_norm=False):
    """Summed entropies of every internal policy over the response positions, and their count.

    response_mask (B, T) marks response tokens; the policy that produces token t+1 sits at
    position t, so positions t with response_mask[:, t+1] are scored (as verl's entropy).
    Returns ({key: (L or L+1,) float64 sums}, n_tokens); keys as internal_entropy.
    """
    check_inputs(model, input_ids, attention_mask)
    if response_mask.shape != input_ids.shape:
        raise ValueError(f"response_mask shape {tuple(response_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    L, V = model.config.num_hidden_layers, model.config.vocab_size
    pos = torch.zeros_like(response_mask, dtype=torch.bool)
    pos[:, :-1] = response_mask[:, 1:].bool()  # (B, T): positions predicting a response token
    chunk = max(1, CHUNK_ELEMENTS // V)
    sums = {k: torch.zeros(L, dtype=torch.float64) for k in KEYS.values()}
    sums["layer"] = torch.zeros(L + 1, dtype=torch.float64)

    def on(kind, l, x):
        x = x[pos]  # (N, D) response positions only
        if kind == "embed":
            sums["layer"][0] = _entropy_sum(model, x, final_norm, chunk)
        elif kind == "layer":  # h_{l+1}; the last one is the model's output policy, with the final norm
            sums["layer"][l + 1] = _entropy_sum(model, x, final_norm or l == L - 1, chunk)
        else:
            sums[KEYS[kind]][l] = _entropy_sum(model, x, final_norm, chunk)
    with capture(model, on):
        model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return sums, int(pos.sum())


def finish(sums, n_tokens):
    """Means from summed entropies, plus the per-module changes dH_attn and dH_ffn."""
    if n_tokens == 0:
        raise ValueError("the response mask selects no token: nothing to average")
    out = {k: (v / n_tokens).tolist() for k, v in sums.items()}
    out["dH_attn"] = [o - i for o, i in zip(out["attn_out"], out["attn_in"])]
    out["dH_ffn"] = [o - i for o, i in zip(out["ffn_out"], out["ffn_in"])]
    return out


def internal_entropy(model, input_ids, response_mask, final_norm=False, attention_mask=None):
    """Per-layer mean entropies over the response tokens (paper Sec. 2).

    Returns {"layer": L+1 values (h_0..h_L, the last with the final norm: the output
    policy), "attn_in", "attn_out", "ffn_in", "ffn_out", "dH_attn", "dH_ffn": L values}.
    """
    return finish(*entropy_sums(model, input_ids, response_mask, attention_mask, final_norm))


def eic_stages(dh_ffn, rel_tol=0.1):
    """Exploration / Integration / Convergence layer ranges from the FFN entropy changes.

    Rule: a change counts when |dH| > rel_tol * max_l |dH| (smaller ones are treated as 0).
    Exploration = layers 0..e, where e is the first layer at which the cumulative
    significant change peaks (the FFNs have added the most uncertainty). Convergence
    starts at the first layer after e with a significant negative change; Integration is
    what lies between. The suggested BuPO layer is e, the end of exploration (paper Sec.
    3: Qwen3-4B's layer 6), capped at L-2 so that it stays an internal layer.
    Returns {"exploration", "integration", "convergence": [first, last] or None, "suggested_layer"}.
    """
    L = len(dh_ffn)
    tol = rel_tol * max(abs(d) for d in dh_ffn)
    sig = [d if abs(d) > tol else 0.0 for d in dh_ffn]
    cum = torch.tensor(sig).cumsum(0)
    e = int(cum.argmax()) if cum.max() > 0 else -1
    c = next((l for l in range(e + 1, L) if sig[l] < 0), L)
    span = lambda a, b: [a, b] if a <= b else None
    return {"exploration": span(0, e), "integration": span(e + 1, c - 1), "convergence": span(c, L - 1),
            "suggested_layer": min(max(e, 0), L - 2)}


def stage_of(l, stages):
    for name in ("exploration", "integration", "convergence"):
        r = stages[name]
        if r and r[0] <= l <= r[1]:
            return name
    return ""


# ----------------------------------------------------------------------------- reporting

def table(result, stages):
    """Plain-text table, one row per layer (row L: the output policy)."""
    L = len(result["dH_ffn"])
    head = f"{'layer':>5} {'H(h_l)':>8} {'attn_in':>8} {'attn_out':>8} {'dH_attn':>8} {'ffn_in':>8} {'ffn_out':>8} {'dH_ffn':>8}  stage"
    rows = [head]
    for l in range(L + 1):
        cells = [f"{result['layer'][l]:8.3f}"]
        if l < L:
            cells += [f"{result[k][l]:8.3f}" for k in ("attn_in", "attn_out", "dH_attn", "ffn_in", "ffn_out", "dH_ffn")]
        rows.append(f"{l:>5} " + " ".join(cells) + (f"  {stage_of(l, stages)}" if l < L else "  (output)"))
    return "\n".join(rows)


def write_csv(path, result, stages):
    L = len(result["dH_ffn"])
    cols = ["attn_in", "attn_out", "dH_attn", "ffn_in", "ffn_out", "dH_ffn"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "H_layer"] + cols + ["stage"])
        for l in range(L + 1):
            w.writerow([l, result["layer"][l]] + [result[k][l] if l < L else "" for k in cols] + [stage_of(l, stages) if l < L else "output"])


def plot(path, results, title):
    """Paper-style figure: per convention, the layer-policy entropy and dH_attn / dH_ffn per layer."""
    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 7), squeeze=False)
    colors = {"exploration": "tab:green", "integration": "tab:gray", "convergence": "tab:red"}
    for j, (name, (res, stages)) in enumerate(results.items()):
        L = len(res["dH_ffn"])
        top, bottom = axes[0, j], axes[1, j]
        top.plot(range(L + 1), res["layer"], marker="o", ms=3)
        top.set(title=f"{title}\n{name}: entropy of internal layer policy", xlabel="layer l (0 = embedding, L = output)", ylabel="H (nats)")
        x = torch.arange(L)
        bottom.bar(x - 0.2, res["dH_attn"], width=0.4, label="dH attention")
        bottom.bar(x + 0.2, res["dH_ffn"], width=0.4, label="dH FFN")
        for stage, color in colors.items():
            if stages[stage]:
                bottom.axvspan(stages[stage][0] - 0.5, stages[stage][1] + 0.5, color=color, alpha=0.08, label=stage)
        bottom.axhline(0, color="k", lw=0.5)
        bottom.axvline(stages["suggested_layer"], color="k", ls="--", lw=0.8, label=f"suggested k={stages['suggested_layer']}")
        bottom.set(title="entropy change of each module", xlabel="layer (0-indexed)", ylabel="dH (nats)")
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def sample_responses(model, tok, problems, max_new_tokens, temperature, seed, path, settings):
    """Prompt and response token ids per problem, cached in a JSONL file (resumable).

    settings is stored beside the file; resuming with other settings is an error.
    """
    meta = path + ".settings.json"
    if os.path.exists(path) and os.path.exists(meta) and json.load(open(meta)) != settings:
        raise ValueError(f"{path} holds answers sampled with other settings ({json.load(open(meta))}); "
                         "use another --out or delete it")
    json.dump(settings, open(meta, "w"))
    done = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    prompts = chat_prompts(tok, problems)
    with open(path, "a") as f:
        for i in tqdm(range(len(done), len(problems), 8), desc="sample answers", initial=len(done) // 8, total=(len(problems) + 7) // 8):
            batch = prompts[i:i + 8]
            r = generate(model, batch, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for p, toks, n in zip(batch, r.tokens.tolist(), r.lengths.tolist()):
                rec = {"prompt": p, "response": toks[:n]}
                f.write(json.dumps(rec) + "\n")
                done.append(rec)
    return done


def analyse(model, samples, final_norm, batch_size=4):
    """internal_entropy over all samples (token-weighted), right-padded batches, with a progress bar."""
    total, n = None, 0
    for i in tqdm(range(0, len(samples), batch_size), desc=f"entropy ({'logit lens' if final_norm else 'raw residual'})"):
        batch = samples[i:i + batch_size]
        T = max(len(s["prompt"]) + len(s["response"]) for s in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        att, resp = torch.zeros_like(ids), torch.zeros_like(ids)
        for b, s in enumerate(batch):
            p, r = len(s["prompt"]), len(s["response"])
            ids[b, :p + r] = torch.tensor(s["prompt"] + s["response"])
            att[b, :p + r], resp[b, p:p + r] = 1, 1
        sums, count = entropy_sums(model, ids.to(model.device), resp.to(model.device), att.to(model.device), final_norm)
        total = sums if total is None else {k: total[k] + sums[k] for k in sums}
        n += count
    return finish(total, n)


def main():
    p = argparse.ArgumentParser(description="Entropy of internal layer and modular policies (BuPO Sec. 2).")
    p.add_argument("--model", default=None, help="HF checkpoint dir or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="math500", help="problem set (math500, amc23, aime24, aime25, deepmath) or parquet path")
    p.add_argument("--n", type=int, default=16, help="number of problems to answer")
    p.add_argument("--max-new-tokens", type=int, default=256, help="response length limit")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the answers")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--final-norm", action="store_true", help="apply the final norm to every policy (logit lens) instead of the paper's raw residual")
    p.add_argument("--compare-norm", action="store_true", help="compute both conventions and draw them side by side")
    p.add_argument("--out", default="runs/entropy", help="output dir")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model, tok = load_model(args.model)
    problems = load_problems(args.data)[:args.n]
    settings = {k: getattr(args, k) for k in ("model", "data", "max_new_tokens", "temperature", "seed")}
    samples = sample_responses(model, tok, problems, args.max_new_tokens, args.temperature, args.seed,
                               os.path.join(args.out, "responses.jsonl"), settings)[:args.n]
    conventions = [False, True] if args.compare_norm else [args.final_norm]
    results, summary = {}, {"settings": vars(args), "model": model.config._name_or_path, "num_layers": model.config.num_hidden_layers}
    for fn in conventions:
        name = "logit lens (final norm)" if fn else "raw residual (paper)"
        res = analyse(model, samples, fn)
        stages = eic_stages(res["dH_ffn"])
        results[name] = (res, stages)
        tag = "final_norm" if fn else "raw"
        write_csv(os.path.join(args.out, f"entropy_{tag}.csv"), res, stages)
        summary[tag] = {"stages": stages, "entropy": res}
        print(f"\n{name}, {len(samples)} answers:\n{table(res, stages)}\nstages: {stages}")
    json.dump(summary, open(os.path.join(args.out, "summary.json"), "w"), indent=1)
    plot(os.path.join(args.out, "entropy.png"), results, f"{os.path.basename(str(model.config._name_or_path))}, {args.data}, n={len(samples)}")
    print(f"wrote {args.out}/entropy.png, summary.json and the CSVs")


if __name__ == "__main__":
    main()
