"""The rewards beside grade.py's: the authors' math scorer (verl's) and the graders of the paper's out-of-domain sets.

BuPO's authors (arXiv 2512.19673; their verl fork at d3a85c6) score the math sets shipped
here with verl's `math.compute_score`: the content of the last \\boxed{} of the response,
Hendrycks et al.'s (2021, MATH) `strip_string` normalization applied to it and to the gold
answer, then exact string equality. grade.py is a lenient symbolic grader instead
(`\\frac{2}{4}` = `0.5`); `--reward verl` trains and evaluates with the authors' rule, and
every run's config.json and every evaluation's summary says which one was used.

Table 9's sets that a string can score: multiple choice (MMLU-Pro, GPQA-Diamond, ARC-C:
an option letter, found in "\\boxed{B}", "(B)", "B)", "The answer is B") and exact match
(BBH). HumanEval needs its programs run: no sandboxed runner here, so it is not scored.

A problem names its rule in problem["grader"] (problems.grader_of): math (grade.py), verl,
choice or exact; problem_reward dispatches and, as grade.py, never raises.
"""
import re

import grade

GRADERS = ("math", "verl", "choice", "exact")
REWARDS = ("math", "verl")  # what --reward may choose for the math sets


# ----------------------------------------------------------------------------- verl's math.compute_score

def last_boxed(text):
    r"""'\boxed{...}' (or '\fbox{...}') of the last box, braces balanced from its start; None without one or unclosed.
    As verl's last_boxed_only_string: a response holding '\boxed ' (with a space) anywhere gives '\boxed ' and what
    follows its last one up to a '$', whatever boxes come after it."""
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    start = start if start >= 0 else text.rfind("\\fbox")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(text)):
        depth += (text[i] == "{") - (text[i] == "}")
        if text[i] == "}" and depth == 0:
            return text[start:i + 1]
    return None


def unbox(s):
    r"""The content of '\boxed{x}' or '\boxed x'; anything else (an \fbox) raises, which scores 0 as in verl."""
    if "\\boxed " in s:
        if not s.startswith("\\boxed "):
            raise ValueError(s)
        return s[len("\\boxed "):]
    if not (s.startswith("\\boxed{") and s.endswith("}")):
        raise ValueError(s)
    return s[len("\\boxed{"):-1]


def fix_fracs(s):
    r"""\frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}: single-character arguments get braces."""
    head, *parts = s.split("\\frac")
    out = head
    for part in parts:
        out += "\\frac"
        if part[0] == "{":  # an empty tail raises IndexError: the caller compares the raw strings
            out += part
        elif len(part) < 2:
            return s
        elif part[1] != "{":
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
        else:
            out += "{" + part[0] + "}" + part[1:]
    return out


def fix_a_slash_b(s):
    r"""'3/4' -> '\frac{3}{4}'. One '/' between anything but integers raises ValueError (as Hendrycks' int(), which
    only an AssertionError guard follows), so verl_equiv then compares the raw strings: '\pi / 2' is not '\pi/2'."""
    if s.count("/") != 1:
        return s
    a, b = (int(x) for x in s.split("/"))
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if s == f"{a}/{b}" else s


def fix_sqrt(s):
    r"""\sqrt3 -> \sqrt{3}: a single-character argument gets braces."""
    head, *parts = s.split("\\sqrt")
    return head + "".join("\\sqrt" + (p if p[0] == "{" else "{" + p[0] + "}" + p[1:]) for p in parts)


def strip_string(s):
    """Hendrycks et al.'s MATH normalization, step by step as verl's math.py applies it."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""),
                     ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    if "\\text{ " in s:  # units: "5 \text{ cm}" -> "5 "; two of them raise (verl's assert)
        head, *tails = s.split("\\text{ ")
        if len(tails) != 1:
            raise ValueError(s)
        s = head
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    s = "0" + s if s[0] == "." else s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:  # "k = 5" -> " 5"
        s = s.split("=")[1]
    s = fix_fracs(fix_sqrt(s).replace(" ", ""))
    s = "\\frac{1}{2}" if s == "0.5" else s
    return fix_a_slash_b(s)


def verl_equiv(a, b):
    """verl's is_equiv: the normalized strings are equal (if normalizing raises, the raw strings)."""
    if a is None or b is None:
        return a is None and b is None
    try:
        return strip_string(a) == strip_string(b)
    except (ValueError, IndexError):
        return a == b


def verl_math_score(response, gold):
    """verl's math.compute_score: 1.0 when the last boxed answer of the response equals gold after strip_string, else
    0.0."""
    try:
        box = last_boxed(grade.as_text(response) or "")
        return float(box is not None and verl_equiv(unbox(box), str(gold)))
    except Exception:  # noqa: BLE001 -- as verl's, a reward never ends a run
        return 0.0


# ----------------------------------------------------------------------------- Table 9: choices and exact match

LETTER = r"\(?\s*([A-J])\s*\)?"


def choice_letter(text):
    """The option letter a response chooses: in its last box, after its last "answer is"/"answer:", its last "(B)" or
    "B)", or the whole response when it is one letter. None when it names none."""
    text = grade.as_text(text) or ""
    box = grade.extract_answer(text)
    if box is not None:
        m = re.fullmatch(r"\s*(?:\\text\{)?\s*" + LETTER + r"\s*\}?\s*[.:]?.*", box, re.S)
        if m:
            return m.group(1)
    # after "answer": a letter in parentheses, or a bare capital that ends the phrase ("Answer: I cannot" names none)
    found = re.findall(r"(?i:answer)\s*(?:(?i:is)|:)?\s*:?\s*(?:(?i:option)\s*)?"
                       r"(?:\(\s*([A-J])\s*\)|([A-J])(?=\s*(?:$|[.,;:)\]\n])))", text)
    found = [a or b for a, b in found]
    listed = set(re.findall(r"\(([A-J])\)", text)) or set(re.findall(r"(?<![A-Za-z])([A-J])\)", text))
    found = found or (sorted(listed) if len(listed) == 1 else [])  # a lone "(B)"; a list of options names none
    return found[-1].upper() if found else (text.strip()[0] if re.fullmatch(r"\s*[A-J][.)]?\s*", text) else None)


def exact_text(s):
    """An answer for exact match (BBH): the last box, else what follows the last "the answer is", else the text;
    stripped, lower case, without a final period."""
    s = grade.as_text(s) or ""
    box = grade.extract_answer(s)
    if box is not None:
        s = box
    elif re.search(r"answer is", s, re.I):
        s = re.split(r"answer is", s, flags=re.I)[-1]
    return s.strip().rstrip(".").strip().lower()


def problem_reward(response, problem):
    """The reward of a response under its problem's grader (problem["grader"], default math): 0.0 or 1.0, never
    raises."""
    gold, rule = problem["answer"], problem.get("grader", "math")
    try:
        if rule == "verl":
            return verl_math_score(response, gold)
        if rule == "choice":
            letter = choice_letter(response)
            return float(letter is not None and letter == choice_letter(gold))
        if rule == "exact":
            return float(exact_text(response) == exact_text(gold) != "")
    except Exception:  # noqa: BLE001 -- see grade.math_reward
        return 0.0
    return grade.problem_reward(response, problem)


def final_answer(response, problem):
    """The answer a response gives, as its problem's grader reads it (kept in evaluate.py's records)."""
    rule = problem.get("grader", "math")
    if rule == "verl":
        box = last_boxed(grade.as_text(response) or "")
        try:
            return box and unbox(box)
        except ValueError:  # an \fbox: verl scores it 0
            return None
    if rule == "choice":
        return choice_letter(response)
    if rule == "exact":
        return exact_text(response)
    return grade.final_answer(response, problem.get("last_number", False))
