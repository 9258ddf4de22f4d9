"""The ``train`` stage: one pass of ReNIO-weighted on-policy distillation over a weights shard.

ReNIO (arXiv 2606.23104) multiplies each sampled trajectory's distillation loss by a weight
computed from its student-to-teacher log-ratios (the ``weight`` stage). This stage reads
``weights.parquet`` (docs/design.md, "The shards"), uses its ``batch_id`` groups as micro-batches,
and optimizes

    batch loss = mean over samples of weight * (mean over completion tokens of the divergence)

with the divergence of ``renio_core.formulas.losses`` (``jsd`` with the teacher's full logits, ``topk``
from the stored top-k, or ``rkl`` from the stored teacher log-probs).

How it stays within memory: the student's decoder runs once per micro-batch; the LM head and
the divergence then run on the completion positions only, ``chunk_size`` positions at a time
(``training.module.ChunkedHeadLoss``). Neither the student's nor the teacher's batch x length x
vocabulary logits ever exist; the extra peak is about ``chunk_size x vocabulary`` floats. By
default the chunk comes from a memory budget (``chunk_budget_mb``, ``models.auto_chunk``):
small vocabularies get long chunks, Qwen3's 151,936 tokens get short ones.

The parts, in ``renio_core/training/``: ``losses`` (the table of losses), ``data``
(micro-batches), ``module`` (the student and its loss as one module), ``parallel`` (torchrun),
``checkpoint`` (save, resume, ``--init-from``), ``score_in_step`` (``renio run``'s scoring in
the train step); this module holds the config and the trainer (:class:`Trainer`: setup
steps, :meth:`Trainer._loss_step`, :meth:`Trainer.train`).

Deliberate differences from the official code:

* the ReNIO weight multiplies every loss (officially the JSD, full and top-k, but not the
  sampled reverse KL), and ``rkl`` is reduced per sample like the others (officially one
  mean over the batch's tokens; see ``formulas.losses``);
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
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from renio_core import tracking
from renio_core.data import shards
from renio_core.errors import RenioInputError
from renio_core.formulas.schedule import lr_factor
from renio_core.modeling import models
from renio_core.training.checkpoint import (
    METRICS_FILE,
    STATE_FILE,
    load_optimizer,
    read_state,
    recover_interrupted_save,
    save_checkpoint,
    schedule_position,
    set_rng_state,
)
from renio_core.training.data import (
    LiveWeightSpec,
    MicroBatch,
    check_token_ids,
    columns,
    pack,
    read_micro_batches,
)
from renio_core.training.losses import LOSS_TABLE, LOSSES, LossSpec, losses_help
from renio_core.training.module import DistillModule, lm_head
from renio_core.training.parallel import (
    Dist,
    all_reduce_sum,
    init_distributed,
    wrap,
)
from renio_core.training.score_in_step import ScoreInTrainStep, StepLogprobs, StepShards

LR_SCHEDULES = ("constant", "linear", "cosine")
WEIGHTS_FROM = ("shard", "live")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Per-step scalars sent to TensorBoard and W&B (renio_core/tracking.py).
TRACKED = ("loss", "mean_weight", "pivotal_share", "grad_norm", "tokens_per_s", "lr")

# progress(step, total_steps, metrics of that step), after each step, and once before the
# first with metrics None (so a progress bar knows its total while that step runs); called on
# rank 0 only.
Progress = Callable[[int, int, "dict[str, Any] | None"], None]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


SELF_TEACHER_NOT_SPREAD = (
    "teacher_device_map: the OPSD teacher (--teacher self with LoRA) is the student being "
    "trained, its adapter switched off; a model being trained is not spread with a device "
    "map (--fsdp under torchrun is that path). Leave --teacher-device-map unset")


@dataclasses.dataclass
class TrainConfig:
    weights: str = dataclasses.field(metadata={"help":
        "Output of 'renio weight': a .parquet file, a directory of parts, or a glob."})
    model: str = dataclasses.field(metadata={"help":
        "The student: a model name or path (toy:student for the toy world)."})
    out: str = dataclasses.field(metadata={"help":
        "Checkpoint directory (Hugging Face format plus trainer state)."})
    loss: str = dataclasses.field(
        default="jsd", metadata={"help": losses_help() + "."})
    beta: float = dataclasses.field(default=0.0, metadata={"help":
        "JSD mixing: 0 = KL(teacher||student), 1 = KL(student||teacher)."})
    token_clip: float = dataclasses.field(default=0.05, metadata={"help":
        "Clamp each vocabulary entry's term to [0, clip]; 0 = no clamp."})
    topk_tail: bool = dataclasses.field(default=True, metadata={"help":
        "topk: keep the mass outside the top-k as one bucket (default), or renormalize both "
        "sides on the top-k."})
    temperature: float | None = dataclasses.field(default=None, metadata={"help":
        "Distribution temperature; default: the scoring temperature in the shard's metadata."})
    teacher: str | None = dataclasses.field(default=None, metadata={"help":
        "jsd only: teacher model (OPD), or 'self' (OPSD: base weights, privileged prompt). "
        "Default: from metadata."})
    lora: bool = dataclasses.field(default=True, metadata={"help":
        "Train a LoRA adapter (default) or the full model."})
    lora_r: int = dataclasses.field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = dataclasses.field(default=128, metadata={"help": "LoRA alpha."})
    lora_targets: tuple[str, ...] = dataclasses.field(default=DEFAULT_LORA_TARGETS, metadata={"help":
        "Comma-separated module names that get LoRA."})
    adapter: str | None = dataclasses.field(default=None, metadata={"help":
        "Start from this LoRA adapter (previous iteration)."})
    lr: float = dataclasses.field(default=5e-6, metadata={"help": "AdamW learning rate."})
    epochs: int = dataclasses.field(default=1, metadata={"help": "Passes over the micro-batches."})
    max_steps: int | None = dataclasses.field(default=None, metadata={"help":
        "Optimizer steps; overrides --epochs (cycles the data)."})
    grad_accum: int = dataclasses.field(default=1, metadata={"help":
        "Micro-batches per optimizer step and process."})
    grad_clip: float = dataclasses.field(default=1.0, metadata={"help":
        "Gradient norm clip; 0 = none."})
    warmup_steps: int = dataclasses.field(default=0, metadata={"help":
        "Linear learning-rate warm-up steps, then --lr-schedule."})
    # The learning-rate schedule after warmup: constant, linear (to 0) or cosine (to 0).
    lr_schedule: str = dataclasses.field(default="constant", metadata={"help":
        "After warm-up: constant, linear (to 0 at --schedule-steps; the official run's) or "
        "cosine."})
    # Total optimizer steps of the schedule, counted from the first run of a chain of
    # --init-from runs; None = this run's own steps (plus, with init_from, the checkpoint's).
    schedule_steps: int | None = dataclasses.field(default=None, metadata={"help":
        "Total steps of the schedule, over a chain of --init-from runs. Default: this run's "
        "steps (plus --init-from's)."})
    # Optimizer steps per pass over the shard: the micro-batches are split into this many
    # equal steps (grad_accum derived). None = --grad-accum micro-batches per step.
    steps_per_batch: int | None = dataclasses.field(default=None, metadata={"help":
        "Split the shard's micro-batches into this many optimizer steps (gradient accumulation "
        "derived); default: --grad-accum micro-batches per step."})
    # A finished checkpoint whose optimizer and schedule state this run continues (not its
    # data position: a new shard). With LoRA, also the adapter to continue (unless --adapter).
    init_from: str | None = dataclasses.field(default=None, metadata={"help":
        "Continue this finished checkpoint's AdamW and schedule state (and, with LoRA, its "
        "adapter) on a new shard: one optimizer across 'renio train' calls."})
    # ReNIO weights from the shard's 'weight' column, or "live": recomputed inside each train
    # step from this forward pass's student log-probs and the stored teacher log-probs, with
    # the weight stage's clip/threshold/tem/norm, normalized over the micro-batch.
    weights_from: str = dataclasses.field(default="shard", metadata={"help":
        "shard: the 'weight' column; live: recompute the ReNIO weight in each step from this "
        "forward pass's student log-probs (the weight stage's settings, normalized per micro-"
        "batch)."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Seed (LoRA initialization)."})
    gradient_checkpointing: bool = dataclasses.field(default=False, metadata={"help":
        "Recompute decoder activations in backward (less memory)."})
    resume: bool = dataclasses.field(default=False, metadata={"help":
        "Continue the checkpoint in --out exactly."})
    fsdp: bool = dataclasses.field(default=False, metadata={"help":
        "Shard the student with FSDP (under torchrun; nccl on GPUs, gloo on CPU)."})
    save_every: int = dataclasses.field(default=0, metadata={"help":
        "Save a resumable checkpoint every N steps; 0 = only at the end."})
    # Completion positions per LM-head chunk; None: auto_chunk(vocabulary, chunk_budget_mb).
    chunk_size: int | None = dataclasses.field(default=None, metadata={"help":
        "Completion positions per LM-head chunk; default: from --chunk-budget-mb and the "
        "vocabulary."})
    chunk_budget_mb: float = dataclasses.field(default=256.0, metadata={"help":
        "Memory for the LM-head chunk's logits and divergence (sets the default --chunk-size)."})
    dtype: str = dataclasses.field(default="auto", metadata={"help":
        "Student weights: auto (bf16 base for LoRA on GPU, else fp32), float32, bfloat16."})
    bf16_autocast: bool | None = dataclasses.field(default=None, metadata={"help":
        "Run forward and backward under bf16 autocast (fp32 master weights). Default: on for "
        "CUDA GPUs with bf16, off on CPU."})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto, cpu or cuda."})
    teacher_device_map: str = dataclasses.field(default="none", metadata={"help":
        "auto spreads the frozen teacher's layers over the visible CUDA GPUs (transformers' "
        "device_map='auto', needs accelerate); none keeps it on --device. Never the student: "
        "a model being trained is spread with --fsdp under torchrun."})
    tensorboard: bool = dataclasses.field(default=False, metadata={"help":
        "Also write TensorBoard events to OUT/tensorboard."})
    wandb_project: str | None = dataclasses.field(default=None, metadata={"help":
        "Also log to this Weights & Biases project (pip install 'renio[wandb]'; "
        "WANDB_MODE=offline works without network)."})
    overwrite: bool = dataclasses.field(default=False, metadata={"help":
        "Replace a non-empty --out."})

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
        models.check_device_map(self.teacher_device_map, self.device,
                                flag="--teacher-device-map")
        if self.teacher_device_map == "auto":
            if not LOSS_TABLE[self.loss].needs_teacher_model:
                raise RenioInputError(
                    f"teacher_device_map: --loss {self.loss} loads no teacher model (it uses "
                    "the stored teacher log-probs); leave --teacher-device-map unset")
            if self.teacher == "self" and self.lora:
                raise RenioInputError(SELF_TEACHER_NOT_SPREAD)
            if self.fsdp:
                raise RenioInputError(
                    "teacher_device_map: auto with --fsdp would spread a teacher over every "
                    "GPU in every process; use one or the other")
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

    def data_content(self) -> dict[str, str]:
        """What the fields of :meth:`data_fields` that name a model or checkpoint folder hold,
        so that a run moved or restored together with those folders still resumes."""
        return {k: shards.fingerprint_of(shards.portable_config(v, k))
                for k, v in self.data_fields().items() if k in shards.PATH_KEYS}


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
    # The scores and weights shards written before the checkpoint (score_in_train_step).
    step_shards: StepShards | None = None


# --------------------------------------------------------------------------------------------
# Settings resolved from the shard's metadata
# --------------------------------------------------------------------------------------------


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
    if not LOSS_TABLE[cfg.loss].needs_teacher_model:
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


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _check_out(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    recover_interrupted_save(out)  # a kill between a save's two renames left no ``out``
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
        lm = models.causal_lm(model)
        # transformers 5 renamed the method (and its keyword); older releases have the old one.
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _load_teacher(name: str, dtype: str, device: torch.device, student_tok: Any,
                  device_map: str = "none") -> Any:
    teacher = models.load_model(name, dtype=dtype, device=str(device), device_map=device_map)
    teacher.requires_grad_(False)
    teacher.eval()
    t_tok = models.load_tokenizer(name)
    models.check_tokenizers_compatible(student_tok, t_tok, teacher_name=name)
    return teacher


def run_train(cfg: TrainConfig, progress: Progress | None = None, *,
              student: Any = None, teacher: Any = None, tokenizer: Any = None,
              score_in_train_step: ScoreInTrainStep | None = None) -> TrainSummary:
    """Train the student on ``cfg.weights`` and write the checkpoint to ``cfg.out``.

    ``student``/``teacher`` may be passed already loaded (the ``renio run`` loop keeps them
    across iterations): the student is trained in place and must come from
    :func:`attach_lora` (or be a full model with ``--no-lora``); ``teacher`` replaces loading
    ``--teacher``, ``tokenizer`` loading ``--model``'s. Not combined with ``--resume`` or
    torchrun. ``score_in_train_step`` (``renio run``'s) trains on rollouts the step scores
    itself, instead of ``cfg.weights``.
    """
    if score_in_train_step is not None and student is None:
        raise RenioInputError("scoring in the train step needs the loop's resident student")
    if student is not None and (cfg.resume or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise RenioInputError("a preloaded student cannot be combined with --resume or torchrun")
    if cfg.teacher_device_map == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RenioInputError("teacher_device_map: auto under torchrun would spread a teacher "
                              "over every GPU in every process; leave it unset there")
    tracking.check_available(tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project)
    t_start = time.perf_counter()
    if score_in_train_step is None:
        inputs = shards.open_inputs(cfg.weights, columns(cfg.loss))
        first_file = inputs.files[0]
        temperature = resolve_temperature(cfg, inputs.metadata, first_file)
        teacher_name = resolve_teacher(cfg, inputs.metadata, first_file)
        input_paths = [cfg.weights, *inputs.files]
    else:  # the rollouts, with what the loop's stage configs say
        inputs = score_in_train_step.inputs
        temperature, teacher_name = score_in_train_step.temperature, score_in_train_step.teacher
        input_paths = list(inputs.files)
    shards.refuse_overwriting_inputs(cfg.out, *input_paths, cfg.model,
                                     None if cfg.resume else cfg.adapter, cfg.init_from,
                                     teacher_name if teacher_name != "self" else None)
    out = _check_out(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0")) if world > 1 else 0
    micro = (read_micro_batches(inputs, cfg.loss, rank=rank, world=world)
             if score_in_train_step is None else list(score_in_train_step.micro))

    # Whether --out holds nothing of its own yet: a run that ends without a checkpoint (a
    # full disk at its save) then leaves it as it found it, so the same command can be run
    # again once the cause is fixed.
    fresh = out.is_dir() and not any(out.iterdir()) if out.exists() else None
    dist_state = init_distributed(cfg.device)
    try:
        trainer = Trainer(cfg, inputs, micro, temperature, teacher_name, out, dist_state,
                          score_in_train_step=score_in_train_step)
        trainer.setup(student, teacher, tokenizer)
        return trainer.train(progress, t_start)
    except BaseException:
        if dist_state.main and fresh is not False and not (out / STATE_FILE).exists():
            shutil.rmtree(out, ignore_errors=True)
            if fresh:
                out.mkdir()
        raise
    finally:
        if dist_state.initialized_here:
            dist.destroy_process_group()


@dataclasses.dataclass
class StepTotals:
    """One optimizer step's sums over its micro-batches (all-reduced across processes)."""

    loss: float = 0.0  # sum of the micro-batches' losses
    weight: float = 0.0  # sum of the sample weights
    samples: float = 0.0
    pivotal_share: float = 0.0  # sum over samples of pivotal tokens / tokens
    tokens: float = 0.0
    micro_batches: float = 0.0

    def add(self, loss: float, weights: list[float], pivotal: list[int], lengths: list[int]) -> None:
        self.loss += loss
        self.weight += sum(weights)
        self.samples += len(weights)
        self.pivotal_share += sum(pc / n if n else 0.0 for pc, n in zip(pivotal, lengths))
        self.tokens += sum(lengths)
        self.micro_batches += 1

    def all_reduced(self, dist_state: Dist, device: torch.device) -> StepTotals:
        return StepTotals(*all_reduce_sum(list(dataclasses.astuple(self)), dist_state, device))


class Trainer:
    """One ``renio train`` run: set up (precision, the step plan, models, the parallel wrap,
    the optimizer and what to restore), then :meth:`train`, one :meth:`_loss_step` per
    micro-batch."""

    def __init__(self, cfg: TrainConfig, inputs: shards.InputSet, micro: list[MicroBatch | None],
                 temperature: float, teacher_name: str | None, out: Path, dist_state: Dist,
                 score_in_train_step: ScoreInTrainStep | None = None):
        self.cfg, self.inputs, self.micro, self.out = cfg, inputs, micro, out
        self.dist_state = dist_state
        self.temperature, self.teacher_name = temperature, teacher_name
        self.score_in_train_step = score_in_train_step
        # The step's log-probs of each row it trained on (score_in_train_step).
        self.step_logprobs: StepLogprobs = {}
        self.state: dict[str, Any] | None = None  # the checkpoint's trainer state (--resume)
        self.step = 0

    # -- setup ---------------------------------------------------------------------------

    def setup(self, student: Any = None, teacher: Any = None, tokenizer: Any = None) -> None:
        self._setup_device_and_precision()
        self._setup_step_plan()
        self._setup_tokenizer(tokenizer)
        self._setup_resume()
        self._setup_models(student, teacher)
        self._setup_optimizer()
        self._setup_metrics()

    def _setup_device_and_precision(self) -> None:
        cfg, dist_state = self.cfg, self.dist_state
        if dist_state.on and torch.cuda.is_available() and cfg.device != "cpu":
            self.device = torch.device("cuda", dist_state.local_rank)
        else:
            self.device = models.choose_device(cfg.device)
        # LoRA on a GPU: the frozen base in bf16, the adapter in fp32 (peft upcasts it). A full
        # fine-tune keeps fp32 master weights and runs the matmuls under bf16 autocast. On CPU
        # everything stays fp32 unless --bf16-autocast asks for bf16 matmuls (CPU autocast).
        cuda = self.device.type == "cuda"
        self.dtype = cfg.dtype
        if self.dtype == "auto":
            self.dtype = "bfloat16" if (cuda and cfg.lora) else "float32"
        if cfg.bf16_autocast is None:
            self.autocast = cuda and torch.cuda.is_bf16_supported()
        else:
            self.autocast = cfg.bf16_autocast
            if self.autocast and cuda and not torch.cuda.is_bf16_supported():
                raise RenioInputError("--bf16-autocast: this GPU has no bf16 support; drop the flag")

    def _setup_step_plan(self) -> None:
        """Micro-batches per optimizer step, steps per epoch, and the run's total steps."""
        cfg, dist_state = self.cfg, self.dist_state
        n_micro, file = len(self.micro), self.inputs.files[0]
        self.grad_accum = cfg.grad_accum
        if cfg.steps_per_batch is not None:
            self.grad_accum = n_micro // (dist_state.world * cfg.steps_per_batch)
            if self.grad_accum == 0:
                raise RenioInputError(
                    f"{n_micro} micro-batches (batch_id groups) cannot make {cfg.steps_per_batch} "
                    f"optimizer steps on {dist_state.world} processes (--steps-per-batch)",
                    file=file)
        self.per_step = dist_state.world * self.grad_accum
        self.steps_per_epoch = n_micro // self.per_step
        if self.steps_per_epoch == 0:
            raise RenioInputError(
                f"{n_micro} micro-batches (batch_id groups) are fewer than one optimizer step "
                f"needs ({dist_state.world} processes x --grad-accum {cfg.grad_accum})", file=file,
            )
        self.total_steps = (cfg.max_steps if cfg.max_steps is not None
                            else cfg.epochs * self.steps_per_epoch)
        self.dropped = n_micro - self.steps_per_epoch * self.per_step

    def _setup_tokenizer(self, preloaded: Any = None) -> None:
        cfg = self.cfg
        self.tok = preloaded if preloaded is not None else models.load_tokenizer(cfg.model)
        want_fp = shards.find_in_lineage(self.inputs.metadata, "tokenizer_fingerprint")
        if want_fp is not None and want_fp != models.tokenizer_fingerprint(self.tok):
            raise RenioInputError(
                f"tokenizer of --model {cfg.model} differs from the one the shard was made with "
                "(metadata 'tokenizer_fingerprint'); train the model that sampled the rollouts",
                file=self.inputs.files[0],
            )
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def _setup_resume(self) -> None:
        """With --resume, the checkpoint's trainer state, refused if made with other settings."""
        cfg, out = self.cfg, self.out
        if not cfg.resume:
            return
        state = read_state(out / STATE_FILE)
        saved, now = state.get("data") or {}, cfg.data_fields()
        # --resume takes no --init-from: what that checkpoint gave (the adapter, the AdamW
        # state, the place on the schedule) is in this checkpoint now.
        now.pop("init_from")
        # Folders compare by what they hold, where the checkpoint recorded it.
        held, held_now = state.get("data_content") or {}, cfg.data_content()

        def differs(k: str) -> bool:
            return held[k] != held_now[k] if k in held else saved[k] != now[k]

        # A key the checkpoint does not record (made by an older renio) cannot be compared.
        changed = [f"--{k.replace('_', '-')} {saved.get(k)} (checkpoint) vs {now[k]} (now)"
                   for k in now if k in saved and differs(k)]
        if changed:
            raise RenioInputError(
                "--resume: the checkpoint was made with other settings: " + "; ".join(changed)
                + "; use the same flags or another --out", file=out,
            )
        if state.get("input_fingerprint") != shards.input_fingerprint(self.inputs.fingerprint()):
            raise RenioInputError("--resume: the checkpoint was trained on other --weights", file=out)
        self.state = state

    def _setup_models(self, student: Any, preloaded_teacher: Any) -> None:
        """The student (trainable), the teacher if the loss needs it, and the wrapped module."""
        cfg, device = self.cfg, self.device
        if student is not None:
            model = student
            model.train()
        elif self.state is not None:
            model = _build_model(cfg, cfg.model if cfg.lora else str(self.out),
                                 str(self.out) if cfg.lora else None, self.dtype, device)
        else:
            model = _build_model(cfg, cfg.model, cfg.adapter, self.dtype, device)
        vocab = lm_head(models.causal_lm(model)).weight.shape[0]
        check_token_ids(self.micro, vocab, self.inputs.files[0])

        teacher, self_teacher = self._teacher(preloaded_teacher)
        chunk = cfg.chunk_size or models.auto_chunk(vocab, cfg.chunk_budget_mb * 2**20)
        self.module = DistillModule(
            model, LossSpec(cfg.loss, cfg.beta, cfg.token_clip, self.temperature, cfg.topk_tail),
            chunk, teacher=teacher, self_teacher=self_teacher,
            live=(self.score_in_train_step.live if self.score_in_train_step is not None else
                  live_weight_spec(cfg, self.inputs.metadata, self.inputs.files[0])))
        self.wrapped = wrap(self.module, self.dist_state, device, fsdp=cfg.fsdp,
                            autocast=self.autocast)

    def _teacher(self, preloaded: Any) -> tuple[Any, bool]:
        """(separate teacher model or None, whether the teacher is the student's own base with
        its adapter switched off)."""
        cfg, name = self.cfg, self.teacher_name
        self_teacher = name == "self"
        if name is None:
            return None, False
        if preloaded is not None and not self_teacher:
            return preloaded, False
        if preloaded is not None and not cfg.lora:
            # OPSD with a full fine-tune: the caller keeps the frozen base weights loaded.
            return preloaded, False
        if self_teacher and cfg.lora:
            if cfg.teacher_device_map == "auto":  # 'self' read from the score metadata
                raise RenioInputError(SELF_TEACHER_NOT_SPREAD)
            return None, True
        # OPD, or OPSD without an adapter to switch off: the frozen base as a separate model.
        # An explicit --dtype applies to the teacher too; "auto" is bf16 on a GPU.
        t_dtype = cfg.dtype if cfg.dtype != "auto" else (
            "bfloat16" if self.device.type == "cuda" else "float32")
        return _load_teacher(cfg.model if self_teacher else name, t_dtype, self.device,
                             self.tok, cfg.teacher_device_map), False

    def _setup_optimizer(self) -> None:
        """AdamW and the schedule, continued from --resume or --init-from; seeds otherwise."""
        cfg, dist_state, module = self.cfg, self.dist_state, self.module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.offset, self.sched_total = schedule_position(cfg, self.state, self.total_steps,
                                                          self.optimizer, module, dist_state)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(self.offset + s, schedule=cfg.lr_schedule,
                                                warmup=cfg.warmup_steps, total=self.sched_total))
        if self.state is not None:
            load_optimizer(self.optimizer, self.state["optimizer"], module, dist_state, cfg.fsdp)
            self.scheduler.load_state_dict(self.state["scheduler"])
            self.step = int(self.state["step"])
            rng = self.state["rng"]
            set_rng_state(rng[dist_state.rank] if dist_state.rank < len(rng) else rng[0])
        else:
            torch.manual_seed(cfg.seed + dist_state.rank)
            np.random.seed((cfg.seed + dist_state.rank) % 2**32)  # numpy's legacy seed is 32-bit
            random.seed(cfg.seed + dist_state.rank)
        self.resumed_from = self.step

    def _setup_metrics(self) -> None:
        """metrics.jsonl (kept up to the checkpoint's step on --resume) and the trackers."""
        cfg, out = self.cfg, self.out
        self.metrics_path = out / METRICS_FILE
        self.tracker = None
        if not self.dist_state.main:
            return
        if cfg.overwrite and out.exists() and not cfg.resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        if cfg.resume and self.metrics_path.exists():
            kept = [ln for ln in self.metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in kept))
        # On --resume, TensorBoard hides the interrupted run's events after the checkpoint's step.
        self.tracker = tracking.Tracker(
            tb_dir=out / "tensorboard" if cfg.tensorboard else None,
            wandb_project=cfg.wandb_project, run_name=out.name, config=shards._jsonable(cfg),
            purge_step=self.step + 1 if cfg.resume else None)

    # -- the step ------------------------------------------------------------------------

    def _loss_step(self, mb: MicroBatch, sync: bool, totals: StepTotals,
                   step_weights: list[float]) -> None:
        """Forward and backward of one micro-batch; gradients accumulate until ``sync``."""
        dist_state, fsdp = self.dist_state, self.cfg.fsdp
        packed = pack(mb, self.pad_id, self.device)
        # DDP: all-reduce the gradients once, after the step's last micro-batch.
        ctx = (self.wrapped.no_sync() if (dist_state.on and not fsdp and not sync)
               else contextlib.nullcontext())
        if dist_state.on and fsdp:
            self.wrapped.set_requires_gradient_sync(sync)
        with ctx, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, _per_token = self.wrapped(packed)
            (loss / self.grad_accum).backward()
        weights, pivotal = mb.weights, mb.pivotal_count
        if self.module.last_live is not None:
            weights, pivotal = (self.module.last_live[0].tolist(),
                                self.module.last_live[1].tolist())
            step_weights.extend(weights)
        if self.score_in_train_step is not None and mb.rows is not None:
            student_N, teacher_N = self.module.last_logprobs
            starts = shards.row_offsets([len(c) for c in mb.completion_ids])[1:-1]
            for row, s_lp, t_lp in zip(mb.rows, np.split(student_N, starts),
                                       np.split(teacher_N, starts)):
                self.step_logprobs[row] = (s_lp.tolist(), t_lp.tolist())
        totals.add(float(loss.detach()), weights, pivotal, [len(c) for c in mb.completion_ids])

    def _optimizer_step(self) -> tuple[dict[str, Any], StepTotals]:
        """One optimizer step over ``grad_accum`` micro-batches per process; its metrics."""
        cfg, dist_state = self.cfg, self.dist_state
        t0 = time.perf_counter()
        base = (self.step % self.steps_per_epoch) * self.per_step
        self.optimizer.zero_grad(set_to_none=True)
        totals, step_weights = StepTotals(), []
        for a in range(self.grad_accum):
            mb = self.micro[base + a * dist_state.world + dist_state.rank]
            assert mb is not None, "micro-batch of another rank"
            self._loss_step(mb, a == self.grad_accum - 1, totals, step_weights)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        t = totals.all_reduced(dist_state, self.device)
        seconds = time.perf_counter() - t0
        record = {
            "step": self.step,
            "global_step": self.offset + self.step,
            "epoch": (self.step - 1) // self.steps_per_epoch,
            "loss": t.loss / t.micro_batches,
            "mean_weight": t.weight / t.samples,
            "pivotal_share": t.pivotal_share / t.samples,
            "grad_norm": float(grad_norm),
            "lr": self.scheduler.get_last_lr()[0],
            "samples": int(t.samples),
            "tokens": int(t.tokens),
            "tokens_per_s": t.tokens / seconds if seconds > 0 else None,
            "step_seconds": seconds,
        }
        if self.module.live is not None:
            record["live_weights"] = step_weights  # this rank's rows, in micro-batch order
        return record, t

    def _save(self, at_step: int) -> None:
        save_checkpoint(self.cfg, self.module, self.optimizer, self.scheduler, self.tok,
                        self.out, at_step, self.dist_state, self.inputs, self.temperature,
                        self.teacher_name,
                        schedule={"global_offset": self.offset, "schedule_total": self.sched_total,
                                  "finished": at_step >= self.total_steps})

    # -- the loop ------------------------------------------------------------------------

    def train(self, progress: Progress | None, t_start: float) -> TrainSummary:
        cfg, dist_state, total = self.cfg, self.dist_state, self.total_steps
        samples_seen = tokens_seen = 0
        first_loss = last_loss = None
        weight_sum = weight_n = 0.0
        if progress is not None and dist_state.main:
            progress(self.step, total, None)
        while self.step < total:
            record, t = self._optimizer_step()
            samples_seen += record["samples"]
            tokens_seen += record["tokens"]
            weight_sum += t.weight
            weight_n += t.samples
            first_loss = record["loss"] if first_loss is None else first_loss
            last_loss = record["loss"]
            if dist_state.main:
                with open(self.metrics_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                if self.tracker is not None:
                    self.tracker.log("train", {k: record[k] for k in TRACKED}, self.step)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < total:
                self._save(self.step)
            if progress is not None and dist_state.main:
                progress(self.step, total, record)
        step_shards = None
        if self.score_in_train_step is not None:  # the shards, then the checkpoint
            step_shards = self.score_in_train_step.write_shards(self.step_logprobs)
        self._save(self.step)
        if self.tracker is not None:
            self.tracker.close()
        return TrainSummary(
            out=str(self.out), steps=self.step - self.resumed_from, total_steps=total,
            resumed_from=self.resumed_from, micro_batches=len(self.micro),
            micro_batches_dropped=self.dropped, samples_seen=samples_seen,
            tokens_seen=tokens_seen, first_loss=first_loss, last_loss=last_loss,
            mean_weight=(weight_sum / weight_n) if weight_n else None,
            seconds=time.perf_counter() - t_start, world_size=dist_state.world,
            temperature=self.temperature, teacher=self.teacher_name, loss=cfg.loss,
            step_shards=step_shards,
        )
