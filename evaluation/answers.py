"""Final answers: find them in a model's text and compare them with the gold answer.

Extraction order: the last `\\boxed{...}` (or `\\fbox{...}`), else a GSM8K-style
`#### X` line, else the last number in the text.

Comparison: when both sides read as numbers (integers, decimals, `a/b`,
`\\frac{a}{b}`, with `$`, thousands separators, `%`, units and trailing periods
stripped) they are compared exactly as fractions, with a 1e-6 relative tolerance
for rounded decimals. That path is deterministic and covers every answer of the
shipped sample set. Anything else (an expression, a set, an interval) goes to
math-verify when it is installed (the `eval` extra), else to a normalised string
comparison. The `method` of a Grade says which path decided.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

try:  # optional: symbolic equivalence for non-numeric answers
    from math_verify import parse as _mv_parse
    from math_verify import verify as _mv_verify
except ImportError:  # pragma: no cover - depends on the environment
    _mv_parse = _mv_verify = None

HAVE_MATH_VERIFY = _mv_parse is not None

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_HASHES = re.compile(r"####\s*([^\n]+)")
# A number as people write it: 1,234,567.5 or 1234.5 or .5, with an optional sign.
_NUMBER = re.compile(r"(?<![\w.])[-−+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?![\w])")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_FRAC = re.compile(r"^([-+]?)\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}$")
_SLASH = re.compile(r"^([-+]?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)$")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")


@dataclass(frozen=True)
class Grade:
    extracted: str | None  # the answer found in the text (None: nothing found)
    correct: bool
    method: str  # "number", "math-verify", "string" or "none"


def _boxed_contents(text: str) -> list[str]:
    """Every \\boxed{...} in order, with nested braces kept whole."""
    out = []
    for m in _BOX.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        out.append(text[i + 1 : j])
                        break
                j += 1
        elif i < len(text):  # "\boxed 5": the next token is the argument
            token = re.match(r"\S+", text[i:])
            if token:
                out.append(token.group(0).rstrip(".,;"))
    return out


def _last_number(text: str) -> str | None:
    found = [m.group(0) for m in _NUMBER.finditer(text) if re.search(r"\d", m.group(0))]
    return found[-1] if found else None


def extract_answer(text: str) -> str | None:
    """The final answer a model wrote, as a string, or None when there is none."""
    if not text:
        return None
    boxed = [b for b in _boxed_contents(text) if b.strip()]
    if boxed:
        return boxed[-1].strip()
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    return _last_number(text)


def normalize(answer: str) -> str:
    """Strip what does not change a value: $ signs, \\text{}, spacing macros,
    thousands separators, a trailing period, %, degree marks."""
    s = answer.strip()
    s = _TEXT.sub(r"\1", s)
    for macro in (r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\ ", r"\displaystyle"):
        s = s.replace(macro, "")
    s = s.replace(r"\$", "").replace("$", "").replace("{,}", "").replace("−", "-")
    s = s.replace(r"\%", "").replace("%", "").replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.strip().rstrip(".").strip()
    # Thousands separators only between digit groups (1,000 but not "1, 2").
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    # A unit or word after a number ("30 dollars", "16 km"): keep the number.
    m = re.match(r"^([-+]?[\d.]+(?:/\d+)?)\s*[A-Za-z][A-Za-z .]*$", s)
    if m:
        s = m.group(1)
    if s.startswith("=") or s.startswith(":"):
        s = s[1:].strip()
    # "x = 5" -> "5": the value is what the question asks for.
    m = re.match(r"^[A-Za-z]\w*\s*=\s*(.+)$", s)
    if m:
        s = m.group(1).strip()
    return re.sub(r"\s+", " ", s)


def to_number(answer: str) -> Fraction | None:
    """The answer's value when it is a plain number or a numeric fraction."""
    s = normalize(answer).replace(" ", "")
    while s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    try:
        if _PLAIN_NUMBER.fullmatch(s):
            return Fraction(s)
        m = _FRAC.match(s) or _SLASH.match(s)
        if m:
            sign, num, den = m.groups() if m.re is _FRAC else ("", *m.groups())
            value = Fraction(num.strip()) / Fraction(den.strip())
            return -value if sign == "-" else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def numbers_equal(a: Fraction, b: Fraction) -> bool:
    return a == b or abs(a - b) <= Fraction(1, 10**6) * max(1, abs(b))


def _math_verify(pred: str, gold: str) -> bool | None:
    try:
        g, p = _mv_parse(f"${gold}$"), _mv_parse(f"${pred}$")
        if not g or not p:
            return None
        return bool(_mv_verify(g, p))
    except Exception:  # its timeouts use signals (main thread only); fall back
        return None


def compare(pred: str, gold: str) -> tuple[bool, str]:
    """Is the extracted answer `pred` equal to `gold`? Returns (equal, method)."""
    a, b = to_number(pred), to_number(gold)
    if a is not None and b is not None:
        return numbers_equal(a, b), "number"
    if HAVE_MATH_VERIFY:
        verdict = _math_verify(pred, gold)
        if verdict is not None:
            return verdict, "math-verify"
    return normalize(pred).replace(" ", "") == normalize(gold).replace(" ", ""), "string"


def grade(text: str, gold: str) -> Grade:
    pred = extract_answer(text)
    if pred is None:
        return Grade(None, False, "none")
    ok, method = compare(pred, str(gold))
    return Grade(pred, ok, method)
