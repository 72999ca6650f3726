"""problems.py: the shipped sets, the arithmetic task's split, bad data files, prompts for chat and base models."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli import InputError
from conftest import FakeTok
from problems import DATASETS, arithmetic_problems, load_problems, plain_prompt, prompt_ids, task_problems


@pytest.mark.parametrize("name,n", [("math500", 500), ("amc23", 40), ("aime24", 30), ("aime25", 30),
                                    ("deepmath", 5000)])
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
    with pytest.raises(InputError, match="t.csv has neither verl's columns .* nor plain problem and answer columns; "
                                         "it has a, b"):
        load_problems(str(tmp_path / "t.csv"))
    (tmp_path / "t.txt").write_text("1+1")
    with pytest.raises(InputError, match="unknown data file type '.txt'"):
        load_problems(str(tmp_path / "t.txt"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="broken.parquet is not a readable parquet file"):
        load_problems(str(tmp_path / "broken.parquet"))
    with pytest.raises(InputError, match="no data set 'nothere.jsonl'"):
        load_problems("nothere.jsonl")
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "1+1?"}], None],
                             "reward_model": [{"ground_truth": "2"}] * 2}),
                   tmp_path / "null.parquet")
    with pytest.raises(InputError, match="null.parquet, row 1: the prompt is empty"):
        load_problems(str(tmp_path / "null.parquet"))
    pq.write_table(pa.table({"prompt": [], "reward_model": []}), tmp_path / "empty.parquet")
    with pytest.raises(InputError, match="holds no rows"):
        load_problems(str(tmp_path / "empty.parquet"))
    rows = {"prompt": [[{"role": "user", "content": "1+1?"}]] * 2,
            "reward_model": [{"ground_truth": ""}, {"ground_truth": " "}]}
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
    # one held-out set for every seed
    assert task_problems("arithmetic", 8, 3, "test") == task_problems("arithmetic", 8, 5, "test")
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
        assert ([p["answer"] for p in ps] == ["2", "4"]
                and ps[1]["messages"][-1] == {"role": "user", "content": "What is 2 + 2?"})
        assert ps[0]["messages"][0]["role"] == "system" and "\\boxed{}" in ps[0]["messages"][0]["content"]
        assert ps[0]["source"] == name.split(".")[0] and ps[0]["set"] == str(tmp_path / name)
    (tmp_path / "gaps.jsonl").write_text(
        "".join(json.dumps({"problem": f"q{i}", "answer": a}) + "\n"
                for i, a in enumerate([None, float("nan"), " ", 7])).replace("NaN", "NaN"))
    held_out = task_problems(str(tmp_path / "gaps.jsonl"), 0, 0, "test")
    assert [(p["id"], p["answer"]) for p in held_out] == [(3, "7")]
    assert "3 of 4 problems of" in capsys.readouterr().out


# Qwen3's chat template, its tail as shipped with Qwen/Qwen3-4B (tokenizer_config.json): the generation prompt, and
# the empty think block that enable_thinking=False adds (the authors' "qwen3_no_thinking", rl_dataset.py).
QWEN3_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")


def byte_tokenizer(template):
    """A real Hugging Face fast tokenizer, one token per byte, with the given chat template (the hub is unreachable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template)


def test_qwen3_prompts_are_the_no_thinking_template():
    """Issue 30.1: the rendered prompt is the template's own with enable_thinking=False, not its thinking default."""
    tok = byte_tokenizer(QWEN3_TEMPLATE)
    messages = [{"role": "system", "content": "Reason."}, {"role": "user", "content": "What is 2 + 3?"}]
    ids = prompt_ids(tok, [{"messages": messages}])[0]
    ref = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False, tokenize=True,
                                  return_dict=True)["input_ids"]
    thinking = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
    assert list(ids) == list(ref) != list(thinking)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # a template without the flag: no kwarg
    plain = byte_tokenizer(QWEN3_TEMPLATE.replace("enable_thinking", "other_flag"))
    assert prompt_ids(plain, [{"messages": messages}])[0] == thinking


def test_prompts_truncated_on_the_left():
    """Issue 30.4: verl's data.truncation='left' keeps a long prompt's last max_prompt_length tokens."""
    messages = [{"role": "user", "content": "What is 12345678 + 1?"}]
    full = prompt_ids(FakeTok(), [{"messages": messages}])[0]
    assert len(full) == 13 and prompt_ids(FakeTok(), [{"messages": messages}], max_length=5)[0] == full[-5:]
    assert prompt_ids(FakeTok(), [{"messages": messages}], max_length=50)[0] == full


def test_training_data_reshuffled_every_epoch():
    """Issue 30.4: epoch 0 in the given order, each later epoch a seeded permutation of all problems (as verl's
    shuffled dataloader); a step's problems depend on (step, seed) alone, so a resumed run continues the order."""
    from problems import epoch_order, epoch_problems
    probs = list(range(10))
    assert epoch_order(probs, 0, 0) == probs
    e1, e2 = epoch_order(probs, 0, 1), epoch_order(probs, 0, 2)
    assert (sorted(e1) == sorted(e2) == probs and e1 != probs and e1 != e2
            and e1 == epoch_order(probs, 0, 1) != epoch_order(probs, 1, 1))
    seen = [p for step in range(5) for p in epoch_problems(probs, step, 4, range(4), 0)]  # 20 = two epochs
    assert seen[:10] == probs and seen[10:] == e1
    assert epoch_problems(probs, 2, 4, [3, 1], 0) == [seen[11], seen[9]]


def test_grader_of_a_row():
    """Table 9's sets: option letters for MMLU-Pro, GPQA and ARC, exact match for BBH, by answer_type or data_source."""
    from problems import grader_of, with_reward
    assert (grader_of({"data_source": "TIGER-Lab/MMLU-Pro"}, "x.parquet") == "choice"
            == grader_of({}, "gpqa_diamond.jsonl"))
    assert grader_of({"data_source": "bbh"}, "x") == "exact" and grader_of({}, "math500") == "math"
    assert (grader_of({"data_source": "allenai/ai2_arc"}, "x") == "choice"
            and grader_of({"data_source": "research_math"}, "march.jsonl") == "math")
    assert grader_of({"answer_type": "exact", "data_source": "arc"}, "x") == "exact"
    with pytest.raises(InputError, match="answer_type 'code'"):
        grader_of({"answer_type": "code"}, "x")
    assert ([p["grader"] for p in with_reward([{"grader": "math"}, {"grader": "choice"}, {}], "verl")]
            == ["verl", "choice", "verl"])
