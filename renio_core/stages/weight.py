"""The ``weight`` stage: teacher-scored rollouts in, ReNIO sample weights out.

Two passes over the input, each streamed by record batch. Pass 1 reads the three columns the
formula needs, validates them and computes every row's weight (a few numbers per row are kept
in memory, never the tokens). Rows are grouped into consecutive groups of ``group_size`` (after
filtering), so every group is normalized as a whole. Pass 2 decodes the input again and writes
the kept rows with the new columns. The formulas are in :mod:`renio_core.formulas.weighting`.

Output: the input's columns plus ``batch_id``, ``pivotal_count``, ``log_ratio_mean``,
``raw_weight`` and ``weight`` (existing columns of those names are replaced, so a weights file
can be re-weighted with other settings). A ``.parquet`` path gives one file; any other path a
directory of parts of about ``rows_per_part`` rows (whole input row groups on the fast path).
Re-running recomputes the weights (cheap) and skips parts that are already complete for the
same inputs and config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from renio_core import option_help
from renio_core.data import shards
from renio_core.data.schema import WEIGHT_COLUMNS, spec
from renio_core.errors import RenioInputError
from renio_core.formulas import weighting

INPUT_COLUMNS = [
    spec("completion_ids"),
    spec("student_logprobs"),
    spec("teacher_logprobs"),
    spec("correct", required=False),
]


@dataclasses.dataclass
class WeightConfig:
    """Settings of ``renio weight``; defaults are the official (BDML-lab/ReNIO) OPSD-math values."""

    input: str = dataclasses.field(
        default="", metadata={"help": "Scores: a .parquet file, a directory of parts, or a "
                                      "glob."})
    out: str = dataclasses.field(
        default="", metadata={"help": "Output: a .parquet file, or a directory for parts."})
    clip: float = dataclasses.field(
        default=2.5, metadata={"help": "Upper clip of the per-token log-ratio s_t - q_t."})
    threshold: float = dataclasses.field(
        default=0.8, metadata={"help": "Tokens with clipped log-ratio >= threshold are "
                                       "pivotal."})
    tem: float = dataclasses.field(
        default=1.0, metadata={"help": "Weight temperature, not the sampling temperature: raw = "
                                        "exp(mean pivotal log-ratio / tem); a larger tem "
                                        "flattens the weights."})
    norm: str = dataclasses.field(
        default="batch_mean", metadata={"help": "Group normalization: batch_mean, ema, clamp or "
                                                "none."})
    group_size: int = dataclasses.field(
        default=8, metadata={"help": "Rows per normalization group."})
    grouping: str = dataclasses.field(
        default="consecutive",
        metadata={"help": "consecutive: runs of --group-size rows in file order; distinct: "
                          "--group-size distinct prompts, one sample each (the official "
                          "trainer's micro-batch), when prompts have several samples."})
    scheme: str = dataclasses.field(
        default="renio", metadata={"help": "renio, or uniform (every weight 1: plain "
                                           "OPD/OPSD)."})
    filter: str = dataclasses.field(
        default="all", metadata={"help": "all, correct or incorrect (needs a graded 'correct' "
                                         "column)."})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": option_help.OVERWRITE})
    batch_rows: int = dataclasses.field(
        default=1024, metadata={"help": "Rows per record batch read (bounds memory)."})
    rows_per_part: int = dataclasses.field(
        default=65536, metadata={"help": "Rows per part when --out is a directory."})

    def __post_init__(self) -> None:
        if not self.input:
            raise RenioInputError("input: a scores file, directory or glob is required (--in)")
        if not self.out:
            raise RenioInputError("out: an output path is required (--out)")
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise RenioInputError(f"clip: must be a positive number (the upper clip of the "
                                  f"log-ratio), got {self.clip}")
        if not np.isfinite(self.threshold):
            raise RenioInputError(f"threshold: must be a finite number, got {self.threshold}")
        if not (self.tem > 0 and np.isfinite(self.tem)):
            raise RenioInputError(f"tem: must be a positive number, got {self.tem}")
        if self.norm not in weighting.NORMS:
            raise RenioInputError(f"norm: must be one of {', '.join(weighting.NORMS)}, got {self.norm!r}")
        if self.scheme not in weighting.SCHEMES:
            raise RenioInputError(f"scheme: must be one of {', '.join(weighting.SCHEMES)}, got {self.scheme!r}")
        if self.filter not in weighting.FILTERS:
            raise RenioInputError(f"filter: must be one of {', '.join(weighting.FILTERS)}, got {self.filter!r}")
        if self.grouping not in weighting.GROUPINGS:
            raise RenioInputError(
                f"grouping: must be one of {', '.join(weighting.GROUPINGS)}, got {self.grouping!r}")
        if self.group_size < 1:
            raise RenioInputError(f"group_size: must be at least 1, got {self.group_size}")
        if self.batch_rows < 1:
            raise RenioInputError(f"batch_rows: must be at least 1, got {self.batch_rows}")
        if self.rows_per_part < 1:
            raise RenioInputError(f"rows_per_part: must be at least 1, got {self.rows_per_part}")

    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings that change the output's content."""
        fields = dataclasses.asdict(self)
        for key in ("input", "out", "overwrite", "batch_rows"):
            fields.pop(key)
        if self.out.endswith(".parquet"):
            fields.pop("rows_per_part")
        return fields


@dataclasses.dataclass
class WeightSummary:
    """What the CLI's summary table shows."""

    out: Path
    rows: int
    rows_in: int
    tokens: int
    pivotal_tokens: int
    weight_min: float
    weight_median: float
    weight_max: float
    mean_weight_correct: float | None
    mean_weight_incorrect: float | None
    auroc_incorrect: float | None
    parts_written: int
    parts_skipped: int
    # Distinct prompts per normalization group: mean and minimum (None without prompt_id).
    group_prompts_mean: float | None = None
    group_prompts_min: int | None = None
    # Of the graded rows: the share of their total weight on incorrect rows, and the share of
    # the rows that are incorrect (what uniform weights would give), so a user sees how far
    # the weights push toward training on incorrect samples only (share 1).
    weight_share_incorrect: float | None = None
    row_share_incorrect: float | None = None

    @property
    def pivotal_share(self) -> float:
        return self.pivotal_tokens / self.tokens if self.tokens else 0.0


def _check_filter_column(cfg: WeightConfig, inputs: shards.InputSet) -> None:
    if cfg.filter == "all":
        return
    if not inputs.has_column("correct"):
        missing = next(f for f, pf in zip(inputs.files, inputs.parquet_files)
                       if "correct" not in pf.schema_arrow.names)
        raise RenioInputError(
            f"--filter {cfg.filter} needs graded rows, but the column is missing "
            "(run 'renio rollout --grade')",
            file=missing, column="correct",
        )


def _output_schema(inputs: shards.InputSet) -> pa.Schema:
    base = inputs.parquet_files[0].schema_arrow.remove_metadata()
    for name in WEIGHT_COLUMNS:
        if name in base.names:
            base = base.remove(base.get_field_index(name))
    for name, dtype in WEIGHT_COLUMNS.items():
        base = base.append(pa.field(name, dtype))
    return base


# Record batches of the input's columns (all of them for None), in file order.
_Batches = Callable[[list[str] | None], Iterator[shards.Batch]]


@dataclasses.dataclass
class _RowStats:
    """Per input row, in file order: what pass 1 computes."""

    log_ratio_mean: np.ndarray  # (R,) float64
    pivotal_count: np.ndarray   # (R,) int64
    raw: np.ndarray             # (R,) float64
    lengths: np.ndarray         # (R,) int64 completion tokens
    correct: np.ndarray | None  # (R,) int8: 1 correct, 0 incorrect, -1 ungraded
    prompt_ids: np.ndarray | None  # (R,) object: prompt_id, None where the column is absent


def _compute_rows(cfg: WeightConfig, inputs: shards.InputSet, batches: _Batches,
                  progress: Callable[[int], None] | None) -> _RowStats:
    """Pass 1: read only the columns the formula needs, validate them, weigh every row."""
    means, counts, raws, lens, corrects, pids = [], [], [], [], [], []
    has_correct = inputs.has_column("correct")
    has_pid = inputs.has_column("prompt_id")
    if cfg.grouping == "distinct" and not has_pid:
        raise RenioInputError("--grouping distinct groups rows by prompt, but the column is "
                              "missing", file=inputs.files[0], column="prompt_id")
    columns = ["completion_ids", "student_logprobs", "teacher_logprobs"]
    columns += ["correct"] if has_correct else []
    columns += ["prompt_id"] if has_pid else []
    for batch in batches(columns):
        rb = batch.data
        lengths_B = shards.check_same_lengths(batch, "student_logprobs", "completion_ids")
        shards.check_same_lengths(batch, "teacher_logprobs", "completion_ids")
        student_N = shards.flat_values(rb.column("student_logprobs"), np.float32)
        teacher_N = shards.flat_values(rb.column("teacher_logprobs"), np.float32)
        shards.check_logprobs(batch, "student_logprobs", student_N, lengths_B)
        shards.check_logprobs(batch, "teacher_logprobs", teacher_N, lengths_B)
        mean_B, count_B, raw_B = weighting.trajectory_weights(
            student_N, teacher_N, shards.row_offsets(lengths_B), clip=cfg.clip,
            threshold=cfg.threshold, tem=cfg.tem)
        means.append(mean_B)
        counts.append(count_B)
        raws.append(raw_B)
        lens.append(lengths_B)
        if has_correct:
            arr = rb.column("correct")
            graded = ~arr.is_null().to_numpy(zero_copy_only=False)
            value = arr.fill_null(False).to_numpy(zero_copy_only=False)
            corrects.append(np.where(graded, value.astype(np.int8), np.int8(-1)).astype(np.int8))
        if has_pid:
            shards.check_no_nulls(batch, "prompt_id")
            pids.append(np.asarray(rb.column("prompt_id").to_pylist(), dtype=object))
        if progress is not None:
            progress(rb.num_rows)
    return _RowStats(
        np.concatenate(means), np.concatenate(counts), np.concatenate(raws),
        np.concatenate(lens), np.concatenate(corrects) if has_correct else None,
        np.concatenate(pids) if has_pid else None,
    )


def group_ids(cfg: WeightConfig, prompt_ids_K: np.ndarray | None, rows: int) -> np.ndarray:
    """The ``batch_id`` of each kept row: its normalization group and training micro-batch
    (``renio run``'s ``score_in_train_step`` groups its rollouts with the same function)."""
    if cfg.grouping == "distinct":
        return weighting.distinct_prompt_groups(prompt_ids_K, cfg.group_size)
    return np.arange(rows, dtype=np.int64) // cfg.group_size


def _new_columns(stats: _RowStats, keep_R: np.ndarray, cfg: WeightConfig) -> dict[str, np.ndarray]:
    """Groups and normalized weights of the kept rows, in order."""
    raw_K = stats.raw[keep_R]
    group_ids_K = group_ids(cfg, stats.prompt_ids[keep_R] if stats.prompt_ids is not None
                            else None, len(raw_K))
    weights_K = weighting.sample_weights(raw_K, group_ids_K, scheme=cfg.scheme, norm=cfg.norm)
    return {
        "batch_id": group_ids_K,
        "pivotal_count": stats.pivotal_count[keep_R].astype(np.int32),
        "log_ratio_mean": stats.log_ratio_mean[keep_R].astype(np.float32),
        "raw_weight": raw_K.astype(np.float32),
        "weight": weights_K.astype(np.float32),
    }


def _new_table(cols: dict[str, np.ndarray], start: int, stop: int) -> pa.Table:
    return pa.table({name: pa.array(cols[name][start:stop], type=dtype)
                     for name, dtype in WEIGHT_COLUMNS.items()})


def _plan_parts(total: int, target: shards.OutputTarget, cfg: WeightConfig) -> list[tuple[int, int]]:
    """Output parts as [start, stop) ranges of kept rows, ``rows_per_part`` rows each."""
    if target.single_file:
        return [(0, total)]
    return [(a, min(a + cfg.rows_per_part, total)) for a in range(0, total, cfg.rows_per_part)]


def _write_parts_rewriting(target: shards.OutputTarget, parts: list[tuple[int, int]],
                           todo: list[bool], metas: list[dict[str, Any]], batches: _Batches,
                           input_names: list[str], keep_R: np.ndarray,
                           cols: dict[str, np.ndarray], schema: pa.Schema) -> None:
    """Decode the input once and write the kept rows with the new columns into the parts
    marked in ``todo``."""
    if not any(todo):
        return
    part = 0
    writer: shards.AtomicParquetWriter | None = None
    kept = 0  # kept rows seen so far = position in the output
    row0 = 0  # input row number of the batch's first row, across files
    try:
        for batch in batches(None):
            n = batch.data.num_rows
            idx = np.flatnonzero(keep_R[row0:row0 + n])
            row0 += n
            table = None
            pos = 0  # position within idx
            while pos < len(idx) and part < len(parts):
                start, stop = parts[part]
                take = min(len(idx) - pos, stop - (kept + pos))
                if todo[part]:
                    if writer is None:
                        writer = shards.AtomicParquetWriter(target.part_path(part), schema, metas[part])
                    if table is None:
                        missing = [c for c in input_names if c not in batch.data.schema.names]
                        if missing:
                            raise RenioInputError(
                                "column present in the first input file is missing here",
                                file=batch.file, column=missing[0])
                        table = pa.Table.from_batches([batch.data]).select(input_names)
                    rows = table.take(idx[pos:pos + take])
                    new = _new_table(cols, kept + pos, kept + pos + take)
                    writer.write(pa.Table.from_arrays([*rows.columns, *new.columns], schema=schema))
                pos += take
                if kept + pos == stop:
                    if writer is not None:
                        writer.commit()
                        writer = None
                    part += 1
            kept += len(idx)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def run_weight(
    cfg: WeightConfig,
    progress: Callable[[int], None] | None = None,
    *,
    scores: pa.Table | None = None,
) -> WeightSummary:
    """Compute ReNIO weights for ``cfg.input`` and write ``cfg.out``.

    Pass 1 reads the three columns the formula needs, validates every row and computes every
    weight, so bad input is reported before anything is written. Pass 2 decodes the input
    again and writes the kept rows with the new columns.
    ``progress(n)`` is called with the number of input rows weighed in pass 1.
    ``scores``: the rows of ``cfg.input`` (one file), already in memory where they were just
    written (``renio run``'s score_in_train_step); both passes then read them instead of the
    file, whose footer still gives the metadata.
    """
    inputs = shards.open_inputs(cfg.input, INPUT_COLUMNS)
    if scores is not None and (
            len(inputs.files) != 1 or scores.num_rows != inputs.total_rows
            or not scores.schema.remove_metadata().equals(
                inputs.parquet_files[0].schema_arrow.remove_metadata())):
        raise ValueError("run_weight: scores must hold the rows of cfg.input's one file")

    def batches(columns: list[str] | None) -> Iterator[shards.Batch]:
        if scores is not None:
            return shards.table_batches(scores, inputs.files[0], columns, cfg.batch_rows)
        read = shards.iter_batches(inputs, columns, batch_rows=cfg.batch_rows)
        # Pass 1 reads a few columns: decoding the next batch overlaps the formula's work.
        return shards.prefetch(read) if columns is not None else read

    shards.refuse_overwriting_inputs(cfg.out, cfg.input, *inputs.files)
    _check_filter_column(cfg, inputs)
    target = shards.OutputTarget(cfg.out, overwrite=cfg.overwrite)
    target.remove_stale_tmp()
    schema = _output_schema(inputs)
    input_names = [n for n in schema.names if n not in WEIGHT_COLUMNS]
    base_meta = shards.build_metadata(
        stage="weight",
        config=cfg,
        inputs=inputs,
        config_for_fingerprint=cfg.fingerprint_fields(),
        tokenizer_fingerprint=shards.find_in_lineage(inputs.metadata, "tokenizer_fingerprint"),
    )

    stats = _compute_rows(cfg, inputs, batches, progress)
    if cfg.filter == "all":
        keep_R = np.ones(len(stats.raw), dtype=bool)
    else:
        if not (stats.correct >= 0).any():
            raise RenioInputError(
                f"--filter {cfg.filter} needs graded rows, but every value is null",
                file=inputs.files[0], column="correct",
            )
        keep_R = stats.correct == (1 if cfg.filter == "correct" else 0)
        if not keep_R.any():
            raise RenioInputError(f"--filter {cfg.filter} kept no rows",
                                  file=inputs.files[0], column="correct")
    cols = _new_columns(stats, keep_R, cfg)
    total = int(keep_R.sum())

    parts = _plan_parts(total, target, cfg)
    metas = [dict(base_meta, part={"index": i, "first_row": a, "rows": b - a})
             for i, (a, b) in enumerate(parts)]
    todo = [not target.existing_part(i, meta) for i, meta in enumerate(metas)]
    _write_parts_rewriting(target, parts, todo, metas, batches, input_names, keep_R,
                           cols, schema)
    parts_written, parts_skipped = sum(todo), len(todo) - sum(todo)

    weights = cols["weight"]
    mean_correct = mean_incorrect = auroc = share_incorrect = rows_incorrect = None
    if stats.correct is not None:
        correct = stats.correct[keep_R]
        graded = correct >= 0
        if graded.any():
            is_correct, is_incorrect = correct == 1, correct == 0
            mean_correct = float(weights[is_correct].mean()) if is_correct.any() else None
            mean_incorrect = float(weights[is_incorrect].mean()) if is_incorrect.any() else None
            value = weighting.auroc(cols["raw_weight"][graded], is_incorrect[graded])
            auroc = None if np.isnan(value) else value
            graded_total = float(weights[graded].sum(dtype=np.float64))
            if graded_total > 0:
                share_incorrect = float(weights[is_incorrect].sum(dtype=np.float64)) / graded_total
            rows_incorrect = float(is_incorrect.sum()) / float(graded.sum())
    group_mean = group_min = None
    if stats.prompt_ids is not None and total:
        per_group: dict[int, set] = {}
        for gid, pid in zip(cols["batch_id"].tolist(), stats.prompt_ids[keep_R].tolist()):
            per_group.setdefault(gid, set()).add(pid)
        sizes = [len(v) for v in per_group.values()]
        group_mean, group_min = float(np.mean(sizes)), int(min(sizes))
    return WeightSummary(
        group_prompts_mean=group_mean,
        group_prompts_min=group_min,
        out=target.out,
        rows=total,
        rows_in=len(keep_R),
        tokens=int(stats.lengths[keep_R].sum()),
        pivotal_tokens=int(cols["pivotal_count"].sum()),
        weight_min=float(weights.min()),
        weight_median=float(np.median(weights)),
        weight_max=float(weights.max()),
        mean_weight_correct=mean_correct,
        mean_weight_incorrect=mean_incorrect,
        auroc_incorrect=auroc,
        weight_share_incorrect=share_incorrect,
        row_share_incorrect=rows_incorrect,
        parts_written=parts_written,
        parts_skipped=parts_skipped,
    )
