"""Reading a math answer as a careful human grader does (BuPO Sec. 3: the reward compares the boxed answer).

A boxed answer, as a model or a data set writes it, becomes a canonical form that grade.py
compares: one spelling per symbol (\\dfrac, \\left, +\\infty, \\varnothing, \\le, \\dbinom),
the option letter apart from its text ("(B) 12"), the unit apart from the value (\\text{},
\\mbox{}, plain words, \\$), the items of a list, set or union (with \\pm, "and"/"or" and
thousands separators told apart from list commas), the name an answer gives itself
(`x = 3`, `(x, y) = (1, 2)`, `AB = 5`), an inequality as its interval, a repeating decimal
as its fraction. The conventions are those of docs/grading.md; tests/test_grade_families.py
checks each with pairs that must and must not pay.
"""
import re
from fractions import Fraction

GREEK = "alpha|beta|gamma|delta|epsilon|theta|lambda|mu|sigma|phi|omega"
SPELLINGS = [  # (pattern, replacement), in order: one spelling per symbol
    (r"\u2212|\u2013", "-"), (r"∞", r"\\infty "), (r"≤|\\leqslant|\\leq|\\le(?![a-zA-Z])", "<="),
    (r"≥|\\geqslant|\\geq|\\ge(?![a-zA-Z])", ">="), (r"\\lt(?![a-zA-Z])", "<"), (r"\\gt(?![a-zA-Z])", ">"),
    (r"\\left(?![a-zA-Z])\s*\.?|\\right(?![a-zA-Z])\s*\.?|\\[bB]igg?[lr]?(?![a-zA-Z])", ""),
    (r"\\displaystyle|\\limits", ""), (r"\\[dtc]frac", r"\\frac"), (r"\\[dt]binom", r"\\binom"), (r"\\lbrace", r"\\{"),
    (r"\\rbrace", r"\\}"), (r"\\langle", "("), (r"\\rangle", ")"),
    (r"\{\s*([^{}]+?)\s*\\choose\s*([^{}]+?)\s*\}", r"\\binom{\1}{\2}"), (r"\\varnothing|\\\{\s*\\\}", r"\\emptyset"),
    (r"\\(?:textbf|textrm|textit|textnormal|mbox|mathrm|mathbf|mathit|operatorname|boldsymbol)\s*\{", r"\\text{"),
    (r"\\text\{\s*([ei])\s*\}", r"\1"), (r"\\text\{\s*(-?\d[^{}]*)\}", r"\1"),  # \text{5 cm}: its text
    (r"\\text\{\s*\+?\s*infinity\s*\}|^\+?\s*infinity$", r"\\infty"), (r"\\mathbb\{R\}", r"(-\\infty,\\infty)"),
    (r"\\dots|\\ldots|\\cdots", "..."),
    (r"(?<=\d),\\!\s*(?=\d{3}(?!\d))", "{,}"),  # 11,\! 111: a thousands separator as MATH writes it
    (r"(?<!\\)\\[,;:! ]|\\q?quad|~", " "), (r"(?<!\\)\$", ""),  # spacing; math delimiters (\$ stays: a currency)
    (r"(^|[(\[,=]|\\cup|\\in)\s*\+\s*\\infty", r"\1\\infty"),  # +\infty
]


def clean(s):
    """One spelling per symbol, matrices as tuples; spaces kept (they tell a list "1, 500" from 1,500)."""
    s = re.sub(r"\\begin\{[pbvB]?matrix\}(.*?)\\end\{[pbvB]?matrix\}", lambda m: _matrix_to_tuple(m.group(1)), s,
               flags=re.S)
    for pattern, repl in SPELLINGS:
        s = re.sub(pattern, repl, s)
    return s.strip()


def _matrix_to_tuple(body):
    """a \\\\ b -> (a,b); rows with & become nested tuples."""
    rows = [r.strip() for r in body.split("\\\\") if r.strip()]
    if any("&" in r for r in rows):
        rows = ["(" + r.replace("&", ",") + ")" for r in rows]
    return "(" + ",".join(rows) + ")" if len(rows) > 1 else rows[0] if rows else ""


def option(s):
    """(letter, text) of a multiple-choice answer: "(B) 12", "B. 12", "B) 12", "\\text{(B)} 12" -> ("B", "12");
    a bare "B" or "(B)" -> ("B", ""); anything else -> (None, s)."""
    t = re.sub(r"^\\text\{([^{}]*)\}$", r"\1", s.strip())  # \text{(B) 12}
    t = re.sub(r"\\text\{\s*(\(?[A-E]\)?[.:]?)\s*\}", r"\1 ", t).strip()
    t = re.sub(r"^(?:\\text\{)?\s*(?:option|choice)\s*([A-E])\s*\}?", r"\1.", t, flags=re.I)  # "Option B"
    m = (re.fullmatch(r"\(([A-E])\)\s*([^\s+*/^=_,].*|)", t, re.S)
         or re.fullmatch(r"([A-E])(?:[.:)]\s*([^\s+*/^=_,].*)|[.:]?)", t, re.S))
    if not m or re.search(r"\([A-E]\)|^(?:and|or)\b|^[A-E](?:\W|$)", m.group(2) or ""):  # (A) or (B): no choice
        return None, s
    return m.group(1), (m.group(2) or "").strip()


UNIT_WORDS = {"m": ["meter", "metre"], "cm": ["centimeter", "centimetre"], "mm": ["millimeter"],
              "km": ["kilometer", "kilometre"], "in": ["inch"], "ft": ["feet", "foot"], "yd": ["yard"], "mi": ["mile"],
              "s": ["second", "sec"], "min": ["minute"], "h": ["hour", "hr"], "g": ["gram"], "kg": ["kilogram"],
              "lb": ["pound"], "l": ["liter", "litre"], "ml": ["milliliter"], "dollar": ["\\$", "usd"],
              "cent": ["¢", "\\cent", "\\textcent"], "unit": [], "degree": ["deg", "°"], "day": [], "week": [],
              "month": [], "year": ["yr"], "mph": ["mile per hour", "miles per hour", "mi/h"],
              "km/h": ["km/hr", "kph", "kilometer per hour", "kilometers per hour"],
              "m/s": ["meter per second", "meters per second"]}
SAME_UNIT = {w + e: u for u, ws in UNIT_WORDS.items() for w in ws + [u] for e in ("", "s", "es")}
PLAIN_UNITS = ("mm|cm|km|m|meters?|centimeters?|kilometers?|inch|inches|in|feet|foot|ft|yards?|yd|miles?|mi|units?|"
               "square units|sq units|degrees?|dollars?|cents?|hours?|hrs?|minutes?|mins?|seconds?|secs?|s|days?|"
               "weeks?|months?|years?|kg|g|grams?|kilograms?|lbs?|pounds?|ounces?|oz|liters?|l|ml|mph|km/h|m/s|cm/s|"
               "people|students|ways|times")


def unit_name(words, power=""):
    """Canonical unit: lower case, singular, one spelling ("square feet" = "ft^2", "5 min" = "5 minutes")."""
    words = re.sub(r"\s+", " ", words.strip().lower())
    m = re.fullmatch(r"(square|sq\.?|cubic|cu\.?) (.+)", words)
    if m:
        words, power = m.group(2), "^2" if m.group(1).startswith("s") else "^3"
    name = SAME_UNIT.get(words, re.sub(r"(?<=[a-z]{3})s$", "", words))
    return name + re.sub(r"[{}\s]", "", power)


def unit(s):
    """(value, unit) of an answer with a unit: a trailing \\text{}/\\mbox{} after a value ("5\\text{ cm}^2",
    "164 \\pi \\mbox{ square feet}"), a plain unit word after a number ("5 cm", "12 inches"), a currency
    ("\\$5", "5¢"); else (s, None). i and e after a number are constants, not units; degrees and % are
    not units here (grade.py drops them)."""
    s = s.strip()
    if s.startswith("\\$"):
        return s[2:].strip(), "dollar"
    m = re.fullmatch(r"(.*?[\w})])\s*(\\text\{([^{}]*)\}|¢|\\cent|\\textcent)\s*(\^\s*\{?\s*[23]\s*\}?)?", s, re.S)
    if m and re.search(r"\d|\\pi", m.group(1)) and (m.group(3) is None or re.search(r"[a-zA-Z¢$]", m.group(3))):
        words = m.group(3) if m.group(3) is not None else m.group(2)
        if not re.fullmatch(r"\s*(and|or|if|for|when|where)\b.*", words):
            return m.group(1).strip(), unit_name(words, m.group(4) or "")
    m = re.fullmatch(rf"(.*[\d}}])\s*({PLAIN_UNITS})(\^\{{?[23]\}}?)?", s)
    if m and re.search(r"\d", m.group(1)) and (m.group(2) not in ("m", "s", "g", "l", "in")
                                                or re.search(r"\d\s+\S+$", s)):
        return m.group(1).strip(), unit_name(m.group(2), m.group(3) or "")
    return s, None


# ----------------------------------------------------------------------------- an item's text

def value_text(s):
    """An item's canonical text: no degrees, %, \\text{} or spaces; \\frac12 and \\sqrt2 braced; a base's subscript
    unbraced; a repeating decimal as its fraction."""
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\%|%|\\degree", "", s)
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(rf"\\(pi|{GREEK})\s+(?=\w)", r"\\\1*", s)  # 2\pi i: a product, not \pii
    spaced = re.fullmatch(r"-?\d{1,3}(?:\s\d{3})+(?:\.\d+)?", s.strip())  # 10 000 (from 10\,000); 1 2 is no number
    s = re.sub(r"(?<![_^]\d)(?<=\d)\s+(?=\d)", "" if spaced else "#", s)  # not \log_2 8
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)  # \frac9{19}
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = re.sub(r"\\sqrt(\d+|[a-z])", r"\\sqrt{\1}", s)  # \sqrt2
    s = re.sub(r"^(\d+)_\{(\d+)\}$", r"\1_\2", s)  # 4210_{5} -> 4210_5
    return repeating(s)


# ----------------------------------------------------------------------------- lists, names, inequalities

def split_top(s, sep=","):
    """Split on sep outside brackets and braces."""
    parts, depth, start = [], 0, 0
    for j, ch in enumerate(s):
        depth += 1 if ch in "([{" else -1 if ch in ")]}" else 0
        if depth == 0 and s.startswith(sep, j) and (sep != "," or s[j - 1:j] != "{"):
            parts.append(s[start:j])
            start = j + len(sep)
    return [p.strip() for p in parts + [s[start:]]]


def as_tuple(s):
    """(open, close, items) of a bracketed, comma-separated answer, else None."""
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        parts = split_top(s[1:-1])
        if len(parts) >= 2:
            return s[0], s[-1], parts
    return None


OR = "\x00"  # "x < 1 or x > 2": a union where all are inequalities, else a list
THOUSANDS = re.compile(r"-?[1-9]\d{0,2}(?:(?:,|\{,\})\d{3})+(?:\.\d+)?")


def items(s, gold_len=None):
    """(kind, items) of an answer: kind "union" for A \\cup B or inequalities joined by "or", "list" for
    a list or set (unordered), None for one item. A number with thousands separators (1,500; 10{,}080)
    is one item, unless gold_len says the gold is a list of as many items (then "1,500" lists 1 and 500)."""
    name, value = named(s)
    s = value if name and value.startswith("\\{") else s  # x \in \{1, 2\}
    builder = re.fullmatch(rf"\\\{{\s*(?:{NAME})\s*(?:\\mid|:|\|)(.+)\\\}}", s.strip(), re.S)
    s = builder.group(1) if builder else s  # \{x \mid x > 2\}: the condition
    s = re.sub(r"^\\\{(.*)\\\}$", r"\1", s.strip(), flags=re.S).strip()  # a set: its elements
    if THOUSANDS.fullmatch(s) and ("{,}" in s or gold_len != len(s.split(","))):  # no space after its commas
        return None, [s.replace("{,}", "").replace(",", "")]
    s = re.sub(r"\s*,?\s*(?:\\text\{\s*(and|or)\s*\}|\b(and|or)\b)\s*", lambda m: OR if "or" in m.group(0) else ",", s)
    ors = split_top(s, OR)
    if "\\cup" in s:
        return "union", [x for part in ors for x in split_top(part, "\\cup")]
    parts = [x for part in ors for x in split_top(part)]
    if len(parts) == 1 and ";" in s:  # 1; 2
        parts = split_top(s, ";")
    if len(ors) > 1 and all(inequality(named(x)[1]) or inequality(x) for x in ors):
        return "union", parts
    return ("list" if len(parts) > 1 else None), parts


NAME = (r"[a-zA-Z](?:_\{?\w+\}?)?|[A-Z]{2,3}|(?:m)?\\angle[A-Z]{1,3}|"
        r"\\(?:vec|text|overrightarrow|overline|hat|bar)\{\w+\}|\|[A-Z]{2}\||"
        rf"\\(?:{GREEK})|[a-zA-Z]\(\w(?:,\w)*\)")
QUANTITY = r"[a-z](?:[+-]?[a-z]){1,3}"  # a+b = 10, ab = 6: the quantity asked for, on the answer's side only


def named(s, answer=False):
    """(name, value) of an answer that names what it answers: "x = 3", "(x, y) = (1, 2)", "\\vec{v} = (1,2)",
    "AB = 5", "f(x) = x^2", "x \\in [2, 7]", and for an answer (not a gold, where x+y = 5 is a line) "a+b = 10";
    else (None, s)."""
    flat = re.sub(r"\s+", "", s)
    name = f"{NAME}|{QUANTITY}" if answer else NAME
    m = re.fullmatch(rf"((?:{name})|\((?:{NAME})(?:,(?:{NAME}))+\))(=|\\in)(.+)", flat, re.S)
    if m and not re.search(r"=|<|>", m.group(3)):
        return m.group(1), m.group(3)
    return None, s


def inequality(s):
    """(name, interval) of a one-variable inequality: "x > 2" -> ("x", "(2,\\infty)"), "-1 <= x < 3" ->
    ("x", "[-1,3)"), "1 < a" -> ("a", "(1,\\infty)"); else None."""
    parts = re.split(r"(<=|>=|<|>)", re.sub(r"\s+", "", s))
    if len(parts) not in (3, 5):
        return None
    terms, ops = parts[0::2], parts[1::2]
    if len(set(o[0] for o in ops)) > 1:
        return None
    if ops[0][0] == ">":  # read it left to right as "<"
        terms, ops = terms[::-1], [o.replace(">", "<") for o in ops[::-1]]
    names = [i for i, t in enumerate(terms) if re.fullmatch(NAME, t) and not re.search(r"\d", t)]
    if len(names) != 1 or len(terms) == 3 and names[0] != 1 or any(t in ("", "\\infty") for t in terms):
        return None
    k = names[0]
    lo = (("[" if ops[k - 1] == "<=" else "("), terms[k - 1]) if k > 0 else ("(", "-\\infty")
    hi = (terms[k + 1], ("]" if ops[k] == "<=" else ")")) if k < len(ops) else ("\\infty", ")")
    return terms[k], f"{lo[0]}{lo[1]},{hi[0]}{hi[1]}"


def repeating(s):
    """A repeating decimal as its fraction: 0.\\overline{3}, 0.(3) -> \\frac{1}{3}; 0.1\\overline{6} -> \\frac{1}{6};
    anything else unchanged."""
    m = re.fullmatch(r"(-?)(\d*)\.(\d*)"
                     r"(?:\\(?:overline|bar)\{(\d+)\}|\\(?:overline|bar)(\d)|\((\d+)\)|\\dot\{?(\d)\}?)", s)
    if not m or len(s) > 60:
        return s
    whole, fixed, rep = m.group(2) or "0", m.group(3), next(g for g in m.groups()[3:] if g)
    value = (int(whole) + Fraction(int(fixed or "0"), 10 ** len(fixed))
             + Fraction(int(rep), 10 ** len(fixed) * (10 ** len(rep) - 1)))
    return f"{m.group(1)}\\frac{{{value.numerator}}}{{{value.denominator}}}"


def named_items(parts, answer=False):
    """[(name, value)] of a list's items: the name an item gives itself ("x = 3", "x > 2" -> its interval), and a
    \\pm item as its two values (1 \\pm \\sqrt{2} -> 1+\\sqrt{2}, 1-\\sqrt{2}; \\pm 2 -> 2, -2)."""
    out = []
    for part in parts:
        name, value = named(part, answer)
        ineq = inequality(value)
        if ineq:
            name, value = ineq[0] if name is None else name, ineq[1]
        m = re.fullmatch(r"(.*?)\\pm(.+)", value, re.S)
        values = ([value] if not m
                  else [f"{m.group(1)}+{m.group(2)}", f"{m.group(1)}-{m.group(2)}"] if m.group(1).strip()
                  else [m.group(2), "-" + m.group(2)])
        out += [(name, value_text(v)) for v in values]
    return out
