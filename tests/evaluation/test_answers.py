"""Answer extraction and comparison, table-driven."""
from __future__ import annotations

import pytest

from evaluation import answers

EXTRACT = [
    # (model text, extracted answer)
    ("So the total is \\boxed{36}.", "36"),
    ("First \\boxed{3}, then correcting: \\boxed{4}", "4"),  # the last box wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces kept whole
    ("The answer is \\boxed{\\text{16 km}}.", "\\text{16 km}"),
    ("\\fbox{12}", "12"),
    ("\\boxed 7.", "7"),
    ("Natalia sold 48 clips.\n#### 72", "72"),
    ("She has 1,250 books and buys 340, so 1,590.", "1,590"),  # last number, thousands separator kept
    ("It drops to -2 degrees.", "-2"),
    ("It costs $4.50.", "4.50"),
    ("3-4 people came", "4"),  # a hyphen between numbers is not a minus sign
    ("no numbers at all", None),
    ("", None),
    ("\\boxed{} and then 5", "5"),  # an empty box is no answer
]


@pytest.mark.parametrize("text,expected", EXTRACT)
def test_extract(text, expected):
    assert answers.extract_answer(text) == expected


COMPARE = [
    # (prediction, gold, equal)
    ("1,000", "1000", True),
    ("1{,}415", "1415", True),
    ("$30", "30", True),
    ("\\$30", "30", True),
    ("30 dollars", "30", True),
    ("\\text{16 km}", "16", True),
    ("42.", "42", True),  # trailing period
    ("-2", "-2", True),
    ("−2", "-2", True),  # unicode minus
    ("2", "-2", False),
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{3}{4}", "3/4", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("1/3", "0.3333333", True),  # rounded decimals within 1e-6
    ("0.33", "1/3", False),
    ("50\\%", "50", True),
    ("x = 5", "5", True),
    ("12.0", "12", True),
    ("120", "12", False),
    ("1,234,567", "1234567", True),
    ("{7}", "7", True),
]


@pytest.mark.parametrize("pred,gold,equal", COMPARE)
def test_compare(pred, gold, equal):
    ok, method = answers.compare(pred, gold)
    assert ok is equal, (pred, gold, method)
    assert method == "number"


@pytest.mark.skipif(not answers.HAVE_MATH_VERIFY, reason="math-verify not installed")
@pytest.mark.parametrize("pred,gold,equal", [
    ("x^2+1", "1+x^2", True),
    ("\\sqrt{4}", "2", True),
    ("(1, 2)", "(1,2)", True),
    ("x^2", "x^3", False),
])
def test_symbolic_answers_go_to_math_verify(pred, gold, equal):
    ok, method = answers.compare(pred, gold)
    assert (ok, method) == (equal, "math-verify")


def test_string_fallback_without_math_verify(monkeypatch):
    monkeypatch.setattr(answers, "HAVE_MATH_VERIFY", False)
    assert answers.compare("\\text{blue}", "blue") == (True, "string")
    assert answers.compare("red", "blue") == (False, "string")


@pytest.mark.parametrize("text,gold,correct", [
    ("Step one.\n\nSo she has \\(\\boxed{1,415}\\) books.", "1415", True),
    ("The temperature is \\boxed{-2} degrees.", "-2", True),
    ("Half is \\boxed{\\frac{1}{2}}.", "0.5", True),
    ("#### 8", "8", True),
    ("I think 7 apples, not 8.", "7", False),  # the last number is 8
    ("I cannot tell.", "3", False),
])
def test_grade(text, gold, correct):
    g = answers.grade(text, gold)
    assert g.correct is correct
    if "I cannot" in text:
        assert (g.extracted, g.method) == (None, "none")


def test_sample_set_answers_are_integers_and_extractable():
    from evaluation import dataset

    problems = dataset.load(dataset.SAMPLE)
    assert 30 <= len(problems) <= 40
    assert len({p.id for p in problems}) == len(problems)
    for p in problems:
        assert int(p.answer) == answers.to_number(p.answer)
        assert answers.grade(f"... so \\boxed{{{p.answer}}}.", p.answer).correct
