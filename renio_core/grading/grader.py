"""Answer extraction and grading for math and code completions.

The paper (arXiv 2606.23104) reports avg@n accuracy on math benchmarks graded by the final
``\\boxed{}`` answer, and pass rates on code benchmarks. renio grades the same way:

* math: the *last* ``\\boxed{...}`` (or ``\\fbox{...}``) of the completion, braces balanced so
  nested ``\\frac{a}{b}`` survive, compared with the reference answer by math-verify
  (symbolic equality, fractions vs decimals, intervals, sets, units stripped);
* code: the *last* fenced Python block, run against the benchmark's tests by
  :mod:`renio_core.grading.sandbox`.

Deliberate differences from the official evaluation scripts:

* a completion with no box is wrong, even if it states the right number in prose (no
  "first number in the text" fallback, which rewards rambling);
* text answers (``\\text{Monday}``, multiple-choice letters) are also compared as
  normalized strings, because math-verify reads bare words as products of symbols.

Pure functions only; math-verify's own alarm-based timeouts are used in the main thread and
switched off elsewhere (signals can only be installed from the main thread).
"""

from __future__ import annotations

import re
import threading

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _matching_brace(text: str, open_index: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_index``, or None when unbalanced."""
    depth = 0
    i = open_index
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2  # an escaped brace \{ or \} does not nest
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_all_boxed(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{...}`` / ``\\fbox{...}``, in order of appearance.

    ``\\boxed 5`` (a single token after a space, as some models write) is accepted too.
    A box whose braces never close (a truncated completion) is ignored.
    """
    if not text:
        return []
    found: list[tuple[int, str]] = []
    for command in _BOX_COMMANDS:
        start = 0
        while True:
            at = text.find(command, start)
            if at < 0:
                break
            after = at + len(command)
            start = after
            # \boxed must be a whole command, not the prefix of \boxedfoo.
            if after < len(text) and text[after].isalpha():
                continue
            j = after
            while j < len(text) and text[j] == " ":
                j += 1
            if j < len(text) and text[j] == "{":
                close = _matching_brace(text, j)
                if close is None:
                    continue
                found.append((at, text[j + 1:close]))
            elif j > after:
                m = re.match(r"[^\s$]+", text[j:])
                if m:
                    found.append((at, m.group(0)))
    found.sort(key=lambda item: item[0])
    return [content for _, content in found]


def extract_last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{}`` in ``text`` (nested braces kept), or None."""
    boxes = extract_all_boxed(text)
    return boxes[-1].strip() if boxes else None


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PY_LANGS = {"python", "py", "python3", ""}


def extract_last_code_block(text: str) -> str | None:
    """The body of the last fenced code block tagged python (or untagged), or None.

    Blocks tagged with another language (```bash) are skipped; an unterminated fence (a
    truncated completion) is not a block.
    """
    if not text:
        return None
    last = None
    for m in _FENCE.finditer(text):
        if m.group(1).lower() in _PY_LANGS:
            last = m.group(2)
    return last


# --------------------------------------------------------------------------------------------
# Math
# --------------------------------------------------------------------------------------------

_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox|operatorname)\s*\{([^{}]*)\}")


def _normalize_text_answer(s: str) -> str:
    s = _TEXT_CMD.sub(r"\1", s)
    s = s.replace("$", "").replace("\\,", "").replace("\\!", "").replace("~", " ")
    s = s.replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\s+", "", s).lower()
    s = s.strip(".")
    # "(C)" and "C" are the same multiple-choice answer.
    if re.fullmatch(r"\([a-z]\)", s):
        s = s[1]
    return s


def _has_words(s: str) -> bool:
    """True when the answer holds a word of 2+ letters that is not a LaTeX command."""
    plain = re.sub(r"\\[A-Za-z]+", " ", _TEXT_CMD.sub(r" \1 ", s))
    return re.search(r"[A-Za-z]{2,}", plain) is not None


def _reference_answer(answer: str) -> str:
    """Datasets store answers bare (``3/4``), in dollars (``$3/4$``) or boxed; unwrap them."""
    text = answer.strip()
    boxed = extract_last_boxed(text) if "\\boxed" in text or "\\fbox" in text else None
    if boxed is not None:
        text = boxed
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$")
    return text.strip()


def grade_math(completion_text: str, answer: str) -> bool:
    """Whether the completion's last ``\\boxed{}`` equals ``answer`` (math-verify semantics).

    No box means wrong. Never raises on odd inputs: a parse failure grades False.
    """
    if completion_text is None or answer is None:
        return False
    predicted = extract_last_boxed(completion_text)
    if predicted is None or not predicted:
        return False
    reference = _reference_answer(str(answer))
    if not reference:
        return False
    if _normalize_text_answer(predicted) == _normalize_text_answer(reference):
        return True
    if _has_words(reference) and not re.search(r"\d", reference):
        # A word answer is compared as text only: math-verify would read "Monday" as a product
        # of symbols, so "dayMon" would match it. Numbers with units ("5 cm") go on to
        # math-verify, which strips the units.
        return False
    return _verify(reference, predicted)


def _verify(reference: str, predicted: str) -> bool:
    from math_verify import parse, verify  # heavy import (sympy), done on first use

    main = threading.current_thread() is threading.main_thread()
    timeout = 5 if main else None
    try:
        gold = parse(f"${reference}$", parsing_timeout=timeout)
        pred = parse(f"${predicted}$", parsing_timeout=timeout)
        if not gold or not pred:
            return False
        return bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - any parser failure means "not shown equal"
        return False
