"""Grader, extraction, pass@k, loaders and the arithmetic task, against hand-written cases."""
import math

import pytest

from evaluate import (DATASETS, arithmetic_problems, extract_answer, final_answer, is_equiv, load_problems,
                      math_reward, pass_at_k, summarize)

# (gold, prediction, expected): golds are real answers of data/ (MATH500, AMC23, AIME24/25)
EQUIV = [
    # integers (AMC / AIME style)
    ("27", "27", True), ("27", "027", True), ("540", "540.", True), ("540", "540.0", True), ("-1", "-1", True),
    ("-1", "1", False), ("204", "240", False), ("3159", "3,159", True), ("1625", "1625.5", False),
    ("721", "\\boxed{721}", False), ("36", "36\\%", True), ("9", "x = 9", True), ("5", "5^\\circ", True),
    # fractions
    ("\\frac{9}{100}", "0.09", True), ("\\frac{9}{100}", "9/100", True), ("\\frac{9}{100}", "\\dfrac{9}{100}", True),
    ("\\frac{9}{100}", "\\frac{9}{10}", False), ("\\frac{9}{100}", "0.0899", False), ("-\\frac{3}{8}", "\\frac{-3}{8}", True),
    ("-\\frac{3}{8}", "-0.375", True), ("-\\frac{3}{8}", "\\frac{3}{8}", False), ("\\frac9{19}", "\\frac{9}{19}", True),
    ("\\frac14", "0.25", True), ("\\frac14", "\\tfrac{1}{4}", True), ("\\frac14", "1/5", False), ("\\frac{3}{2}", "1.5", True),
    ("\\frac{3}{2}", "1\\frac{1}{2}", True), ("\\frac{3}{2}", "1 \\frac{1}{2}", True), ("\\frac{3}{2}", "\\frac{2}{3}", False),
    ("\\frac{448}{15625}", "\\frac{448}{15625}", True), ("\\frac{448}{15625}", "0.028672", True), ("\\frac{448}{15625}", "0.0287", False),
    ("137 \\frac{1}{2}", "137.5", True), ("137 \\frac{1}{2}", "\\frac{275}{2}", True), ("137 \\frac{1}{2}", "68.5", False),
    ("\\dfrac{17}{50}", "0.34", True), ("\\dfrac{17}{50}", "\\frac{34}{100}", True), (".35625", "0.35625", True),
    ("\\frac{1}{3}", "0.333", False), ("\\frac{1}{3}", "0.3333333333", True), ("\\frac{1}{3}", "0.33", False),
    # decimals, separators, money, degrees, units
    ("4.5", "4.50", True), ("4.5", "9/2", True), ("4.5", "4.05", False), ("0.15", "15\\%", False), ("3.21", "3.2", False),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100", True), ("11,\\! 111,\\! 111,\\! 100", "11,111,111,100", True),
    ("11,\\! 111,\\! 111,\\! 100", "11111111000", False), ("\\$32,\\!348", "32348", True), ("\\$32,\\!348", "\\$32,348", True),
    ("\\$32,\\!348", "32,349", False), ("58,500", "58500", True), ("10,\\!080", "10080", True), ("10,\\!080", "1008", False),
    ("120^\\circ", "120", True), ("120^\\circ", "120^{\\circ}", True), ("120^\\circ", "60^\\circ", False),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", True), ("\\frac{270}7\\text{ degrees}", "38.57", False),
    ("326.5", "326.5 \\text{ cm}", True),
    # radicals, pi, complex
    ("2 \\sqrt{5}", "2\\sqrt{5}", True), ("2 \\sqrt{5}", "\\sqrt{20}", True), ("2 \\sqrt{5}", "2\\sqrt5", True),
    ("2 \\sqrt{5}", "\\sqrt{5}", False), ("2 \\sqrt{5}", "4.472", False), ("11\\sqrt2", "11\\sqrt{2}", True),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True), ("\\frac{\\sqrt{3}}{3}", "\\sqrt{3}/3", True),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{\\sqrt{3}}{2}", False), ("-\\sqrt{3}", "\\sqrt{3}", False), ("\\sqrt{53}", "\\sqrt{53}", True),
    ("11 \\sqrt{5} + 11", "11+11\\sqrt{5}", True), ("11 \\sqrt{5} + 11", "11\\sqrt{5}-11", False),
    ("288 \\pi", "288\\pi", True), ("288 \\pi", "\\pi \\cdot 288", True), ("288 \\pi", "904.78", False), ("18+2\\pi", "2\\pi+18", True),
    ("8 \\pi", "8", False), ("6+9i", "6 + 9i", True), ("6+9i", "9i+6", True), ("6+9i", "6-9i", False), ("1 - 12i", "1-12i", True),
    ("\\sqrt[3]{8}", "2", True),
    # powers, factorials
    ("120", "5!", True), ("64", "2^6", True), ("64", "2^{6}", True), ("64", "4^4", False), ("24", "4!", True),
    # tuples, intervals, unions, vectors
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(\\frac{\\pi}{2}, 3)", False), ("(6,31,-1)", "(6, 31, -1)", True), ("(6,31,-1)", "(6,31,1)", False),
    ("(1,-16,-4,43)", "(1,-16,-4,43)", True), ("(2,\\infty)", "(2, \\infty)", True), ("(2,\\infty)", "[2,\\infty)", False),
    ("(-\\infty, 0]", "(-\\infty,0]", True), ("(-\\infty, 0]", "(-\\infty,0)", False), ("x \\in [-2,7]", "[-2,7]", True),
    ("x \\in [-2,7]", "[-2,7)", False), ("(2,12) \\cup (12,102)", "(2,12)\\cup(12,102)", True),
    ("(2,12) \\cup (12,102)", "(2,102)", False), ("(-1,6)", "(-1, 6)", True), ("(-1,6)", "(6,-1)", False),
    ("\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}", "\\begin{pmatrix}-2\\\\-14\\\\-7\\end{pmatrix}", True),
    ("\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}", "(-2,-14,-7)", True),
    ("\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}", "\\begin{pmatrix}-2\\\\-14\\\\7\\end{pmatrix}", False),
    ("\\begin{pmatrix} 16/49 \\\\ 48/49 \\\\ 24/49 \\end{pmatrix}", "\\begin{pmatrix}\\frac{16}{49}\\\\\\frac{48}{49}\\\\\\frac{24}{49}\\end{pmatrix}", True),
    # unordered lists, plus-minus
    ("3 \\pm 2 \\sqrt{2}", "3+2\\sqrt{2}, 3-2\\sqrt{2}", True), ("3 \\pm 2 \\sqrt{2}", "3-2\\sqrt{2},3+2\\sqrt{2}", True),
    ("3 \\pm 2 \\sqrt{2}", "3+2\\sqrt{2}", False), ("1 \\pm \\sqrt{19}", "1\\pm\\sqrt{19}", True), ("1,2,3", "3, 1, 2", True),
    ("1,2,3", "1,2", False), ("1,2,3", "1,2,4", False),
    # expressions, equations, text, letters, bases
    ("-13x+3", "3-13x", True), ("-13x+3", "-13x-3", False), ("8n^2 + 4n + 1", "1+4n+8n^2", True), ("8n^2 + 4n + 1", "8n^2+4n", False),
    ("x^3+3x-6", "x^{3}+3x-6", True), ("(a+5)(b+2)", "(b+2)(a+5)", True), ("(a+5)(b+2)", "ab+2a+5b+10", True),
    ("(a+5)(b+2)", "(a+2)(b+5)", False), ("2k", "2k", True), ("2k", "k", False), ("x=5", "5", True), ("x=5", "x = 5", True),
    ("x=5", "6", False), ("y = 2x + 3", "2x+3", True), ("y = 2x + 3", "y=3+2x", True), ("y = 2x + 3", "y=2x-3", False),
    ("\\cot x", "\\cot x", True), ("\\cot x", "\\tan x", False), ("\\text{Evelyn}", "Evelyn", True), ("\\text{Evelyn}", "\\text{Bob}", False),
    ("\\text{(C)}", "C", True), ("\\text{(C)}", "(C)", True), ("\\text{(C)}", "\\textbf{(C)}", True), ("\\text{(C)}", "D", False),
    ("4343_6", "4343_6", True), ("4343_6", "4343", True), ("4343_6", "4342_6", False), ("4210_{5}", "4210_5", True),
    ("0.1234567", "0.1234568", False), ("3", "3.0000001", False), ("\\frac{2}{7}", "0.285714", True),
    ("\\infty", "\\infty", True), ("\\infty", "-\\infty", False), ("0", "", False), ("0", "0.0", True),
]


@pytest.mark.parametrize("gold,pred,expected", EQUIV)
def test_is_equiv_table(gold, pred, expected):
    assert is_equiv(pred, gold) is expected


def test_table_is_large_and_balanced():
    assert len(EQUIV) >= 80
    assert sum(e for *_, e in EQUIV) >= 40 and sum(not e for *_, e in EQUIV) >= 40


def test_gold_answers_equal_themselves():
    for name in ("math500", "amc23", "aime24", "aime25"):
        for p in load_problems(name):
            assert is_equiv(p["answer"], p["answer"]), p["answer"]


def test_extract_answer():
    assert extract_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_answer("first \\boxed{1}, then \\boxed{2}.") == "2"
    assert extract_answer("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert extract_answer("\\fbox{7}") == "7"
    assert extract_answer("answer: \\boxed 5$ ok") == "5"
    assert extract_answer("no box here, 42") is None
    assert extract_answer("cut off \\boxed{\\frac{1}{2") is None
    assert extract_answer("\\boxed{a{b{c}}d} and \\boxed{{x}}") == "{x}"


def test_rewards_and_fallback():
    assert math_reward("The answer is \\boxed{19}.", "19") == 1.0
    assert math_reward("The answer is \\boxed{18}.", "19") == 0.0
    assert math_reward("12 + 7 = 19", "19") == 0.0  # the paper's rule: no box, no reward
    assert math_reward("12 + 7 = 19", "19", last_number=True) == 1.0
    assert math_reward("19, no wait, 20", "19", last_number=True) == 0.0
    assert final_answer("\\boxed{3} then 5", last_number=True) == "3"


def test_pass_at_k_exact():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    recs = [dict(source="s", id=i, correct=c) for i, cs in enumerate([[1, 0, 0, 0], [0, 0, 0, 0]]) for c in cs]
    s = summarize(recs, 2)["s"]
    assert s["avg@2"] == pytest.approx(12.5) and s["pass@2"] == pytest.approx(25.0)


@pytest.mark.parametrize("name,n", [("math500", 500), ("amc23", 40), ("aime24", 30), ("aime25", 30), ("deepmath", 5000)])
def test_load_every_shipped_set(name, n):
    problems = load_problems(name)
    assert len(problems) == n and name in DATASETS
    p = problems[0]
    assert p["messages"][0]["role"] == "system" and "\\boxed{}" in p["messages"][0]["content"]
    assert p["messages"][-1]["role"] == "user" and p["answer"]


def test_loader_errors(tmp_path):
    import pandas as pd
    with pytest.raises(FileNotFoundError, match="math500"):
        load_problems("nope")
    pd.DataFrame({"prompt": [[{"role": "user", "content": "1+1?"}]]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="reward_model"):
        load_problems(str(tmp_path / "bad.parquet"))


def test_arithmetic_task():
    a, b = arithmetic_problems(50, seed=3), arithmetic_problems(50, seed=3)
    assert a == b and a != arithmetic_problems(50, seed=4)
    for p in a + arithmetic_problems(50, seed=1, ops="+-*"):
        x, op, y = p["messages"][-1]["content"].split("?")[0].split()[-3:]
        assert int(p["answer"]) == eval(f"{int(x)} {op} {int(y)}")


def test_no_false_positive_on_perturbed_golds():
    """Every real MATH500 gold with a digit or a term appended is a different answer."""
    for p in load_problems("math500"):
        g = p["answer"]
        assert not is_equiv(g + "1", g) and not is_equiv(g + "+1", g) and not is_equiv("2" + g, g), g
