"""Math answers: extraction, grading, rewards and benchmark accuracy (avg@k, pass@k).

The reward of every GRPO/BuPO step and every number of the results table come from
here (arXiv 2512.19673, Sec. 3: reward 1 if the boxed answer matches, else 0; validation
on MATH500, AMC23, AIME24, AIME25). The grader normalizes LaTeX the way a careful human
grader of MATH-style answers would, then compares numbers exactly (fractions) or with a
relative tolerance, tuples/intervals element-wise, unordered lists as multisets, and
expressions symbolically with sympy under a time limit. It never rewards a different value.

    python evaluate.py --data math500,amc23,aime24,aime25 --limit 8 --k 4
"""
import argparse
import json
import math
import os
import random
import re
import signal
import threading
from fractions import Fraction
from functools import lru_cache

import sympy
from datasets import Dataset
from sympy.parsing.sympy_parser import convert_xor, implicit_multiplication_application, parse_expr, standard_transformations
from tqdm import tqdm

from decompose import load_model
from rollout import chat_prompts, generate

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DATASETS = {"math500": "math500.parquet", "amc23": "amc2023.parquet", "aime24": "aime_2024.parquet",
            "aime25": "aime_2025.parquet", "deepmath": "deepmath-5k.parquet"}
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


# ----------------------------------------------------------------------------- data

def load_problems(name_or_path):
    """Problems [{"messages", "answer", "source", "id"}] of a shipped set or any verl-schema parquet."""
    path = os.path.join(DATA_DIR, DATASETS[name_or_path]) if name_or_path in DATASETS else name_or_path
    if not os.path.exists(path):
        raise FileNotFoundError(f"no data set '{name_or_path}': use one of {', '.join(DATASETS)} or a parquet path")
    ds = Dataset.from_parquet(path)
    for col in ("prompt", "reward_model"):
        if col not in ds.column_names:
            raise ValueError(f"{path} has no '{col}' column (it has {ds.column_names}); "
                             "expected the verl schema: prompt (chat messages), reward_model {ground_truth}")
    source = name_or_path if name_or_path in DATASETS else None
    return [{"messages": [dict(role=m["role"], content=m["content"]) for m in row["prompt"]],
             "answer": str(row["reward_model"]["ground_truth"]),
             "source": source or row.get("data_source") or "data", "id": i} for i, row in enumerate(ds)]


def arithmetic_problems(n, seed=0, low=1, high=20, ops="+", split=None):
    """n two-operand arithmetic questions with exact integer answers, in load_problems' format.

    The default CPU task: easy enough that the 135M default model solves some and can
    improve within minutes. Measured on SmolLM2-135M-Instruct at temperature 1.0: it
    almost never writes \\boxed{} (reward ~0 under the strict rule, no signal to learn
    from) but its last number is right ~15% of the time; so these problems are graded
    with the last-number fallback of math_reward ("last_number": True). split="train" or
    "test" keeps only the operand pairs of that side of a fixed 80/20 split, so a
    held-out set never repeats a training question.
    """
    rng = random.Random(seed)
    problems = []
    while len(problems) < n:
        a, b, op = rng.randint(low, high), rng.randint(low, high), rng.choice(ops)
        if split is not None and ((a * 7 + b) % 5 == 0) != (split == "test"):
            continue
        i = len(problems)
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        user = f"What is {a} {op} {b}? Put the final answer within \\boxed{{}}."
        problems.append({"messages": [{"role": "user", "content": user}], "answer": str(answer),
                         "source": "arithmetic", "id": i, "last_number": True})
    return problems


# ----------------------------------------------------------------------------- extraction

def extract_answer(text):
    """Content of the last \\boxed{...} or \\fbox{...} (nested braces kept), else None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)  # past \boxed / \fbox
    if text[i:i + 1] == " ":  # "\boxed 5": up to the next space or $
        return re.split(r"[\s$]", text[i + 1:].strip() + " ", 1)[0] or None
    if text[i:i + 1] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced: the response was cut off inside the box


# ----------------------------------------------------------------------------- normalization

def _strip_text_units(s):
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{\s*\(?([A-E])\)?\s*\}", r"\1", s)  # \text{(C)} -> C
    s = re.sub(r"(\d)\s*\\(?:text|mbox|mathrm)\{[^{}]*\}\s*(\^\{?\d\}?)?$", r"\1", s)  # 5\text{ cm}^2 -> 5
    return re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)


def normalize(s):
    """A canonical string for MATH-style answers (spacing, \\left, \\dfrac, units, degrees, %, x=)."""
    s = _matrix_to_tuple(str(s).strip())
    s = re.sub(r"\\[,;:! ]|\\q?quad|~", " ", s).replace("\\left", "").replace("\\right", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\displaystyle", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = _strip_text_units(s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\%|%|\\degree", "", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"(\d)\{,\}(\d\d\d)", r"\1\2", s)  # 1{,}000
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 10,000 -> 10000 (a lone number only)
        s = s.replace(",", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)  # \frac9{19}
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = re.sub(r"\\sqrt(\d+|[a-z])", r"\\sqrt{\1}", s)  # \sqrt2
    m = re.fullmatch(r"[a-zA-Z](?:_\w|_\{\w+\})?=(.+)", s)  # x=3 -> 3
    if m and "=" not in m.group(1):
        s = m.group(1)
    if re.fullmatch(r"\(?[A-E]\)?", s):
        s = s.strip("()")
    s = re.sub(r"^[a-zA-Z]\\in", "", s)  # x \in [-2,7]
    s = re.sub(r"_\{(\d+)\}", r"_\1", s)  # 4210_{5} -> 4210_5
    m = re.fullmatch(r"([^,]+)\\pm([^,]+)", s)  # a \pm b -> the list a+b, a-b
    if m:
        s = f"{m.group(1)}+{m.group(2)},{m.group(1)}-{m.group(2)}"
    return s


def _matrix_to_tuple(s):
    """\\begin{pmatrix} a \\\\ b \\end{pmatrix} -> (a,b); rows with & become nested tuples."""
    m = re.fullmatch(r"\\begin\{[pbv]?matrix\}(.*)\\end\{[pbv]?matrix\}", s, re.S)
    if not m:
        return s
    rows = [r.strip() for r in m.group(1).split("\\\\") if r.strip()]
    if any("&" in r for r in rows):
        rows = ["(" + r.replace("&", ",") + ")" for r in rows]
    return "(" + ",".join(rows) + ")" if len(rows) > 1 else rows[0]


# ----------------------------------------------------------------------------- values

_FUNCS = r"sqrt|pi|oo|log|ln|sin|cos|tan|cot|sec|csc|exp|i|e"


def _latex_to_sympy_text(s):
    """Plain-text expression for sympy.parse_expr, or None where the LaTeX is beyond us."""
    s = re.sub(r"(\d)\\frac", r"\1+\\frac", s)  # mixed number 2\frac{1}{2}
    for _ in range(8):  # innermost first: \frac{a}{b}, \sqrt[n]{a}, \sqrt{a}
        t = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        t = re.sub(r"\\sqrt\[([^\[\]{}]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", t)
        t = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", t)
        if t == s:
            break
        s = t
    s = s.replace("\\infty", "oo").replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*")
    s = re.sub(r"\\(ln|log|sin|cos|tan|cot|sec|csc|exp)", r"\1", s).replace("{", "(").replace("}", ")").replace("^", "**")
    if re.search(r"[^0-9a-zA-Z+\-*/().! ]", s) or "\\" in s:
        return None
    if re.search(r"[)a-zA-Z]\d", s):  # "(14/3)1", "x1": no one writes a product so; never parse it as one
        return None
    words = re.sub(rf"\b(?:{_FUNCS})\b|\d", " ", re.sub(rf"({_FUNCS[:-4]})", r" \1 ", s))
    if re.search(r"[a-zA-Z]{3,}", words):  # a word, not a formula: compare as text
        return None
    return s


class _Timeout(Exception):
    pass


def _with_time_limit(fn, seconds):
    """Run fn under a SIGALRM limit in the main thread (elsewhere: without one)."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    def stop(*_):
        raise _Timeout
    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@lru_cache(maxsize=100_000)
def _number(s):
    """Exact value of a plain integer, decimal or fraction string, else None (fast path)."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"(-?)(-?\d+)/(-?\d+)", s)
    if m:
        return None if int(m.group(3)) == 0 else (-1 if m.group(1) else 1) * Fraction(int(m.group(2)), int(m.group(3)))
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)", s):
        return Fraction(s)
    return None


@lru_cache(maxsize=100_000)
def _sympy(s):
    """sympy expression of a normalized answer, or None."""
    text = _latex_to_sympy_text(s)
    if text is None:
        return None
    try:
        return _with_time_limit(lambda: parse_expr(text, transformations=standard_transformations + (
            implicit_multiplication_application, convert_xor), evaluate=True), 1.0)
    except (_Timeout, Exception):
        return None


def _close(a, b, rel=1e-6):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _values_equal(a, b):
    x, y = _number(a), _number(b)
    if x is not None and y is not None:  # exact, but a decimal of >= 6 digits may round a fraction
        rounds = lambda d, f: re.search(r"\.\d{6,}$", d) and ("/" in f or "frac" in f)
        return x == y or bool(rounds(a, b) or rounds(b, a)) and _close(float(x), float(y))
    ea, eb = _sympy(a), _sympy(b)
    if ea is None or eb is None:
        return False

    def check():
        if ea.free_symbols != eb.free_symbols:
            return False
        if not ea.free_symbols:
            va, vb = complex(sympy.N(ea)), complex(sympy.N(eb))
            return _close(va.real, vb.real) and _close(va.imag, vb.imag)
        return sympy.simplify(ea - eb) == 0
    try:
        return bool(_with_time_limit(check, 2.0))
    except (_Timeout, Exception):
        return False


# ----------------------------------------------------------------------------- equivalence

def _split_top(s):
    """Split on commas outside brackets/braces."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{" and 1 or ch in ")]}" and -1 or 0
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _as_tuple(s):
    """(open, close, items) of a bracketed, comma-separated answer, else None."""
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        items = _split_top(s[1:-1])
        if len(items) >= 2:
            return s[0], s[-1], items
    return None


def _equiv(p, g):
    if p == g:
        return True
    tp, tg = _as_tuple(p), _as_tuple(g)
    if tp or tg:  # tuples and intervals: brackets and order matter
        return bool(tp and tg) and tp[:2] == tg[:2] and len(tp[2]) == len(tg[2]) and all(map(_equiv, tp[2], tg[2]))
    lg, lp = _split_top(g), _split_top(p)
    if len(lg) > 1 or len(lp) > 1:  # unordered list of answers: a multiset match
        if len(lg) != len(lp):
            return False
        rest = list(lp)
        for x in lg:
            hit = next((i for i, y in enumerate(rest) if _equiv(y, x)), None)
            if hit is None:
                return False
            rest.pop(hit)
        return True
    if "\\cup" in g or "\\cup" in p:  # unions of intervals, in order
        a, b = p.split("\\cup"), g.split("\\cup")
        return len(a) == len(b) and all(map(_equiv, a, b))
    if "=" in g and "=" in p:  # equations: side by side
        return all(_equiv(a, b) for a, b in zip(p.split("=", 1), g.split("=", 1)))
    return _values_equal(p, g)


def is_equiv(pred, gold):
    """True when pred is the same answer as gold (MATH-style); never true for a different value."""
    if pred is None or gold is None:
        return False
    p, g = normalize(pred), normalize(gold)
    base = re.search(r"_\{?\d+\}?$", g)  # 4343_6: a bare 4343 means the same base
    if base and re.fullmatch(r"\d+", p):
        p += base.group(0)
    return bool(p) and _equiv(p, g)


def final_answer(response, last_number=False):
    """The last boxed answer; with last_number=True, failing a box, the last number in the text."""
    pred = extract_answer(response)
    if pred is None and last_number:
        nums = re.findall(r"-?\d+(?:\.\d+)?", response)
        pred = nums[-1] if nums else None
    return pred


def math_reward(response, gold, last_number=False):
    """1.0 when the final answer of the response equals gold, else 0.0 (paper Sec. 3: the boxed answer)."""
    return float(is_equiv(final_answer(response, last_number), gold))


def problem_reward(response, problem):
    """math_reward with the problem's own answer rule (the arithmetic task allows the last number)."""
    return math_reward(response, problem["answer"], problem.get("last_number", False))


# ----------------------------------------------------------------------------- benchmarks

def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize(records, k):
    """{source: {"avg@k", "pass@k", "n"}} from graded records (one per sample)."""
    by = {}
    for r in records:
        by.setdefault(r["source"], {}).setdefault(r["id"], []).append(r["correct"])
    out = {}
    for src, probs in by.items():
        out[src] = {f"avg@{k}": 100 * sum(sum(v) / len(v) for v in probs.values()) / len(probs),
                    f"pass@{k}": 100 * sum(pass_at_k(len(v), sum(v), k) for v in probs.values()) / len(probs),
                    "n": len(probs)}
    return out


def evaluate(model, tokenizer, problems, k=1, max_new_tokens=1024, temperature=1.0, top_p=1.0,
             batch_size=64, seed=0, done=None, on_record=None, progress=True):
    """Sample k answers per problem with rollout.generate, grade them; returns (summary, records).

    done: records already graded (resume); on_record(record) is called for each new one.
    """
    records = list(done or [])
    have = {(r["source"], r["id"], r["sample"]) for r in records}
    todo = [(p, j) for p in problems for j in range(k) if (p["source"], p["id"], j) not in have]
    bar = tqdm(total=len(todo), desc="evaluate", disable=not progress)
    for b in range(0, len(todo), batch_size):
        chunk = todo[b:b + batch_size]
        out = generate(model, chat_prompts(tokenizer, [p for p, _ in chunk]), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, seed=seed + b)
        for (p, j), toks, n in zip(chunk, out.tokens.tolist(), out.lengths.tolist()):
            text = tokenizer.decode(toks[:n], skip_special_tokens=True)
            pred = final_answer(text, p.get("last_number", False))
            rec = dict(source=p["source"], id=p["id"], sample=j, response=text, pred=pred, gold=p["answer"],
                       correct=is_equiv(pred, p["answer"]), length=n)
            records.append(rec)
            if on_record:
                on_record(rec)
        bar.update(len(chunk))
    bar.close()
    return summarize(records, k), records


def results_table(summary, k, columns):
    """Markdown table in the paper's layout: one column per benchmark plus the average."""
    cols = [c for c in dict.fromkeys(columns) if c in summary]
    head = "| metric | " + " | ".join(cols) + " | avg |\n|---|" + "---|" * (len(cols) + 1) + "\n"
    rows = ""
    for metric in (f"avg@{k}", f"pass@{k}"):
        vals = [summary[c][metric] for c in cols]
        rows += f"| {metric} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {sum(vals) / max(len(vals), 1):.1f} |\n"
    return head + rows


def main():
    p = argparse.ArgumentParser(description="Benchmark accuracy (avg@k, pass@k) of a model on math sets.")
    p.add_argument("--model", default=None, help="HF checkpoint dir or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="math500,amc23,aime24,aime25", help="comma list of sets (math500, amc23, aime24, aime25, deepmath, arithmetic) or parquet paths")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each set")
    p.add_argument("--k", type=int, default=1, help="samples per problem")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="response length limit")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences sampled together")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", default="runs/evaluate", help="output dir: responses.jsonl, summary.json, summary.md (resumes from responses.jsonl)")
    args = p.parse_args()
    names = args.data.split(",")
    problems = [q for name in names for q in (arithmetic_problems(args.limit or 100, seed=10_000) if name == "arithmetic"
                                            else load_problems(name)[:args.limit])]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "responses.jsonl")
    done = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    model, tok = load_model(args.model)
    with open(path, "a") as f:
        summary, _ = evaluate(model, tok, problems, k=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              batch_size=args.batch_size, seed=args.seed, done=done,
                              on_record=lambda r: (f.write(json.dumps(r) + "\n"), f.flush()))
    table = results_table(summary, args.k, [q["source"] for q in problems])
    json.dump({"summary": summary, "settings": vars(args)}, open(os.path.join(args.out, "summary.json"), "w"), indent=1)
    open(os.path.join(args.out, "summary.md"), "w").write(table)
    print(table)


if __name__ == "__main__":
    main()
