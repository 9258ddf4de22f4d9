"""Training losses of on-policy distillation, as pure functions of tensors.

ReNIO (arXiv 2606.23104) trains the student on its own samples with a per-token divergence to
the teacher and multiplies each trajectory's loss by its ReNIO weight. The contract is
``docs/design.md`` ("Training losses"):

* ``token_divergence``: generalized Jensen-Shannon divergence over the full vocabulary with
  mixing ``beta`` (beta 0 = KL(teacher || student), beta 1 = KL(student || teacher), in between
  ``beta * KL(T || M) + (1 - beta) * KL(S || M)`` with ``M = beta * T + (1 - beta) * S``).
  With ``token_clip > 0`` each vocabulary entry's term is clamped to ``[0, token_clip]`` before
  the sum over the vocabulary (official value 0.05).
* ``topk_divergence``: the same divergence on the teacher's stored top-k support.
* ``sampled_reverse_kl``: the sampled-token reverse KL as a policy-gradient surrogate.
* ``weighted_loss``: sample loss = token mean; batch loss = mean over samples of weight x loss.

Deliberate differences from the official code:

* The ReNIO weight multiplies every loss (the official code weights its JSD, on the full
  vocabulary and on its top-k path, but not its sampled reverse KL).
* The sampled reverse KL is reduced as every loss here: a token mean per sample, then the
  (weighted) mean over samples. The official ``-(advantage * log p).mean()`` is one mean over
  all the batch's valid tokens, so long samples count more there.
* ``topk_divergence(tail=True)`` keeps the probability mass outside the top-k as one extra
  bucket on both sides; ``tail=False`` renormalizes both sides on the top-k support (the
  docs/design.md wording). The trainer uses the default, ``tail=True``, so that k = vocabulary size
  gives exactly the full-vocabulary divergence and small k never overstates agreement.

All arithmetic is in float32 whatever the input dtype: bf16 log-probabilities lose the small
differences that the clip acts on.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "token_divergence",
    "topk_divergence",
    "sampled_reverse_kl",
    "weighted_loss",
    "generalized_jsd_from_logprobs",
]


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32: half-precision inputs are upcast, float64 is kept (for tests)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _kl_terms(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """Per-entry ``a * (log a - log b)``, exactly 0 where ``a`` is 0.

    The ``where`` sits on the difference, not on the product, so that entries with
    ``a == 0`` and ``log b == -inf`` give neither NaN values nor NaN gradients.
    """
    prob_a = logp_a.exp()
    present = prob_a > 0
    diff = torch.where(present, logp_a - logp_b, torch.zeros_like(logp_a))
    return prob_a * diff


def generalized_jsd_from_logprobs(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    beta: float,
    token_clip: float,
) -> torch.Tensor:
    """The divergence of docs/design.md between two normalized log-distributions (..., K) → (...).

    Shared by the full-vocabulary and the top-k paths, so both clip the same per-entry term.
    """
    _check_beta(beta)
    if token_clip < 0:
        raise ValueError(f"token_clip must be >= 0, got {token_clip}")
    if beta == 0.0:
        terms = _kl_terms(teacher_logp, student_logp)  # KL(T || S)
    elif beta == 1.0:
        terms = _kl_terms(student_logp, teacher_logp)  # KL(S || T)
    else:
        log_m = torch.logaddexp(
            teacher_logp + math.log(beta), student_logp + math.log(1.0 - beta)
        )
        terms = beta * _kl_terms(teacher_logp, log_m) + (1.0 - beta) * _kl_terms(
            student_logp, log_m
        )
    if token_clip > 0:
        terms = terms.clamp(min=0.0, max=token_clip)
    return terms.sum(dim=-1)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float,
    temperature: float,
    token_clip: float,
) -> torch.Tensor:
    """Full-vocabulary generalized JSD per position: logits (B, T, V) → (B, T).

    Both distributions are ``softmax(logits / temperature)``. The teacher side carries no
    gradient.
    """
    _check_positive("temperature", temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    student_logp_BTV = torch.log_softmax(_f32(student_logits) / temperature, dim=-1)
    teacher_logp_BTV = torch.log_softmax(_f32(teacher_logits.detach()) / temperature, dim=-1)
    return generalized_jsd_from_logprobs(student_logp_BTV, teacher_logp_BTV, beta, token_clip)


def topk_divergence(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    beta: float,
    temperature: float,
    token_clip: float,
    tail: bool = True,
) -> torch.Tensor:
    """Generalized JSD on the teacher's top-k support: (B, T, V), (B, T, K), (B, T, K) → (B, T).

    ``teacher_topk_logprobs`` are log-probabilities already at ``temperature`` (as the score
    stage stores them). With ``tail`` the mass outside the top-k is one extra bucket on each
    side (K + 1 entries); without it both sides are renormalized on the K entries.
    """
    _check_positive("temperature", temperature)
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError("teacher_topk_ids and teacher_topk_logprobs must have the same shape")
    if teacher_topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"top-k arrays {tuple(teacher_topk_ids.shape)} do not match student logits "
            f"{tuple(student_logits.shape)}"
        )
    ids_BTK = teacher_topk_ids.long()
    student_all_BTV = torch.log_softmax(_f32(student_logits) / temperature, dim=-1)
    student_k_BTK = student_all_BTV.gather(-1, ids_BTK)
    teacher_k_BTK = _f32(teacher_topk_logprobs.detach())
    if not tail:
        student_logp = torch.log_softmax(student_k_BTK, dim=-1)
        teacher_logp = torch.log_softmax(teacher_k_BTK, dim=-1)
        return generalized_jsd_from_logprobs(student_logp, teacher_logp, beta, token_clip)

    # Student tail from the logits outside the top-k, not from 1 - sum(p_k): the subtraction
    # loses everything below float32's epsilon. A finite fill (not -inf) keeps the gradient
    # of an empty tail (k = V) at 0 instead of NaN.
    fill = torch.finfo(student_all_BTV.dtype).min
    outside_BTV = student_all_BTV.scatter(-1, ids_BTK, fill)
    student_tail_BT1 = torch.logsumexp(outside_BTV, dim=-1, keepdim=True)
    # The teacher's tail is only known as 1 - sum(p_k), whose rounding error is about
    # k * epsilon; a "tail" below that is noise and is read as empty. Otherwise a noise mass
    # against a truly empty student tail (k = V) would count as an infinite divergence.
    teacher_tail_BT1 = 1.0 - teacher_k_BTK.exp().sum(dim=-1, keepdim=True)
    noise = ids_BTK.shape[-1] * torch.finfo(teacher_k_BTK.dtype).eps
    teacher_tail_BT1 = torch.where(
        teacher_tail_BT1 > noise, teacher_tail_BT1, torch.zeros_like(teacher_tail_BT1)
    ).log()
    student_logp = torch.cat([student_k_BTK, student_tail_BT1], dim=-1)
    teacher_logp = torch.cat([teacher_k_BTK, teacher_tail_BT1], dim=-1)
    return generalized_jsd_from_logprobs(student_logp, teacher_logp, beta, token_clip)


def sampled_reverse_kl(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """Policy-gradient surrogate of the sampled-token reverse KL: (B, T), (B, T) → (B, T).

    Value ``-(q_t - s_t) * s_t`` with the advantage ``q_t - s_t`` detached, so the gradient is
    ``(s_t - q_t) * grad s_t``: the score-function estimate of grad KL(student || teacher) for
    tokens sampled from the student.
    """
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(
            f"student_logprobs {tuple(student_logprobs.shape)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must have the same shape"
        )
    student_BT = _f32(student_logprobs)
    advantage_BT = (_f32(teacher_logprobs) - student_BT).detach()
    return -advantage_BT * student_BT


def weighted_loss(
    per_token: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Batch loss: mean over samples of ``weight * (token mean of the sample's loss)``.

    ``per_token`` (B, T), ``mask`` (B, T) true on completion tokens, ``weights`` (B,). A sample
    without tokens contributes 0, and values at masked positions (padding, possibly NaN) are
    never read, so an all-masked batch gives 0, not NaN.
    """
    if per_token.shape != mask.shape:
        raise ValueError(
            f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must match"
        )
    if weights.shape != per_token.shape[:1]:
        raise ValueError(
            f"weights {tuple(weights.shape)} must have one value per sample ({per_token.shape[0]})"
        )
    if per_token.shape[0] == 0:
        return _f32(per_token).sum() * 0.0
    mask_BT = mask.bool()
    per_token = _f32(per_token)
    values_BT = torch.where(mask_BT, per_token, torch.zeros_like(per_token))
    counts_B = mask_BT.sum(dim=1).clamp(min=1).to(per_token.dtype)
    sample_loss_B = values_BT.sum(dim=1) / counts_B
    return (weights.detach().to(per_token.dtype) * sample_loss_B).mean()
