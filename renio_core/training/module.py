"""The student and its loss as one module (``DistillModule``), with the chunked LM head.

The student's decoder runs once per micro-batch; the LM head and the divergence then run on
the completion positions only, ``chunk`` positions at a time, inside one autograd function
that computes each chunk's gradient right away (:class:`ChunkedHeadLoss`). Neither the
student's nor the teacher's batch x length x vocabulary logits ever exist. Which divergence,
and what it reads, comes from ``losses.LOSS_TABLE``; :func:`naive_loss` is the
unchunked reference the tests hold the chunked path to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from renio_core.errors import RenioInputError
from renio_core.formulas import losses
from renio_core.modeling import models
from renio_core.training.data import LiveWeightSpec, live_weights
from renio_core.training.losses import (
    LOSS_TABLE,
    Grid,
    LossSpec,
    PackedBatch,
    TeacherHead,
    sampled_logprobs,
)


@dataclasses.dataclass
class LiveCoef:
    """Loss coefficients that depend on the same pass's sampled-token log-probs (live ReNIO
    weights): ``coef_of(student_logprobs_N)`` gives ``coef_N`` once every chunk has run."""

    targets_N: torch.Tensor
    temperature: float
    coef_of: Callable[[torch.Tensor], torch.Tensor]


class ChunkedHeadLoss(torch.autograd.Function):
    """``sum_n coef_n * chunk_fn(hidden_n @ W^T)`` with the gradient computed chunk by chunk.

    Forward runs each chunk's LM head and loss under local autograd and keeps only the
    gradients with respect to the hidden states (N x H) and the head weight (V x H); the chunk's
    logits are freed before the next chunk. Backward scales those by the incoming gradient.
    Returns the scalar and the detached per-position values (for metrics).

    With a :class:`LiveCoef` in place of ``coef_N`` the coefficients are not known before the
    pass: each chunk also records the student's log-prob of its sampled tokens and keeps its
    gradients unscaled (position n's value depends on hidden state n alone, so the gradient of
    the chunk's sum is each position's own), and the coefficients, computed once the last chunk
    has run, scale them afterwards. So the head runs once per micro-batch, not once for the
    log-probs and again for the loss. A trained head (full fine-tuning) cannot take this path:
    its weight's gradient sums over positions before any scaling.
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, coef_N, chunk_fn, chunk, config):  # type: ignore[override]
        n_total = hidden_NH.shape[0]
        grad_hidden_NH = torch.zeros_like(hidden_NH)
        need_w = weight_VH.requires_grad
        live = coef_N if isinstance(coef_N, LiveCoef) else None
        if live is not None and need_w:
            raise ValueError("live loss coefficients need a frozen LM head")
        grad_weight_VH = torch.zeros_like(weight_VH) if need_w else None
        per_token_N = torch.zeros(n_total, dtype=torch.float32, device=hidden_NH.device)
        student_lp_N = (torch.empty(n_total, dtype=torch.float32, device=hidden_NH.device)
                        if live is not None else None)
        total = torch.zeros((), dtype=torch.float32, device=hidden_NH.device)
        w_leaf = weight_VH.detach().requires_grad_(need_w)
        for lo in range(0, n_total, chunk):
            hi = min(n_total, lo + chunk)
            with torch.enable_grad():
                h_leaf = hidden_NH[lo:hi].detach().requires_grad_(True)
                logits_CV = models.postprocess_logits(config, F.linear(h_leaf, w_leaf))
                values_C = chunk_fn(logits_CV, lo, hi)
                if live is None:
                    scalar = (values_C * coef_N[lo:hi]).sum()
                else:
                    scalar = values_C.sum()
                    student_lp_N[lo:hi] = sampled_logprobs(
                        logits_CV.detach(), live.targets_N[lo:hi], live.temperature)
                inputs = (h_leaf, w_leaf) if need_w else (h_leaf,)
                grads = torch.autograd.grad(scalar, inputs)
            grad_hidden_NH[lo:hi] = grads[0]
            if need_w:
                grad_weight_VH += grads[1]
            per_token_N[lo:hi] = values_C.detach().float()
            if live is None:
                total += scalar.detach().float()
            del logits_CV, values_C, scalar, grads
        if live is not None:
            coef_N = live.coef_of(student_lp_N)
            grad_hidden_NH *= coef_N[:, None].to(grad_hidden_NH.dtype)
            for lo in range(0, n_total, chunk):  # the same sums, chunk by chunk, as above
                hi = min(n_total, lo + chunk)
                total += (per_token_N[lo:hi] * coef_N[lo:hi]).sum()
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


def _final_hidden(lm: Any, ids_BL: torch.Tensor, attn_BL: torch.Tensor) -> torch.Tensor:
    out = lm.get_decoder()(input_ids=ids_BL, attention_mask=attn_BL, use_cache=False)
    return out.last_hidden_state


def lm_head(lm: Any) -> torch.nn.Linear:
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
        # (student_N, teacher_N) sampled-token log-probs of the last forward (live weights).
        self.last_logprobs: tuple[np.ndarray, np.ndarray] | None = None
        # A plain attribute, not a submodule: DDP/FSDP must not wrap or sync the frozen teacher.
        self.__dict__["teacher"] = teacher
        self.self_teacher = self_teacher

    def forward(self, p: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        lm = models.causal_lm(self.model)
        entry = LOSS_TABLE[self.spec.loss]
        teacher = self._teacher_head(lm, p) if entry.needs_teacher_model else None
        hidden_BLH = _final_hidden(lm, p.input_ids_BL, p.attention_BL)
        hidden_NH = hidden_BLH[p.rows_N, p.cols_N]
        head = lm_head(lm)
        if hidden_NH.shape[0] == 0:
            if self.live is not None:
                self._live_coef(p, hidden_NH, lm, teacher)  # the rows' weights, for the shards
            # Nothing to learn from, but every parameter must still take part (DDP).
            zero = hidden_BLH.sum() * 0.0 + head.weight.sum() * 0.0
            return zero.float(), torch.zeros(0, device=zero.device)
        coef_N = p.coef_N if self.live is None else self._live(p, hidden_NH, lm, teacher)
        chunk_fn = entry.chunk_fn(self.spec, p, teacher)
        return ChunkedHeadLoss.apply(hidden_NH, head.weight, coef_N, chunk_fn, self.chunk,
                                     lm.config)

    @torch.no_grad()
    def _teacher_head(self, lm: Any, p: PackedBatch) -> TeacherHead:
        """The teacher's hidden states at the completion positions, on its own prompt."""
        if self.self_teacher:
            with self.model.disable_adapter():
                t_hidden = _final_hidden(lm, p.teacher_input_ids_BL, p.teacher_attention_BL)
            t_lm = lm
        else:
            t_lm = models.causal_lm(self.teacher)
            t_hidden = _final_hidden(t_lm, p.teacher_input_ids_BL, p.teacher_attention_BL)
        # A teacher spread by device_map="auto" ends on its last GPU; the loss runs on the
        # student's (a no-op for a teacher on the student's device).
        device = p.rows_N.device
        return TeacherHead(t_hidden.to(device)[p.rows_N, p.teacher_cols_N],
                           lm_head(t_lm).weight.detach().to(device), t_lm.config)

    def _live(self, p: PackedBatch, hidden_NH: torch.Tensor, lm: Any,
              teacher: TeacherHead | None) -> torch.Tensor | LiveCoef:
        """Live weights' loss coefficients: from the loss pass itself for a frozen head, else
        from a log-prob pass first."""
        if lm_head(lm).weight.requires_grad:
            return self._live_coef(p, hidden_NH, lm, teacher)
        return self._live_coef_in_pass(p, teacher)

    def _live_coef(self, p: PackedBatch, hidden_NH: torch.Tensor, lm: Any,
                   teacher: TeacherHead | None) -> torch.Tensor:
        """The loss coefficients from live weights, with a log-prob pass of its own before the
        loss (a trained head; see :class:`ChunkedHeadLoss`)."""
        lp_N = self._sampled_logprobs(hidden_NH, lm_head(lm).weight, lm.config, p.targets_N)
        if p.teacher_logprobs_N is not None:
            t_lp_N = p.teacher_logprobs_N
        elif teacher is not None:
            t_lp_N = self._sampled_logprobs(teacher.hidden_NH, teacher.weight_VH, teacher.config,
                                            p.targets_N)
        else:
            raise _no_teacher_logprobs()
        return self._coef_from_logprobs(p, lp_N, t_lp_N)

    def _live_coef_in_pass(self, p: PackedBatch, teacher: TeacherHead | None) -> LiveCoef:
        """The loss coefficients from live weights, computed inside the loss pass from its own
        chunks (a frozen head): the teacher's log-probs are stored in the shard or recorded by
        the ``jsd`` chunks as they make the teacher's logits."""
        if p.teacher_logprobs_N is not None:
            t_lp_N = p.teacher_logprobs_N
        elif teacher is not None:
            t_lp_N = teacher.sampled_logprobs_N = torch.empty(
                p.targets_N.shape[0], dtype=torch.float32, device=p.targets_N.device)
        else:
            raise _no_teacher_logprobs()
        return LiveCoef(p.targets_N, self.spec.temperature,
                        lambda lp_N: self._coef_from_logprobs(p, lp_N, t_lp_N))

    def _coef_from_logprobs(self, p: PackedBatch, lp_N: torch.Tensor,
                            t_lp_N: torch.Tensor) -> torch.Tensor:
        """Sampled-token log-probs (as ``renio score`` computes them) -> the micro-batch's
        ReNIO weights -> the per-token loss coefficients."""
        lengths_B = p.lengths_B.cpu().numpy()
        student_N, teacher_N = lp_N.cpu().numpy(), t_lp_N.cpu().numpy()
        weights_B, pivotal_B = live_weights(self.live, student_N, teacher_N, lengths_B)
        self.last_live = (weights_B, pivotal_B)
        self.last_logprobs = (student_N, teacher_N)
        B = len(lengths_B)
        coef_B = torch.as_tensor(weights_B, dtype=torch.float32) / (
            torch.as_tensor(lengths_B).clamp(min=1).float() * B)
        return coef_B.to(p.rows_N.device)[p.rows_N]

    @torch.no_grad()
    def _sampled_logprobs(self, hidden_NH: torch.Tensor, weight_VH: torch.Tensor, config: Any,
                          targets_N: torch.Tensor) -> torch.Tensor:
        """Each sampled token's log-prob, ``chunk`` positions at a time."""
        n_total = hidden_NH.shape[0]
        lp_N = torch.empty(n_total, dtype=torch.float32, device=hidden_NH.device)
        for lo in range(0, n_total, self.chunk):
            hi = min(n_total, lo + self.chunk)
            logits_CV = models.postprocess_logits(config, F.linear(hidden_NH[lo:hi].detach(),
                                                                   weight_VH))
            lp_N[lo:hi] = sampled_logprobs(logits_CV, targets_N[lo:hi], self.spec.temperature)
        return lp_N


def _no_teacher_logprobs() -> RenioInputError:
    return RenioInputError("scoring in the train step needs the teacher's logits (loss jsd)")


def naive_loss(module: DistillModule, p: PackedBatch) -> torch.Tensor:
    """Reference: full-vocabulary logits of the whole micro-batch, then ``weighted_loss``.

    What the chunked path replaces; used by tests (equal values and gradients) and by the
    benchmark (time and memory).
    """
    spec = module.spec
    entry = LOSS_TABLE[spec.loss]
    lm = models.causal_lm(module.model)
    logits_BLV = lm(input_ids=p.input_ids_BL, attention_mask=p.attention_BL, use_cache=False).logits
    B = p.input_ids_BL.shape[0]
    Tmax = int(p.lengths_B.max().item()) if B else 0
    offsets_N = (torch.cat([torch.arange(int(n), device=p.rows_N.device) for n in p.lengths_B])
                 if p.rows_N.numel() else p.rows_N)
    grid = Grid(p.rows_N, offsets_N, B, Tmax)
    mask_BT = grid.place(torch.ones_like(p.rows_N, dtype=torch.bool), False, torch.bool)
    student_BTV = grid.place(logits_BLV[p.rows_N, p.cols_N], 0.0)
    teacher_BTV = None
    if entry.needs_teacher_model:
        with torch.no_grad():
            ids, attn = p.teacher_input_ids_BL, p.teacher_attention_BL
            if module.self_teacher:
                with module.model.disable_adapter():
                    t_logits = lm(input_ids=ids, attention_mask=attn, use_cache=False).logits
            else:
                t_logits = module.teacher(input_ids=ids, attention_mask=attn, use_cache=False).logits
            teacher_BTV = grid.place(t_logits[p.rows_N, p.teacher_cols_N], 0.0)
    per_token_BT = entry.naive(spec, p, student_BTV, teacher_BTV, grid)
    return losses.weighted_loss(per_token_BT, mask_BT, p.weights_B)
