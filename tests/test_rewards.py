"""rewards.py: verl's math scorer (the authors' reward) on known strings, and Table 9's option-letter and
exact-match graders."""
import pytest

from config import GRPOConfig, resume_safe
from rewards import choice_letter, exact_text, problem_reward, strip_string, verl_math_score


@pytest.mark.parametrize("response,gold,score", [
    ("so \\boxed{\\frac{1}{2}}", "\\frac12", 1.0),          # \frac12 -> \frac{1}{2}
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),        # dfrac -> frac
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),                  # Hendrycks' one decimal rule: "0.5" -> \frac{1}{2}
    ("\\boxed{0.50}", "\\frac{1}{2}", 0.0),                 # ... and only that string: no arithmetic
    ("\\boxed{2/4}", "\\frac{1}{2}", 0.0),                  # 2/4 -> \frac{2}{4}, not reduced
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),                    # units after "\text{ " are dropped
    ("\\boxed{5\\text{cm}}", "5", 0.0),                      # ... only with the space
    ("\\boxed{90^\\circ}", "90", 1.0), ("\\boxed{50\\%}", "50", 1.0), ("\\boxed{\\$5}", "5", 1.0),
    ("\\boxed{x = 3}", "3", 1.0),                            # a short left-hand side is dropped
    ("\\boxed{ 1 , 2 }", "1,2", 1.0),                        # spaces removed
    ("\\boxed{5.}", "5", 0.0),                               # a trailing period is not stripped
    ("\\boxed{\\left( 1,2 \\right)}", "(1,2)", 1.0),
    ("\\boxed{\\sqrt2}", "\\sqrt{2}", 1.0),
    ("\\boxed{.5}", "0.5", 1.0),
    ("\\boxed{1} then \\boxed{2}", "2", 1.0), ("\\boxed{1} then \\boxed{2}", "1", 0.0),  # the last box
    ("the answer is 5", "5", 0.0),                          # no box, no reward
    ("\\boxed{5", "5", 0.0),                                 # unclosed
    ("\\fbox{5}", "5", 0.0),                                 # verl's unboxing knows \boxed only
    ("\\boxed{10}", "10.0", 0.0),                            # strings, not numbers
    ("\\boxed{\\frac}", "1", 0.0), (None, "1", 0.0), (b"\\boxed{3}", "3", 1.0),
    ("\\boxed{\\pi/2}", "\\pi/2", 1.0), ("\\boxed{\\pi / 2}", "\\pi/2", 0.0),  # not integers: raw strings compared
    # verl: the last '\\boxed ' wins, up to a '$'
    ("so \\boxed 5$.", "5", 1.0), ("\\boxed 3 then \\boxed{5}", "5", 0.0),
    ("\\boxed{+3/4}", "\\frac{3}{4}", 0.0),
    ("\\boxed{1 \\text{ m} + 2 \\text{ m}}", "1 \\text{ m} + 2 \\text{ m}", 1.0),
])
def test_verl_math_score_on_known_strings(response, gold, score):
    assert verl_math_score(response, gold) == score


def test_strip_string_steps():
    assert strip_string("\\frac1{72}") == "\\frac{1}{72}" and strip_string("\\tfrac{3}{4}") == "\\frac{3}{4}"
    assert strip_string("k = \\dfrac{1}{2}") == "\\frac{1}{2}" and strip_string("\\{1,\\!000\\}") == "\\{1,000\\}"
    with pytest.raises(ValueError):
        strip_string("1 \\text{ m} + 2 \\text{ m}")  # verl's assert: two unit texts; is_equiv then compares raw strings


def test_the_reward_follows_the_problem_grader():
    """grade.py (symbolic) and verl's (strings) differ where they should: 2/4 = 1/2 only for grade.py."""
    p = {"answer": "\\frac{1}{2}"}
    assert problem_reward("\\boxed{2/4}", p) == 1.0 and problem_reward("\\boxed{2/4}", p | {"grader": "verl"}) == 0.0
    assert problem_reward("\\boxed{0.5}", p | {"grader": "verl"}) == 1.0


@pytest.mark.parametrize("response,letter", [
    ("(B)", "B"), ("B)", "B"), ("B", "B"), ("The answer is B.", "B"), ("the answer is (C)", "C"), ("Answer: D", "D"),
    ("\\boxed{B}", "B"), ("so \\boxed{\\text{(E)}}", "E"), ("A) is wrong, (C) too; the answer is (B)", "B"),
    ("The options are (A) 3, (B) 4, (C) 5, (D) 6. I am not sure.", None),  # a list of options chooses none
    ("Answer: I cannot decide", None), ("I pick (C) since it is largest", "C"),  # the pronoun I is no option
    ("I think it is 42", None), ("", None), (None, None), ("The answer is a number", None), ("ANSWER IS C", "C"),
])
def test_choice_letter(response, letter):
    assert choice_letter(response) == letter


def test_multiple_choice_and_exact_match_rewards():
    mc = {"answer": "(B)", "grader": "choice"}
    assert problem_reward("After thought, the answer is B.", mc) == 1.0 and problem_reward("\\boxed{C}", mc) == 0.0
    assert problem_reward("no letter", mc) == 0.0
    bbh = {"answer": "True", "grader": "exact"}
    assert exact_text("Let's think. So the answer is True.") == "true"
    assert (problem_reward("So the answer is True.", bbh) == 1.0
            and problem_reward("So the answer is False.", bbh) == 0.0)
    assert problem_reward("\\boxed{(A)}", {"answer": "(A)", "grader": "exact"}) == 1.0
    assert problem_reward("", {"answer": "", "grader": "exact"}) == 0.0


def test_config_refuses_a_micro_batch_change_on_resume_under_the_authors_loss():
    """micro-token-mean weights each micro-batch's mean by its rows: its split is part of the objective."""
    assert "micro_batch" in resume_safe(GRPOConfig()) and "micro_tokens" in resume_safe(GRPOConfig())
    fork = GRPOConfig(loss_agg="micro-token-mean")
    assert ("micro_batch" not in resume_safe(fork) and "micro_tokens" not in resume_safe(fork)
            and "steps" in resume_safe(fork))
