"""The distillation losses of ``renio train``, one table entry each (docs/design.md,
"Training losses").

Every loss is a per-token divergence between the student and the teacher, computed two ways
that must agree (tests/test_train.py): chunked, on ``chunk`` completion positions at a time
from the student's logits of those positions (:attr:`LossEntry.chunk_fn`, used by
``DistillModule``), and naive, on the whole micro-batch's (batch, time, vocabulary) logits
(:attr:`LossEntry.naive`, the reference). The formulas are in ``renio_core.formulas.losses``.

A new loss is one entry of :data:`LOSS_TABLE`: what it reads (the teacher model in the step,
the shard's stored top-k), its chunk function and its naive reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from renio_core.formulas import losses
from renio_core.modeling import models

# chunk_fn(student_logits_CV, lo, hi) -> per-token loss (C,) for flat positions lo:hi.
ChunkFn = Callable[[torch.Tensor, int, int], torch.Tensor]


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
    # None when the train step scores the rollouts itself (``score_in_train_step``: computed
    # in forward).
    teacher_logprobs_N: torch.Tensor | None
    topk_ids_NK: torch.Tensor | None
    topk_logprobs_NK: torch.Tensor | None
    weights_B: torch.Tensor
    lengths_B: torch.Tensor


@dataclasses.dataclass
class TeacherHead:
    """The teacher's final hidden states at the completion positions (N, H), its LM head
    weight (V, H) and config: enough to make its logits chunk by chunk."""

    hidden_NH: torch.Tensor
    weight_VH: torch.Tensor
    config: object
    # When set (live weights in one pass), the loss's chunks write the teacher's log-prob of
    # each sampled token here, from the logits they make anyway.
    sampled_logprobs_N: torch.Tensor | None = None


def sampled_logprobs(logits_CV: torch.Tensor, targets_C: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` at each sampled token, in float32: the arithmetic of
    ``models.sequence_logprobs`` (the score stage's), so the train step's live weights and
    ``renio score``'s agree."""
    logits_CV = logits_CV.float() / temperature
    return logits_CV.gather(1, targets_C[:, None])[:, 0] - torch.logsumexp(logits_CV, dim=-1)


@dataclasses.dataclass
class Grid:
    """Where the N flat completion positions sit in a (B, T) grid, for the naive references."""

    rows_N: torch.Tensor
    offsets_N: torch.Tensor
    B: int
    T: int

    def place(self, values_N: torch.Tensor, fill: float, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
        """(N, ...) values -> (B, T, ...), ``fill`` where there is no completion token."""
        out = torch.full((self.B, self.T, *values_N.shape[1:]), fill,
                         dtype=dtype or values_N.dtype, device=values_N.device)
        out[self.rows_N, self.offsets_N] = values_N.to(out.dtype)
        return out


# --------------------------------------------------------------------------------------------
# jsd: the teacher's full logits (the official loss; beta 0 is forward KL, 1 reverse KL)
# --------------------------------------------------------------------------------------------


def _jsd_chunks(spec: LossSpec, p: PackedBatch, teacher: TeacherHead | None) -> ChunkFn:
    assert teacher is not None, "jsd needs the teacher's hidden states"

    def jsd(logits_CV: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        with torch.no_grad():
            t_logits_CV = models.postprocess_logits(
                teacher.config, F.linear(teacher.hidden_NH[lo:hi], teacher.weight_VH))
            if teacher.sampled_logprobs_N is not None:
                teacher.sampled_logprobs_N[lo:hi] = sampled_logprobs(
                    t_logits_CV, p.targets_N[lo:hi], spec.temperature)
        V = min(logits_CV.shape[-1], t_logits_CV.shape[-1])  # padded vocabularies: real rows
        return losses.token_divergence(logits_CV[None, :, :V], t_logits_CV[None, :, :V],
                                       spec.beta, spec.temperature, spec.token_clip)[0]
    return jsd


def _jsd_naive(spec: LossSpec, p: PackedBatch, student_BTV: torch.Tensor,
               teacher_BTV: torch.Tensor | None, grid: Grid) -> torch.Tensor:
    assert teacher_BTV is not None
    V = min(student_BTV.shape[-1], teacher_BTV.shape[-1])
    return losses.token_divergence(student_BTV[..., :V], teacher_BTV[..., :V], spec.beta,
                                   spec.temperature, spec.token_clip)


# --------------------------------------------------------------------------------------------
# topk: the teacher's stored top-k log-probs (renio score --topk K)
# --------------------------------------------------------------------------------------------


def _topk_chunks(spec: LossSpec, p: PackedBatch, teacher: TeacherHead | None) -> ChunkFn:
    def topk(logits_CV: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return losses.topk_divergence(
            logits_CV[None], p.topk_ids_NK[None, lo:hi], p.topk_logprobs_NK[None, lo:hi],
            spec.beta, spec.temperature, spec.token_clip, tail=spec.topk_tail,
        )[0]
    return topk


def _topk_naive(spec: LossSpec, p: PackedBatch, student_BTV: torch.Tensor,
                teacher_BTV: torch.Tensor | None, grid: Grid) -> torch.Tensor:
    ids_BTK = grid.place(p.topk_ids_NK, 0, torch.long)
    lps_BTK = grid.place(p.topk_logprobs_NK, -1.0, torch.float32)
    return losses.topk_divergence(student_BTV, ids_BTK, lps_BTK, spec.beta, spec.temperature,
                                  spec.token_clip, tail=spec.topk_tail)


# --------------------------------------------------------------------------------------------
# rkl: the sampled reverse KL from the stored teacher log-probs of the sampled tokens
# --------------------------------------------------------------------------------------------


def _rkl_chunks(spec: LossSpec, p: PackedBatch, teacher: TeacherHead | None) -> ChunkFn:
    def rkl(logits_CV: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        logp_CV = torch.log_softmax(logits_CV.float() / spec.temperature, dim=-1)
        s_C = logp_CV.gather(1, p.targets_N[lo:hi, None])[:, 0]
        return losses.sampled_reverse_kl(s_C[None], p.teacher_logprobs_N[None, lo:hi])[0]
    return rkl


def _rkl_naive(spec: LossSpec, p: PackedBatch, student_BTV: torch.Tensor,
               teacher_BTV: torch.Tensor | None, grid: Grid) -> torch.Tensor:
    logp_BTV = torch.log_softmax(student_BTV.float() / spec.temperature, dim=-1)
    targets_BT = grid.place(p.targets_N, 0, torch.long)
    q_BT = grid.place(p.teacher_logprobs_N, 0.0, torch.float32)
    return losses.sampled_reverse_kl(logp_BTV.gather(-1, targets_BT[..., None])[..., 0], q_BT)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossEntry:
    help: str
    # The teacher model runs in the train step for its full logits (else the shard has all it
    # needs, and no teacher is loaded).
    needs_teacher_model: bool
    # The shard's teacher_topk_ids / teacher_topk_logprobs columns (renio score --topk K).
    needs_topk: bool
    chunk_fn: Callable[[LossSpec, PackedBatch, TeacherHead | None], ChunkFn]
    naive: Callable[[LossSpec, PackedBatch, torch.Tensor, torch.Tensor | None, Grid],
                    torch.Tensor]


LOSS_TABLE: dict[str, LossEntry] = {
    "jsd": LossEntry("teacher's full logits", needs_teacher_model=True, needs_topk=False,
                     chunk_fn=_jsd_chunks, naive=_jsd_naive),
    "topk": LossEntry("stored top-k", needs_teacher_model=False, needs_topk=True,
                      chunk_fn=_topk_chunks, naive=_topk_naive),
    "rkl": LossEntry("sampled reverse KL", needs_teacher_model=False, needs_topk=False,
                     chunk_fn=_rkl_chunks, naive=_rkl_naive),
}
LOSSES = tuple(LOSS_TABLE)


def losses_help() -> str:
    """``jsd (teacher's full logits), topk (stored top-k) or rkl (sampled reverse KL)``."""
    items = [f"{name} ({entry.help})" for name, entry in LOSS_TABLE.items()]
    return ", ".join(items[:-1]) + " or " + items[-1]
