"""evaluate.py: pass@k against the exact formula, the summary, resuming an evaluation, and records never mixed."""
import json
import math

import pytest

import decode
import evaluate
from cli import InputError
from conftest import FakeTok, tiny_model
from evaluate import pass_at_k, summarize, pass_curve, pass_ks
from problems import task_problems


def test_pass_at_k_exact():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    recs = [dict(source="s", set="s", id=i, correct=c) for i, cs in enumerate([[1, 0, 0, 0], [0, 0, 0, 0]]) for c in cs]
    s = summarize(recs, 2)["s"]
    assert s["avg@2"] == pytest.approx(12.5) and s["pass@2"] == pytest.approx(25.0)


def test_pass_at_k_needs_k_samples():
    with pytest.raises(ValueError, match="at least 4 samples"):
        pass_at_k(1, 0, 4)  # one wrong sample is not "solved at pass@4"
    with pytest.raises(ValueError):
        summarize([dict(source="s", set="s", id=0, correct=True)], 2)


def test_evaluate_resumes_where_it_stopped():
    """Records already graded are kept, only the rest is sampled, and the result equals one uninterrupted call."""
    model, tok, problems = tiny_model("llama"), FakeTok(), task_problems("arithmetic", 6, 0, "test")
    full, recs = evaluate.evaluate(model, tok, problems, k=2, max_new_tokens=5, batch_size=4, progress=False, window=1)
    calls = []
    real = evaluate.generate
    evaluate.generate = lambda m, prompts, **kw: calls.append(len(prompts)) or real(m, prompts, **kw)
    try:
        again, recs2 = evaluate.evaluate(model, tok, problems, k=2, max_new_tokens=5, batch_size=4, progress=False,
                                         done=recs[:7], window=1)
    finally:
        evaluate.generate = real
    # the window of rows 4..7 is sampled whole (row 7 kept), then rows 8..11
    assert sum(calls) == 12 - 4 and again == full
    key = lambda r: (r["id"], r["sample"])
    # the same samples
    assert sorted((key(r), r["response"]) for r in recs2) == sorted((key(r), r["response"]) for r in recs)
    assert len({r["response"] for r in recs}) > 6  # sampled at temperature 1: a different draw would show


def test_windows_of_8_batches_decode_batch_size_rows_at_once_and_sample_what_one_batch_samples(monkeypatch):
    """20 rows in batches of 2: windows of 16 rows (8 batches), each one generate call decoding 2 rows at a time
    (continuous batching, as the training rollouts); each row samples what it samples in one batch of all 20 (per-row
    draws), a resume samples only the window with rows left, whole, and the progress bar counts every row sampled."""
    model, tok, problems = tiny_model("llama"), FakeTok(), task_problems("arithmetic", 10, 0, "test")
    one, recs_one = evaluate.evaluate(model, tok, problems, k=2, max_new_tokens=6, batch_size=20, progress=False)
    calls, bars, real = [], [], evaluate.generate

    def spy(model, prompts, **kw):  # each call's rows and max_batch, and the steps of the progress bar
        calls.append((kw["batch_index"], kw["max_batch"]))
        bars.append([])
        return real(model, prompts, **{**kw, "on_done": lambda n: (bars[-1].append(n), kw["on_done"](n))})
    monkeypatch.setattr(evaluate, "generate", spy)
    full, recs = evaluate.evaluate(model, tok, problems, k=2, max_new_tokens=6, batch_size=2, progress=False)
    assert calls == [(list(range(16)), 2), (list(range(16, 20)), 2)]
    assert [sum(b) for b in bars] == [16, 4] and len(bars[0]) > 2  # the bar moves as rows end, not once a window
    assert full == one and [r["response"] for r in recs] == [r["response"] for r in recs_one]
    assert len({r["response"] for r in recs}) > 10  # sampled at temperature 1: a different draw would show
    calls.clear()
    again, recs2 = evaluate.evaluate(model, tok, problems, k=2, max_new_tokens=6, batch_size=2, progress=False,
                                     done=recs[:17])
    # rows 16..19, row 16 sampled, not kept
    assert calls == [(list(range(16, 20)), 2)] and again == full and recs2 == recs


def test_an_evaluation_keeps_its_decoders_apart_and_leaves_none_kept(monkeypatch):
    """With static shapes (CUDA's path, run eagerly here) Decoders are kept across calls. The training rollout's, of the
    same sampling setting as the evaluation, is neither used nor dropped by it (its CUDA graphs stay valid); the
    evaluation's 4 windows share one Decoder of their own, and it is not left kept after."""
    model, tok, problems = tiny_model("llama"), FakeTok(), task_problems("arithmetic", 4, 0, "test")
    decode.release()
    real = evaluate.generate
    real(model, [[5, 6, 7]] * 3, max_new_tokens=4, eos_token_id=2, static=True, sync_every=3)  # the rollout's
    kept, built, make = list(decode._DECODERS.items()), [], decode.Decoder
    monkeypatch.setattr(decode, "Decoder", lambda *a: built.append(a[1:4]) or make(*a))
    monkeypatch.setattr(evaluate, "generate", lambda *a, **kw: real(*a, **{**kw, "static": True, "sync_every": 3}))
    evaluate.evaluate(model, tok, problems, k=2, max_new_tokens=5, batch_size=2, window=1, progress=False)
    assert len(kept) == 1 and list(decode._DECODERS.items()) == kept and built == [(2, 128, 5)]
    decode.release()


def tiny_checkpoint(path, seed=0):
    """A tiny model saved with a real (word-level) tokenizer that has no chat template: a base model on disk."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tiny_model("llama", seed=seed).save_pretrained(path)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
                                  eos_token="<unk>")
    tok.save_pretrained(path)
    return str(path)


def test_cli_resumes_the_same_evaluation_and_refuses_to_mix_another(tmp_path, monkeypatch):
    """Responses are keyed to what produced them: a rerun with the same settings samples nothing new; another model,
    temperature or k is refused with the fields that differ; --overwrite starts over."""
    a, b = tiny_checkpoint(tmp_path / "a"), tiny_checkpoint(tmp_path / "b", seed=1)
    args = ["--model", a, "--data", "arithmetic", "--limit", "3", "--k", "2", "--max-new-tokens", "3",
            "--out", str(tmp_path / "ev")]
    evaluate.main(args)
    lines = (tmp_path / "ev" / "responses.jsonl").read_text().splitlines()
    assert len(lines) == 6
    calls = []
    monkeypatch.setattr(evaluate, "generate", lambda *x, **k: calls.append(1))
    evaluate.main(args)  # resumed: everything is there
    assert calls == [] and (tmp_path / "ev" / "responses.jsonl").read_text().splitlines() == lines
    with pytest.raises(InputError, match=r"other settings: temperature \(1.0 there, 0.5 now\), weights"):
        evaluate.main(args[:1] + [b] + args[2:] + ["--temperature", "0.5"])
    monkeypatch.undo()
    evaluate.main(args[:1] + [b] + args[2:] + ["--overwrite"])
    assert json.load(open(tmp_path / "ev" / "config.json"))["model"] == b


def test_cli_refuses_to_resume_an_evaluation_sampled_in_other_windows(tmp_path):
    """The window (batches of one generate call) is part of what produced the responses: a dir of the code before
    windows (batches sampled one call each: no "window" key) or of another window is refused by name, not mixed."""
    args = ["--model", tiny_checkpoint(tmp_path / "a"), "--data", "arithmetic", "--limit", "3", "--k", "2",
            "--max-new-tokens", "3", "--out", str(tmp_path / "ev")]
    evaluate.main(args)
    config = tmp_path / "ev" / "config.json"
    saved = json.loads(config.read_text())
    assert saved["window"] == evaluate.WINDOW == 8
    del saved["window"]
    config.write_text(json.dumps(saved))
    with pytest.raises(InputError, match=r"other settings: window \(None there, 8 now\)"):
        evaluate.main(args)


def test_pass_curve_hand_computed():
    """Two problems, n = 4: 2 correct gives pass@1 0.5, pass@2 1 - C(2,2)/C(4,2) = 5/6, pass@4 1; 0 correct gives 0."""
    recs = ([dict(source="s", set="s", id=0, correct=c) for c in (True, False, True, False)]
            + [dict(source="s", set="s", id=1, correct=False)] * 4)
    got = pass_curve(recs, 4)["s"]
    assert got == pytest.approx({"avg@4": 25.0, "pass@1": 25.0, "pass@2": 100 * (5 / 6) / 2, "pass@4": 50.0})
    assert pass_ks(64) == [1, 2, 4, 8, 16, 32, 64] and pass_ks(6) == [1, 2, 4, 6]


def test_problems_are_named_by_file_and_row():
    """Row 0 of two files with the same data_source are two problems of one column: pass@2 of one right and one
    wrong problem is 50%, not the 100% of one problem solved once in two samples."""
    recs = [dict(source="math", set=f, id=0, correct=c) for f, c in (("a.parquet", True), ("b.parquet", False))] * 2
    assert summarize(recs, 2)["math"] == {"avg@2": 50.0, "pass@2": 50.0, "n": 2}


def parquet_set(path, answers):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = {"prompt": [[{"role": "user", "content": f"What is {a - 1} + 1?"}] for a in answers],
            "reward_model": [{"ground_truth": str(a)} for a in answers]}
    pq.write_table(pa.table(rows), path)
    return str(path)


def test_cli_two_files_without_data_source_cut_line_and_rewritten_weights(tmp_path, monkeypatch):
    """Two parquet files without data_source are two columns and 2 x 2 problems; a last line cut by a kill is
    dropped before the resume appends (the file stays valid, nothing is lost); a checkpoint dir that now holds
    other weights is another model (refused), and --max-new-tokens beyond the context is refused before --out exists."""
    a, one, two = (tiny_checkpoint(tmp_path / "a"), parquet_set(tmp_path / "one.parquet", [3, 4]),
                   parquet_set(tmp_path / "two.parquet", [5, 6]))
    out = tmp_path / "ev"
    args = ["--model", a, "--data", f"{one},{two}", "--k", "2", "--max-new-tokens", "3", "--out", str(out)]
    evaluate.main(args)
    path = out / "responses.jsonl"
    lines = path.read_text().splitlines()
    assert (len(lines) == 8
            and {(r["set"], r["id"]) for r in map(json.loads, lines)} == {(f, i) for f in (one, two) for i in (0, 1)})
    assert set(json.load(open(out / "summary.json"))["summary"]) == {"one", "two"}
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # killed while writing the last record
    evaluate.main(args)
    evaluate.main(args)  # and again: the file it left is valid
    assert path.read_text().splitlines() == lines
    tiny_model("llama", seed=3).save_pretrained(a)  # the same path, other weights
    with pytest.raises(InputError, match="other settings: .*weights"):
        evaluate.main(args)
    with pytest.raises(InputError, match="--max-new-tokens 256 leaves no room"):
        evaluate.main(args[:-4] + ["--max-new-tokens", "256", "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


def test_a_k_per_set_as_the_paper():
    """Issue 30.3: Avg@32 on AIME and Avg@16 on MATH500 in one evaluation: each set's metrics at its own K."""
    from evaluate import benchmark_table, parse_k, pass_curve
    assert parse_k("16") == 16 and parse_k("aime24=32,math500=16") == {"aime24": 32, "math500": 16}
    for bad in ("x", "aime24=0", "aime24=3.5"):
        with pytest.raises(InputError, match="--k"):
            parse_k(bad)
    recs = [dict(source="aime24", set="aime24", id=0, correct=j < 8) for j in range(32)]
    recs += [dict(source="math500", set="math500", id=i, correct=i == 0 and j < 4) for i in range(2) for j in range(16)]
    s = summarize(recs)
    assert s["aime24"] == {"avg@32": 25.0, "pass@32": 100.0, "n": 1} and s["math500"]["avg@16"] == 12.5
    curve = pass_curve(recs)
    assert max(int(k[5:]) for k in curve["aime24"] if k.startswith("pass@")) == 32 and "pass@32" not in curve["math500"]
    assert curve["math500"]["pass@1"] == 12.5 and curve["math500"]["pass@16"] == 50.0
    table = benchmark_table(s, ["aime24", "math500"])
    assert ("| K | 32 | 16 |  |" in table and "| avg@K | 25.0 | 12.5 | 18.8 |" in table
            and "| pass@K | 100.0 | 50.0 | 75.0 |" in table)


def test_table9_files_are_graded_by_their_answer_type(tmp_path):
    """A multiple-choice file (MMLU-Pro-like, by data_source) and a BBH-like one beside a math set, a K per set: each
    record is graded by its set's rule (rewards.problem_reward), and each set gets its own number of samples."""
    import rewards
    rows = [{"problem": f"Q{i}? (A) 1 (B) 2", "answer": "(B)", "data_source": "TIGER-Lab/MMLU-Pro"} for i in range(2)]
    (tmp_path / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bbh.jsonl").write_text(json.dumps({"problem": "True or False?", "answer": "True"}) + "\n")
    sets = [str(tmp_path / "mmlu.jsonl"), str(tmp_path / "bbh.jsonl"), "arithmetic"]
    problems = [p for name in sets for p in task_problems(name, 2, 0, "test")]
    _, recs = evaluate.evaluate(tiny_model("llama"), FakeTok(), problems, k={sets[0]: 3, "arithmetic": 2},
                                max_new_tokens=4, progress=False)
    count = lambda s: sum(r["set"] == s for r in recs)
    assert (count(sets[0]), count(sets[1]), count("arithmetic")) == (6, 1, 4)
    assert ({r["grader"] for r in recs if r["set"] == sets[0]} == {"choice"}
            and {r["grader"] for r in recs if r["set"] == sets[1]} == {"exact"})
    by_key = {(p["set"], p["id"]): p for p in problems}
    assert all(r["correct"] == bool(rewards.problem_reward(r["response"], by_key[r["set"], r["id"]])) for r in recs)
    assert rewards.problem_reward("the answer is (B)", by_key[sets[0], 0]) == 1.0
