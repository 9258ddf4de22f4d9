"""The weights shard as the train stage reads it: micro-batches, their checks, live ReNIO
weights, and the tensors of one micro-batch (:func:`pack`).

A micro-batch is one ``batch_id`` group of the weight stage, in file order (docs/design.md,
"train reads"); all rows are read and validated before any model loads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from renio_core.data import shards
from renio_core.data.schema import spec
from renio_core.errors import RenioInputError
from renio_core.formulas import weighting
from renio_core.modeling import models
from renio_core.training.losses import LOSS_TABLE, PackedBatch


@dataclasses.dataclass
class MicroBatch:
    """One ``batch_id`` group, as Python lists (a few rows of a few thousand tokens)."""

    batch_id: int
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    teacher_prompt_ids: list[list[int]]
    teacher_logprobs: list[list[float]] | None  # None: scored inside the train step
    weights: list[float]
    pivotal_count: list[int]
    topk_ids: list[list[list[int]]] | None = None
    topk_logprobs: list[list[list[float]]] | None = None
    rows: list[int] | None = None  # the rows' positions in the input table (score_in_train_step)

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


def columns(loss: str) -> list[shards.ColumnSpec]:
    """The weights shard's columns ``loss`` reads (every one declared in ``data.schema``)."""
    topk_hint = f"--loss {loss} needs them: run 'renio score --topk K'"
    needs_topk = LOSS_TABLE[loss].needs_topk
    return [
        *(spec(name) for name in ("prompt_ids", "completion_ids", "teacher_prompt_ids",
                                  "student_logprobs", "teacher_logprobs", "batch_id",
                                  "pivotal_count", "log_ratio_mean", "raw_weight", "weight")),
        spec("teacher_topk_ids", required=needs_topk, hint=topk_hint),
        spec("teacher_topk_logprobs", required=needs_topk, hint=topk_hint),
    ]


def read_micro_batches(inputs: shards.InputSet, loss: str, *, rank: int = 0,
                       world: int = 1) -> list[MicroBatch | None]:
    """Validate every row, then group rows by ``batch_id`` (groups in order of appearance).

    Under torchrun each process keeps only its share: group ``i`` belongs to rank
    ``i % world`` (the training loop gives micro-batch ``i`` to that rank); the others are
    ``None`` placeholders so that every rank sees the same count.
    """
    names = [c.name for c in columns(loss)]
    topk = LOSS_TABLE[loss].needs_topk
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
        if topk:
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
                                              [] if topk else None, [] if topk else None)
            mb.prompt_ids.append(data["prompt_ids"][i])
            mb.completion_ids.append(data["completion_ids"][i])
            mb.teacher_prompt_ids.append(data["teacher_prompt_ids"][i])
            mb.teacher_logprobs.append(data["teacher_logprobs"][i])
            mb.weights.append(float(data["weight"][i]))
            mb.pivotal_count.append(int(data["pivotal_count"][i]))
            if topk:
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


def check_token_ids(micro: list[MicroBatch | None], vocab: int, file: Path) -> None:
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


@dataclasses.dataclass
class LiveWeightSpec:
    """The weight stage's settings, for ReNIO weights recomputed inside the train step."""

    clip: float
    threshold: float
    tem: float
    norm: str
    scheme: str


def live_weights(spec: LiveWeightSpec, student_logprobs_N: np.ndarray,
                 teacher_logprobs_N: np.ndarray, lengths_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ReNIO weights of one micro-batch (one normalization group), the weight stage's formula
    on this step's student log-probs. Returns ``(weights_B, pivotal_count_B)``."""
    _, pivotal_B, raw_B = weighting.trajectory_weights(
        student_logprobs_N, teacher_logprobs_N, shards.row_offsets(lengths_B), clip=spec.clip,
        threshold=spec.threshold, tem=spec.tem)
    one_group_B = np.zeros(len(raw_B), dtype=np.int64)
    return weighting.sample_weights(raw_B, one_group_B, scheme=spec.scheme,
                                    norm=spec.norm), pivotal_B


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
        teacher_logprobs_N=(None if mb.teacher_logprobs is None else
                            torch.tensor(flat(mb.teacher_logprobs), dtype=torch.float32).to(device)),
        topk_ids_NK=topk_ids, topk_logprobs_NK=topk_lp,
        weights_B=weights_B.to(device), lengths_B=lengths_B.to(device),
    )
