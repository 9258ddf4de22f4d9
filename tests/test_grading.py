"""Grading: last-box extraction, math equivalence, code-block extraction."""

from __future__ import annotations

import pytest

from renio_core.grading.grader import (
    extract_all_boxed,
    extract_last_boxed,
    extract_last_code_block,
    grade_math,
)


def boxed(x: str) -> str:
    return f"Let me work through it step by step.\n\nThe answer is $\\boxed{{{x}}}$."


# (reference answer, what the model boxed, expected grade)
MATH_PAIRS = [
    # fractions vs decimals
    ("1/2", "0.5", True),
    ("\\frac{1}{2}", "0.5", True),
    ("0.75", "\\frac{3}{4}", True),
    ("\\frac{1}{3}", "0.33", False),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("0.5", "\\frac{1}{3}", False),
    # \frac vs \dfrac vs \tfrac
    ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
    ("\\frac{3}{5}", "\\tfrac{3}{5}", True),
    ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    # intervals
    ("[1,2)", "[1,2)", True),
    ("[1,2)", "(1,2]", False),
    ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("(0,1)", "[0,1]", False),
    # units and decorations
    ("5", "5\\text{ cm}", True),
    ("90", "90^\\circ", True),
    ("10", "\\$10", True),
    ("1000", "1,000", True),
    ("12", "12.0", True),
    # text answers
    ("Monday", "\\text{Monday}", True),
    ("Monday", "\\text{Tuesday}", False),
    ("Monday", "\\text{dayMon}", False),  # math-verify alone would call this equal
    ("(C)", "C", True),
    ("\\text{(B)}", "B", True),
    ("B", "D", False),
    ("yes", "\\text{Yes}", True),
    # symbolic equality
    ("2\\sqrt{5}", "\\sqrt{20}", True),
    ("x^2+1", "1+x^2", True),
    ("3", "x=3", True),
    ("\\pi", "3.14", False),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("(1,2)", "(2,1)", False),
    # nested braces inside the box
    ("\\frac{1}{2^{3}}", "\\frac{1}{8}", True),
    ("\\frac{a+1}{b^{2}}", "\\frac{a+1}{b^{2}}", True),
    ("\\sqrt{\\frac{1}{4}}", "\\frac{1}{2}", True),
    # plainly wrong
    ("42", "43", False),
    ("-1", "1", False),
]


@pytest.mark.parametrize("reference,predicted,expected", MATH_PAIRS)
def test_grade_math_pairs(reference: str, predicted: str, expected: bool) -> None:
    assert grade_math(boxed(predicted), reference) is expected


def test_at_least_thirty_pairs() -> None:
    assert len(MATH_PAIRS) >= 30


def test_no_box_is_wrong_even_with_the_right_number() -> None:
    assert grade_math("The answer is 5.", "5") is False
    assert grade_math("", "5") is False


def test_last_of_several_boxes_counts() -> None:
    text = "First guess \\boxed{3}. Wait, that is wrong. Actually \\boxed{4}."
    assert grade_math(text, "4") is True
    assert grade_math(text, "3") is False


def test_truncated_last_box_falls_back_to_previous_complete_box() -> None:
    text = "So \\boxed{7}. Hmm, alternatively \\boxed{\\frac{1"
    assert extract_last_boxed(text) == "7"


def test_reference_in_dollars_or_boxed_is_unwrapped() -> None:
    assert grade_math(boxed("3/4"), "$\\frac{3}{4}$") is True
    assert grade_math(boxed("3/4"), "\\boxed{0.75}") is True


def test_none_and_empty_inputs_grade_false() -> None:
    assert grade_math(None, "1") is False  # type: ignore[arg-type]
    assert grade_math(boxed("1"), None) is False  # type: ignore[arg-type]
    assert grade_math("\\boxed{}", "1") is False
    assert grade_math(boxed("1"), "") is False


def test_toy_world_answers_grade_the_same_way() -> None:
    # The toy task writes sums as per-digit steps then a boxed integer.
    text = "7+5+0=12; 2+1+1=4; 0+0+0=0. \\boxed{412}"
    assert grade_math(text, "412") is True
    assert grade_math(text, "413") is False


def test_extract_nested_and_several_boxes() -> None:
    text = "\\boxed{1} and \\fbox{2} then \\boxed{\\frac{a}{b^{2}}} end"
    assert extract_all_boxed(text) == ["1", "2", "\\frac{a}{b^{2}}"]
    assert extract_last_boxed(text) == "\\frac{a}{b^{2}}"


def test_extract_edge_cases() -> None:
    assert extract_last_boxed("no box here") is None
    assert extract_last_boxed("\\boxed 7") == "7"
    assert extract_last_boxed("\\boxedfoo{3}") is None
    assert extract_last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert extract_last_boxed("\\boxed{ {x} }") == "{x}"


def test_extract_last_code_block() -> None:
    text = (
        "Plan:\n```python\nprint(1)\n```\nshell:\n```bash\nls\n```\n"
        "final:\n```python\ndef f():\n    return 2\n```\nDone."
    )
    assert extract_last_code_block(text) == "def f():\n    return 2\n"
    assert extract_last_code_block("```\nx = 1\n```") == "x = 1\n"
    assert extract_last_code_block("```py\nx = 1\n```") == "x = 1\n"


def test_extract_code_block_none_or_unterminated() -> None:
    assert extract_last_code_block("no code") is None
    assert extract_last_code_block("```python\nprint(1)\n") is None
    assert extract_last_code_block("```bash\nls\n```") is None
