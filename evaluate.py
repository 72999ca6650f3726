"""Benchmark accuracy: avg@k and pass@k of a model on MATH500, AMC23, AIME24, AIME25 or the arithmetic task.

The validation of BuPO (arXiv 2512.19673, Sec. 3, Table 1) reports Avg@K on MATH500, AMC23,
AIME24 and AIME25: pass@1 averaged over K samples per problem at temperature 1.0, K = 32 on
AIME24/25 and 16 on AMC23 and MATH500 (--k aime24=32,aime25=32,amc23=16,math500=16: a K per
set); its Pass@K curve (Sec. 6, Fig. 6) is the unbiased estimator of Chen et al. (2021)
from n = 300 samples (--k 300). Answers are sampled with rollout.generate and graded by the
problem's grader (rewards.py: grade.py's, or verl's with --reward verl; option letters
and exact match for Table 9's sets). The CLI keeps every response with its answer and
grade, resumes an interrupted evaluation, and refuses to mix responses of other settings into it.

    python evaluate.py --data math500,amc23,aime24,aime25 --limit 8 --k 4
    python evaluate.py --data arithmetic --limit 100 --k 4 --max-new-tokens 64
    python evaluate.py --model CKPT --k aime24=32,aime25=32,amc23=16,math500=16 --reward verl \
        --max-new-tokens 8192   # Table 1
"""
import argparse
import json
import math
import os

import torch
from tqdm import tqdm

from cli import InputError, check, check_seed, claim_run_dir, read_jsonl, run_main, write_jsonl
from models import EMBEDDED, load_model, model_config, weights_id
from rewards import REWARDS, final_answer, problem_reward
from problems import TASKS, prompt_ids, task_problems, with_reward
from stats import markdown_table
from decode import kept_apart
from rollout import configure, generate

WINDOW = 8  # batches of rows in a window: one generate call, sampled (and resumed) whole

# ----------------------------------------------------------------------------- benchmarks

def pass_at_k(n, c, k):
    """Unbiased pass@k from n >= k samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least {k} samples of a problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def by_problem(records):
    """{source: {(set, id): [correct of each sample]}}: a problem is named by its set (file) and row, so two
    files with the same data_source are one column of different problems."""
    by = {}
    for r in records:
        by.setdefault(r["source"], {}).setdefault((r["set"], r["id"]), []).append(r["correct"])
    return by


def summarize(records, k=None):
    """{source: {"avg@K", "pass@K", "n"}} from graded records (one per sample, K per problem); k=None: each source's
    own K, its problems' number of samples (a K per set, as the paper's Avg@32 on AIME and Avg@16 on MATH500)."""
    by = by_problem(records)
    out = {}
    for src, probs in by.items():
        K = k or len(next(iter(probs.values())))
        out[src] = {f"avg@{K}": 100 * sum(sum(v) / len(v) for v in probs.values()) / len(probs),
                    f"pass@{K}": 100 * sum(pass_at_k(len(v), sum(v), K) for v in probs.values()) / len(probs),
                    "n": len(probs)}
    return out


def pass_ks(n):
    """K = 1, 2, 4, ... up to n, and n: the points of a Pass@K curve from n samples per problem."""
    ks = [2 ** i for i in range(n.bit_length()) if 2 ** i <= n]
    return ks + ([n] if ks[-1] != n else [])


def pass_curve(records, n=None):
    """{source: {"avg@n", "pass@K" for K in pass_ks(n)}} from n graded samples per problem (percent):
    the paper's Avg@K (Table 1: pass@1 averaged over the n samples) and its Pass@K curve (Fig. 6).
    n=None: each source's own number of samples (a K per set)."""
    by = by_problem(records)
    out = {}
    for src, probs in by.items():
        m = len(next(iter(probs.values()))) if n is None else n
        out[src] = {f"avg@{m}": 100 * sum(sum(v) / len(v) for v in probs.values()) / len(probs)}
        out[src] |= {f"pass@{k}": 100 * sum(pass_at_k(len(v), sum(v), k) for v in probs.values()) / len(probs)
                     for k in pass_ks(m)}
    return out


def parse_k(text):
    """--k: "16" (every set) or "aime24=32,aime25=32,amc23=16,math500=16" (a K per set; other sets 1):
    an int or a dict."""
    try:
        k = (int(text) if "=" not in text
             else {name.strip(): int(v) for name, v in (kv.split("=") for kv in text.split(","))})
    except ValueError:
        raise InputError(f"--k must be a count (16) or a K per set (aime24=32,math500=16), got '{text}'") from None
    if min([k] if isinstance(k, int) else k.values()) < 1:
        raise InputError(f"--k must be >= 1 for every set, got '{text}'")
    return k


def evaluate(model, tokenizer, problems, k=1, max_new_tokens=1024, temperature=1.0, top_p=1.0,
             batch_size=64, seed=0, done=None, on_record=None, progress=True, dtype=None, max_prompt_length=0,
             window=WINDOW):
    """Sample k answers per problem with rollout.generate, grade them; returns (summary, records).

    k: an int, or {set name: K} (a K per set, 1 for a set it does not name). Each answer is
    graded by its problem's grader (rewards.problem_reward). max_prompt_length: keep a longer
    prompt's last tokens (problems.prompt_ids, verl's left truncation).

    batch_size: rows decoded at once, as the training rollouts' --rollout-batch (generate's
    max_batch: a row that ends takes the next waiting one, continuous batching). The rows
    are taken in windows of window x batch_size (default 8 batches), each window one
    generate call; its Decoders are kept for the next window (decode.kept_apart) and
    dropped at the end, the training rollout's left as they were.

    done: records already graded (resume; the same settings are the caller's duty, see
    main); on_record(record) is called for each new one. Sample j of problem i is row
    i*k+j of one batch sampled with `seed` (rollout.generate's batch_index): its random
    draws depend neither on batch_size nor on what was done before. Its logits may: a
    batch of another shape or other rows sums in another order (BLAS blocking), and a
    rounding step can flip a draw. So the windows are rows [w, w + window x batch_size)
    whatever is done, a window with any row to do is sampled whole (its new rows kept),
    and a resumed evaluation samples exactly what an uninterrupted one with the same
    batch_size would (main keys a run on it). dtype: sample with a copy of the weights in
    this dtype (rollout.generate's), e.g. bf16 as the training rollouts do.
    """
    records = list(done or [])
    have = {(r["set"], r["id"], r["sample"]) for r in records}
    rows = [(p, j) for p in problems for j in range(k if isinstance(k, int) else k.get(p["set"], 1))]
    todo = {i for i, (p, j) in enumerate(rows) if (p["set"], p["id"], j) not in have}
    size = window * batch_size
    windows = [list(range(b, min(b + size, len(rows)))) for b in range(0, len(rows), size)]
    windows = [w for w in windows if todo.intersection(w)]  # the uninterrupted run's windows, whole: their numerics too
    bar = tqdm(total=sum(map(len, windows)), desc="evaluate", unit="row", disable=not progress)  # rows sampled
    with kept_apart():
        for chunk in windows:
            out = generate(model, prompt_ids(tokenizer, [rows[i][0] for i in chunk], max_prompt_length),
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seed=seed,
                           batch_index=chunk, batch_rows=len(rows), max_batch=batch_size, dtype=dtype,
                           on_done=bar.update)
            for i, toks, n in zip(chunk, out.tokens.tolist(), out.lengths.tolist()):
                if i in todo:
                    records.append(graded(*rows[i], tokenizer.decode(toks[:n], skip_special_tokens=True), n))
                    if on_record:
                        on_record(records[-1])
    bar.close()
    return summarize(records, k if isinstance(k, int) else None), records


def graded(p, j, text, n):
    """The record of sample j of problem p: its response text (n tokens), answer and grade (the problem's grader)."""
    return dict(source=p["source"], set=p["set"], id=p["id"], sample=j, response=text, pred=final_answer(text, p),
                gold=p["answer"], correct=bool(problem_reward(text, p)), length=n, grader=p.get("grader", "math"))


def benchmark_table(summary, columns):
    """Markdown table in the paper's layout: one column per benchmark plus the average; Avg@K and Pass@K at each
    benchmark's own K (the row K says which)."""
    cols = [c for c in dict.fromkeys(columns) if c in summary]
    rows = [["K"] + [int(next(m for m in summary[c] if m.startswith("avg@"))[4:]) for c in cols] + [""]]
    for metric in ("avg@", "pass@"):
        vals = [next(v for m, v in summary[c].items() if m.startswith(metric)) for c in cols]
        rows.append([metric.replace("@", "@K")] + vals + [sum(vals) / max(len(vals), 1)])
    return markdown_table(["metric"] + cols + ["avg"], rows)


def parse_args(argv=None):
    """The CLI's flags."""
    p = argparse.ArgumentParser(description="Benchmark accuracy (avg@k, pass@k) of a model on math sets.")
    p.add_argument("--model", default=None, help=f"HF checkpoint dir, hub id or short name ({', '.join(EMBEDDED)}; "
                   "default: smollm2)")
    p.add_argument("--data", default="math500,amc23,aime24,aime25", help=f"comma list of sets ({', '.join(TASKS)}) "
                   "or data files (parquet, JSON, JSONL, CSV) or hub ids; "
                   "arithmetic is the held-out half of the CPU task")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each set (default: all)")
    p.add_argument("--k", default="1", help="samples per problem: a count, or a K per set (the paper's Table 1: "
                   "aime24=32,aime25=32,amc23=16,math500=16; its Pass@K curve: 300)")
    p.add_argument("--reward", default="math", choices=REWARDS, help="math: grade.py's symbolic grader; "
                   "verl: the authors' (verl's math.compute_score); Table 9's sets are graded by option letter "
                   "or exact match either way")
    p.add_argument("--max-prompt-length", type=int, default=0, help="keep a longer prompt's last N tokens "
                   "(the authors: 1024; 0 = no cap)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="response length limit")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--batch-size", type=int, default=64, help="rows decoded at once (continuous batching, as "
                   f"--rollout-batch in training); rows are sampled in windows of {WINDOW} x this, the unit a resume "
                   "samples whole. The random draws do not depend on it, but the kernels' rounding does, so a resumed "
                   "evaluation must keep it")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", default="runs/evaluate", help="output dir: responses.jsonl, summary.json, summary.md; "
                   "rerun with the same settings to resume")
    p.add_argument("--overwrite", action="store_true", help="empty --out first (it holds another evaluation)")
    p.add_argument("--compile", action="store_true", help="compile the decode step's forward with torch.compile "
                   "(opt-in; graphs.py)")
    p.add_argument("--attention", default="", help="sdpa or eager (default: sdpa on CUDA, eager on CPU)")
    return p.parse_args(argv)


def check_args(args):
    """The flags' values, before any work; returns --k parsed (an int or {set: K})."""
    k = parse_k(args.k)
    check(isinstance(k, int) or set(k) <= set(args.data.split(",")),
          f"--k must name sets of --data ({args.data}) as set=K, got '{args.k}'")
    check(args.max_prompt_length >= 0, f"--max-prompt-length must be >= 0, got {args.max_prompt_length}")
    check(args.limit is None or args.limit >= 1,
          f"--limit must be >= 1 (leave it out for all problems), got {args.limit}")
    check(args.batch_size >= 1 and args.max_new_tokens >= 1, "--batch-size and --max-new-tokens must be >= 1")
    check_seed(args.seed)
    check(math.isfinite(args.temperature) and args.temperature >= 0 and 0 < args.top_p <= 1,
          "--temperature must be a finite number >= 0 and --top-p in (0, 1]")
    n_ctx = getattr(model_config(args.model), "max_position_embeddings", None)
    check(n_ctx is None or args.max_new_tokens < n_ctx,
          f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt "
          f"in the model's context of {n_ctx}; lower it")
    return k


def main(argv=None):
    args = parse_args(argv)
    configure(args.compile, args.attention)
    k = check_args(args)
    problems = with_reward([q for name in args.data.split(",")
                            for q in task_problems(name, args.limit or 0, 0, "test")], args.reward)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # load_model's default, and its dtype
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite")} | {
        "weights": weights_id(args.model), "device": device, "dtype": "bfloat16" if device == "cuda" else "float32",
        "records": 2, "window": WINDOW}  # a dir of the code before windows (no window) is not mixed with this one
    # same settings: resume; others refused. The model is keyed by its weights alone (DIR, DIR/, a symlink to it, or
    # smollm2 and no --model are one model); the batch size is a setting, as the numerics of a batch depend on its shape
    with claim_run_dir(args.out, settings, resume=True, overwrite=args.overwrite, mutable=("model",)):
        path = os.path.join(args.out, "responses.jsonl")
        done = read_jsonl(path)
        write_jsonl(path, done)  # drop a line cut off by a killed run before appending
        model, tok = load_model(args.model)
        with open(path, "a") as f:
            summary, _ = evaluate(model, tok, problems, k=k, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, max_prompt_length=args.max_prompt_length,
                                  top_p=args.top_p, batch_size=args.batch_size, seed=args.seed, done=done,
                                  on_record=lambda r: (f.write(json.dumps(r) + "\n"), f.flush()))
        table = benchmark_table(summary, [q["source"] for q in problems]) + f"\nreward: {args.reward} (rewards.py)\n"
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({"summary": summary, "settings": settings}, f, indent=1)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(table)
    print(table)


if __name__ == "__main__":
    run_main(main)
