"""``renio run``'s ``score_in_train_step``: the train step scores the rollouts it trains on.

The official trainer (BDML-lab/ReNIO ``opsd_trainer.py``) computes the student's and the
teacher's log-probs of the sampled tokens in its training step and the ReNIO weight from them
(arXiv 2606.23104, Alg. 1); it runs no separate scoring pass. With one optimizer step per
rollout batch the loop can do the same: the step's single forward of the student (with
gradients) and of the teacher gives the loss, the log-probs and the live weights, where the
separate score pass runs both models once more in ``renio score`` beforehand. The loop
chooses this path wherever its conditions hold (``RunConfig.scoring``).

The flow is one way: the loop hands the trainer a :class:`ScoreInTrainStep` (the rollouts
grouped as the weight stage groups them, and the score and weight stage configs); after the
last step and before the checkpoint the trainer calls :meth:`ScoreInTrainStep.write_shards`
with the step's log-probs, which writes ``scores.parquet`` through ``run_score`` with a
:class:`StepScorer` (the step's log-probs instead of a forward pass; same columns and
metadata, plus ``score_in_train_step``) and ``weights.parquet`` through ``run_weight`` from
those scores in memory; the trainer returns what was written in its summary. The weights in
the shard are the ones the step trained with (the same formula on the same float32 log-probs,
grouped by :func:`weight.group_ids`), which tests/test_run_loop.py checks. Writing them
before the checkpoint means a complete checkpoint always has its shards.

What differs from the separate score pass: the student's log-probs come from the training
forward (train mode; LoRA dropout is 0) on right-padded micro-batches, the scorer's from an
inference forward on its own token-budget batches, so they may differ by float rounding
(the tests allow 1e-4; a 32-row iteration of the toy sample config, OPD and OPSD, gave
identical bits).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from renio_core.backends.rows import with_scores
from renio_core.data import shards
from renio_core.errors import RenioInputError
from renio_core.modeling import models
from renio_core.stages.score import ScoreConfig, ScoreSummary, run_score
from renio_core.stages.weight import WeightConfig, WeightSummary, group_ids, run_weight
from renio_core.training.data import LiveWeightSpec, MicroBatch

# {row: (student log-probs, teacher log-probs)} of the rows the step trained on.
StepLogprobs = dict[int, tuple[list[float], list[float]]]


def live_spec(cfg: WeightConfig) -> LiveWeightSpec:
    return LiveWeightSpec(cfg.clip, cfg.threshold, cfg.tem, cfg.norm, cfg.scheme)


def row_keys(table: pa.Table) -> list[tuple[str, int]]:
    """(prompt_id, sample_index) of each row: how the step's log-probs find their row again."""
    keys = list(zip(table.column("prompt_id").to_pylist(),
                    table.column("sample_index").to_pylist()))
    if len(set(keys)) != len(keys):
        raise RenioInputError("score_in_train_step: the rollouts repeat a (prompt_id, "
                              "sample_index) pair; the step's log-probs could not find their "
                              "rows")
    return keys


def micro_batches(table: pa.Table, teacher_prompts: Sequence[Sequence[int]],
                  cfg: WeightConfig) -> list[MicroBatch]:
    """The rollout rows as the weight stage would group them (``batch_id`` order of first
    appearance), with no log-probs yet: the train step computes them."""
    pids = np.asarray(table.column("prompt_id").to_pylist(), dtype=object)
    batch_B = group_ids(cfg, pids, table.num_rows)
    prompts = table.column("prompt_ids").to_pylist()
    completions = table.column("completion_ids").to_pylist()
    groups: dict[int, MicroBatch] = {}
    for row, bid in enumerate(batch_B.tolist()):
        mb = groups.get(bid)
        if mb is None:
            mb = groups[bid] = MicroBatch(bid, [], [], [], None, [], [], rows=[])
        mb.prompt_ids.append(prompts[row])
        mb.completion_ids.append(completions[row])
        mb.teacher_prompt_ids.append(list(teacher_prompts[row]))
        mb.weights.append(1.0)  # replaced by the step's live weight
        mb.pivotal_count.append(0)
        mb.rows.append(row)
    return list(groups.values())


@dataclasses.dataclass
class StepShards:
    """What :meth:`ScoreInTrainStep.write_shards` wrote, and the seconds each shard took."""

    score: ScoreSummary
    weight: WeightSummary
    score_seconds: float
    weight_seconds: float


@dataclasses.dataclass
class ScoreInTrainStep:
    """Rollouts that the train step scores itself: its one forward of student and teacher
    gives the sampled-token log-probs, the live ReNIO weights and the loss; then
    :meth:`write_shards` writes the scores and weights shards, before the checkpoint."""

    inputs: shards.InputSet  # the rollouts shard: the checkpoint's input identity
    micro: list[MicroBatch]  # teacher_logprobs None, rows set
    temperature: float
    teacher: str
    score_cfg: ScoreConfig
    weight_cfg: WeightConfig
    row_keys: list[tuple[str, int]]  # of the rollouts' rows, in order
    teacher_prompts: list[list[int]]  # the teacher's prompt ids the step was given, per row
    vocab_sizes: dict[str, int]  # the student's and the teacher's, for the scores' checks

    @classmethod
    def of(cls, table: pa.Table, inputs: shards.InputSet, teacher_prompts: list[list[int]],
           score_cfg: ScoreConfig, weight_cfg: WeightConfig, *, temperature: float,
           teacher: str, vocab_sizes: dict[str, int]) -> ScoreInTrainStep:
        """From the rollouts shard's rows and the iteration's stage configs."""
        return cls(inputs, micro_batches(table, teacher_prompts, weight_cfg), temperature,
                   teacher, score_cfg, weight_cfg, row_keys(table), teacher_prompts,
                   vocab_sizes)

    @property
    def live(self) -> LiveWeightSpec:
        """The weight stage's settings, for the step's live weights."""
        return live_spec(self.weight_cfg)

    def write_shards(self, logprobs: StepLogprobs) -> StepShards:
        t0 = time.perf_counter()
        rows = {self.row_keys[row]: (self.teacher_prompts[row], *pair)
                for row, pair in logprobs.items()}
        scorer = StepScorer(rows, self.vocab_sizes)
        score = run_score(self.score_cfg, scorer=scorer,
                          extra_meta={"score_in_train_step": True})
        t1 = time.perf_counter()
        # Where the whole shard was scored just now, its rows are in memory; where parts were
        # already complete (a run resumed after a kill), the weight stage reads the file.
        scores = scorer.scored_rows() if score.parts_skipped == 0 else None
        weight = run_weight(self.weight_cfg, scores=scores)
        return StepShards(score, weight, t1 - t0, time.perf_counter() - t1)


class StepScorer:
    """A scorer for ``run_score`` that hands back the train step's log-probs.

    ``rows`` maps a row's (prompt_id, sample_index) to (teacher prompt ids, student
    log-probs, teacher log-probs): the teacher prompts the step was given, not rendered
    again. The tables it returns are kept, in order: the scores shard's rows."""

    def __init__(self, rows: dict[tuple[str, int], tuple[list[int], list[float], list[float]]],
                 vocab_sizes: dict[str, int]):
        self.rows = rows
        self._vocab = dict(vocab_sizes)
        self._scored: list[pa.Table] = []

    def vocab_sizes(self) -> dict[str, int]:
        return dict(self._vocab)

    def close(self) -> None:
        """Nothing to release."""

    def scored_rows(self) -> pa.Table:
        return pa.concat_tables(self._scored)

    def score_table(self, table: pa.Table, progress: Callable[[int], None] | None = None
                    ) -> pa.Table:
        try:
            found = [self.rows[key] for key in row_keys(table)]
        except KeyError as exc:
            raise RenioInputError(f"score_in_train_step: no log-probs from the train step for "
                                  f"row {exc.args[0]}") from None
        student = models.LogprobResult([np.asarray(s, np.float32) for _, s, _ in found], None, None)
        teacher = models.LogprobResult([np.asarray(t, np.float32) for _, _, t in found], None, None)
        if progress is not None:
            progress(table.num_rows)
        scored = with_scores(table, [list(p) for p, _, _ in found], student, teacher, topk=0)
        self._scored.append(scored)
        return scored
