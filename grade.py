"""Grading math answers: extraction, normalization, equivalence and the reward (BuPO Sec. 3: 1 if the boxed answer matches).

The grader normalizes LaTeX the way a careful human grader of MATH-style answers would
(units, sets, \\pm, "and" lists, a Unicode minus), then compares integers, fractions and
decimals exactly (a decimal is the rational it writes), except that a decimal of 6+
digits may round a non-integer value (to 1e-6); tuples/intervals element-wise with their
brackets; unordered lists and sets as multisets; other expressions symbolically with
sympy (i and e are constants) under a time limit, after refusing any whose value would be
astronomically large (a power tower such as 10^{10^5}, which sympy would expand in one
uninterruptible C call). It never rewards a different value, and whatever a response
holds, the reward is 0.0 or 1.0, never an exception (tests: ~200 hand-written pairs from
the real golds and math-verify's classes, perturbed golds, big numbers, fuzzing).
"""
import math
import re
import signal
import threading
from fractions import Fraction
from functools import lru_cache

import sympy
from sympy.parsing.sympy_parser import convert_xor, implicit_multiplication_application, parse_expr, standard_transformations

MAX_ANSWER_CHARS = 1000  # longer answers (a degenerate response) are compared as plain text: golds are < 200
MAX_BITS = 1 << 14       # a sympy expression whose value could need more bits is compared as text (10^{10^5}, 9^{9^9})


# ----------------------------------------------------------------------------- extraction

def as_text(response):
    """The response as a str: bytes are decoded (invalid UTF-8 replaced); anything else that is not a str is None."""
    if isinstance(response, (bytes, bytearray)):
        return bytes(response).decode("utf-8", errors="replace")
    return response if isinstance(response, str) else None


def extract_answer(text):
    """Content of the last \\boxed{...} or \\fbox{...} (nested braces kept), else None (also for a non-text input)."""
    text = as_text(text)
    if text is None:
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)  # past \boxed / \fbox
    if text[i:i + 1] == " ":  # "\boxed 5": up to the next space or $
        return re.split(r"[\s$]", text[i + 1:].strip() + " ", 1)[0] or None
    if text[i:i + 1] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced: the response was cut off inside the box


# ----------------------------------------------------------------------------- normalization

UNITS = ("mm|cm|km|m|meters?|centimeters?|kilometers?|inch|inches|in|feet|foot|ft|yards?|yd|miles?|mi|units?|square units|"
         "sq units|degrees?|dollars?|cents?|hours?|hrs?|minutes?|mins?|seconds?|secs?|s|days?|weeks?|months?|years?|kg|g|grams?|"
         "kilograms?|lbs?|pounds?|ounces?|oz|liters?|l|ml|mph|km/h|m/s|cm/s|people|students|ways|times")


def _strip_text_units(s):
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{\s*\(?([A-E])\)?\s*\}", r"\1", s)  # \text{(C)} -> C
    s = re.sub(r"([\d}])\s*\\(?:text|mbox|mathrm)\{[^{}]*\}\s*(\^\{?\d\}?)?$", r"\1", s)  # 5\text{ cm}^2, \frac12\text{ cm} -> 5
    return re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)


SAME_UNIT = {w + e: u for u, ws in {"m": ["meter"], "cm": ["centimeter"], "km": ["kilometer"], "in": ["inch"], "ft": ["feet", "foot"],
                                   "yd": ["yard"], "mi": ["mile"], "s": ["second", "sec"], "min": ["minute"], "h": ["hour", "hr"],
                                   "g": ["gram"], "kg": ["kilogram"], "lb": ["pound"], "l": ["liter"], "unit": ["units"]}.items()
             for w in ws + [u] for e in ("", "s", "es") if w + e != u}


def unit(s):
    """(value, unit) of an answer that ends in a plain unit after a number or a closing brace ("5 cm", "5cm",
    "\\frac{1}{2} m^2"), else (s, None): i and e, written after a number, are constants, not units."""
    s = str(s).strip()
    m = re.fullmatch(rf"(.*[\d}}])\s*(?:\\text\{{\s*)?({UNITS})\}}?(\^\{{?[23]\}}?)?", s)
    if m and re.search(r"\d", m.group(1)) and (m.group(2) not in ("m", "s", "g", "l", "in") or re.search(r"\d\s+\S+$", s)):
        return m.group(1), m.group(2) + (m.group(3) or "")
    return s, None


def normalize(s):
    """A canonical string for MATH-style answers (spacing, \\left, \\dfrac, units, degrees, %, x=, sets, \\pm, "and")."""
    s = _matrix_to_tuple(unit(str(s).replace("\u2212", "-"))[0])
    s = re.sub(r"\\[,;:! ]|\\q?quad|~", " ", s).replace("\\left", "").replace("\\right", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\displaystyle", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = _strip_text_units(s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\%|%|\\degree", "", s)
    s = re.sub(r"\s*,?\s+(?:and|or)\s+", ",", s)  # "1 and 2", "1, 2, and 3": a list
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^\\\{(.*)\\\}$", r"\1", s)  # a set \{1,0\}: its elements, an unordered list
    s = re.sub(r"(\d)\{,\}(\d\d\d)", r"\1\2", s)  # 1{,}000
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 10,000 -> 10000 (a lone number only)
        s = s.replace(",", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)  # \frac9{19}
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = re.sub(r"\\sqrt(\d+|[a-z])", r"\\sqrt{\1}", s)  # \sqrt2
    m = re.fullmatch(r"[a-zA-Z](?:_\w|_\{\w+\})?=(.+)", s)  # x=3 -> 3
    if m and "=" not in m.group(1):
        s = m.group(1)
    if re.fullmatch(r"\(?[A-E]\)?", s):
        s = s.strip("()")
    s = re.sub(r"^[a-zA-Z]\\in", "", s)  # x \in [-2,7]
    s = re.sub(r"_\{(\d+)\}", r"_\1", s)  # 4210_{5} -> 4210_5
    m = re.fullmatch(r"([^,]*)\\pm([^,]+)", s)  # a \pm b -> the list a+b, a-b; \pm b -> b, -b
    if m:
        s = f"{m.group(1)}+{m.group(2)},{m.group(1)}-{m.group(2)}" if m.group(1) else f"{m.group(2)},-{m.group(2)}"
    return s


def _matrix_to_tuple(s):
    """\\begin{pmatrix} a \\\\ b \\end{pmatrix} -> (a,b); rows with & become nested tuples."""
    m = re.fullmatch(r"\\begin\{[pbv]?matrix\}(.*)\\end\{[pbv]?matrix\}", s, re.S)
    if not m:
        return s
    rows = [r.strip() for r in m.group(1).split("\\\\") if r.strip()]
    if any("&" in r for r in rows):
        rows = ["(" + r.replace("&", ",") + ")" for r in rows]
    return "(" + ",".join(rows) + ")" if len(rows) > 1 else rows[0]


# ----------------------------------------------------------------------------- values

_FUNCS = r"sqrt|pi|oo|log|ln|sin|cos|tan|cot|sec|csc|exp|i|e"


def _latex_to_sympy_text(s):
    """Plain-text expression for sympy.parse_expr, or None where the LaTeX is beyond us."""
    s = re.sub(r"(\d)\\frac", r"\1+\\frac", s)  # mixed number 2\frac{1}{2}
    for _ in range(8):  # innermost first: \frac{a}{b}, \sqrt[n]{a}, \sqrt{a}
        t = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        t = re.sub(r"\\sqrt\[([^\[\]{}]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", t)
        t = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", t)
        if t == s:
            break
        s = t
    s = s.replace("\\infty", "oo").replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*")
    s = re.sub(r"\\(ln|log|sin|cos|tan|cot|sec|csc|exp)", r"\1", s).replace("{", "(").replace("}", ")").replace("^", "**")
    if re.search(r"[^0-9a-zA-Z+\-*/().! ]", s) or "\\" in s:
        return None
    if re.search(r"[)a-zA-Z]\d", s):  # "(14/3)1", "x1": no one writes a product so; never parse it as one
        return None
    if re.search(r"\d{4,}\s*!", s):  # 1000!+ : sympy computes it even unevaluated, for seconds (and 2000! > MAX_BITS)
        return None
    words = re.sub(rf"\b(?:{_FUNCS})\b|\d", " ", re.sub(rf"({_FUNCS[:-4]})", r" \1 ", s))
    if re.search(r"[a-zA-Z]{3,}", words):  # a word, not a formula: compare as text
        return None
    return s


class _Timeout(Exception):
    pass


def _with_time_limit(fn, seconds):
    """Run fn under a SIGALRM limit in the main thread (elsewhere: without one)."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    def stop(*_):
        raise _Timeout
    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@lru_cache(maxsize=100_000)
def _number(s):
    """Exact value of a plain integer, decimal or fraction string, else None (fast path)."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"(-?)(-?\d+)/(-?\d+)", s)
    try:  # int() refuses strings of over 4300 digits: those stay text
        if m:
            return None if int(m.group(3)) == 0 else (-1 if m.group(1) else 1) * Fraction(int(m.group(2)), int(m.group(3)))
        if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)", s):
            return Fraction(s)
    except ValueError:
        pass
    return None


def _log2_bound(e):
    """An upper bound on log2 |value| of a numeric sympy expression left unevaluated (inf: too big to know)."""
    if e.is_Integer or e.is_Rational:
        return float(max(abs(e.p).bit_length(), e.q.bit_length(), 1))
    if e.is_Pow and not e.exp.free_symbols:
        exp_bits = _log2_bound(e.exp)
        return math.inf if exp_bits > 20 else _log2_bound(e.base) * max(1.0, abs(float(e.exp)))
    if isinstance(e, sympy.factorial) and not e.args[0].free_symbols:
        n_bits = _log2_bound(e.args[0])
        return math.inf if n_bits > 20 else float(e.args[0]) * n_bits
    return 1.0 + sum(_log2_bound(a) for a in e.args)  # sums, products, functions: at most the sum of the parts


CONSTANTS = {"i": sympy.I, "e": sympy.E}  # as MATH's answers use them: 2i, e^2


@lru_cache(maxsize=100_000)
def _parsed(s):
    """sympy expression of a normalized answer, or None (also where its value would need over MAX_BITS bits).
    A timeout raises _Timeout, which lru_cache does not keep: a slow moment is not a wrong answer forever."""
    text = _latex_to_sympy_text(s)
    if text is None:
        return None
    parse = lambda evaluate: parse_expr(text, local_dict=CONSTANTS, transformations=standard_transformations + (
        implicit_multiplication_application, convert_xor), evaluate=evaluate)
    try:  # first unevaluated: sympy would expand 10**(10**5) into a 332k-bit integer in one C call, past any alarm
        if _with_time_limit(lambda: _log2_bound(parse(False)), 1.0) > MAX_BITS:
            return None
        return _with_time_limit(lambda: parse(True), 1.0)
    except _Timeout:
        raise
    except Exception:
        return None


def _sympy(s):
    try:
        return _parsed(s)
    except _Timeout:
        return None


def _close(a, b, rel=1e-6):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _decimals(s):
    """The most digits after a decimal point written in s."""
    return max((len(d) for d in re.findall(r"\.(\d+)", s)), default=0)


def _values_equal(a, b):
    """Numbers: exact, except that a decimal of 6+ digits may round a fraction. Expressions: exact rationals
    compare exactly; a written decimal of 6+ digits against an exact non-integer value numerically to 1e-6
    (0.785398 = pi/4), any other decimal exactly as the rational it writes (3.0000001 is not sqrt(9)),
    exact irrationals symbolically."""
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        rounds = lambda d, f: re.search(r"\.\d{6,}$", d) and ("/" in f or "frac" in f)
        return x == y or bool(rounds(a, b) or rounds(b, a)) and _close(float(x), float(y))
    ea, eb = _sympy(a), _sympy(b)
    if ea is None or eb is None:
        return False

    def check():
        if ea.free_symbols != eb.free_symbols:
            return False
        if ea.free_symbols:
            return sympy.simplify(ea - eb) == 0
        if ea.is_Rational and eb.is_Rational:  # integers and fractions: exactly (10^6 is not 1000001)
            return ea == eb
        fa, fb = ea.has(sympy.Float), eb.has(sympy.Float)
        exact = eb if fa and not fb else ea if fb and not fa else None
        if exact is not None and _decimals(a + b) >= 6 and not exact.is_Integer:  # a decimal that may round: 1e-6
            va, vb = complex(sympy.N(ea)), complex(sympy.N(eb))
            return _close(va.real, vb.real) and _close(va.imag, vb.imag)
        rational = lambda e: sympy.nsimplify(e, rational=True)  # a written decimal is the rational it writes
        return sympy.simplify(rational(ea) - rational(eb)) == 0
    try:
        return bool(_with_time_limit(check, 2.0))
    except (_Timeout, Exception):
        return False


# ----------------------------------------------------------------------------- equivalence

def _split_top(s):
    """Split on commas outside brackets/braces."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{" and 1 or ch in ")]}" and -1 or 0
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _as_tuple(s):
    """(open, close, items) of a bracketed, comma-separated answer, else None."""
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        items = _split_top(s[1:-1])
        if len(items) >= 2:
            return s[0], s[-1], items
    return None


def _equiv(p, g):
    if p == g:
        return True
    tp, tg = _as_tuple(p), _as_tuple(g)
    if tp or tg:  # tuples and intervals: brackets and order matter
        return bool(tp and tg) and tp[:2] == tg[:2] and len(tp[2]) == len(tg[2]) and all(map(_equiv, tp[2], tg[2]))
    lg, lp = _split_top(g), _split_top(p)
    if len(lg) > 1 or len(lp) > 1:  # unordered list of answers: a multiset match
        if len(lg) != len(lp):
            return False
        rest = list(lp)
        for x in lg:
            hit = next((i for i, y in enumerate(rest) if _equiv(y, x)), None)
            if hit is None:
                return False
            rest.pop(hit)
        return True
    if "\\cup" in g or "\\cup" in p:  # unions of intervals, in order
        a, b = p.split("\\cup"), g.split("\\cup")
        return len(a) == len(b) and all(map(_equiv, a, b))
    if "=" in g and "=" in p:  # equations: side by side
        return all(_equiv(a, b) for a, b in zip(p.split("=", 1), g.split("=", 1)))
    return _values_equal(p, g)


def is_equiv(pred, gold):
    """True when pred is the same answer as gold (MATH-style); never true for a different value."""
    pred, gold = as_text(pred), as_text(gold)
    if pred is None or gold is None:
        return False
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return pred.strip() == gold.strip()
    (_, up), (_, ug) = unit(pred), unit(gold)
    if up and ug and SAME_UNIT.get(up, up) != SAME_UNIT.get(ug, ug):  # 5 m is not 5 cm; either without a unit is
        return False
    p, g = normalize(pred), normalize(gold)
    base = re.search(r"_\{?\d+\}?$", g)  # 4343_6: a bare 4343 means the same base
    if base and re.fullmatch(r"\d+", p):
        p += base.group(0)
    return bool(p) and _equiv(p, g)


def final_answer(response, last_number=False):
    """The last boxed answer; with last_number=True, failing a box, the last number in the text."""
    text = as_text(response)
    pred = extract_answer(text)
    if pred is None and last_number and text is not None:
        nums = re.findall(r"-?\d+(?:\.\d+)?", text)
        pred = nums[-1] if nums else None
    return pred


def math_reward(response, gold, last_number=False):
    """1.0 when the final answer of the response equals gold, else 0.0 (paper Sec. 3: the boxed answer).

    Never raises, whatever the response holds (tested by fuzzing): a crash here would end
    a training run for one degenerate sample. The known hazards are handled where they
    arise (huge numbers, power towers, non-text); the last guard turns anything else into 0.
    """
    try:
        return float(is_equiv(final_answer(response, last_number), gold))
    except Exception:  # noqa: BLE001 -- see the docstring
        return 0.0


def problem_reward(response, problem):
    """math_reward with the problem's own answer rule (the arithmetic task allows the last number)."""
    return math_reward(response, problem["answer"], problem.get("last_number", False))
