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
    with pytest.raises(InputError, match="t.csv has neither verl's columns .* nor plain problem and answer columns; it has a, b"):
        load_problems(str(tmp_path / "t.csv"))
    (tmp_path / "t.txt").write_text("1+1")
    with pytest.raises(InputError, match="unknown data file type '.txt'"):
        load_problems(str(tmp_path / "t.txt"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="broken.parquet is not a readable parquet file"):
        load_problems(str(tmp_path / "broken.parquet"))
    with pytest.raises(InputError, match="no data set 'nothere.jsonl'"):
        load_problems("nothere.jsonl")
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "1+1?"}], None], "reward_model": [{"ground_truth": "2"}] * 2}),
                   tmp_path / "null.parquet")
    with pytest.raises(InputError, match="null.parquet, row 1: the prompt is empty"):
        load_problems(str(tmp_path / "null.parquet"))
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


def test_plain_columns_in_json_jsonl_csv_and_a_dataset_dir(tmp_path, capsys):
    """problem/answer columns through datasets.load_dataset: the paper's system prompt is added, the file's stem is the
    column, numbers become text without '.0'; gold answers that are None, NaN or blank are left out with a note,
    held-out sets too."""
    import json
    rows = [{"problem": "What is 1 + 1?", "answer": 2}, {"problem": "What is 2 + 2?", "answer": "4"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.csv").write_text("problem,answer\nWhat is 1 + 1?,2\nWhat is 2 + 2?,4\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text((tmp_path / "a.jsonl").read_text())
    for name in ("a.jsonl", "b.json", "c.csv", "d"):
        ps = load_problems(str(tmp_path / name))
        assert [p["answer"] for p in ps] == ["2", "4"] and ps[1]["messages"][-1] == {"role": "user", "content": "What is 2 + 2?"}
        assert ps[0]["messages"][0]["role"] == "system" and "\\boxed{}" in ps[0]["messages"][0]["content"]
        assert ps[0]["source"] == name.split(".")[0] and ps[0]["set"] == str(tmp_path / name)
    (tmp_path / "gaps.jsonl").write_text("".join(json.dumps({"problem": f"q{i}", "answer": a}) + "\n"
                                                 for i, a in enumerate([None, float("nan"), " ", 7])).replace("NaN", "NaN"))
    held_out = task_problems(str(tmp_path / "gaps.jsonl"), 0, 0, "test")
    assert [(p["id"], p["answer"]) for p in held_out] == [(3, "7")]
    assert "3 of 4 problems of" in capsys.readouterr().out
