"""Experiment tracking: one code path that sends scalars to TensorBoard and/or Weights & Biases.

``renio train`` logs per optimizer step (loss, learning rate, gradient norm, ...); ``renio run``
also logs per iteration (rollout accuracy, mean weight of correct and incorrect rows, AUROC,
pivotal share, eval accuracy, time split). Both go through :class:`Tracker`, which fans out to
whichever backends were asked for. Both are off unless asked: ``--tensorboard`` writes event
files under the output directory; ``--wandb-project NAME`` (``wandb_project: NAME`` in a run
config) starts a W&B run, which honours W&B's own environment (``WANDB_MODE=offline`` writes the
run under ``WANDB_DIR`` without network). Only the main process of a torchrun job logs.

W&B is an optional extra (``pip install "renio[wandb]"``); asking for it without the package is
one clear error (:func:`check_available`), raised before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from renio_core.errors import RenioInputError


def check_available(*, tensorboard: bool = False, wandb_project: str | None = None) -> None:
    """Fail early, with one line, when a requested backend's package is missing."""
    if tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise RenioInputError("--tensorboard needs the 'tensorboard' package installed") from None
    if wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise RenioInputError(
                "W&B logging (--wandb-project, wandb_project=) needs the 'wandb' package "
                "(the renio extra 'wandb'): pip install wandb") from None


class Tracker:
    """Scalars to TensorBoard (``tb_dir``) and/or W&B (``wandb_project``); a no-op with neither.

    ``purge_step`` (TensorBoard only) hides events of an interrupted run after a resumed
    checkpoint's step. ``config`` is recorded as the W&B run's config.
    """

    def __init__(self, *, tb_dir: str | Path | None = None, wandb_project: str | None = None,
                 run_name: str | None = None, config: dict[str, Any] | None = None,
                 wandb_dir: str | Path | None = None, purge_step: int | None = None):
        check_available(tensorboard=tb_dir is not None, wandb_project=wandb_project)
        self._tb = None
        self._wandb = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tb_dir), purge_step=purge_step)
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config or {},
                                     dir=str(wandb_dir) if wandb_dir is not None else None,
                                     reinit="finish_previous")

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def log(self, prefix: str, metrics: dict[str, Any], step: int) -> None:
        """Log every finite number in ``metrics`` as ``prefix/key`` at ``step`` (None skipped)."""
        scalars = {f"{prefix}/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None and scalars:
            # W&B's own step must only grow; ours is recorded as a metric of its own instead.
            self._wandb.log({**scalars, f"{prefix}/step": step})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
