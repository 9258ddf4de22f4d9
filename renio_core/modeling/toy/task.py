"""The toy task: column addition of two 3-digit numbers, solved one column at a time.

Part of renio's embedded "toy world" (see ``renio_core.modeling.toy``), the CPU-sized stand-in for
the math reasoning data of ReNIO (arXiv 2606.23104). A solution writes one step per column,
least significant first, as ``a+b+carry=sum``, then the answer in ``\\boxed{}``::

    347+285
    7+5+0=12
    4+8+1=13
    3+2+1=6
    \\boxed{632}

Every step depends on the carry of the step before, so one slip (a dropped carry) makes
the final answer wrong while every later step still looks locally fine. The token where
the carry is dropped is where a teacher that adds correctly disagrees sharply with a
student that slipped: ReNIO's pivotal token.

Deliberate differences from the paper's data: a synthetic task with exact-match grading
instead of competition math graded by math-verify (the answer is a plain integer, so
math-verify agrees with ``grade``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

DIGITS = 3
LOW, HIGH = 10 ** (DIGITS - 1), 10**DIGITS - 1
TASK = "math"


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def id(self) -> str:
        return f"add-{self.a}-{self.b}"

    @property
    def problem(self) -> str:
        return f"{self.a}+{self.b}"

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


def solution(p: Problem, *, drop_carries: frozenset[int] = frozenset()) -> str:
    """The step-by-step solution; columns in ``drop_carries`` forget the incoming carry.

    Column 0 is the ones column. Dropping the carry into column ``k`` (or into the final
    digit when ``k == DIGITS``) gives the kind of wrong solution a sloppy student writes.
    """
    da, db = str(p.a)[::-1], str(p.b)[::-1]
    carry, lines, digits = 0, [], []
    for k in range(DIGITS):
        if k in drop_carries:
            carry = 0
        x, y = int(da[k]), int(db[k])
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s}")
        digits.append(s % 10)
        carry = s // 10
    if DIGITS in drop_carries:
        carry = 0
    answer = ("1" if carry else "") + "".join(str(d) for d in reversed(digits))
    lines.append(f"\\boxed{{{answer}}}")
    return "\n".join(lines)


def carry_columns(p: Problem) -> list[int]:
    """Columns (1..DIGITS, DIGITS = the final digit) that receive a carry of 1."""
    da, db = str(p.a)[::-1], str(p.b)[::-1]
    carry, out = 0, []
    for k in range(DIGITS):
        s = int(da[k]) + int(db[k]) + carry
        carry = s // 10
        if carry:
            out.append(k + 1)
    return out


def random_problems(rng: random.Random, *, exclude: frozenset[Problem] = frozenset()
                    ) -> Iterator[Problem]:
    """An endless stream of problems from ``rng``, skipping ``exclude``."""
    while True:
        p = Problem(rng.randint(LOW, HIGH), rng.randint(LOW, HIGH))
        if p not in exclude:
            yield p


def split_problems(seed: int, n_train: int, n_test: int) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train and test problems, deterministic in ``seed``."""
    rng = random.Random(f"renio-toy-split-{seed}")
    seen: set[Problem] = set()
    out: list[Problem] = []
    for p in random_problems(rng):
        if p in seen:
            continue
        seen.add(p)
        out.append(p)
        if len(out) == n_train + n_test:
            break
    return out[:n_train], out[n_train:]


def prompt_row(p: Problem) -> dict[str, str]:
    """One row of a prompt file in docs/design.md's format."""
    return {"id": p.id, "problem": p.problem, "solution": solution(p), "answer": p.answer,
            "task": TASK}


_BOXED = "\\boxed{"


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    i, depth = start + len(_BOXED), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _normalize(s: str) -> str:
    s = re.sub(r"[\s,$]", "", s)
    if re.fullmatch(r"[+-]?\d+", s):
        return str(int(s))
    return s


def grade(completion_text: str, answer: str) -> bool:
    """True when the last ``\\boxed{}`` in the completion holds ``answer`` (as an integer)."""
    got = extract_boxed(completion_text)
    return got is not None and _normalize(got) == _normalize(str(answer))
