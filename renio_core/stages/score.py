"""The ``score`` stage: per-token log-probs of each sampled completion under the student and
the teacher, at the scoring temperature T (arXiv 2606.23104: ReNIO's weight is built from
``s_t - q_t``; the default T is the rollout temperature, 1.1 in the official runs).

* OPD: a separate teacher model sees the student's prompt (``teacher_prompt_ids`` =
  ``prompt_ids``), or with ``--teacher-prompt privileged`` the privileged prompt, as the
  official collator (BDML-lab/ReNIO ``data_collator.py``) shows its separate OPD teacher.
* OPSD (``--teacher self``): the student's base weights with any adapter disabled, shown the
  privileged prompt of :mod:`renio_core.data.prompts` that contains the reference solution.

Exactness and memory: :func:`renio_core.modeling.models.sequence_logprobs` runs the decoder once per
batch and the LM head plus log-softmax on ``chunk`` positions at a time, so peak memory grows
with the chunk, never with batch × length × vocabulary. Batches are formed by a token budget
(``max_batch_tokens`` counts padded tokens) over rows sorted by length.

Work is cut into fixed chunks of ``rows_per_part`` input rows; chunk k is part k, owned by
shard k % N; a re-run skips complete parts (``renio_core.data.chunked_output``). Output rows keep
the input's order and columns.

Deliberate differences from the official code: the official trainer computes teacher
log-probs inside the training step; here scoring is a separate, resumable stage, so the
weight can be inspected before training (``renio train --weights-from live`` recomputes the
student's side inside the step). OPD's default teacher prompt is the plain student prompt, so
that prompt sets without reference solutions work; the official OPD recipe
(``sample_configs/official-opd-qwen3-1.7b.yaml``) sets ``privileged``. The official collator
renders the teacher's prompt with thinking enabled and the student's with it disabled; renio
renders both with the rollout's setting, so the sampled completion follows the same template
tokens in both contexts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from renio_core import option_help
from renio_core.backends import vllm as vllm_backend
from renio_core.backends.hf import HFScorer
from renio_core.backends.protocols import Scorer
from renio_core.data import schema, shards
from renio_core.data.chunked_output import (
    ChunkedOutput,
    parse_shard,
    write_chunks,
)
from renio_core.data.prompts import TASKS
from renio_core.errors import RenioInputError
from renio_core.modeling import models

BACKENDS = ("hf", "vllm")
TEACHER_PROMPTS = ("plain", "privileged")


INPUT_COLUMNS = [
    schema.spec("prompt_ids"),
    schema.spec("completion_ids"),
    *(schema.spec(name, required=False)
      for name in ("prompt_id", "sample_index", "problem", "solution", "task")),
]


@dataclasses.dataclass
class ScoreConfig:
    """Settings of ``renio score``. ``student``/``temperature`` default to the rollout's."""

    input: str = dataclasses.field(
        default="", metadata={"help": "Rollouts: a .parquet file, a directory of parts, or a "
                                      "glob."})
    teacher: str = dataclasses.field(
        default="", metadata={"help": "Teacher model (OPD), or 'self' (OPSD: student base "
                                      "weights + privileged prompt)."})
    out: str = dataclasses.field(
        default="", metadata={"help": "Output: a .parquet file, or a directory of parts."})
    student: str | None = dataclasses.field(
        default=None, metadata={"help": "Student model; default: the rollout's, from the "
                                        "input's metadata."})
    adapter: str | None = dataclasses.field(
        default=None, metadata={"help": "Student PEFT adapter; default: the rollout's."})
    temperature: float | None = dataclasses.field(
        default=None, metadata={"help": "Scoring temperature T; default: the rollout's."})
    topk: int = dataclasses.field(
        default=0, metadata={"help": "Also store the teacher's top-K ids and log-probs per "
                                     "position."})
    max_batch_tokens: int = dataclasses.field(
        default=16384, metadata={"help": "Padded tokens per forward batch."})
    # None: from chunk_budget_mb and the vocabulary (train's auto_chunk)
    chunk: int | None = dataclasses.field(
        default=None, metadata={"help": "Positions per log-softmax chunk (peak memory ~ chunk x "
                                        "vocab); default: from --chunk-budget-mb."})
    chunk_budget_mb: float = dataclasses.field(
        default=256.0, metadata={"help": "Memory for one chunk's logits and log-softmax (sets "
                                         "the default --chunk)."})
    shard: str = dataclasses.field(default="0/1", metadata={"help": option_help.SHARD})
    backend: str = dataclasses.field(default="hf", metadata={"help": option_help.BACKEND})
    vllm_memory: float = dataclasses.field(
        default=0.9, metadata={"help": option_help.VLLM_MEMORY})
    tensor_parallel_size: int = dataclasses.field(
        default=1, metadata={"help": option_help.TENSOR_PARALLEL})
    device_map: str = dataclasses.field(default="none", metadata={"help": option_help.DEVICE_MAP})
    rows_per_part: int = dataclasses.field(
        default=512, metadata={"help": "Input rows per output part (the unit of resuming and "
                                       "sharding)."})
    dtype: str = dataclasses.field(default="auto", metadata={"help": option_help.DTYPE})
    device: str = dataclasses.field(default="auto", metadata={"help": option_help.DEVICE})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": option_help.OVERWRITE})
    # What the teacher is shown before the completion: "plain" (the student's prompt) or
    # "privileged" (problem, reference solution, instruction). None: privileged for OPSD,
    # plain for OPD.
    teacher_prompt: str | None = dataclasses.field(
        default=None, metadata={"help": "What the teacher sees before the completion: plain "
                                        "(the student's prompt) or privileged (problem + "
                                        "reference solution + instruction, as the official "
                                        "collator shows its OPD teacher). Default: privileged "
                                        "for --teacher self, plain otherwise."})

    def __post_init__(self) -> None:
        def bad(field: str, msg: str) -> RenioInputError:
            return RenioInputError(f"--{field.replace('_', '-')}: {msg}")

        if self.teacher_prompt not in (None, *TEACHER_PROMPTS):
            raise bad("teacher_prompt", f"must be one of {', '.join(TEACHER_PROMPTS)}, got "
                      f"{self.teacher_prompt!r}")
        if self.teacher == "self" and self.teacher_prompt == "plain":
            raise bad("teacher_prompt", "plain with --teacher self would score the student "
                      "against its own base on the same prompt; OPSD's teacher is privileged")

        if not self.input:
            raise bad("in", "a rollouts file or directory is required")
        if not self.teacher:
            raise bad("teacher", "a teacher model, or 'self' for OPSD, is required")
        if not self.out:
            raise bad("out", "an output path is required")
        if self.temperature is not None and not self.temperature > 0:
            raise bad("temperature", f"must be > 0, got {self.temperature}")
        if self.topk < 0:
            raise bad("topk", f"must be >= 0, got {self.topk}")
        if self.max_batch_tokens < 1:
            raise bad("max_batch_tokens", f"must be >= 1, got {self.max_batch_tokens}")
        if self.chunk is not None and self.chunk < 1:
            raise bad("chunk", f"must be >= 1, got {self.chunk}")
        if not self.chunk_budget_mb > 0:
            raise bad("chunk_budget_mb", f"must be > 0, got {self.chunk_budget_mb}")
        if self.rows_per_part < 1:
            raise bad("rows_per_part", f"must be >= 1, got {self.rows_per_part}")
        if self.backend not in BACKENDS:
            raise bad("backend", f"must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not 0 < self.vllm_memory <= 1:
            raise bad("vllm_memory", f"must be in (0, 1], got {self.vllm_memory}")
        vllm_backend.check_tensor_parallel(self.tensor_parallel_size, self.backend)
        models.check_device_map(self.device_map, self.device, self.backend)
        if self.dtype not in models.DTYPES:
            raise bad("dtype", f"must be one of {', '.join(models.DTYPES)}")
        parse_shard(self.shard)

    @property
    def self_distill(self) -> bool:
        return self.teacher == "self"

    @property
    def privileged(self) -> bool:
        """The teacher sees the privileged prompt (always in OPSD; by choice in OPD)."""
        return self.teacher_prompt == "privileged" or (
            self.teacher_prompt is None and self.self_distill)


@dataclasses.dataclass
class ResolvedScoring:
    """What the stage actually uses after reading the input's metadata."""

    student: str
    adapter: str | None
    temperature: float
    task: str
    enable_thinking: bool
    math_instruction: str | None
    code_instruction: str | None
    tokenizer_fingerprint: str | None  # the rollout's, if recorded

    def instruction(self, task: str) -> str | None:
        return self.math_instruction if task == "math" else self.code_instruction


@dataclasses.dataclass
class ScoreSummary:
    out: Path
    rows: int = 0
    tokens: int = 0
    mean_student_logprob: float | None = None
    mean_teacher_logprob: float | None = None
    parts_written: int = 0
    parts_skipped: int = 0
    seconds: float = 0.0  # spent scoring, model loading excluded
    fresh_tokens: int = 0  # completion tokens scored by this run (not found complete)
    temperature: float = 1.0
    student: str = ""
    teacher: str = ""
    _sums: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0], repr=False)

    @property
    def tokens_per_second(self) -> float:
        return self.fresh_tokens / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Resolving defaults from the input's lineage
# --------------------------------------------------------------------------------------------


def resolve(cfg: ScoreConfig, inputs: shards.InputSet) -> ResolvedScoring:
    meta = inputs.metadata
    rollout = shards.find_stage(meta, "rollout") or {}
    rcfg = rollout.get("config") or {}
    where = inputs.files[0]
    if cfg.student is not None:
        student, adapter = cfg.student, cfg.adapter
    else:
        student = rcfg.get("model")
        if not student:
            raise RenioInputError(
                "metadata has no rollout key 'config.model' (the student); pass --student",
                file=where,
            )
        adapter = cfg.adapter if cfg.adapter is not None else rcfg.get("adapter")
    temperature = cfg.temperature
    if temperature is None:
        temperature = shards.find_in_lineage(meta, "config", "temperature")
        if temperature is None:
            raise RenioInputError(
                "metadata has no rollout key 'config.temperature'; pass --temperature",
                file=where,
            )
        temperature = float(temperature)
        if temperature <= 0:
            raise RenioInputError(
                f"the rollout's temperature is {temperature} (greedy); pass --temperature > 0",
                file=where,
            )
    task = rcfg.get("task") or "math"
    return ResolvedScoring(
        student=student, adapter=adapter, temperature=temperature, task=task,
        enable_thinking=bool(rcfg.get("enable_thinking", False)),
        math_instruction=rcfg.get("math_instruction"),
        code_instruction=rcfg.get("code_instruction"),
        tokenizer_fingerprint=shards.find_in_lineage(meta, "tokenizer_fingerprint"),
    )


def validate_rows(cfg: ScoreConfig, inputs: shards.InputSet) -> None:
    """Every row is checked before any model runs: ids present, solutions present for a
    privileged teacher prompt."""
    who = ("--teacher self (OPSD's privileged prompt)" if cfg.self_distill
           else "--teacher-prompt privileged")
    if cfg.privileged:
        for col in ("problem", "solution"):
            if not inputs.has_column(col):
                raise RenioInputError(f"missing column, needed by {who}",
                                      file=inputs.files[0], column=col)
    cols = ["prompt_ids", "completion_ids"] + (["problem", "solution", "task"]
                                              if cfg.privileged else [])
    keyed = inputs.has_column("prompt_id") and inputs.has_column("sample_index")
    cols += ["prompt_id", "sample_index"] if keyed else []
    keys = shards.UniqueKeys()
    for batch in shards.iter_batches(inputs, cols):
        if keyed:
            for j, (pid, idx) in enumerate(zip(batch.column("prompt_id").to_pylist(),
                                               batch.column("sample_index").to_pylist())):
                keys.add(pid, idx, file=batch.file, row=batch.first_row + j)
        shards.check_no_nulls(batch, "prompt_ids")
        shards.check_no_nulls(batch, "completion_ids")
        lengths = shards.list_lengths(batch.column("prompt_ids"))
        if (lengths == 0).any():
            row = int(np.flatnonzero(lengths == 0)[0])
            raise RenioInputError("empty prompt", file=batch.file, row=batch.first_row + row,
                                  column="prompt_ids")
        if cfg.privileged:
            for col in ("problem", "solution"):
                arr = batch.column(col)
                if arr.null_count:
                    row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
                    raise RenioInputError(
                        f"no {col} for this row; {who} needs the reference "
                        "solution in the privileged prompt", file=batch.file,
                        row=batch.first_row + row, column=col,
                    )
            if "task" in batch.data.schema.names:
                bad = [t for t in batch.column("task").to_pylist() if t not in (None, *TASKS)]
                if bad:
                    raise RenioInputError(f"unknown task {bad[0]!r}", file=batch.file,
                                          column="task")


def check_ids_in_vocab(inputs: shards.InputSet, vocab: int, who: str) -> None:
    for batch in shards.iter_batches(inputs, ["prompt_ids", "completion_ids"]):
        for col in ("prompt_ids", "completion_ids"):
            flat = shards.flat_values(batch.column(col))
            if flat.size and (int(flat.max()) >= vocab or int(flat.min()) < 0):
                lengths = shards.list_lengths(batch.column(col))
                idx = int(np.flatnonzero((flat >= vocab) | (flat < 0))[0])
                row, _ = shards.flat_position(lengths, idx)
                raise RenioInputError(
                    f"token id {int(flat[idx])} is outside the {who}'s vocabulary ({vocab})",
                    file=batch.file, row=batch.first_row + row, column=col,
                )


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def read_rows(inputs: shards.InputSet, start: int, stop: int) -> pa.Table:
    """Global rows [start, stop) across the input files, reading only the row groups needed."""
    pieces = []
    offset = 0
    for pf, n in zip(inputs.parquet_files, inputs.num_rows):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            md = pf.metadata
            groups, first = [], None
            rg_start = 0
            for g in range(md.num_row_groups):
                rg_n = md.row_group(g).num_rows
                if rg_start < hi - offset and rg_start + rg_n > lo - offset:
                    groups.append(g)
                    first = rg_start if first is None else first
                rg_start += rg_n
            t = pf.read_row_groups(groups)
            pieces.append(t.slice(lo - offset - first, hi - lo).replace_schema_metadata(None))
        offset += n
    if len(pieces) == 1:
        return pieces[0]
    return pa.concat_tables(pieces, promote_options="permissive")


def _fingerprint_fields(cfg: ScoreConfig, resolved: ResolvedScoring) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    for key in ("out", "shard", "overwrite", "device", "max_batch_tokens", "chunk",
                "chunk_budget_mb", "vllm_memory", "tensor_parallel_size", "device_map"):
        d.pop(key)
    d["resolved"] = dataclasses.asdict(resolved)
    return d


def load_scoring_models(cfg: ScoreConfig, resolved: ResolvedScoring, where: Any
                        ) -> tuple[Any, Any, Any, Any]:
    """Tokenizers checked first (cheap, exits before any weights load), then the models."""
    student_tok = models.load_tokenizer(resolved.student)
    fp = models.tokenizer_fingerprint(student_tok)
    if resolved.tokenizer_fingerprint is not None and resolved.tokenizer_fingerprint != fp:
        raise RenioInputError(
            f"the rollouts were tokenized by a different tokenizer than the student "
            f"{resolved.student!r} (fingerprint {resolved.tokenizer_fingerprint} vs {fp}); "
            "pass the rollout's model as --student",
            file=where,
        )
    teacher_tok = None
    if not cfg.self_distill:
        teacher_tok = models.load_tokenizer(cfg.teacher)
        models.check_tokenizers_compatible(student_tok, teacher_tok,
                                           student_name=resolved.student,
                                           teacher_name=cfg.teacher)
    if cfg.backend == "vllm":
        return None, student_tok, None, teacher_tok
    student = models.load_model(resolved.student, adapter=resolved.adapter, dtype=cfg.dtype,
                                device=cfg.device, device_map=cfg.device_map)
    teacher = None
    if not cfg.self_distill:
        teacher = models.load_model(cfg.teacher, dtype=cfg.dtype, device=cfg.device,
                                    device_map=cfg.device_map)
    return student, student_tok, teacher, teacher_tok


def planned_rows(cfg: ScoreConfig, total_rows: int) -> int:
    shard = parse_shard(cfg.shard)
    n_chunks = -(-total_rows // cfg.rows_per_part)
    return sum(min(cfg.rows_per_part, total_rows - k * cfg.rows_per_part)
               for k in range(n_chunks) if shard.owns(k))


def run_score(
    cfg: ScoreConfig,
    progress: Callable[[int], None] | None = None,
    *,
    scorer: Scorer | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> ScoreSummary:
    """Score this shard's chunks of ``cfg.input`` and write them to ``cfg.out``.

    ``scorer`` may be passed with preloaded models (the ``renio run`` loop). ``progress(n)``
    is called with the number of rows scored (or found complete) since the last call.
    ``extra_meta`` adds keys to the shard's metadata (where the log-probs came from).
    """
    inputs = shards.open_inputs(cfg.input, INPUT_COLUMNS)
    resolved = resolve(cfg, inputs)
    shards.refuse_overwriting_inputs(cfg.out, cfg.input, *inputs.files, resolved.student,
                                     resolved.adapter, cfg.teacher)
    if cfg.backend == "vllm":
        vllm_backend.check_scoring_temperature(resolved.temperature)
        vllm_backend.require_vllm()
    validate_rows(cfg, inputs)
    shard = parse_shard(cfg.shard)
    out = ChunkedOutput(cfg.out, shard=shard, overwrite=cfg.overwrite)
    total = inputs.total_rows
    n_chunks = -(-total // cfg.rows_per_part)
    teacher_name = resolved.student if cfg.self_distill else cfg.teacher
    teacher_adapter = None
    meta = shards.build_metadata(
        stage="score",
        config=cfg,
        inputs=inputs,
        config_for_fingerprint=_fingerprint_fields(cfg, resolved),
        models={
            "student": models.model_record(resolved.student, resolved.adapter),
            "teacher": dict(models.model_record(teacher_name, teacher_adapter),
                            self_distill=cfg.self_distill),
        },
        tokenizer_fingerprint=resolved.tokenizer_fingerprint,
        extra={"scoring_temperature": resolved.temperature,
               "teacher_prompt": "privileged" if cfg.privileged else "plain",
               **(extra_meta or {})},
    )
    summary = ScoreSummary(out=Path(cfg.out), temperature=resolved.temperature,
                           student=resolved.student,
                           teacher="self (OPSD)" if cfg.self_distill else cfg.teacher)

    def count(table: pa.Table) -> None:
        summary.rows += table.num_rows
        for k, col in enumerate(("student_logprobs", "teacher_logprobs")):
            flat = pc.list_flatten(table.column(col))
            summary._sums[k] += float(pc.sum(flat).as_py() or 0.0)
            if k == 0:
                summary.tokens += len(flat)

    def chunk_rows(k: int) -> tuple[int, int]:
        return k * cfg.rows_per_part, min(total, (k + 1) * cfg.rows_per_part)

    def finish() -> ScoreSummary:
        if summary.tokens:
            summary.mean_student_logprob = summary._sums[0] / summary.tokens
            summary.mean_teacher_logprob = summary._sums[1] / summary.tokens
        return summary

    if out.already_final(meta):
        summary.parts_skipped = n_chunks
        if progress is not None:
            progress(total)
        count(shards.read_table(cfg.out))
        return finish()

    def new_scorer() -> Scorer:
        student, student_tok, teacher, teacher_tok = load_scoring_models(
            cfg, resolved, inputs.files[0])
        if cfg.backend == "vllm":
            return vllm_backend.VllmScorer(cfg, resolved, student_tok, teacher_tok)
        return HFScorer(cfg, resolved, student, student_tok, teacher, teacher_tok)

    def check_vocabularies(scorer_now: Scorer) -> None:
        # Every id is checked against both vocabularies before any part is written, so bad
        # input never leaves a half-scored output behind.
        for name, vocab in scorer_now.vocab_sizes().items():
            check_ids_in_vocab(inputs, vocab, name)
            if name == "teacher" and cfg.topk > vocab:
                raise RenioInputError(f"--topk {cfg.topk}: larger than the teacher's "
                                      f"vocabulary of {vocab}")

    def score_chunk(scorer_now: Scorer, k: int) -> pa.Table:
        lo, hi = chunk_rows(k)
        scored = scorer_now.score_table(read_rows(inputs, lo, hi), progress)
        count(scored)
        summary.fresh_tokens += int(
            pc.sum(pc.list_value_length(scored.column("completion_ids"))).as_py() or 0)
        return scored

    def on_skip(k: int) -> None:
        lo, hi = chunk_rows(k)
        if progress is not None:
            progress(hi - lo)
        count(shards.read_table(out.parts.part_path(k)))

    done = write_chunks(out, n_chunks, meta, score_chunk, make_backend=new_scorer,
                        backend=scorer, first_use=check_vocabularies, on_skip=on_skip)
    summary.parts_written, summary.parts_skipped = done.written, done.skipped
    summary.seconds = done.busy  # scoring alone, the models' loading left out: for tokens/s
    return finish()
