"""problems.py: the shipped sets, the arithmetic task's split, bad data files, prompts for chat and base models."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli import InputError
from conftest import FakeTok
from problems import DATASETS, arithmetic_problems, load_problems, plain_prompt, prompt_ids, task_problems


@pytest.mark.parametrize("name,n", [("math500", 500), ("amc23", 40), ("aime24", 30), ("aime25", 30), ("deepmath", 5000)])
def test_load_every_shipped_set(name, n):
    problems = load_problems(name)
    assert len(problems) == n and name in DATASETS
    p = problems[0]
    assert p["messages"][0]["role"] == "system" and "\\boxed{}" in p["messages"][0]["content"]
    assert p["messages"][-1]["role"] == "user" and p["answer"]


def test_bad_data_files(tmp_path):
    with pytest.raises(InputError, match="math500"):
        load_problems("nope")
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "1+1?"}]]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="reward_model"):
        load_problems(str(tmp_path / "bad.parquet"))
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="t.csv is not a readable parquet"):
        load_problems(str(tmp_path / "t.csv"))
    pq.write_table(pa.table({"prompt": [], "reward_model": []}), tmp_path / "empty.parquet")
    with pytest.raises(InputError, match="holds no rows"):
        load_problems(str(tmp_path / "empty.parquet"))
    rows = {"prompt": [[{"role": "user", "content": "1+1?"}]] * 2, "reward_model": [{"ground_truth": ""}, {"ground_truth": " "}]}
    pq.write_table(pa.table(rows), tmp_path / "blank.parquet")
    with pytest.raises(InputError, match="every gold answer"):
        task_problems(str(tmp_path / "blank.parquet"), 0, 0, "train")


def test_arithmetic_task():
    train, test = arithmetic_problems(0, "train"), arithmetic_problems(0, "test")
    q = lambda ps: {p["messages"][0]["content"] for p in ps}
    assert not q(train) & q(test) and len(q(train)) == len(train) and len(q(test)) == len(test)  # disjoint, distinct
    assert len(train) + len(test) == 25 * 25 and len(test) >= 256
    for p in train + test:
        a, b = p["messages"][0]["content"].split("?")[0].split()[-3::2]
        assert int(p["answer"]) == int(a) + int(b) and p["last_number"]
    assert task_problems("arithmetic", 8, 3, "test") == task_problems("arithmetic", 8, 5, "test")  # one held-out set for every seed
    assert task_problems("arithmetic", 8, 3, "train") != task_problems("arithmetic", 8, 5, "train")


def test_prompts_of_chat_and_base_models():
    messages = [{"role": "system", "content": "Reason."}, {"role": "user", "content": "What is 2 + 3?"}]
    assert plain_prompt(messages) == "Reason.\n\nQuestion: What is 2 + 3?\nAnswer:"
    assert prompt_ids(FakeTok(), [{"messages": messages}])[0][:2] == [1, 20 + ord("W") % 50]  # the chat template

    class Base:  # a tokenizer with no chat template
        chat_template = None

        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}
    assert prompt_ids(Base(), [{"messages": messages}]) == [[ord(c) for c in plain_prompt(messages)]]
