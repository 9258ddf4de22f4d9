"""Prompt construction: the student prompt and the privileged teacher prompt.

The student samples from its prompt (problem, then the task's instruction). The privileged
prompt holds the problem plus a reference solution, followed by a request to solve it again;
the sampled completion is scored after it, so the teacher's log-probs say how plausible each
student token is to a model that knows the answer. OPSD (``--teacher self``) always uses it;
an OPD teacher sees it with ``renio score --teacher-prompt privileged`` (the official code
shows its separate OPD teacher the same prompt), else the student's prompt.

Differences from the official collator (BDML-lab/ReNIO ``data_collator.py``, math, the
default ``reason_first=False``), all still open:

* Wording. The official student message is ``"Problem: {problem}\\n\\n{instruction}"``; the
  teacher's is ``"Problem: {problem}\\n\\n"``, a header line, the solution between
  ``=== Reference Solution Begin ===`` / ``=== Reference Solution End ===`` lines, a paragraph
  asking the model to understand the solution and derive the answer in its own words, then
  the instruction. Here there is no ``Problem:`` prefix and no delimiter lines, and the
  closing request is a short sentence of renio's own: the project copies no prose from other
  projects. The math instruction is the same sentence (a format convention).
  Reason: the toy world and its recorded results are built on these prompts; matching the
  official structure changes every prompt, so it belongs with a rerun of the demo.
* Thinking mode. The official teacher prompt is rendered with ``enable_thinking=True`` and
  the student's with ``False``; here both use the rollout's ``enable_thinking``.
* Code. The official code instruction asks for the code in a ```python block "at the end"
  after thinking first; renio's asks for one complete program in a ```python block at the
  end (the sandbox grades one program).

The instructions can be replaced through the stage configs (``math_instruction`` /
``code_instruction``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = (
    "Write a Python solution. Put the complete program in one ```python fenced code block "
    "at the end of your answer."
)
PRIVILEGED_HEADER = "Here is a reference solution to this problem:"
PRIVILEGED_FOOTER = (
    "Now that you have seen a reference solution, solve the problem yourself from the start."
)
TASKS = ("math", "code")


def instruction_for(task: str, math_instruction: str | None = None,
                    code_instruction: str | None = None) -> str:
    if task == "math":
        return MATH_INSTRUCTION if math_instruction is None else math_instruction
    if task == "code":
        return CODE_INSTRUCTION if code_instruction is None else code_instruction
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def student_messages(problem: str, task: str = "math", *, instruction: str | None = None
                     ) -> list[dict[str, str]]:
    """The chat messages the student samples from."""
    text = instruction if instruction is not None else instruction_for(task)
    content = f"{problem}\n\n{text}" if text else problem
    return [{"role": "user", "content": content}]


def privileged_messages(problem: str, solution: str, task: str = "math", *,
                        instruction: str | None = None) -> list[dict[str, str]]:
    """OPSD's teacher prompt: the problem, a reference solution, then the same instruction."""
    text = instruction if instruction is not None else instruction_for(task)
    content = f"{problem}\n\n{PRIVILEGED_HEADER}\n{solution}\n\n{PRIVILEGED_FOOTER}"
    if text:
        content = f"{content}\n{text}"
    return [{"role": "user", "content": content}]


def render_ids(tokenizer: Any, messages: Sequence[dict[str, str]], *,
               enable_thinking: bool = False) -> list[int]:
    """Token ids of ``messages`` after the chat template, ready for the assistant's turn.

    ``enable_thinking`` is passed through to templates that know it (Qwen3) and ignored by
    the others.
    """
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
