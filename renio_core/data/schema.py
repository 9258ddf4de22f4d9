"""Every shard column, declared once: its Arrow type, and the stage that writes it.

The pipeline's files grow stage by stage (docs/design.md, "Columns"): ``rollout`` writes
:data:`ROLLOUT_COLUMNS`, ``score`` adds :data:`SCORE_COLUMNS`, ``weight`` adds
:data:`WEIGHT_COLUMNS`; ``eval`` writes a file of its own, :data:`EVAL_COLUMNS`. A stage that
reads a column asks :func:`spec` for it, so the kind it checks and the stage its error message
names come from here.
"""

from __future__ import annotations

import pyarrow as pa

from renio_core.data.shards import ColumnSpec

ROLLOUT_COLUMNS = pa.schema([
    ("prompt_id", pa.string()),
    ("sample_index", pa.int32()),
    ("problem", pa.string()),
    ("solution", pa.string()),
    ("answer", pa.string()),
    ("tests", pa.string()),
    ("task", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("completion_ids", pa.list_(pa.int32())),
    ("completion_text", pa.string()),
    ("finish_reason", pa.string()),
    ("policy_step", pa.int64()),
    ("correct", pa.bool_()),
])

SCORE_COLUMNS = {
    "teacher_prompt_ids": pa.list_(pa.int32()),
    "student_logprobs": pa.list_(pa.float32()),
    "teacher_logprobs": pa.list_(pa.float32()),
    "teacher_topk_ids": pa.list_(pa.list_(pa.int32())),
    "teacher_topk_logprobs": pa.list_(pa.list_(pa.float32())),
}

WEIGHT_COLUMNS = {
    "batch_id": pa.int64(),
    "pivotal_count": pa.int32(),
    "log_ratio_mean": pa.float32(),
    "raw_weight": pa.float32(),
    "weight": pa.float32(),
}

EVAL_COLUMNS = pa.schema([
    ("prompt_id", pa.string()),
    ("sample_index", pa.int32()),
    ("task", pa.string()),
    ("completion_text", pa.string()),
    ("completion_ids", pa.list_(pa.int32())),
    ("num_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("answer", pa.string()),
    ("extracted", pa.string()),
    ("correct", pa.bool_()),
    ("grade_status", pa.string()),
    ("isolation", pa.string()),  # code: which sandbox graded the row (bwrap / inprocess)
    ("reflection_markers", pa.int32()),
    ("epistemic_markers", pa.int32()),
])

# Which stage writes each pipeline column, and its type.
_WRITER: dict[str, tuple[str, pa.DataType]] = {
    **{f.name: ("rollout", f.type) for f in ROLLOUT_COLUMNS},
    **{name: ("score", t) for name, t in SCORE_COLUMNS.items()},
    **{name: ("weight", t) for name, t in WEIGHT_COLUMNS.items()},
}


def kind(t: pa.DataType) -> str:
    """The loose kind a reader checks (``shards.ColumnSpec``): any int width, any float width."""
    if pa.types.is_list(t):
        return f"list<{kind(t.value_type)}>"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_string(t):
        return "string"
    raise ValueError(f"no column kind for Arrow type {t}")


def spec(name: str, *, required: bool = True, hint: str | None = None) -> ColumnSpec:
    """What a stage reads of pipeline column ``name``; the hint names the stage that writes it."""
    stage, t = _WRITER[name]
    return ColumnSpec(name, kind(t), required=required,
                      hint=f"written by 'renio {stage}'" if hint is None else hint)
