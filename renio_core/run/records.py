"""What ``renio run`` records on disk and reads back when it resumes: ``metrics.jsonl``, one
:class:`IterationRecord` line per finished iteration, written last; the per-step metrics a
checkpoint holds; and whether a shard or checkpoint left by an interrupted iteration is
complete."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from renio_core.data import shards
from renio_core.errors import RenioInputError
from renio_core.training.checkpoint import (
    CONFIG_FILE,
    METRICS_FILE,
)


@dataclasses.dataclass
class IterationRecord:
    iteration: int
    policy_step: int
    rollout_accuracy: float | None
    mean_weight_correct: float | None
    mean_weight_incorrect: float | None
    auroc_incorrect: float | None
    pivotal_share: float
    train_loss: float | None
    eval_accuracy: float | None
    seconds: float
    # fill_filtered: rows sampled in all, and rows of the kept kind trained on
    # (prompts_per_iteration x n unless a pass over the prompts found fewer; with none, the
    # iteration trains nothing and the next one continues from the last checkpoint).
    fill_sampled: int | None = None
    fill_kept: int | None = None
    # Wall seconds by phase (TIME_KEYS); "*_work" is the stage's own compute inside it.
    time: dict[str, float] = dataclasses.field(default_factory=dict)


# sample/score/weight/train/eval: each stage's wall time; sample_work, score_work and
# train_steps: its own compute (model loading, shard writes and checkpoint saves excluded);
# other: the rest of the iteration (adapter swaps, metrics, pruning).
TIME_KEYS = ("sample", "sample_work", "score", "score_work", "weight", "train", "train_steps",
             "eval", "other")


def damaged(path: Path) -> str | None:
    """Why a shard found in an iteration folder cannot be a complete renio output, as far as
    its footer tells; None when there is none, or it may be one (the stage compares its
    fingerprints)."""
    if not path.is_file():
        return None
    try:
        meta = shards.read_metadata(path)
    except RenioInputError:
        return "cannot be read as Parquet (cut short or damaged)"
    return None if meta is not None else "holds no renio metadata"


def checkpoint_finished(ckpt: Path) -> bool:
    """A checkpoint written at the end of its training: not a mid-training ``save_every``."""
    try:
        info = json.loads((ckpt / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return bool(info.get("finished"))


def checkpoint_metrics(ckpt: Path) -> list[dict[str, Any]]:
    """The per-step metrics the trainer wrote next to a checkpoint (empty if none)."""
    path = ckpt / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def eval_accuracy(path: Path) -> float | None:
    return json.loads(path.read_text()).get("metrics", {}).get("avg_at_n")


def _metric_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The records of the run's ``metrics.jsonl`` with their text. A last line cut short (a
    kill or a full disk while it was written) belongs to the iteration that did not finish,
    and is left out; a damaged line before it is refused."""
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    out = []
    for n, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except ValueError:
            if n == len(lines) - 1:
                break
            raise RenioInputError(f"line {n + 1} is not a JSON record (damaged); remove it "
                                  "and the iterations from it on to redo them", file=path) from None
    return out


def trained_nothing(record: IterationRecord) -> bool:
    """The iteration found no row to train on (``fill_filtered``) and saved no checkpoint."""
    return record.fill_kept == 0


def read_records(path: Path) -> dict[int, IterationRecord]:
    fields = {f.name for f in dataclasses.fields(IterationRecord)}
    out = {}
    for _line, data in _metric_lines(path):
        out[int(data["iteration"])] = IterationRecord(
            **{k: v for k, v in data.items() if k in fields})
    return out


def append_metrics(path: Path, record: IterationRecord) -> None:
    existing = [ln for ln, data in _metric_lines(path)
                if data.get("iteration") != record.iteration]
    existing.append(json.dumps(dataclasses.asdict(record)))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(existing) + "\n")
    os.replace(tmp, path)
