"""Problems and prompts: the shipped math sets, the arithmetic task of the CPU runs, and how a problem becomes tokens.

BuPO (arXiv 2512.19673, Sec. 3) trains on DeepMath-5k and validates on MATH500, AMC23,
AIME24 and AIME25, with the system prompt "Please reason step by step, and put your final
answer within \\boxed{}." and the problem as the user turn. Those five sets ship in data/
in verl's parquet schema. The arithmetic task is this project's own: a 135M model solves
too few competition problems to learn from (README, grpo.py).

A problem is a dict {"messages", "answer", "source", "set", "id"} (+ "last_number" for the
arithmetic task, whose answers may be unboxed); (set, id) names it, source is its column
in the tables (verl's data_source). Other data come through datasets.load_dataset: a hub
id, or a parquet, JSON, JSONL or CSV file in verl's schema or with problem/answer columns.
The shipped sets are read with pyarrow alone, so the GPU machines, which lack `datasets`,
load them too.
"""
import math
import os
import random
import re

import pyarrow
import pyarrow.parquet as pq

from cli import InputError

try:
    import datasets
    datasets.disable_progress_bars()  # a bar per small file split is noise
    datasets.logging.set_verbosity_error()
except ImportError:  # the GPU machines: the shipped sets and parquet files need only pyarrow
    datasets = None

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DATASETS = {"math500": "math500.parquet", "amc23": "amc2023.parquet", "aime24": "aime_2024.parquet",
            "aime25": "aime_2025.parquet", "deepmath": "deepmath-5k.parquet"}
TASKS = ("arithmetic",) + tuple(DATASETS)
FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
NOTED = set()
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def read_rows(name):
    """The rows (dicts) of a data set: a shipped one by name (pyarrow), a local parquet, JSON, JSONL or CSV file or
    dataset dir, or a hub dataset id ("owner/name", or "owner/name:split"; default split train). A parquet file is read
    with pyarrow (as datasets reads it; the GPU machines lack datasets), the rest with datasets.load_dataset, cached as
    datasets caches."""
    if name in DATASETS or (name.lower().endswith(".parquet") and os.path.isfile(name)):
        path = os.path.join(DATA_DIR, DATASETS[name]) if name in DATASETS else name
        try:
            return pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as e:
            raise InputError(f"{path} is not a readable parquet file ({e}); "
                             "pass a parquet file in verl's schema") from e
    ext = os.path.splitext(name)[1].lower()
    local = os.path.exists(name) or ext in FORMATS or os.path.isabs(name) or name.startswith(".")
    if (local and not os.path.exists(name)) or (not local and name.count("/") != 1):
        raise InputError(f"no data set '{name}': use one of {', '.join(TASKS)}, a parquet, JSON, JSONL or CSV file, "
                         "a dataset dir or a hub dataset id (owner/name[:split])")
    if os.path.isfile(name) and ext not in FORMATS:
        raise InputError(f"{name}: unknown data file type '{ext}'; use a parquet, JSON, JSONL or CSV file")
    if datasets is None:
        raise InputError(f"reading {name} needs the datasets package: pip install datasets (or pass a parquet file)")
    repo, _, split = name.rpartition(":") if not local and ":" in name else (name, "", "")
    try:
        ds = (datasets.load_dataset(FORMATS[ext], data_files=name, split="train") if os.path.isfile(name)
              else datasets.load_dataset(repo, split=split or "train"))
    except Exception as e:  # datasets raises many kinds: a bad file, no such id, no network, no such split
        what = f"a readable {FORMATS.get(ext, 'data')} file" if local else "a reachable hub dataset"
        raise InputError(f"{name} is not {what} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    return ds.to_list()


def gold_text(x):
    """The gold answer as text: None, NaN and blanks are '' (no answer), numbers without a spurious '.0'."""
    if x is None or isinstance(x, float) and math.isnan(x):
        return ""
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x).strip()


def row_problem(row, i, name):
    """A problem from a row in verl's schema (prompt messages, reward_model.ground_truth) or with plain problem and
    answer columns (the paper's system prompt is added)."""
    if "prompt" in row and "reward_model" in row:
        messages, gold = row["prompt"], (row["reward_model"] or {}).get("ground_truth")
    elif "problem" in row and "answer" in row:
        messages, gold = row["problem"] and [{"role": "system", "content": SYSTEM},
                                             {"role": "user", "content": row["problem"]}], row["answer"]
    else:
        raise InputError(f"{name} has neither verl's columns (prompt: chat messages, reward_model: {{ground_truth}}) "
                         f"nor plain problem and answer columns; it has {', '.join(row)}")
    if not messages or not all(isinstance(m, dict) and m.get("content") for m in messages):
        raise InputError(f"{name}, row {i}: the prompt is empty or not a list of chat messages; fix or drop that row")
    source = (name if name in DATASETS
              else row.get("data_source") or os.path.splitext(os.path.basename(name.rstrip("/")))[0])
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages], "answer": gold_text(gold),
            "source": source, "set": name, "id": i, "grader": grader_of(row, name)}


def grader_of(row, name):
    """How a row's answer is scored (rewards.py): its "answer_type" column (math, choice or exact) if it has one,
    else by its data_source or file name: MMLU-Pro, GPQA and ARC by option letter, BBH by exact match, the rest as
    math."""
    kind = row.get("answer_type")
    if kind:
        if kind not in ("math", "choice", "exact"):
            raise InputError(f"{name}: answer_type '{kind}' is not one of math, choice, exact")
        return kind
    src = f"{row.get('data_source') or ''} {os.path.basename(name)}".lower()
    named = lambda *words: re.search(rf"(^|[^a-z])({'|'.join(words)})([^a-z]|$)", src)  # a word: "arc" is not "search"
    return "choice" if named("mmlu", "gpqa", "arc") else "exact" if named("bbh") else "math"


def with_reward(problems, reward):
    """The problems with --reward's rule (math: grade.py, verl: the authors' scorer) for the math ones (rewards.py)."""
    return [p | {"grader": reward} if p.get("grader", "math") == "math" else p for p in problems]


def epoch_order(problems, seed, epoch):
    """The training problems in the order of an epoch: epoch 0 as given (task_problems shuffled them by seed), every
    later one a fresh permutation drawn from (seed, epoch), as verl's dataloader reshuffles each epoch; a function of
    its arguments alone, so a resumed run sees the order of an uninterrupted one."""
    if epoch == 0:
        return problems
    return random.Random(seed * 1_000_003 + epoch).sample(problems, len(problems))


def epoch_problems(problems, step, prompts_per_step, positions, seed):
    """The problems at `positions` (0..prompts_per_step-1) of a step's batch: consecutive slices of the epochs'
    orders."""
    out = []
    for i in positions:
        j = step * prompts_per_step + i
        out.append(epoch_order(problems, seed, j // len(problems))[j % len(problems)])
    return out


def load_problems(name):
    """Problems of a data set (read_rows): {"messages", "answer", "source", "set", "id"}; (set, id) names a problem."""
    rows = read_rows(name)
    if not rows:
        raise InputError(f"{name} holds no rows: nothing to train or evaluate on")
    return [row_problem(row, i, name) for i, row in enumerate(rows)]


def arithmetic_problems(n=0, split=None, seed=0, low=1, high=25):
    """Distinct questions "What is a + b?" with a, b in low..high, shuffled by seed; n=0: all of them.

    The CPU task: the default model solves ~30% greedily and ~10% at temperature 1, so
    GRPO groups often differ and there is something to learn within minutes. It rarely
    writes \\boxed{}, so its answers are graded with the last-number fallback
    ("last_number": True). split="train" or "test" keeps one half of a fixed 50/50 split
    of the operand pairs: a held-out question is never a training question.
    """
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)
             if split is None or (random.Random(a * 100_003 + b).random() < 0.5) == (split == "test")]
    random.Random(seed).shuffle(pairs)
    return [{"messages": [{"role": "user", "content": f"What is {a} + {b}? Put the final answer within \\boxed{{}}."}],
             "answer": str(a + b), "source": "arithmetic", "set": "arithmetic", "id": i, "last_number": True}
            for i, (a, b) in enumerate(pairs[:n or None])]


def task_problems(name, n, seed, split):
    """The problems of a task: n of the arithmetic split (train: shuffled by seed; test: one fixed order
    for every seed), or of a data set (train: shuffled by seed; test: its first n); n=0: all.

    Problems without a gold answer are left out (with a note): their reward is 0 whatever the model writes.
    """
    if name == "arithmetic":
        return arithmetic_problems(n, split, seed=seed if split == "train" else 0)
    problems = load_problems(name)
    if split == "train":
        random.Random(seed).shuffle(problems)
    empty = sum(not p["answer"] for p in problems)
    if empty == len(problems):
        raise InputError(f"every gold answer of '{name}' is empty: the reward would be 0 forever; check its answers")
    if empty and name not in NOTED:  # once a process, not at every evaluation
        NOTED.add(name)
        print(f"note: {empty} of {len(problems)} problems of '{name}' have no gold answer and are left out")
    return [p for p in problems if p["answer"]][:n or None]


def plain_prompt(messages):
    """The prompt of a base model (its tokenizer has no chat template): system text, then "Question: ...", "Answer:"."""
    parts = [m["content"] if m["role"] == "system" else f"Question: {m['content']}" for m in messages]
    return "\n\n".join(parts) + "\nAnswer:"


def prompt_ids(tokenizer, problems, max_length=0):
    """Token ids of each problem's prompt: its chat messages plus the assistant turn's start
    (the paper's format), or plain_prompt for a base model; with the tokenizer's special tokens (BOS).

    A template that knows `enable_thinking` (Qwen3's) gets enable_thinking=False, as the authors'
    "qwen3_no_thinking" prompts (rl_dataset.py): Qwen3 answers without a <think> trace. max_length > 0
    keeps a longer prompt's last max_length tokens (verl's data.truncation='left'; the authors cap at 1024)."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        kw = {"enable_thinking": False} if "enable_thinking" in str(template) else {}
        ids = [tokenizer.apply_chat_template(list(p["messages"]), add_generation_prompt=True, tokenize=True,
                                             return_dict=True, **kw)["input_ids"] for p in problems]
    else:
        ids = [tokenizer(plain_prompt(p["messages"]))["input_ids"] for p in problems]
    return [list(x)[-max_length:] for x in ids] if max_length else ids
