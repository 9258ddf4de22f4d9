"""The learning-rate schedule of ``renio train``: a multiplier of the base rate per optimizer
step, counted over the whole run (docs/design.md, "The training loop"). The official trainer
uses Hugging Face's linear decay to 0 with no warmup.
"""

from __future__ import annotations

import math


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
