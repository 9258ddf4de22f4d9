"""``renio run``: the on-policy loop, rollout -> score -> weight -> train, in one process.

On-policy distillation (arXiv 2606.23104, Alg. 1) alternates sampling from the current student
and training it on those samples. Each iteration ``i`` writes every stage's shards under
``RUN_DIR/iter-0000i/`` (``rollouts.parquet``, ``scores.parquet``, ``weights.parquet``,
``ckpt/``) so they can be inspected, and every ``eval_every`` iterations an evaluation on the
held-out prompts (``eval.parquet`` + ``eval.json``). The models stay loaded across stages and
iterations (:mod:`renio_core.run.resident`); the run's configuration is in
:mod:`renio_core.run.config`, its ``metrics.jsonl`` in :mod:`renio_core.run.records`.

One optimizer for the whole run, as the official single trainer has: each iteration's train
stage continues the previous checkpoint's AdamW state and learning-rate schedule
(``TrainConfig.init_from``), the schedule's length being the run's own step count
(``iterations x steps per iteration``). ``train.steps_per_batch`` (default 1, the official
loop's) optimizer steps are taken on each iteration's fresh rollouts.

Resuming: an iteration is done once its line is in ``metrics.jsonl`` (written last); a rerun
skips done iterations and, inside the first unfinished one, every stage is idempotent on its
outputs (complete parts are skipped; a checkpoint is reused only when it recorded the end of
its training, never a mid-training ``save_every`` save), so the same command after a kill
continues exactly from the last complete stage.

Scoring inside the train step (``score_in_train_step``): as the official trainer, one forward
of student and teacher per iteration gives the loss, the sampled-token log-probs and the live
weights; the scores and weights shards are written from them before the checkpoint
(``renio_core.training.score_in_step``). ``auto`` (the default) takes this path wherever
its conditions hold and the separate score pass elsewhere; the run's first lines say which
and why (:meth:`RunConfig.scoring`).

Filtered runs (``fill_filtered``): the paper's correct-only and incorrect-only comparison is
fair only at equal data, so the loop can sample further prompts until the iteration has
``prompts_per_iteration x n`` rows of the kind ``weight.filter`` keeps (``sample_filled``).

Disk: the optimizer state (``trainer_state.pt``) is kept only in the newest checkpoint and in
every ``keep_checkpoint_every``-th; ``prune_checkpoints`` also removes those older
checkpoints' weights, ``prune_shards`` older iterations' rollouts (with ``fill/``), scores and
weights.

Deliberate differences from the official code: prompts for iteration ``i`` are the next
``prompts_per_iteration`` prompts of the prompt file in order, cycling (the official trainer
shuffles its dataset once per epoch); each iteration writes its stages' shards and a checkpoint
(the official trainer keeps its samples in memory), so that every step can be inspected and a
killed run resumes exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from renio_core.backends.hf import HFScorer
from renio_core.backends.rows import prompt_task
from renio_core.data import shards
from renio_core.data.prompt_io import PromptSet, load_prompts
from renio_core.errors import RenioInputError
from renio_core.modeling import models
from renio_core.run.config import EVAL_SAMPLING, RunConfig, resolve_prompts
from renio_core.run.records import (
    TIME_KEYS,
    IterationRecord,
    append_metrics,
    checkpoint_finished,
    checkpoint_metrics,
    damaged,
    eval_accuracy,
    read_records,
    trained_nothing,
)
from renio_core.run.resident import Resident, Tokenizers
from renio_core.stages.evaluate import EvalConfig, run_eval
from renio_core.stages.rollout import (
    RolloutConfig,
    RolloutSummary,
    fit_to_context,
    run_rollout,
)
from renio_core.stages.score import ScoreConfig, resolve, run_score
from renio_core.stages.train import TRACKED
from renio_core.stages.weight import run_weight
from renio_core.tracking import Tracker
from renio_core.training.checkpoint import (
    STATE_FILE,
    verify_checkpoint,
)
from renio_core.training.score_in_step import ScoreInTrainStep


def graded_at_rollout(cfg: RunConfig, prompts: PromptSet) -> bool:
    """Whether the loop's rollouts are graded: yes for math, not where any prompt is code
    (code is graded by running it, which ``renio eval`` does in its sandbox, not rollout)."""
    return not any(prompt_task(p, cfg.task) == "code" for p in prompts.prompts)


def _check_grading_needs(cfg: RunConfig, prompts: PromptSet) -> None:
    if graded_at_rollout(cfg, prompts):
        return
    for key, value in (("weight.filter", cfg.weight.get("filter", "all")),
                       ("fill_filtered", cfg.fill_filtered)):
        if value not in ("all", False):
            raise RenioInputError(
                f"{key}: needs graded rollouts, and code prompts are not graded at rollout "
                "(renio eval grades code in its sandbox); remove it for code prompts",
                file=prompts.source)


def _prompt_window(prompts: PromptSet, start: int, count: int) -> PromptSet:
    """``count`` prompts from position ``start`` on, in file order, cycling."""
    n = len(prompts.prompts)
    return dataclasses.replace(prompts, prompts=[prompts.prompts[(start + j) % n]
                                                 for j in range(count)])


def _iteration_prompts(prompts: PromptSet, cfg: RunConfig, iteration: int) -> PromptSet:
    return _prompt_window(prompts, iteration * cfg.prompts_per_iteration,
                          min(cfg.prompts_per_iteration, len(prompts.prompts)))



@dataclasses.dataclass
class RunSummary:
    run_dir: Path
    base_eval_accuracy: float | None
    iterations: list[IterationRecord]
    final_eval_accuracy: float | None
    final_adapter: Path


def run_loop(
    cfg: RunConfig,
    log: Callable[[str], None] | None = None,
    progress_factory: Callable[[str, int | None], Any] | None = None,
) -> RunSummary:
    """Run (or resume) ``cfg``. ``log`` gets one line per stage; ``progress_factory(desc,
    total)`` returns a context manager yielding ``advance(n)`` for a stage's progress bar."""
    say = log or (lambda _msg: None)

    def bar(desc: str, total: int | None):
        return progress_factory(desc, total) if progress_factory else contextlib.nullcontext(None)

    # Every check runs before the first write: a refused run leaves no trace.
    train_prompts = load_prompts(resolve_prompts(cfg.prompts, "prompts"))
    eval_spec = resolve_prompts(cfg.eval_prompts, "eval_prompts") if cfg.eval_prompts else None
    eval_prompts = load_prompts(eval_spec) if eval_spec else None
    _check_grading_needs(cfg, train_prompts)
    run_dir = _check_run_dir(cfg)
    tokenizers = Tokenizers(cfg)
    train_prompts, eval_prompts = _fit_run_prompts(cfg, tokenizers, train_prompts, eval_spec,
                                                   eval_prompts, say)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_run_dir(run_dir)
    say(cfg.scoring()[1])  # once the run is surely this process's: a refused one says only why
    try:
        (run_dir / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        tracker = Tracker(wandb_project=cfg.wandb_project, run_name=run_dir.name,
                          config=dataclasses.asdict(cfg))
        resident = Resident(cfg, cfg.rollout, tokenizers)
        try:
            loop = _Loop(cfg, resident, run_dir, train_prompts, eval_spec, eval_prompts, say,
                         bar)
            loop.tracker = tracker
            return loop.run()
        finally:
            resident.close()  # a vLLM engine's worker processes
            tracker.close()
    finally:
        os.close(lock)  # the kernel releases it too when the process is killed


RUN_LOCK = ".renio-run.lock"


def _check_run_dir(cfg: RunConfig) -> Path:
    """``run_dir`` as a path, refused when it is not a run directory: a file, a folder that
    holds something else (a model, data) and no ``run_config.json``, or a place inside a
    model folder. Hidden files (a lock, a tool's stamp, .DS_Store) do not count."""
    run_dir = Path(cfg.run_dir)
    for role, name in (("student", cfg.student), ("teacher", cfg.teacher)):
        if name == "self":
            continue
        model_dir = Path(os.path.realpath(models.resolve_name(name)))
        target = Path(os.path.realpath(run_dir))
        if model_dir.is_dir() and (target == model_dir or model_dir in target.parents):
            raise RenioInputError(
                f"run_dir: {run_dir} is inside the {role} model folder {name}; choose a "
                "new folder for the run")
    if run_dir.exists() and not run_dir.is_dir():
        raise RenioInputError(f"run_dir: {run_dir} is a file, not a folder")
    if run_dir.is_dir() and not (run_dir / "run_config.json").is_file():
        other = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
        if other:
            shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
            raise RenioInputError(
                f"run_dir: {run_dir} holds other files ({shown}) and no run_config.json, so "
                "it is not a renio run directory; choose a new or empty folder")
    return run_dir


def _lock_run_dir(run_dir: Path) -> int:
    """Hold ``run_dir`` for this process (an open file descriptor with an exclusive flock),
    or refuse at once naming the process that holds it: two loops on one directory would
    redo and overwrite each other's stages."""
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RenioInputError(
            f"another renio run (pid {holder}) holds {run_dir}; wait for it to end, or choose "
            "another run_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd



def _fit_run_prompts(cfg: RunConfig, tokenizers: Tokenizers, train_prompts: PromptSet,
                     eval_spec: str | None, eval_prompts: PromptSet | None,
                     say: Callable[[str], None]) -> tuple[PromptSet, PromptSet | None]:
    """Every prompt the run will sample, checked against the context with the rollout's (and
    the evaluation's) ``max_new_tokens``: refused, or with ``rollout.skip_long_prompts``
    dropped and counted."""
    context = tokenizers.context(cfg)

    def fit(rcfg: RolloutConfig, prompts: PromptSet, what: str) -> PromptSet:
        fitted = fit_to_context(rcfg, prompts, tokenizers.student, context,
                                skip_hint="rollout.skip_long_prompts=true")
        if fitted.skipped:
            say(f"skipped {len(fitted.skipped):,} of {len(prompts):,} {what} longer than the "
                f"context ({context:,} tokens with max_new_tokens {rcfg.max_new_tokens:,})")
        return fitted.prompts

    rollout_cfg = cfg.stage_configs(Path(cfg.run_dir) / "iter-00000", adapter=None,
                                    policy_step=0)["rollout"]
    train_prompts = fit(rollout_cfg, train_prompts, "prompts")
    if eval_prompts is None or eval_spec is None:
        return train_prompts, None
    limit = cfg.eval.get("limit")
    if limit is not None:  # only the prompts the evaluations take
        eval_prompts = dataclasses.replace(eval_prompts, prompts=eval_prompts.prompts[:limit])
    eval_cfg = _eval_rollout_config(cfg, eval_spec, Path(cfg.run_dir), None, 0)
    return train_prompts, fit(eval_cfg, eval_prompts, "evaluation prompts")


def _eval_rollout_config(cfg: RunConfig, eval_spec: str, where: Path, ckpt: str | None,
                         policy_step: int) -> RolloutConfig:
    """The rollout of an evaluation: the run's rollout settings with the eval section's
    sampling, from the student with checkpoint ``ckpt``."""
    sampling = {k: cfg.eval[k] for k in EVAL_SAMPLING if k in cfg.eval}
    full_ft = ckpt is not None and not cfg.lora
    return RolloutConfig(
        **{**{k: v for k, v in cfg.rollout.items() if k not in EVAL_SAMPLING}, **sampling},
        model=ckpt if full_ft else cfg.student, prompts=eval_spec,
        out=str(where / "eval_rollouts.parquet"), adapter=None if full_ft else ckpt,
        policy_step=policy_step, seed=cfg.seed + 7919, grade=True, overwrite=True,
    )


class _Loop:
    """The iterations of one run, each a short method's worth of stages."""

    def __init__(self, cfg: RunConfig, resident: Resident, run_dir: Path,
                 train_prompts: PromptSet, eval_spec: str | None,
                 eval_prompts: PromptSet | None, say: Callable[[str], None],
                 bar: Callable[[str, int | None], Any]):
        self.cfg, self.resident, self.run_dir = cfg, resident, run_dir
        self.train_prompts, self.eval_spec, self.eval_prompts = train_prompts, eval_spec, eval_prompts
        self.say, self.bar = say, bar
        self.tracker = Tracker()  # run_loop sets the run's own (W&B), else logs nowhere
        self.metrics_path = run_dir / "metrics.jsonl"
        self.graded = graded_at_rollout(cfg, train_prompts)
        self.score_in_train_step = cfg.scoring()[0]
        self.lora_rank = cfg.stage_configs(run_dir / "iter-00000", adapter=None,
                                           policy_step=0)["train"].lora_r

    def run(self) -> RunSummary:
        cfg, run_dir = self.cfg, self.run_dir
        done = read_records(self.metrics_path)
        base_acc = None
        if cfg.eval_before and cfg.eval_every > 0:
            base_json = run_dir / "eval-base" / "eval.json"
            if done and base_json.is_file():
                base_acc = eval_accuracy(base_json)
            else:
                base_acc = self.evaluate(run_dir / "eval-base", None, 0, "base")
        records: list[IterationRecord] = []
        ckpt: str | None = None
        ckpt_iter = -1  # the iteration whose checkpoint ckpt is
        policy_step = 0
        for i in range(cfg.iterations):
            it_ckpt = run_dir / f"iter-{i:05d}" / "ckpt"
            if i in done and (i + 1 in done or checkpoint_finished(it_ckpt)
                              or trained_nothing(done[i])):
                record = done[i]  # finished before a kill: nothing to redo
                self.say(f"iter {i}: done earlier, skipped")
                last = i if not trained_nothing(record) else ckpt_iter
                if i == cfg.iterations - 1 and last >= 0:
                    self.check_checkpoint(last)  # the run's result, handed on as it is
            else:
                if ckpt is not None:
                    self.check_checkpoint(ckpt_iter)  # the one this iteration continues
                record = self.iteration(i, ckpt, policy_step)
                append_metrics(self.metrics_path, record)
                self.tracker.log("iter", {**dataclasses.asdict(record), **{
                    f"{k}_seconds": v for k, v in record.time.items()}}, record.policy_step)
                # The checkpoint the next iteration continues from keeps its trainer state.
                self.prune(i, keep=ckpt_iter if trained_nothing(record) else i)
            records.append(record)
            if not trained_nothing(record):
                ckpt, ckpt_iter, policy_step = str(it_ckpt), i, record.policy_step
        final = next((r.eval_accuracy for r in reversed(records) if r.eval_accuracy is not None), None)
        last_eval = next((run_dir / f"iter-{r.iteration:05d}" / "eval.json" for r in reversed(records)
                          if r.eval_accuracy is not None), None)
        if last_eval is not None:
            # A stable name for the newest evaluation, for `renio eval --compare`.
            tmp = run_dir / "eval-final.json.tmp"
            tmp.write_text(last_eval.read_text())
            os.replace(tmp, run_dir / "eval-final.json")
        return RunSummary(run_dir, base_acc, records, final, Path(ckpt) if ckpt else run_dir)

    def check_checkpoint(self, i: int) -> None:
        """Refuse iteration ``i``'s damaged checkpoint in one line that says how to resume:
        from the newest older checkpoint that is intact and kept its trainer state."""
        ckpt = self.run_dir / f"iter-{i:05d}" / "ckpt"
        try:
            verify_checkpoint(ckpt)
        except RenioInputError:
            # Once more with the advice, which reads the older checkpoints: only when needed.
            verify_checkpoint(ckpt, advice=self.resume_advice(i))

    def resume_advice(self, damaged: int) -> str:
        folder = self.run_dir / f"iter-{damaged:05d}"
        if damaged == 0:
            return f"restore it, or delete {folder} to redo iteration 0 from the start"
        for k in range(damaged - 1, -1, -1):
            ckpt = self.run_dir / f"iter-{k:05d}" / "ckpt"
            if not (checkpoint_finished(ckpt) and (ckpt / STATE_FILE).is_file()):
                continue
            try:
                verify_checkpoint(ckpt)
            except RenioInputError:
                continue
            if k == damaged - 1:
                return (f"restore it, or delete {folder} to redo iteration {damaged} from "
                        f"iteration {k}'s checkpoint")
            return (f"restore it, or to resume from iteration {k}'s checkpoint (the newest "
                    f"intact one with its trainer state) delete iter-{k + 1:05d} to "
                    f"iter-{damaged:05d} in {self.run_dir} and the lines of "
                    f"{self.metrics_path.name} from iteration {k + 1} on")
        return ("no older checkpoint kept its trainer state (keep_checkpoint_every) to resume "
                "from; restore the file or start the run again in a new run_dir")

    def iteration(self, i: int, prev_ckpt: str | None, policy_step: int) -> IterationRecord:
        cfg, resident, label = self.cfg, self.resident, f"iter {i}"
        timings: dict[str, float] = dict.fromkeys(TIME_KEYS, 0.0)
        t0 = time.perf_counter()
        it_dir = self.run_dir / f"iter-{i:05d}"
        stage_cfgs = cfg.stage_configs(it_dir, adapter=prev_ckpt, policy_step=policy_step,
                                       iteration=i, grade=self.graded)
        for stage in ("rollout", "score", "weight"):
            why = damaged(Path(stage_cfgs[stage].out))
            if why:
                self.say(f"{label}: {stage_cfgs[stage].out} {why}; made again")
        resident.use_checkpoint(prev_ckpt)

        fill: tuple[int, int] | None = None
        with _timed(timings, "sample"):
            if cfg.fill_filtered:
                rollout_summary, fill = self.sample_filled(stage_cfgs, i, label)
            else:
                rollout_summary = self.sample(
                    stage_cfgs["rollout"], _iteration_prompts(self.train_prompts, cfg, i),
                    f"{label}: rollout")
        timings["sample_work"] = rollout_summary.seconds
        rollout_acc = (rollout_summary.correct / rollout_summary.graded
                       if rollout_summary.graded else None)
        if fill is not None and fill[1] == 0:
            return self.nothing_to_train(i, it_dir, prev_ckpt, policy_step, rollout_acc, fill,
                                         timings, t0)

        ckpt = it_dir / "ckpt"
        if self.score_in_train_step:
            weight_summary = self.train_with_score_in_train_step(stage_cfgs, ckpt, label,
                                                                 policy_step, timings)
            self.say_weights(label, weight_summary, rollout_acc)
        else:
            weight_summary = self.score_and_weight(stage_cfgs, label, timings)
            self.say_weights(label, weight_summary, rollout_acc)
            with _timed(timings, "train"):
                self.train(stage_cfgs, ckpt, label, policy_step)
        steps = checkpoint_metrics(ckpt)
        timings["train_steps"] = sum(s.get("step_seconds", 0.0) for s in steps)
        policy_step = max((s.get("global_step", policy_step + s.get("step", 0)) for s in steps),
                          default=policy_step)
        eval_acc = None
        if cfg.eval_every and ((i + 1) % cfg.eval_every == 0 or i == cfg.iterations - 1):
            with _timed(timings, "eval"):
                eval_acc = self.evaluate(it_dir, str(ckpt), policy_step, label)
        total = time.perf_counter() - t0
        timings["other"] = max(0.0, total - sum(timings[k] for k in ("sample", "score", "weight",
                                                                     "train", "eval")))
        return IterationRecord(
            iteration=i, policy_step=policy_step, rollout_accuracy=rollout_acc,
            mean_weight_correct=weight_summary.mean_weight_correct,
            mean_weight_incorrect=weight_summary.mean_weight_incorrect,
            auroc_incorrect=weight_summary.auroc_incorrect,
            pivotal_share=weight_summary.pivotal_share,
            train_loss=steps[-1].get("loss") if steps else None,
            eval_accuracy=eval_acc, seconds=total,
            fill_sampled=fill[0] if fill else None, fill_kept=fill[1] if fill else None,
            time={k: round(v, 4) for k, v in timings.items()},
        )

    def nothing_to_train(self, i: int, it_dir: Path, prev_ckpt: str | None, policy_step: int,
                         rollout_acc: float | None, fill: tuple[int, int],
                         timings: dict[str, float], t0: float) -> IterationRecord:
        """An iteration whose fill pass found no row of the kept kind (an incorrect-only run
        whose student no longer errs): no score, weights or optimizer step; the student stays
        at ``prev_ckpt``, which a scheduled evaluation evaluates."""
        cfg, label = self.cfg, f"iter {i}"
        self.say(f"{label}: no {cfg.weight.get('filter')} row in one pass over the prompts: "
                 "nothing to train on; the next iteration continues from the last checkpoint")
        eval_acc = None
        if cfg.eval_every and ((i + 1) % cfg.eval_every == 0 or i == cfg.iterations - 1):
            with _timed(timings, "eval"):
                eval_acc = self.evaluate(it_dir, prev_ckpt, policy_step, label)
        total = time.perf_counter() - t0
        timings["other"] = max(0.0, total - sum(timings[k] for k in ("sample", "eval")))
        return IterationRecord(
            iteration=i, policy_step=policy_step, rollout_accuracy=rollout_acc,
            mean_weight_correct=None, mean_weight_incorrect=None, auroc_incorrect=None,
            pivotal_share=0.0, train_loss=None, eval_accuracy=eval_acc, seconds=total,
            fill_sampled=fill[0], fill_kept=0, time={k: round(v, 4) for k, v in timings.items()})

    def scorer(self, score_cfg: ScoreConfig, inputs: shards.InputSet) -> HFScorer:
        resident = self.resident
        scorer = HFScorer(score_cfg, resolve(score_cfg, inputs), resident.student,
                          resident.tokenizer, resident.teacher, resident.teacher_tok)
        if score_cfg.self_distill and not self.cfg.lora:
            scorer.teacher_model = resident.teacher  # the frozen base
        return scorer

    def score_and_weight(self, stage_cfgs: dict[str, Any], label: str,
                         timings: dict[str, float]) -> Any:
        with _timed(timings, "score"):
            inputs = shards.open_inputs(stage_cfgs["score"].input, [])
            scorer = self.scorer(stage_cfgs["score"], inputs)
            with self.bar(f"{label}: score", inputs.total_rows) as advance:
                timings["score_work"] = run_score(stage_cfgs["score"], advance,
                                                  scorer=scorer).seconds
        with _timed(timings, "weight"):
            return run_weight(stage_cfgs["weight"])

    def say_weights(self, label: str, summary: Any, rollout_acc: float | None) -> None:
        self.say(f"{label}: {summary.rows} rollouts, accuracy "
                 f"{'-' if rollout_acc is None else f'{rollout_acc:.3f}'}, pivotal share "
                 f"{summary.pivotal_share:.2%}, AUROC "
                 f"{'-' if summary.auroc_incorrect is None else f'{summary.auroc_incorrect:.3f}'}")

    def train(self, stage_cfgs: dict[str, Any], ckpt: Path, label: str, policy_step: int,
              score_in_train_step: ScoreInTrainStep | None = None) -> Any:
        """The train stage into ``ckpt``; its summary, or None where the checkpoint was
        already complete."""
        if checkpoint_finished(ckpt):
            self.say(f"{label}: checkpoint already complete, not retrained")
            self.resident.use_checkpoint(str(ckpt))  # it holds prev_ckpt: this reloads
            return None
        with contextlib.ExitStack() as stack:
            advance: list[Any] = []

            def on_step(step: int, total: int, metrics: dict[str, Any] | None) -> None:
                # The trainer's first call (metrics None) gives the total: the bar opens there.
                if not advance:
                    advance.append(stack.enter_context(self.bar(f"{label}: train", total)))
                if metrics is None:
                    return
                self.tracker.log("train", {k: metrics[k] for k in TRACKED},
                                 metrics.get("global_step", policy_step + step))
                if advance[0] is not None:
                    advance[0](1)
            return self.resident.train(stage_cfgs["train"], str(ckpt), on_step,
                                       score_in_train_step=score_in_train_step)

    def train_with_score_in_train_step(self, stage_cfgs: dict[str, Any], ckpt: Path,
                                       label: str, policy_step: int,
                                       timings: dict[str, float]) -> Any:
        """``score_in_train_step``: train on the rollouts, the step scoring them; the trainer
        writes the scores and weights shards from the step's log-probs before the checkpoint
        (renio_core/training/score_in_step.py) and says how long each took. A checkpoint
        already complete had its shards written first, so only the weight summary is read
        again."""
        score_cfg = stage_cfgs["score"]
        inputs = shards.open_inputs(score_cfg.input, [])
        scorer = self.scorer(score_cfg, inputs)
        table = shards.read_table(score_cfg.input)
        in_step = ScoreInTrainStep.of(
            table, inputs, scorer.teacher_prompts(table), score_cfg, stage_cfgs["weight"],
            temperature=scorer.resolved.temperature, teacher=stage_cfgs["train"].teacher,
            vocab_sizes={"student": models.vocab_rows(scorer.student_model),
                         "teacher": models.vocab_rows(scorer.teacher_model)})
        start = time.perf_counter()
        summary = self.train(stage_cfgs, ckpt, label, policy_step, score_in_train_step=in_step)
        written = summary.step_shards if summary is not None else None
        if written is None:  # the checkpoint was complete: its shards exist
            timings["train"] += time.perf_counter() - start
            with _timed(timings, "weight"):
                return run_weight(stage_cfgs["weight"])
        timings["score"] += written.score_seconds
        timings["weight"] += written.weight_seconds
        timings["train"] += (time.perf_counter() - start - written.score_seconds
                             - written.weight_seconds)
        return written.weight

    def sample(self, rollout_cfg: RolloutConfig, prompt_set: PromptSet, desc: str) -> Any:
        with self.bar(desc, len(prompt_set.prompts) * rollout_cfg.n) as advance:
            return run_rollout(rollout_cfg, advance, prompt_set=prompt_set,
                               model=self.resident.student, tokenizer=self.resident.tokenizer,
                               sampler=self.resident.sampler(rollout_cfg, self.lora_rank))

    def sample_filled(self, stage_cfgs: dict[str, Any], i: int,
                      label: str) -> tuple[Any, tuple[int, int]]:
        """Rollout rounds over the next prompts until ``prompts_per_iteration x n`` rows of
        the kind ``weight.filter`` keeps exist; those rows (first ones first) become the
        iteration's ``rollouts.parquet``. Each round is an ordinary, resumable rollout shard
        under ``fill/``; rows depend only on (seed, prompt, sample), not on the rounds."""
        cfg, rollout_cfg = self.cfg, stage_cfgs["rollout"]
        keep = stage_cfgs["weight"].filter == "correct"
        n_prompts = len(self.train_prompts.prompts)
        target = min(cfg.prompts_per_iteration, n_prompts) * rollout_cfg.n
        fill_dir = Path(rollout_cfg.out).parent / "fill"
        fill_dir.mkdir(parents=True, exist_ok=True)
        tables, kept, sampled, seconds, meta = [], 0, 0, 0.0, None
        graded = correct = 0
        start = i * cfg.prompts_per_iteration
        for j, first in enumerate(range(0, n_prompts, cfg.prompts_per_iteration)):
            window = _prompt_window(self.train_prompts, start + first,
                                    min(cfg.prompts_per_iteration, n_prompts - first))
            round_cfg = dataclasses.replace(rollout_cfg, out=str(fill_dir / f"rollouts-{j:03d}.parquet"))
            round_summary = self.sample(round_cfg, window, f"{label}: rollout (fill round {j})")
            seconds += round_summary.seconds
            graded, correct = graded + round_summary.graded, correct + round_summary.correct
            table = shards.read_table(round_cfg.out)
            meta = meta or shards.read_metadata(Path(round_cfg.out))
            sampled += table.num_rows
            mask = pc.fill_null(pc.equal(table.column("correct"), keep), False)
            tables.append(table.filter(mask))
            kept += tables[-1].num_rows
            if kept >= target:
                break
        rows = pa.concat_tables(tables).slice(0, target)
        meta = {**(meta or {}), "fill_filtered": {
            "filter": stage_cfgs["weight"].filter, "target_rows": target, "rows": rows.num_rows,
            "rows_sampled": sampled, "rounds": j + 1}}
        shards.write_table_atomic(Path(rollout_cfg.out), rows.replace_schema_metadata(None), meta)
        if rows.num_rows < target:
            self.say(f"{label}: fill_filtered found {rows.num_rows} of {target} "
                     f"{stage_cfgs['weight'].filter} rows in one pass over the prompts")
        # The record's rollout accuracy is the student's, over every row sampled.
        summary = RolloutSummary(out=Path(rollout_cfg.out), rows=rows.num_rows, graded=graded,
                                 correct=correct, seconds=seconds)
        return summary, (sampled, rows.num_rows)

    def evaluate(self, where: Path, ckpt: str | None, policy_step: int, label: str) -> float | None:
        cfg, resident, eval_prompts = self.cfg, self.resident, self.eval_prompts
        if eval_prompts is None:
            return None
        resident.use_checkpoint(ckpt)
        limit = cfg.eval.get("limit")
        prompt_set = eval_prompts
        if limit is not None:
            prompt_set = dataclasses.replace(eval_prompts, prompts=eval_prompts.prompts[:limit])
        rcfg = _eval_rollout_config(cfg, self.eval_spec, where, ckpt, policy_step)
        with self.bar(f"{label}: eval sampling", len(prompt_set.prompts) * rcfg.n) as advance:
            run_rollout(rcfg, advance, prompt_set=prompt_set, model=resident.student,
                        tokenizer=resident.tokenizer,
                        sampler=resident.sampler(rcfg, self.lora_rank))
        ecfg = EvalConfig(bench=self.eval_spec, out=str(where / "eval.parquet"),
                          completions=str(where / "eval_rollouts.parquet"),
                          **{k: getattr(rcfg, k) for k in EVAL_SAMPLING},
                          limit=limit, summary=str(where / "eval.json"), overwrite=True)
        result = run_eval(ecfg)
        acc = result.summary.get("metrics", {}).get("avg_at_n")
        self.say(f"{label}: eval avg@{rcfg.n} = {acc:.3f}" if acc is not None
                 else f"{label}: eval done")
        return acc

    def prune(self, newest: int, keep: int | None = None) -> None:
        """Once iteration ``newest`` is recorded, older iterations keep only what was asked,
        and iteration ``keep``'s checkpoint stays whole (the next iteration continues from it
        where ``newest`` trained nothing)."""
        cfg = self.cfg
        for j in range(newest):
            it_dir = self.run_dir / f"iter-{j:05d}"
            kept = (cfg.keep_checkpoint_every > 0 and (j + 1) % cfg.keep_checkpoint_every == 0
                    or j == keep)
            ckpt = it_dir / "ckpt"
            if not kept and cfg.prune_checkpoints:
                shutil.rmtree(ckpt, ignore_errors=True)
            elif not kept:
                (ckpt / STATE_FILE).unlink(missing_ok=True)
            if cfg.prune_shards:
                for name in ("rollouts.parquet", "scores.parquet", "weights.parquet", "fill"):
                    path = it_dir / name
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _timed(times: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        times[key] += time.perf_counter() - start
