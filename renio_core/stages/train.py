"""The ``train`` stage: one pass of ReNIO-weighted on-policy distillation over a weights shard.

ReNIO (arXiv 2606.23104) multiplies each sampled trajectory's distillation loss by a weight
computed from its student-to-teacher log-ratios (the ``weight`` stage). This stage reads
``weights.parquet`` (docs/design.md, "The shards"), uses its ``batch_id`` groups as micro-batches,
and optimizes

    batch loss = mean over samples of weight * (mean over completion tokens of the divergence)

with the divergence of ``renio_core.formulas.losses`` (``jsd`` with the teacher's full logits, ``topk``
from the stored top-k, or ``rkl`` from the stored teacher log-probs).

How it stays within memory: the student's decoder runs once per micro-batch; the LM head and
the divergence then run on the completion positions only, ``chunk_size`` positions at a time,
inside one autograd function that computes each chunk's gradient right away
(:class:`ChunkedHeadLoss`). Neither the student's nor the teacher's batch x length x vocabulary
logits ever exist; the extra peak is about ``chunk_size x vocabulary`` floats. By default the chunk
comes from a memory budget (``chunk_budget_mb``, ``models.auto_chunk``): small vocabularies get
long chunks, Qwen3's 151,936 tokens get short ones.

Deliberate differences from the official code:

* the ReNIO weight multiplies every loss (officially only the full-vocabulary path);
* ``topk`` keeps the teacher's tail mass as one extra bucket by default
  (``topk_divergence(tail=True)``); ``topk_tail=False`` (``--topk-renormalize``) is docs/design.md's
  "both sides renormalized on the top-k";
* LoRA dropout is 0, so that a resumed or a distributed run reproduces an uninterrupted one;
* the learning rate warms up as ``(s + 1) / warmup_steps`` (Hugging Face's ``s / warmup_steps``
  makes the first step a no-op; the official scripts use no warmup, where both agree). After
  warmup ``lr_schedule`` is ``constant``, ``linear`` (to 0 at ``schedule_steps``: the official
  run's) or ``cosine``; ``init_from`` continues another checkpoint's AdamW state and schedule
  position, so that many ``renio train`` calls (``renio run``, or the shell) step one optimizer
  as the official single trainer does;
* by default the ReNIO weights come from the shard (the weight stage, on the log-probs of the
  student that sampled); the official trainer computes them inside the step, which
  ``weights_from="live"`` does (identical with one step per rollout batch);
* micro-batches are visited in file order each epoch, without shuffling: their order is the
  order of the weight stage's normalization groups;
* teacher and student vocabularies that differ in size (padded embeddings) are both cut to the
  smaller size before the softmax: the padding rows are not tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from renio_core.data import shards
from renio_core.errors import RenioInputError
from renio_core.formulas import losses, weighting
from renio_core.modeling import models
from renio_core.stages import tracking

LOSSES = ("jsd", "topk", "rkl")
LR_SCHEDULES = ("constant", "linear", "cosine")
WEIGHTS_FROM = ("shard", "live")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
# Per-step scalars sent to TensorBoard and W&B (renio_core/stages/tracking.py).
TRACKED = ("loss", "mean_weight", "pivotal_share", "grad_norm", "tokens_per_s", "lr")
CONFIG_FILE = "train_config.json"

# progress(step, total_steps, metrics of that step); called on rank 0 only.
Progress = Callable[[int, int, dict[str, Any]], None]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    weights: str
    model: str
    out: str
    loss: str = "jsd"
    beta: float = 0.0
    token_clip: float = 0.05
    topk_tail: bool = True  # topk: keep the mass outside the top-k as one bucket (else renormalize)
    temperature: float | None = None  # None: the score stage's temperature, from metadata
    teacher: str | None = None  # a model, "self" (OPSD), or None: from metadata (jsd only)
    lora: bool = True
    lora_r: int = 64
    lora_alpha: int = 128
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    adapter: str | None = None
    lr: float = 5e-6
    epochs: int = 1
    max_steps: int | None = None
    grad_accum: int = 1
    grad_clip: float = 1.0
    warmup_steps: int = 0
    # The learning-rate schedule after warmup: constant, linear (to 0) or cosine (to 0).
    lr_schedule: str = "constant"
    # Total optimizer steps of the schedule, counted from the first run of a chain of
    # --init-from runs; None = this run's own steps (plus, with init_from, the checkpoint's).
    schedule_steps: int | None = None
    # Optimizer steps per pass over the shard: the micro-batches are split into this many
    # equal steps (grad_accum derived). None = --grad-accum micro-batches per step.
    steps_per_batch: int | None = None
    # A finished checkpoint whose optimizer and schedule state this run continues (not its
    # data position: a new shard). With LoRA, also the adapter to continue (unless --adapter).
    init_from: str | None = None
    # ReNIO weights from the shard's 'weight' column, or "live": recomputed inside each train
    # step from this forward pass's student log-probs and the stored teacher log-probs, with
    # the weight stage's clip/threshold/tem/norm, normalized over the micro-batch.
    weights_from: str = "shard"
    seed: int = 0
    gradient_checkpointing: bool = False
    resume: bool = False
    fsdp: bool = False
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    # Completion positions per LM-head chunk; None: auto_chunk(vocabulary, chunk_budget_mb).
    chunk_size: int | None = None
    chunk_budget_mb: float = 256.0
    dtype: str = "auto"
    bf16_autocast: bool | None = None  # None: on for CUDA GPUs with bf16, off on CPU
    device: str = "auto"
    tensorboard: bool = False
    wandb_project: str | None = None  # log to Weights & Biases (renio[wandb]); None = off
    overwrite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):
            self.lora_targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        else:
            self.lora_targets = tuple(self.lora_targets)
        if self.loss not in LOSSES:
            raise RenioInputError(f"loss: must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise RenioInputError(f"beta: must be in [0, 1], got {self.beta}")
        if self.token_clip < 0:
            raise RenioInputError(f"token_clip: must be >= 0 (0 = no clip), got {self.token_clip}")
        if self.temperature is not None and not self.temperature > 0:
            raise RenioInputError(f"temperature: must be > 0, got {self.temperature}")
        if self.teacher is not None and self.loss != "jsd":
            raise RenioInputError(
                f"teacher: --loss {self.loss} uses the stored teacher log-probs; --teacher is "
                "only for --loss jsd"
            )
        if self.lora:
            if self.lora_r < 1:
                raise RenioInputError(f"lora_r: must be >= 1, got {self.lora_r}")
            if not self.lora_alpha > 0:
                raise RenioInputError(f"lora_alpha: must be > 0, got {self.lora_alpha}")
            if not self.lora_targets:
                raise RenioInputError("lora_targets: give at least one module name")
        elif self.adapter is not None:
            raise RenioInputError("adapter: --adapter continues a LoRA adapter; drop --no-lora")
        if self.init_from is not None and self.lora and self.adapter is None:
            self.adapter = self.init_from  # continue its adapter along with its optimizer
        if not self.lr > 0:
            raise RenioInputError(f"lr: must be > 0, got {self.lr}")
        if self.epochs < 1:
            raise RenioInputError(f"epochs: must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise RenioInputError(f"max_steps: must be >= 1, got {self.max_steps}")
        if self.grad_accum < 1:
            raise RenioInputError(f"grad_accum: must be >= 1, got {self.grad_accum}")
        if self.grad_clip < 0:
            raise RenioInputError(f"grad_clip: must be >= 0 (0 = no clipping), got {self.grad_clip}")
        if self.warmup_steps < 0:
            raise RenioInputError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise RenioInputError(
                f"lr_schedule: must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise RenioInputError(f"schedule_steps: must be >= 1, got {self.schedule_steps}")
        if self.steps_per_batch is not None:
            if self.steps_per_batch < 1:
                raise RenioInputError(f"steps_per_batch: must be >= 1, got {self.steps_per_batch}")
            if self.grad_accum != 1:
                raise RenioInputError(
                    "steps_per_batch: derives the gradient accumulation from the shard; drop "
                    "--grad-accum")
        if self.weights_from not in WEIGHTS_FROM:
            raise RenioInputError(
                f"weights_from: must be one of {', '.join(WEIGHTS_FROM)}, got {self.weights_from!r}")
        if self.init_from is not None and self.resume:
            raise RenioInputError(
                "init_from: --resume continues OUT's own state; --init-from starts a new run from "
                "another checkpoint's; use one")
        if self.save_every < 0:
            raise RenioInputError(f"save_every: must be >= 0, got {self.save_every}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise RenioInputError(f"chunk_size: must be >= 1, got {self.chunk_size}")
        if not self.chunk_budget_mb > 0:
            raise RenioInputError(f"chunk_budget_mb: must be > 0, got {self.chunk_budget_mb}")
        if self.dtype not in models.DTYPES:
            raise RenioInputError(f"dtype: must be one of {', '.join(models.DTYPES)}, got {self.dtype!r}")
        if self.resume and self.overwrite:
            raise RenioInputError("resume: --resume continues OUT; --overwrite would discard it")

    def data_fields(self) -> dict[str, Any]:
        """What must not change between a run and its resumption."""
        keep = ("loss", "beta", "token_clip", "topk_tail", "temperature", "teacher", "lora", "lora_r",
                "lora_alpha", "lora_targets", "grad_accum", "seed", "chunk_size",
                # The optimizer and scheduler states restore the checkpoint's own values, so a
                # new one given with --resume would be silently ignored: refuse it instead.
                "lr", "warmup_steps", "grad_clip", "lr_schedule", "schedule_steps",
                "steps_per_batch", "init_from", "weights_from")
        return {k: shards._jsonable(getattr(self, k)) for k in keep}


@dataclasses.dataclass
class TrainSummary:
    out: str
    steps: int
    total_steps: int
    resumed_from: int
    micro_batches: int
    micro_batches_dropped: int
    samples_seen: int
    tokens_seen: int
    first_loss: float | None
    last_loss: float | None
    mean_weight: float | None
    seconds: float
    world_size: int
    temperature: float
    teacher: str | None
    loss: str


# --------------------------------------------------------------------------------------------
# Reading the weights shard
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MicroBatch:
    """One ``batch_id`` group, as Python lists (a few rows of a few thousand tokens)."""

    batch_id: int
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    teacher_prompt_ids: list[list[int]]
    teacher_logprobs: list[list[float]]
    weights: list[float]
    pivotal_count: list[int]
    topk_ids: list[list[list[int]]] | None = None
    topk_logprobs: list[list[list[float]]] | None = None

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


def _columns(loss: str) -> list[shards.ColumnSpec]:
    from_score = "added by 'renio score'"
    from_weight = "added by 'renio weight'"
    cols = [
        shards.ColumnSpec("prompt_ids", "list<int>", hint="added by 'renio rollout'"),
        shards.ColumnSpec("completion_ids", "list<int>", hint="added by 'renio rollout'"),
        shards.ColumnSpec("teacher_prompt_ids", "list<int>", hint=from_score),
        shards.ColumnSpec("student_logprobs", "list<float>", hint=from_score),
        shards.ColumnSpec("teacher_logprobs", "list<float>", hint=from_score),
        shards.ColumnSpec("batch_id", "int", hint=from_weight),
        shards.ColumnSpec("pivotal_count", "int", hint=from_weight),
        shards.ColumnSpec("log_ratio_mean", "float", hint=from_weight),
        shards.ColumnSpec("raw_weight", "float", hint=from_weight),
        shards.ColumnSpec("weight", "float", hint=from_weight),
    ]
    topk_hint = "--loss topk needs them: run 'renio score --topk K'"
    cols.append(shards.ColumnSpec("teacher_topk_ids", "list<list<int>>", required=loss == "topk", hint=topk_hint))
    cols.append(shards.ColumnSpec("teacher_topk_logprobs", "list<list<float>>", required=loss == "topk", hint=topk_hint))
    return cols


def read_micro_batches(inputs: shards.InputSet, loss: str, *, rank: int = 0,
                       world: int = 1) -> list[MicroBatch | None]:
    """Validate every row, then group rows by ``batch_id`` (groups in order of appearance).

    Under torchrun each process keeps only its share: group ``i`` belongs to rank
    ``i % world`` (the training loop gives micro-batch ``i`` to that rank); the others are
    ``None`` placeholders so that every rank sees the same count.
    """
    names = [c.name for c in _columns(loss)]
    groups: dict[int, MicroBatch | None] = {}
    for batch in shards.iter_batches(inputs, names):
        for name in ("prompt_ids", "completion_ids", "teacher_prompt_ids", "batch_id", "weight",
                     "pivotal_count"):
            shards.check_no_nulls(batch, name)
        lengths = shards.list_lengths(batch.column("completion_ids"))
        for name in ("student_logprobs", "teacher_logprobs"):
            shards.check_same_lengths(batch, name, "completion_ids")
            shards.check_logprobs(batch, name, shards.flat_values(batch.column(name), np.float64), lengths)
        for name in ("prompt_ids", "teacher_prompt_ids"):
            empty = np.flatnonzero(shards.list_lengths(batch.column(name)) == 0)
            if empty.size:
                raise RenioInputError(
                    "empty prompt: the first completion token needs a position to be predicted from",
                    file=batch.file, row=batch.first_row + int(empty[0]), column=name,
                )
        weight_B = batch.column("weight").to_numpy(zero_copy_only=False).astype(np.float64)
        shards.check_finite(batch, "weight", weight_B, np.ones_like(lengths))
        negative = np.flatnonzero(weight_B < 0)
        if negative.size:
            raise RenioInputError(f"weight {weight_B[negative[0]]}; sample weights are >= 0",
                                  file=batch.file, row=batch.first_row + int(negative[0]),
                                  column="weight")
        if loss == "topk":
            _check_topk(batch, lengths)
        data = {n: batch.column(n).to_pylist() for n in names if n in batch.data.schema.names}
        for i in range(batch.data.num_rows):
            bid = int(data["batch_id"][i])
            if bid not in groups and len(groups) % world != rank:
                groups[bid] = None  # another rank's micro-batch
            if bid in groups and groups[bid] is None:
                continue
            mb = groups.get(bid)
            if mb is None:
                mb = groups[bid] = MicroBatch(bid, [], [], [], [], [], [],
                                              [] if loss == "topk" else None,
                                              [] if loss == "topk" else None)
            mb.prompt_ids.append(data["prompt_ids"][i])
            mb.completion_ids.append(data["completion_ids"][i])
            mb.teacher_prompt_ids.append(data["teacher_prompt_ids"][i])
            mb.teacher_logprobs.append(data["teacher_logprobs"][i])
            mb.weights.append(float(data["weight"][i]))
            mb.pivotal_count.append(int(data["pivotal_count"][i]))
            if loss == "topk":
                mb.topk_ids.append(data["teacher_topk_ids"][i])
                mb.topk_logprobs.append(data["teacher_topk_logprobs"][i])
    return list(groups.values())


def _check_topk(batch: shards.Batch, lengths: np.ndarray) -> None:
    for name in ("teacher_topk_ids", "teacher_topk_logprobs"):
        shards.check_no_nulls(batch, name)
        got = shards.list_lengths(batch.column(name))
        bad = np.flatnonzero(got != lengths)
        if bad.size:
            i = int(bad[0])
            raise RenioInputError(
                f"has {got[i]} positions but 'completion_ids' has {lengths[i]}; the lists must "
                "have equal length", file=batch.file, row=batch.first_row + i, column=name,
            )
    ids_inner = shards.list_lengths(pc.list_flatten(batch.column("teacher_topk_ids")))
    lp_flat = pc.list_flatten(batch.column("teacher_topk_logprobs"))
    lp_inner = shards.list_lengths(lp_flat)
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    mismatch = np.flatnonzero((ids_inner != lp_inner) | (ids_inner != (ids_inner[0] if ids_inner.size else 0)))
    if mismatch.size:
        i = int(row_of[mismatch[0]])
        raise RenioInputError(
            "top-k lists must all have the same k, in both teacher_topk_ids and "
            "teacher_topk_logprobs", file=batch.file, row=batch.first_row + i,
            column="teacher_topk_logprobs",
        )
    values = shards.flat_values(lp_flat, np.float64)
    if values.size and not np.isfinite(values).all():
        k = int(ids_inner[0])
        i = int(row_of[int(np.flatnonzero(~np.isfinite(values))[0]) // max(k, 1)])
        raise RenioInputError("NaN or inf in the teacher's top-k log-probs", file=batch.file,
                              row=batch.first_row + i, column="teacher_topk_logprobs")


def _check_token_ids(micro: list[MicroBatch | None], vocab: int, file: Path) -> None:
    """Ids beyond the student's vocabulary would fail deep inside the embedding lookup."""
    for mb in micro:
        if mb is None:
            continue
        for name in ("prompt_ids", "completion_ids", "teacher_prompt_ids", "topk_ids"):
            rows = getattr(mb, name)
            if rows is None:
                continue
            for seq in rows:
                flat = np.asarray(seq).ravel()
                if flat.size and (flat.max() >= vocab or flat.min() < 0):
                    column = "teacher_topk_ids" if name == "topk_ids" else name
                    bad = int(flat.max() if flat.max() >= vocab else flat.min())
                    raise RenioInputError(
                        f"token id {bad} (batch_id {mb.batch_id}) is outside the student's "
                        f"vocabulary of {vocab}; was the shard made with another tokenizer?",
                        file=file, column=column,
                    )


def resolve_temperature(cfg: TrainConfig, meta: dict[str, Any] | None, file: Path) -> float:
    if cfg.temperature is not None:
        return float(cfg.temperature)
    score = shards.find_stage(meta, "score")
    # 'renio score' records the temperature it resolved (its --temperature may be unset and
    # default to the rollout's); files from elsewhere may only have a config value.
    value = (score or {}).get("scoring_temperature")
    if value is None:
        value = shards.find_in_lineage(score if score is not None else meta, "config", "temperature")
    if value is None:
        raise RenioInputError(
            "metadata key 'config.temperature' of the score stage is missing (file not made by "
            "'renio score'?); pass --temperature T (the scoring temperature)", file=file,
        )
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise RenioInputError(f"metadata 'config.temperature' is {value!r}, not a number; "
                              "pass --temperature T", file=file) from None
    if not value > 0:
        raise RenioInputError(f"metadata 'config.temperature' is {value}; pass --temperature T",
                              file=file)
    return value


def resolve_teacher(cfg: TrainConfig, meta: dict[str, Any] | None, file: Path) -> str | None:
    if cfg.loss != "jsd":
        return None
    if cfg.teacher is not None:
        return cfg.teacher
    score = shards.find_stage(meta, "score") or meta
    for keys in (("config", "teacher"), ("models", "teacher", "name")):
        value = shards.find_in_lineage(score, *keys)
        if isinstance(value, str) and value:
            return value
    raise RenioInputError(
        "--loss jsd needs the teacher's logits, but metadata key 'config.teacher' of the score "
        "stage is missing; pass --teacher NAME_OR_PATH (OPD) or --teacher self (OPSD)", file=file,
    )


def lr_factor(step: int, *, schedule: str, warmup: int, total: int) -> float:
    """The multiplier of the base learning rate for optimizer step ``step`` (0-based, counted
    over the whole schedule): ``(step + 1) / warmup`` during warmup, then constant, linear to 0
    at ``total`` (Hugging Face's ``get_linear_schedule_with_warmup`` after warmup), or a
    half cosine to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return min(1.0, (step + 1) / warmup)
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclasses.dataclass
class LiveWeightSpec:
    """The weight stage's settings, for ReNIO weights recomputed inside the train step."""

    clip: float
    threshold: float
    tem: float
    norm: str
    scheme: str


def live_weight_spec(cfg: TrainConfig, meta: dict[str, Any] | None, file: Path) -> LiveWeightSpec | None:
    if cfg.weights_from != "live":
        return None
    wcfg = (shards.find_stage(meta, "weight") or {}).get("config") or {}
    missing = [k for k in ("clip", "threshold", "tem", "norm", "scheme") if k not in wcfg]
    if missing:
        raise RenioInputError(
            f"--weights-from live needs the weight stage's settings, but metadata key "
            f"'config.{missing[0]}' of the weight stage is missing (file not made by 'renio "
            "weight'?)", file=file)
    if wcfg["norm"] == "ema":
        raise RenioInputError(
            "--weights-from live normalizes within each micro-batch; the shard was weighted with "
            "--norm ema (a running mean over the file's groups): use batch_mean, clamp or none",
            file=file)
    return LiveWeightSpec(float(wcfg["clip"]), float(wcfg["threshold"]), float(wcfg["tem"]),
                          str(wcfg["norm"]), str(wcfg["scheme"]))


def live_weights(spec: LiveWeightSpec, student_logprobs_N: np.ndarray,
                 teacher_logprobs_N: np.ndarray, lengths_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ReNIO weights of one micro-batch (one normalization group), the weight stage's formula
    on this step's student log-probs. Returns ``(weights_B, pivotal_count_B)``."""
    offsets_B1 = np.r_[0, np.cumsum(lengths_B)].astype(np.int64)
    mean_B, pivotal_B = weighting.trajectory_log_ratios(
        student_logprobs_N, teacher_logprobs_N, offsets_B1, clip=spec.clip,
        threshold=spec.threshold)
    if spec.scheme == "uniform":
        return np.ones(len(lengths_B)), pivotal_B
    raw_B = weighting.raw_weights(mean_B, spec.tem)
    return weighting.normalize_groups(raw_B, np.zeros(len(raw_B), dtype=np.int64), spec.norm), pivotal_B


# --------------------------------------------------------------------------------------------
# The chunked LM head + divergence
# --------------------------------------------------------------------------------------------


# chunk_fn(student_logits_CV, lo, hi) -> per-token loss (C,) for flat positions lo:hi.
ChunkFn = Callable[[torch.Tensor, int, int], torch.Tensor]


class ChunkedHeadLoss(torch.autograd.Function):
    """``sum_n coef_n * chunk_fn(hidden_n @ W^T)`` with the gradient computed chunk by chunk.

    Forward runs each chunk's LM head and loss under local autograd and keeps only the
    gradients with respect to the hidden states (N x H) and the head weight (V x H); the chunk's
    logits are freed before the next chunk. Backward scales those by the incoming gradient.
    Returns the scalar and the detached per-position values (for metrics).
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, coef_N, chunk_fn, chunk, config):  # type: ignore[override]
        n_total = hidden_NH.shape[0]
        grad_hidden_NH = torch.zeros_like(hidden_NH)
        need_w = weight_VH.requires_grad
        grad_weight_VH = torch.zeros_like(weight_VH) if need_w else None
        per_token_N = torch.zeros(n_total, dtype=torch.float32, device=hidden_NH.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden_NH.device)
        w_leaf = weight_VH.detach().requires_grad_(need_w)
        for lo in range(0, n_total, chunk):
            hi = min(n_total, lo + chunk)
            with torch.enable_grad():
                h_leaf = hidden_NH[lo:hi].detach().requires_grad_(True)
                logits_CV = models.postprocess_logits(config, F.linear(h_leaf, w_leaf))
                values_C = chunk_fn(logits_CV, lo, hi)
                scalar = (values_C * coef_N[lo:hi]).sum()
                inputs = (h_leaf, w_leaf) if need_w else (h_leaf,)
                grads = torch.autograd.grad(scalar, inputs)
            grad_hidden_NH[lo:hi] = grads[0]
            if need_w:
                grad_weight_VH += grads[1]
            per_token_N[lo:hi] = values_C.detach().float()
            total += scalar.detach().float()
            del logits_CV, values_C, scalar, grads
        ctx.save_for_backward(grad_hidden_NH, grad_weight_VH if need_w else torch.empty(0))
        ctx.need_w = need_w
        ctx.mark_non_differentiable(per_token_N)
        return total, per_token_N

    @staticmethod
    def backward(ctx, grad_total, _grad_per_token):  # type: ignore[override]
        grad_hidden_NH, grad_weight_VH = ctx.saved_tensors
        g_h = grad_hidden_NH * grad_total.to(grad_hidden_NH.dtype)
        g_w = grad_weight_VH * grad_total.to(grad_weight_VH.dtype) if ctx.need_w else None
        return g_h, g_w, None, None, None, None


@dataclasses.dataclass
class LossSpec:
    loss: str
    beta: float
    token_clip: float
    temperature: float
    topk_tail: bool = True


@dataclasses.dataclass
class PackedBatch:
    """A micro-batch as tensors: right-padded inputs and the flat completion positions."""

    input_ids_BL: torch.Tensor
    attention_BL: torch.Tensor
    rows_N: torch.Tensor  # sample of each completion token
    cols_N: torch.Tensor  # position that predicts it in the student input
    targets_N: torch.Tensor  # the completion token
    coef_N: torch.Tensor  # weight_b / (tokens_b * B): batch loss = sum coef * per-token loss
    teacher_input_ids_BL: torch.Tensor
    teacher_attention_BL: torch.Tensor
    teacher_cols_N: torch.Tensor
    teacher_logprobs_N: torch.Tensor
    topk_ids_NK: torch.Tensor | None
    topk_logprobs_NK: torch.Tensor | None
    weights_B: torch.Tensor
    lengths_B: torch.Tensor


def pack(mb: MicroBatch, pad_id: int, device: torch.device) -> PackedBatch:
    B = len(mb.completion_ids)
    student_seqs = [list(p) + list(c) for p, c in zip(mb.prompt_ids, mb.completion_ids)]
    teacher_seqs = [list(p) + list(c) for p, c in zip(mb.teacher_prompt_ids, mb.completion_ids)]
    ids_BL, attn_BL = models.pad_right(student_seqs, pad_id)
    t_ids_BL, t_attn_BL = models.pad_right(teacher_seqs, pad_id)
    lengths = [len(c) for c in mb.completion_ids]
    rows = np.repeat(np.arange(B), lengths)
    offsets = np.concatenate([np.arange(n) for n in lengths]) if sum(lengths) else np.zeros(0, int)
    # Logits at position p predict token p + 1: completion token j sits at len(prompt) + j.
    cols = np.repeat([len(p) - 1 for p in mb.prompt_ids], lengths) + offsets
    t_cols = np.repeat([len(p) - 1 for p in mb.teacher_prompt_ids], lengths) + offsets
    weights_B = torch.tensor(mb.weights, dtype=torch.float32)
    lengths_B = torch.tensor(lengths, dtype=torch.long)
    coef_B = weights_B / (lengths_B.clamp(min=1).float() * B)
    flat = lambda rows_: [x for r in rows_ for x in r]  # noqa: E731
    topk_ids = topk_lp = None
    if mb.topk_ids is not None:
        k = next((len(pos) for r in mb.topk_ids for pos in r), 0)
        topk_ids = torch.tensor(flat(mb.topk_ids), dtype=torch.long).reshape(-1, k).to(device)
        topk_lp = torch.tensor(flat(mb.topk_logprobs), dtype=torch.float32).reshape(-1, k).to(device)
    return PackedBatch(
        input_ids_BL=ids_BL.to(device), attention_BL=attn_BL.to(device),
        rows_N=torch.as_tensor(rows, dtype=torch.long).to(device),
        cols_N=torch.as_tensor(cols, dtype=torch.long).to(device),
        targets_N=torch.tensor(flat(mb.completion_ids), dtype=torch.long).to(device),
        coef_N=coef_B[torch.as_tensor(rows, dtype=torch.long)].to(device),
        teacher_input_ids_BL=t_ids_BL.to(device), teacher_attention_BL=t_attn_BL.to(device),
        teacher_cols_N=torch.as_tensor(t_cols, dtype=torch.long).to(device),
        teacher_logprobs_N=torch.tensor(flat(mb.teacher_logprobs), dtype=torch.float32).to(device),
        topk_ids_NK=topk_ids, topk_logprobs_NK=topk_lp,
        weights_B=weights_B.to(device), lengths_B=lengths_B.to(device),
    )


def _causal_lm(model: Any) -> Any:
    return model.get_base_model() if models.has_adapter(model) else model


def _final_hidden(lm: Any, ids_BL: torch.Tensor, attn_BL: torch.Tensor) -> torch.Tensor:
    out = lm.get_decoder()(input_ids=ids_BL, attention_mask=attn_BL, use_cache=False)
    return out.last_hidden_state


def _head(lm: Any) -> torch.nn.Linear:
    head = lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise RenioInputError(
            f"unsupported LM head {type(head).__name__}: train needs a bias-free linear head "
            "(do not put LoRA on lm_head)"
        )
    return head


class DistillModule(torch.nn.Module):
    """The student plus the loss, in one ``forward`` so DDP and FSDP see every parameter use.

    ``forward(packed)`` returns (batch loss, per-token values N). The teacher's final hidden
    states come from ``teacher`` (OPD), or, when ``self_teacher``, from this same model with the
    adapter disabled and the teacher's prompt (OPSD).
    """

    def __init__(self, model: Any, spec: LossSpec, chunk: int, *, teacher: Any = None,
                 self_teacher: bool = False, live: LiveWeightSpec | None = None):
        super().__init__()
        self.model = model
        self.spec = spec
        self.chunk = chunk
        self.live = live
        # (weights_B, pivotal_count_B) of the last forward, when the weights are live.
        self.last_live: tuple[np.ndarray, np.ndarray] | None = None
        # A plain attribute, not a submodule: DDP/FSDP must not wrap or sync the frozen teacher.
        self.__dict__["teacher"] = teacher
        self.self_teacher = self_teacher

    def forward(self, p: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        lm = _causal_lm(self.model)
        spec = self.spec
        teacher_h_NH = teacher_w_VH = teacher_cfg = None
        if spec.loss == "jsd":
            with torch.no_grad():
                if self.self_teacher:
                    with self.model.disable_adapter():
                        t_hidden = _final_hidden(lm, p.teacher_input_ids_BL, p.teacher_attention_BL)
                    t_lm = lm
                else:
                    t_lm = _causal_lm(self.teacher)
                    t_hidden = _final_hidden(t_lm, p.teacher_input_ids_BL, p.teacher_attention_BL)
                teacher_h_NH = t_hidden[p.rows_N, p.teacher_cols_N]
                del t_hidden
                teacher_w_VH = _head(t_lm).weight.detach()
                teacher_cfg = t_lm.config
        hidden_BLH = _final_hidden(lm, p.input_ids_BL, p.attention_BL)
        hidden_NH = hidden_BLH[p.rows_N, p.cols_N]
        head = _head(lm)
        chunk_fn = self._chunk_fn(p, teacher_h_NH, teacher_w_VH, teacher_cfg)
        coef_N = p.coef_N
        if self.live is not None:
            coef_N = self._live_coef(p, hidden_NH, lm)
        if hidden_NH.shape[0] == 0:
            # Nothing to learn from, but every parameter must still take part (DDP).
            zero = hidden_BLH.sum() * 0.0 + head.weight.sum() * 0.0
            return zero.float(), torch.zeros(0, device=zero.device)
        return ChunkedHeadLoss.apply(hidden_NH, head.weight, coef_N, chunk_fn, self.chunk,
                                     lm.config)

    def _live_coef(self, p: PackedBatch, hidden_NH: torch.Tensor, lm: Any) -> torch.Tensor:
        """This forward's sampled-token log-probs (as ``renio score`` computes them) -> the
        micro-batch's ReNIO weights -> the per-token loss coefficients."""
        n_total = hidden_NH.shape[0]
        lp_N = torch.empty(n_total, dtype=torch.float32, device=hidden_NH.device)
        with torch.no_grad():
            for lo in range(0, n_total, self.chunk):
                hi = min(n_total, lo + self.chunk)
                logits_CV = models.head_logits(lm, hidden_NH[lo:hi].detach()).float()
                logits_CV = logits_CV / self.spec.temperature
                lp_N[lo:hi] = (logits_CV.gather(1, p.targets_N[lo:hi, None])[:, 0]
                               - torch.logsumexp(logits_CV, dim=-1))
        lengths_B = p.lengths_B.cpu().numpy()
        weights_B, pivotal_B = live_weights(self.live, lp_N.cpu().numpy(),
                                            p.teacher_logprobs_N.cpu().numpy(), lengths_B)
        self.last_live = (weights_B, pivotal_B)
        B = len(lengths_B)
        coef_B = torch.as_tensor(weights_B, dtype=torch.float32) / (
            torch.as_tensor(lengths_B).clamp(min=1).float() * B)
        return coef_B.to(hidden_NH.device)[p.rows_N]

    def _chunk_fn(self, p: PackedBatch, teacher_h_NH, teacher_w_VH, teacher_cfg) -> ChunkFn:
        spec = self.spec
        T = spec.temperature
        if spec.loss == "jsd":
            def jsd(logits_CV: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
                with torch.no_grad():
                    t_logits_CV = models.postprocess_logits(teacher_cfg, F.linear(teacher_h_NH[lo:hi], teacher_w_VH))
                V = min(logits_CV.shape[-1], t_logits_CV.shape[-1])
                return losses.token_divergence(
                    logits_CV[None, :, :V], t_logits_CV[None, :, :V], spec.beta, T, spec.token_clip
                )[0]
            return jsd
        if spec.loss == "topk":
            def topk(logits_CV: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
                return losses.topk_divergence(
                    logits_CV[None], p.topk_ids_NK[None, lo:hi], p.topk_logprobs_NK[None, lo:hi],
                    spec.beta, T, spec.token_clip, tail=spec.topk_tail,
                )[0]
            return topk

        def rkl(logits_CV: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
            logp_CV = torch.log_softmax(logits_CV.float() / T, dim=-1)
            s_C = logp_CV.gather(1, p.targets_N[lo:hi, None])[:, 0]
            return losses.sampled_reverse_kl(s_C[None], p.teacher_logprobs_N[None, lo:hi])[0]
        return rkl


def naive_loss(module: DistillModule, p: PackedBatch) -> torch.Tensor:
    """Reference: full-vocabulary logits of the whole micro-batch, then ``weighted_loss``.

    What the chunked path replaces; used by tests (equal values and gradients) and by the
    benchmark (time and memory).
    """
    spec = module.spec
    lm = _causal_lm(module.model)
    logits_BLV = lm(input_ids=p.input_ids_BL, attention_mask=p.attention_BL, use_cache=False).logits
    B = p.input_ids_BL.shape[0]
    Tmax = int(p.lengths_B.max().item()) if B else 0
    offsets_N = torch.cat([torch.arange(int(n), device=p.rows_N.device) for n in p.lengths_B]) if p.rows_N.numel() else p.rows_N
    mask_BT = torch.zeros(B, Tmax, dtype=torch.bool, device=p.rows_N.device)
    mask_BT[p.rows_N, offsets_N] = True
    student_BTV = logits_BLV.new_zeros(B, Tmax, logits_BLV.shape[-1])
    student_BTV[p.rows_N, offsets_N] = logits_BLV[p.rows_N, p.cols_N]
    if spec.loss == "jsd":
        with torch.no_grad():
            if module.self_teacher:
                with module.model.disable_adapter():
                    t_logits = lm(input_ids=p.teacher_input_ids_BL, attention_mask=p.teacher_attention_BL, use_cache=False).logits
            else:
                t_logits = module.teacher(input_ids=p.teacher_input_ids_BL, attention_mask=p.teacher_attention_BL, use_cache=False).logits
            teacher_BTV = t_logits.new_zeros(B, Tmax, t_logits.shape[-1])
            teacher_BTV[p.rows_N, offsets_N] = t_logits[p.rows_N, p.teacher_cols_N]
        V = min(student_BTV.shape[-1], teacher_BTV.shape[-1])
        per_token = losses.token_divergence(student_BTV[..., :V], teacher_BTV[..., :V], spec.beta,
                                            spec.temperature, spec.token_clip)
    elif spec.loss == "topk":
        K = p.topk_ids_NK.shape[1]
        ids = torch.zeros(B, Tmax, K, dtype=torch.long, device=p.rows_N.device)
        lps = torch.full((B, Tmax, K), -1.0, device=p.rows_N.device)
        ids[p.rows_N, offsets_N] = p.topk_ids_NK
        lps[p.rows_N, offsets_N] = p.topk_logprobs_NK
        per_token = losses.topk_divergence(student_BTV, ids, lps, spec.beta, spec.temperature,
                                           spec.token_clip, tail=spec.topk_tail)
    else:
        logp = torch.log_softmax(student_BTV.float() / spec.temperature, dim=-1)
        tgt = torch.zeros(B, Tmax, dtype=torch.long, device=p.rows_N.device)
        tgt[p.rows_N, offsets_N] = p.targets_N
        q = torch.zeros(B, Tmax, device=p.rows_N.device)
        q[p.rows_N, offsets_N] = p.teacher_logprobs_N
        per_token = losses.sampled_reverse_kl(logp.gather(-1, tgt[..., None])[..., 0], q)
    return losses.weighted_loss(per_token, mask_BT, p.weights_B)


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def init_distributed(device_pref: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    return Dist(rank, world, local_rank, created)


def _all_reduce_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    if not d.on:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _optim_by_name(sd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An ``optimizer.state_dict()`` (parameters by index, as saved without FSDP) keyed by
    parameter name instead, as FSDP's full optimizer state dict is; other forms unchanged.
    (Without FSDP, ``load_state_dict`` takes either form: it matches parameters by order.)"""
    groups = sd.get("param_groups") or []
    if not groups or not groups[0]["params"] or not isinstance(groups[0]["params"][0], int):
        return sd
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups]}


def _swap_dir(tmp: Path, out: Path) -> None:
    """Put a complete checkpoint directory in place: rename, never a half-copied ``out``."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _check_out(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise RenioInputError("--out must be a directory (the checkpoint)", file=out)
    if cfg.resume:
        if not (out / STATE_FILE).is_file():
            raise RenioInputError(f"--resume: no checkpoint ({STATE_FILE}) to resume from", file=out)
    elif out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise RenioInputError(
            "--out exists and is not empty; pass --resume to continue it or --overwrite to "
            "replace it", file=out,
        )
    return out


def attach_lora(model: Any, cfg: TrainConfig, adapter: str | None = None) -> Any:
    """The student ready to train: a peft model with a trainable adapter (``adapter`` if
    given, else a fresh one seeded by ``cfg.seed``), or all weights trainable with
    ``--no-lora``. Also used by the ``renio run`` loop on its resident student."""
    if cfg.lora:
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(model, PeftModel):
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.requires_grad_(True)
        elif adapter is not None:
            with models.quiet_peft():
                model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        else:
            torch.manual_seed(cfg.seed)
            lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                              target_modules=list(cfg.lora_targets), lora_dropout=0.0,
                              bias="none", task_type="CAUSAL_LM")
            try:
                with models.quiet_peft():
                    model = get_peft_model(model, lcfg)
            except ValueError as exc:
                raise RenioInputError(f"--lora-targets: {exc}") from None
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    return model


def _build_model(cfg: TrainConfig, source: str, adapter: str | None, dtype: str,
                 device: torch.device) -> Any:
    model = attach_lora(models.load_model(source, dtype=dtype, device=str(device)), cfg, adapter)
    model.to(device)
    model.train()
    if cfg.gradient_checkpointing:
        lm = _causal_lm(model)
        # transformers 5 renamed the method (and its keyword); older releases have the old one.
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _load_teacher(name: str, dtype: str, device: torch.device, student_tok: Any) -> Any:
    teacher = models.load_model(name, dtype=dtype, device=str(device))
    teacher.requires_grad_(False)
    teacher.eval()
    t_tok = models.load_tokenizer(name)
    models.check_tokenizers_compatible(student_tok, t_tok, teacher_name=name)
    return teacher


def run_train(cfg: TrainConfig, progress: Progress | None = None, *,
              student: Any = None, teacher: Any = None) -> TrainSummary:
    """Train the student on ``cfg.weights`` and write the checkpoint to ``cfg.out``.

    ``student``/``teacher`` may be passed already loaded (the ``renio run`` loop keeps them
    across iterations): the student is trained in place and must come from
    :func:`attach_lora` (or be a full model with ``--no-lora``); ``teacher`` replaces loading
    ``--teacher``. Not combined with ``--resume`` or torchrun.
    """
    if student is not None and (cfg.resume or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise RenioInputError("a preloaded student cannot be combined with --resume or torchrun")
    tracking.check_available(tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project)
    t_start = time.perf_counter()
    inputs = shards.open_inputs(cfg.weights, _columns(cfg.loss))
    first_file = inputs.files[0]
    meta = inputs.metadata
    temperature = resolve_temperature(cfg, meta, first_file)
    teacher_name = resolve_teacher(cfg, meta, first_file)
    shards.refuse_overwriting_inputs(cfg.out, cfg.weights, *inputs.files, cfg.model,
                                     None if cfg.resume else cfg.adapter, cfg.init_from,
                                     teacher_name if teacher_name != "self" else None)
    out = _check_out(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0")) if world > 1 else 0
    micro = read_micro_batches(inputs, cfg.loss, rank=rank, world=world)

    d = init_distributed(cfg.device)
    try:
        return _run(cfg, inputs, micro, temperature, teacher_name, out, d, progress, t_start,
                    student, teacher)
    finally:
        if d.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(cfg: TrainConfig, inputs: shards.InputSet, micro: list[MicroBatch | None],
         temperature: float,
         teacher_name: str | None, out: Path, d: Dist, progress: Progress | None,
         t_start: float, student: Any = None, preloaded_teacher: Any = None) -> TrainSummary:
    if d.on and torch.cuda.is_available() and cfg.device != "cpu":
        device = torch.device("cuda", d.local_rank)
    else:
        device = models.choose_device(cfg.device)
    grad_accum = cfg.grad_accum
    if cfg.steps_per_batch is not None:
        grad_accum = len(micro) // (d.world * cfg.steps_per_batch)
        if grad_accum == 0:
            raise RenioInputError(
                f"{len(micro)} micro-batches (batch_id groups) cannot make {cfg.steps_per_batch} "
                f"optimizer steps on {d.world} processes (--steps-per-batch)", file=inputs.files[0])
    per_step = d.world * grad_accum
    steps_per_epoch = len(micro) // per_step
    if steps_per_epoch == 0:
        raise RenioInputError(
            f"{len(micro)} micro-batches (batch_id groups) are fewer than one optimizer step "
            f"needs ({d.world} processes x --grad-accum {cfg.grad_accum})", file=inputs.files[0],
        )
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    dropped = len(micro) - steps_per_epoch * per_step

    # LoRA on a GPU: the frozen base in bf16, the adapter in fp32 (peft upcasts it). A full
    # fine-tune keeps fp32 master weights and runs the matmuls under bf16 autocast. On CPU
    # everything stays fp32 unless --bf16-autocast asks for bf16 matmuls (CPU autocast).
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if (device.type == "cuda" and cfg.lora) else "float32"
    if cfg.bf16_autocast is None:
        autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        autocast = cfg.bf16_autocast
        if autocast and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RenioInputError("--bf16-autocast: this GPU has no bf16 support; drop the flag")

    tok = models.load_tokenizer(cfg.model)
    want_fp = shards.find_in_lineage(inputs.metadata, "tokenizer_fingerprint")
    if want_fp is not None and want_fp != models.tokenizer_fingerprint(tok):
        raise RenioInputError(
            f"tokenizer of --model {cfg.model} differs from the one the shard was made with "
            "(metadata 'tokenizer_fingerprint'); train the model that sampled the rollouts",
            file=inputs.files[0],
        )
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    state: dict[str, Any] | None = None
    if cfg.resume:
        state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=False)
        saved, now = state.get("data") or {}, cfg.data_fields()
        # A key the checkpoint does not record (made by an older renio) cannot be compared.
        changed = [f"--{k.replace('_', '-')} {saved.get(k)} (checkpoint) vs {now[k]} (now)"
                   for k in now if k in saved and saved[k] != now[k]]
        if changed:
            raise RenioInputError(
                "--resume: the checkpoint was made with other settings: " + "; ".join(changed)
                + "; use the same flags or another --out", file=out,
            )
        if state.get("input_fingerprint") != shards.fingerprint_of(inputs.fingerprint()):
            raise RenioInputError("--resume: the checkpoint was trained on other --weights", file=out)
        source = str(out) if not cfg.lora else cfg.model
        adapter = str(out) if cfg.lora else None
    else:
        source, adapter = cfg.model, cfg.adapter
    if student is not None:
        model = student
        model.train()
    else:
        model = _build_model(cfg, source, adapter, dtype, device)
    _check_token_ids(micro, _head(_causal_lm(model)).weight.shape[0], inputs.files[0])

    self_teacher = teacher_name == "self"
    teacher = None
    if preloaded_teacher is not None and teacher_name is not None and not self_teacher:
        teacher = preloaded_teacher
    elif preloaded_teacher is not None and self_teacher and not cfg.lora:
        # OPSD with a full fine-tune: the caller keeps the frozen base weights loaded.
        teacher, self_teacher = preloaded_teacher, False
    elif teacher_name is not None and (not self_teacher or not cfg.lora):
        # OPD, or OPSD without an adapter to switch off: the frozen base as a separate model.
        # An explicit --dtype applies to the teacher too; "auto" is bf16 on a GPU.
        t_dtype = cfg.dtype if cfg.dtype != "auto" else (
            "bfloat16" if device.type == "cuda" else "float32")
        teacher = _load_teacher(cfg.model if self_teacher else teacher_name, t_dtype, device, tok)
        self_teacher = False

    spec = LossSpec(cfg.loss, cfg.beta, cfg.token_clip, temperature, cfg.topk_tail)
    chunk = cfg.chunk_size or models.auto_chunk(_head(_causal_lm(model)).weight.shape[0],
                                         cfg.chunk_budget_mb * 2**20)
    module = DistillModule(model, spec, chunk, teacher=teacher, self_teacher=self_teacher,
                           live=live_weight_spec(cfg, inputs.metadata, inputs.files[0]))
    wrapped: torch.nn.Module = module
    if d.on and cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        lm = _causal_lm(model)
        layer_names = set(getattr(lm, "_no_split_modules", None) or [])
        # Works with gloo on CPU too. Parameters are gathered in bf16 only when the matmuls
        # run in bf16 anyway (autocast); gradients are always reduced in fp32.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if autocast else None,
                                  reduce_dtype=torch.float32)
        for sub in lm.modules():
            if type(sub).__name__ in layer_names:
                fully_shard(sub, mp_policy=mp)
        fully_shard(module, mp_policy=mp)
    elif d.on:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(
            module, device_ids=[d.local_rank] if device.type == "cuda" else None
        )

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    offset, sched_total = _schedule_position(cfg, state, total_steps, optimizer, module, d)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(offset + s, schedule=cfg.lr_schedule,
                                       warmup=cfg.warmup_steps, total=sched_total))
    step = 0
    if state is not None:
        _load_optimizer(optimizer, state["optimizer"], module, d, cfg.fsdp)
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        rng = state["rng"]
        _set_rng_state(rng[d.rank] if d.rank < len(rng) else rng[0])
    else:
        torch.manual_seed(cfg.seed + d.rank)
        np.random.seed(cfg.seed + d.rank)
        random.seed(cfg.seed + d.rank)
    resumed_from = step

    metrics_path = out / METRICS_FILE
    tb = None
    if d.main:
        if cfg.overwrite and out.exists() and not cfg.resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        if cfg.resume and metrics_path.exists():
            kept = [ln for ln in metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= step]
        metrics_path.write_text("".join(ln + "\n" for ln in kept))
        # On --resume, TensorBoard hides the interrupted run's events after the checkpoint's step.
        tb = tracking.Tracker(tb_dir=out / "tensorboard" if cfg.tensorboard else None,
                              wandb_project=cfg.wandb_project, run_name=out.name,
                              config=shards._jsonable(cfg),
                              purge_step=step + 1 if cfg.resume else None)

    def save(at_step: int) -> None:
        _save_checkpoint(cfg, module, optimizer, scheduler, tok, out, at_step, d, inputs,
                         temperature, teacher_name,
                         schedule={"global_offset": offset, "schedule_total": sched_total,
                                   "finished": at_step >= total_steps})

    samples_seen = tokens_seen = 0
    first_loss = last_loss = None
    weight_sum = weight_n = 0.0
    while step < total_steps:
        t0 = time.perf_counter()
        within = step % steps_per_epoch
        base = within * per_step
        optimizer.zero_grad(set_to_none=True)
        sums = [0.0] * 6  # loss, weight sum, samples, pivotal share sum, tokens, micro-batches
        step_weights: list[float] = []
        for a in range(grad_accum):
            mb = micro[base + a * d.world + d.rank]
            assert mb is not None, "micro-batch of another rank"
            packed = pack(mb, pad_id, device)
            sync = a == grad_accum - 1
            # DDP: all-reduce the gradients once, after the step's last micro-batch.
            ctx = wrapped.no_sync() if (d.on and not cfg.fsdp and not sync) else contextlib.nullcontext()
            if d.on and cfg.fsdp:
                wrapped.set_requires_gradient_sync(sync)
            with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, _per_token = wrapped(packed)
                (loss / grad_accum).backward()
            lengths = [len(c) for c in mb.completion_ids]
            weights, pivotal = mb.weights, mb.pivotal_count
            if module.last_live is not None:
                weights, pivotal = module.last_live[0].tolist(), module.last_live[1].tolist()
                step_weights.extend(weights)
            sums[0] += float(loss.detach())
            sums[1] += sum(weights)
            sums[2] += len(weights)
            sums[3] += sum(pc / n if n else 0.0 for pc, n in zip(pivotal, lengths))
            sums[4] += sum(lengths)
            sums[5] += 1
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded DTensor
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        scheduler.step()
        step += 1
        sums = _all_reduce_sum(sums, d, device)
        seconds = time.perf_counter() - t0
        record = {
            "step": step,
            "global_step": offset + step,
            "epoch": (step - 1) // steps_per_epoch,
            "loss": sums[0] / sums[5],
            "mean_weight": sums[1] / sums[2],
            "pivotal_share": sums[3] / sums[2],
            "grad_norm": float(grad_norm),
            "lr": scheduler.get_last_lr()[0],
            "samples": int(sums[2]),
            "tokens": int(sums[4]),
            "tokens_per_s": sums[4] / seconds if seconds > 0 else None,
            "step_seconds": seconds,
        }
        if module.live is not None:
            record["live_weights"] = step_weights  # this rank's rows, in micro-batch order
        samples_seen += int(sums[2])
        tokens_seen += int(sums[4])
        weight_sum += sums[1]
        weight_n += sums[2]
        first_loss = record["loss"] if first_loss is None else first_loss
        last_loss = record["loss"]
        if d.main:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if tb is not None:
                tb.log("train", {k: record[k] for k in TRACKED}, step)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            save(step)
        if progress is not None and d.main:
            progress(step, total_steps, record)
    save(step)
    if tb is not None:
        tb.close()
    return TrainSummary(
        out=str(out), steps=step - resumed_from, total_steps=total_steps,
        resumed_from=resumed_from, micro_batches=len(micro), micro_batches_dropped=dropped,
        samples_seen=samples_seen, tokens_seen=tokens_seen, first_loss=first_loss,
        last_loss=last_loss, mean_weight=(weight_sum / weight_n) if weight_n else None,
        seconds=time.perf_counter() - t_start, world_size=d.world, temperature=temperature,
        teacher=teacher_name, loss=cfg.loss,
    )


def _load_optimizer(optimizer: torch.optim.Optimizer, sd: dict[str, Any],
                    module: DistillModule, d: Dist, fsdp: bool) -> None:
    if fsdp and d.on:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        names = [n for n, p in module.named_parameters() if p.requires_grad]
        set_optimizer_state_dict(module, optimizer, _optim_by_name(sd, names),
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(sd)


def _schedule_position(cfg: TrainConfig, state: dict[str, Any] | None, total_steps: int,
                       optimizer: torch.optim.Optimizer, module: DistillModule,
                       d: Dist) -> tuple[int, int]:
    """Where this run starts on the learning-rate schedule and the schedule's total steps.

    ``--resume``: the checkpoint's own values. ``--init-from``: continue that checkpoint's
    schedule and AdamW state (loaded here), refusing settings that would silently differ.
    """
    if state is not None:
        return int(state.get("global_offset", 0)), int(state.get("schedule_total") or total_steps)
    if cfg.init_from is None:
        return 0, cfg.schedule_steps or total_steps
    src = Path(cfg.init_from)
    if not (src / STATE_FILE).is_file():
        raise RenioInputError(f"--init-from: no trainer state ({STATE_FILE}) in the checkpoint "
                              "(pruned, or not made by 'renio train')", file=src)
    init = torch.load(src / STATE_FILE, map_location="cpu", weights_only=False)
    saved = init.get("data") or {}
    offset = int(init.get("global_step", init.get("step", 0)))
    total = cfg.schedule_steps or int(init.get("schedule_total") or 0) or offset + total_steps
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} (checkpoint) vs {getattr(cfg, k)} (now)"
               for k in ("lr", "warmup_steps", "lr_schedule", "lora", "lora_r", "lora_alpha")
               if k in saved and saved[k] != shards._jsonable(getattr(cfg, k))]
    # A constant rate does not depend on the total (a run may be extended); a decay does.
    if cfg.lr_schedule != "constant" and init.get("schedule_total") and total != init["schedule_total"]:
        changed.append(f"--schedule-steps {init['schedule_total']} (checkpoint) vs {total} (now)")
    if changed:
        raise RenioInputError("--init-from: the checkpoint's optimizer ran with other settings: "
                              + "; ".join(changed), file=src)
    try:
        _load_optimizer(optimizer, init["optimizer"], module, d, cfg.fsdp)
    except (ValueError, KeyError) as exc:
        raise RenioInputError(f"--init-from: its optimizer state does not fit this model's "
                              f"trainable parameters ({exc})", file=src) from None
    for group in optimizer.param_groups:  # the schedule is re-applied from the base rate
        group["lr"] = group["initial_lr"] = cfg.lr
    return offset, total


def _save_adapter(model: Any, out: Path) -> None:
    """The files of peft's ``save_pretrained`` that loading needs (adapter weights and
    config), without the model card it renders from a template on every save: the
    ``renio run`` loop saves once per optimizer step."""
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(model)
    save_file({k: v.detach().contiguous() for k, v in state.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.copy(model.peft_config["default"])
    config.inference_mode = True
    config.save_pretrained(str(out))


def _save_checkpoint(cfg: TrainConfig, module: DistillModule, optimizer: torch.optim.Optimizer,
                     scheduler: Any, tok: Any, out: Path, step: int, d: Dist,
                     inputs: shards.InputSet, temperature: float, teacher_name: str | None,
                     schedule: dict[str, Any] | None = None) -> None:
    """Write the HF-format model or adapter plus the trainer state, then swap it into place."""
    rng_states: list[Any] = [_rng_state()]
    model_sd = optim_sd = None
    if d.on:
        import torch.distributed as dist

        gathered: list[Any] = [None] * d.world
        dist.all_gather_object(gathered, rng_states[0])
        rng_states = gathered
        if cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(module, options=opts)
            model_sd = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
            # Tied weights (input embeddings = LM head) come back as two copies: point them at
            # one tensor so that save_pretrained drops the duplicate, as it does without FSDP.
            first: dict[int, str] = {}
            for name, param in module.model.named_parameters(remove_duplicate=False):
                key = first.setdefault(id(param), name)
                if key != name and key in model_sd and name in model_sd:
                    model_sd[name] = model_sd[key]
            optim_sd = get_optimizer_state_dict(module, optimizer, options=opts)
    if not d.main:
        if d.on:
            import torch.distributed as dist

            dist.barrier()
        return
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = module.model
    if model_sd is not None:
        model.save_pretrained(str(tmp), state_dict=model_sd)
    elif models.has_adapter(model):
        _save_adapter(model, tmp)
    else:
        model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    state = {
        "step": step,
        "optimizer": optim_sd if optim_sd is not None else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states,
        "data": cfg.data_fields(),
        "input_fingerprint": shards.fingerprint_of(inputs.fingerprint()),
        "world_size": d.world,
        **(schedule or {}),
        "global_step": (schedule or {}).get("global_offset", 0) + step,
    }
    torch.save(state, tmp / STATE_FILE)
    info = {"step": step, "finished": bool((schedule or {}).get("finished", True)),
            "config": shards._jsonable(cfg), "temperature": temperature,
            "teacher": teacher_name, "base_model": cfg.model, "lora": cfg.lora,
            "upstream": inputs.metadata}
    (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    live = out / METRICS_FILE
    if live.exists():
        shutil.copyfile(live, tmp / METRICS_FILE)
    if (out / "tensorboard").is_dir():
        # Moved, not copied: the open event file keeps writing into it after the swap.
        os.replace(out / "tensorboard", tmp / "tensorboard")
    _swap_dir(tmp, out)
    if d.on:
        import torch.distributed as dist

        dist.barrier()


__all__ = [
    "TrainConfig", "TrainSummary", "run_train", "read_micro_batches", "ChunkedHeadLoss",
    "DistillModule", "naive_loss", "pack", "LossSpec",
]
