"""Rows of the shards, built from what a backend returns; shared by the HF and vLLM backends.

Rollout rows (:func:`build_rows`, the columns of ``data.schema.ROLLOUT_COLUMNS``) from the
prompts and the sampled completions; score columns (:func:`with_scores`) from the two models'
log-probs; and the prompt each side is scored on (:func:`render_prompt`,
:func:`teacher_prompt_ids`). Pure functions of plain values and a tokenizer: no model here.
``cfg`` is a ``RolloutConfig`` or ``ScoreConfig`` (read for the fields named).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from renio_core.data.prompt_io import Prompt
from renio_core.data.prompts import privileged_messages, render_ids, student_messages
from renio_core.data.schema import ROLLOUT_COLUMNS, SCORE_COLUMNS
from renio_core.grading.grader import grade_math
from renio_core.modeling.models import LogprobResult


@dataclasses.dataclass
class Completion:
    ids: list[int]
    finish_reason: str  # "stop" or "length"


def prompt_task(prompt: Prompt, default: str) -> str:
    return prompt.task or default


def render_prompt(tokenizer: Any, prompt: Prompt, cfg: Any) -> list[int]:
    task = prompt_task(prompt, cfg.task)
    return render_ids(tokenizer, student_messages(prompt.problem, task,
                                                  instruction=cfg.instruction(task)),
                      enable_thinking=cfg.enable_thinking)


def grade_row(task: str, text: str, answer: str | None) -> bool | None:
    if task != "math" or answer is None:
        return None
    return bool(grade_math(text, answer))


def build_rows(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Completion],
    cfg: Any,
) -> pa.Table:
    """Rows in (prompt, sample_index) order; ``completions`` are laid out the same way."""
    cols: dict[str, list] = {name: [] for name in ROLLOUT_COLUMNS.names}
    k = 0
    for p, pids in zip(prompts, prompt_ids):
        task = prompt_task(p, cfg.task)
        for s in range(cfg.n):
            c = completions[k]
            k += 1
            text = tokenizer.decode(c.ids, skip_special_tokens=True)
            cols["prompt_id"].append(p.id)
            cols["sample_index"].append(s)
            cols["problem"].append(p.problem)
            cols["solution"].append(p.solution)
            cols["answer"].append(p.answer)
            cols["tests"].append(p.tests)
            cols["task"].append(task)
            cols["prompt_ids"].append(list(pids))
            cols["completion_ids"].append(list(c.ids))
            cols["completion_text"].append(text)
            cols["finish_reason"].append(c.finish_reason)
            cols["policy_step"].append(cfg.policy_step)
            cols["correct"].append(grade_row(task, text, p.answer) if cfg.grade else None)
    return pa.table(cols, schema=ROLLOUT_COLUMNS)



def teacher_prompt_ids(table: pa.Table, tokenizer: Any, privileged: bool, resolved: Any
                       ) -> list[list[int]]:
    """The prompt the teacher scores each row on: the student's own prompt, or (OPSD's
    privileged prompt) the problem with its reference solution, rendered with ``tokenizer``.
    ``resolved`` is the score stage's ``ResolvedScoring`` (task, instruction, thinking)."""
    if not privileged:
        return [list(p) for p in table.column("prompt_ids").to_pylist()]
    problems = table.column("problem").to_pylist()
    solutions = table.column("solution").to_pylist()
    tasks = (table.column("task").to_pylist() if "task" in table.schema.names
             else [None] * table.num_rows)
    out = []
    for problem, solution, task in zip(problems, solutions, tasks):
        task = task or resolved.task
        msgs = privileged_messages(problem, solution, task, instruction=resolved.instruction(task))
        out.append(render_ids(tokenizer, msgs, enable_thinking=resolved.enable_thinking))
    return out


def _list_array(rows: Sequence[Any], value_type: pa.DataType) -> pa.Array:
    return pa.array([r.tolist() if hasattr(r, "tolist") else r for r in rows],
                    type=pa.list_(value_type))


def with_scores(table: pa.Table, teacher_prompts: Sequence[Sequence[int]],
                student: LogprobResult, teacher: LogprobResult,
                topk: int) -> pa.Table:
    """The input rows plus the score columns (replacing any from an earlier scoring)."""
    for name in SCORE_COLUMNS:
        if name in table.schema.names:
            table = table.drop_columns([name])
    n = table.num_rows
    cols = {
        "teacher_prompt_ids": pa.array(teacher_prompts, type=SCORE_COLUMNS["teacher_prompt_ids"]),
        "student_logprobs": _list_array(student.logprobs, pa.float32()),
        "teacher_logprobs": _list_array(teacher.logprobs, pa.float32()),
        "teacher_topk_ids": (_list_array([r.tolist() for r in teacher.topk_ids],
                                         pa.list_(pa.int32()))
                             if topk else pa.nulls(n, SCORE_COLUMNS["teacher_topk_ids"])),
        "teacher_topk_logprobs": (_list_array([r.tolist() for r in teacher.topk_logprobs],
                                              pa.list_(pa.float32()))
                                  if topk else pa.nulls(n, SCORE_COLUMNS["teacher_topk_logprobs"])),
    }
    for name, arr in cols.items():
        table = table.append_column(pa.field(name, SCORE_COLUMNS[name]), arr)
    return table

