"""Problems and prompts: the shipped math sets, the arithmetic task of the CPU runs, and how a problem becomes tokens.

BuPO (arXiv 2512.19673, Sec. 3) trains on DeepMath-5k and validates on MATH500, AMC23,
AIME24 and AIME25, with the system prompt "Please reason step by step, and put your final
answer within \\boxed{}." and the problem as the user turn. Those five sets ship in data/
in verl's parquet schema. The arithmetic task is this project's own: a 135M model solves
too few competition problems to learn from (README, grpo.py).

A problem is a dict {"messages", "answer", "source", "id"} (+ "last_number" for the
arithmetic task, whose answers may be unboxed). Reads parquet with pyarrow alone, so the
GPU benchmark machines, which lack `datasets`, can load the arithmetic task too.
"""
import os
import random

import pyarrow
import pyarrow.parquet as pq

from cli import InputError

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DATASETS = {"math500": "math500.parquet", "amc23": "amc2023.parquet", "aime24": "aime_2024.parquet",
            "aime25": "aime_2025.parquet", "deepmath": "deepmath-5k.parquet"}
TASKS = ("arithmetic",) + tuple(DATASETS)


def load_problems(name_or_path):
    """Problems of a shipped set (see DATASETS) or of any parquet file in verl's schema."""
    path = os.path.join(DATA_DIR, DATASETS[name_or_path]) if name_or_path in DATASETS else name_or_path
    if not os.path.isfile(path):
        raise InputError(f"no data set '{name_or_path}': use one of {', '.join(TASKS)} or the path of a parquet file")
    try:
        rows = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise InputError(f"{path} is not a readable parquet file ({e}); pass a parquet file in verl's schema") from e
    if not rows:
        raise InputError(f"{path} holds no rows: nothing to train or evaluate on")
    for col in ("prompt", "reward_model"):
        if col not in rows[0]:
            raise InputError(f"{path} has no '{col}' column (it has {', '.join(rows[0])}); expected verl's schema: "
                             "prompt (chat messages), reward_model {ground_truth}")
    source = name_or_path if name_or_path in DATASETS else None
    return [{"messages": [{"role": m["role"], "content": m["content"]} for m in row["prompt"]],
             "answer": str((row["reward_model"] or {}).get("ground_truth") or ""),
             "source": source or row.get("data_source") or "data", "id": i} for i, row in enumerate(rows)]


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
             "answer": str(a + b), "source": "arithmetic", "id": i, "last_number": True}
            for i, (a, b) in enumerate(pairs[:n or None])]


def task_problems(name, n, seed, split):
    """The problems of a task: n of the arithmetic split (train: shuffled by seed; test: one fixed order
    for every seed), or of a data set (train: shuffled by seed; test: its first n); n=0: all.

    Training problems without a gold answer are dropped (with a note): their reward is 0 whatever the model writes.
    """
    if name == "arithmetic":
        return arithmetic_problems(n, split, seed=seed if split == "train" else 0)
    problems = load_problems(name)
    if split == "train":
        random.Random(seed).shuffle(problems)
        empty = sum(not p["answer"].strip() for p in problems)
        if empty == len(problems):
            raise InputError(f"every gold answer of '{name}' is empty: the reward would be 0 forever; check reward_model.ground_truth")
        if empty:
            print(f"note: {empty} of {len(problems)} problems of '{name}' have no gold answer and are left out")
            problems = [p for p in problems if p["answer"].strip()]
    return problems[:n or None]


def plain_prompt(messages):
    """The prompt of a base model (its tokenizer has no chat template): system text, then "Question: ...", "Answer:"."""
    parts = [m["content"] if m["role"] == "system" else f"Question: {m['content']}" for m in messages]
    return "\n\n".join(parts) + "\nAnswer:"


def prompt_ids(tokenizer, problems):
    """Token ids of each problem's prompt: its chat messages plus the assistant turn's start
    (the paper's format), or plain_prompt for a base model; with the tokenizer's special tokens (BOS)."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template(list(p["messages"]), add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"] for p in problems]
    return [tokenizer(plain_prompt(p["messages"]))["input_ids"] for p in problems]
