"""The models ``renio run`` keeps loaded for the whole run (:class:`Resident`) and their
tokenizers (:class:`Tokenizers`).

The student with its LoRA adapter and the teacher stay loaded across stages and iterations;
after each train step the new adapter is loaded into the resident student.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from renio_core.modeling import models
from renio_core.run.config import RunConfig
from renio_core.stages.rollout import (
    make_sampler,
)
from renio_core.stages.train import attach_lora, run_train
from renio_core.training.checkpoint import (
    verify_checkpoint,
)
from renio_core.training.score_in_step import ScoreInTrainStep


class Resident:
    """The models kept loaded for the whole run."""

    def __init__(self, cfg: RunConfig, stage_defaults: dict[str, Any], tokenizers: Tokenizers):
        self.student_name = models.resolve_name(cfg.student)
        self.lora = cfg.lora
        self.tokenizer = tokenizers.student
        self.device = stage_defaults.get("device", "auto")
        self.dtype = stage_defaults.get("dtype", "auto")
        self.student = models.load_model(self.student_name, dtype=self.dtype, device=self.device)
        self.teacher = None
        self.teacher_tok = None
        teacher_map = cfg.score.get("device_map", "none")  # the frozen teacher only
        if cfg.teacher != "self":
            self.teacher_tok = tokenizers.teacher
            self.teacher = models.load_model(cfg.teacher, dtype=self.dtype, device=self.device,
                                             device_map=teacher_map)
        elif not cfg.lora:
            # OPSD with a full fine-tune: no adapter to switch off, so the frozen base stays
            # loaded beside the student it is trained into.
            self.teacher = models.load_model(self.student_name, dtype=self.dtype,
                                             device=self.device, device_map=teacher_map)
            self.teacher.requires_grad_(False)
        self.checkpoint: str | None = None
        self.vllm_sampler: Any = None

    def sampler(self, rollout_cfg: Any, lora_rank: int) -> Any:
        """With ``backend: vllm``, one engine for the whole run, built on first use with LoRA
        enabled up to the trainer's rank; each rollout (and eval) swaps in the newest
        adapter. None for the HF backend, which samples from the resident student."""
        if rollout_cfg.backend != "vllm":
            return None
        if self.vllm_sampler is None:
            self.vllm_sampler = make_sampler(dataclasses.replace(rollout_cfg, adapter=None),
                                             self.tokenizer, lora_rank=lora_rank)
        self.vllm_sampler.set_adapter(rollout_cfg.adapter)
        return self.vllm_sampler

    def close(self) -> None:
        if self.vllm_sampler is not None:
            self.vllm_sampler.close()
            self.vllm_sampler = None

    def use_checkpoint(self, ckpt: str | None) -> None:
        """Make the resident student equal to checkpoint ``ckpt`` (an adapter on the base, or
        a fully fine-tuned model).

        Only needed when a resumed run starts from a checkpoint on disk: otherwise the resident
        student is the one just trained, already equal to the newest checkpoint.
        """
        if ckpt == self.checkpoint or ckpt is None:
            return
        verify_checkpoint(Path(ckpt))
        if not self.lora:
            self.student = models.load_model(ckpt, dtype=self.dtype, device=self.device)
        else:
            from peft import PeftModel, set_peft_model_state_dict
            from safetensors.torch import load_file

            if isinstance(self.student, PeftModel):
                set_peft_model_state_dict(
                    self.student, load_file(str(Path(ckpt) / "adapter_model.safetensors")))
            else:
                with models.quiet_peft():
                    self.student = PeftModel.from_pretrained(self.student, ckpt, is_trainable=True)
        self.student.eval()
        self.checkpoint = ckpt

    def train(self, train_cfg: Any, out: str, on_step: Any,
              score_in_train_step: ScoreInTrainStep | None = None) -> Any:
        """Train the resident student in place (continuing its adapter) and record that it
        now equals the checkpoint written to ``out``."""
        self.student = attach_lora(self.student, train_cfg)
        try:
            summary = run_train(train_cfg, on_step, student=self.student, teacher=self.teacher,
                                tokenizer=self.tokenizer,
                                score_in_train_step=score_in_train_step)
        finally:
            self.student.eval()
        self.checkpoint = out
        return summary


class Tokenizers:
    """The student's and (a separate teacher's) tokenizers, loaded and checked compatible
    before any work; the resident models use them."""

    def __init__(self, cfg: RunConfig):
        self.student = models.load_tokenizer(models.resolve_name(cfg.student))
        self.teacher = None
        if cfg.teacher != "self":
            self.teacher = models.load_tokenizer(cfg.teacher)
            models.check_tokenizers_compatible(self.student, self.teacher,
                                               student_name=cfg.student, teacher_name=cfg.teacher)

    def context(self, cfg: RunConfig) -> int | None:
        """The tokens a rollout row may take: the student samples it and the teacher scores
        it, so the smaller of their contexts."""
        limits = [models.context_length(models.load_config(cfg.student), self.student)]
        if self.teacher is not None:
            limits.append(models.context_length(models.load_config(cfg.teacher), self.teacher))
        known = [x for x in limits if x is not None]
        return min(known) if known else None

