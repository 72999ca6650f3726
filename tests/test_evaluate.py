"""evaluate.py: pass@k against the exact formula, the summary, resuming an evaluation, and records never mixed."""
import json
import math

import pytest

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
    recs = [dict(source="s", id=i, correct=c) for i, cs in enumerate([[1, 0, 0, 0], [0, 0, 0, 0]]) for c in cs]
    s = summarize(recs, 2)["s"]
    assert s["avg@2"] == pytest.approx(12.5) and s["pass@2"] == pytest.approx(25.0)


def test_pass_at_k_needs_k_samples():
    with pytest.raises(ValueError, match="at least 4 samples"):
        pass_at_k(1, 0, 4)  # one wrong sample is not "solved at pass@4"
    with pytest.raises(ValueError):
        summarize([dict(source="s", id=0, correct=True)], 2)


def test_evaluate_resumes_where_it_stopped():
    """Records already graded are kept, only the rest is sampled, and the result equals one uninterrupted call."""
    model, tok, problems = tiny_model("llama"), FakeTok(), task_problems("arithmetic", 6, 0, "test")
    full, recs = evaluate.evaluate(model, tok, problems, k=2, max_new_tokens=5, batch_size=4, progress=False)
    calls = []
    real = evaluate.generate
    evaluate.generate = lambda m, prompts, **kw: calls.append(len(prompts)) or real(m, prompts, **kw)
    try:
        again, recs2 = evaluate.evaluate(model, tok, problems, k=2, max_new_tokens=5, batch_size=4, progress=False, done=recs[:7])
    finally:
        evaluate.generate = real
    assert sum(calls) == 12 - 7 and again == full
    key = lambda r: (r["id"], r["sample"])
    assert sorted((key(r), r["response"]) for r in recs2) == sorted((key(r), r["response"]) for r in recs)  # the same samples
    assert len({r["response"] for r in recs}) > 6  # sampled at temperature 1: a different draw would show


def tiny_checkpoint(path, seed=0):
    """A tiny model saved with a real (word-level) tokenizer that has no chat template: a base model on disk."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tiny_model("llama", seed=seed).save_pretrained(path)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")), eos_token="<unk>")
    tok.save_pretrained(path)
    return str(path)


def test_cli_resumes_the_same_evaluation_and_refuses_to_mix_another(tmp_path, monkeypatch):
    """Responses are keyed to what produced them: a rerun with the same settings samples nothing new; another model,
    temperature or k is refused with the fields that differ; --overwrite starts over."""
    a, b = tiny_checkpoint(tmp_path / "a"), tiny_checkpoint(tmp_path / "b", seed=1)
    args = ["--model", a, "--data", "arithmetic", "--limit", "3", "--k", "2", "--max-new-tokens", "3", "--out", str(tmp_path / "ev")]
    evaluate.main(args)
    lines = (tmp_path / "ev" / "responses.jsonl").read_text().splitlines()
    assert len(lines) == 6
    calls = []
    monkeypatch.setattr(evaluate, "generate", lambda *x, **k: calls.append(1))
    evaluate.main(args)  # resumed: everything is there
    assert calls == [] and (tmp_path / "ev" / "responses.jsonl").read_text().splitlines() == lines
    with pytest.raises(InputError, match=r"other settings: model .*temperature \(1.0 there, 0.5 now\)"):
        evaluate.main(args[:1] + [b] + args[2:] + ["--temperature", "0.5"])
    monkeypatch.undo()
    evaluate.main(args[:1] + [b] + args[2:] + ["--overwrite"])
    assert json.load(open(tmp_path / "ev" / "config.json"))["model"] == b


def test_pass_curve_hand_computed():
    """Two problems, n = 4: 2 correct gives pass@1 0.5, pass@2 1 - C(2,2)/C(4,2) = 5/6, pass@4 1; 0 correct gives 0."""
    recs = [dict(source="s", id=0, correct=c) for c in (True, False, True, False)] + [dict(source="s", id=1, correct=False)] * 4
    got = pass_curve(recs, 4)["s"]
    assert got == pytest.approx({"avg@4": 25.0, "pass@1": 25.0, "pass@2": 100 * (5 / 6) / 2, "pass@4": 50.0})
    assert pass_ks(64) == [1, 2, 4, 8, 16, 32, 64] and pass_ks(6) == [1, 2, 4, 6]
