"""``renio run``: the on-policy loop, rollout -> score -> weight -> train, in one process.

On-policy distillation (arXiv 2606.23104, Alg. 1) alternates sampling from the current student
and training it on those samples. Each iteration ``i`` writes every stage's shards under
``RUN_DIR/iter-0000i/`` (``rollouts.parquet``, ``scores.parquet``, ``weights.parquet``,
``ckpt/``) so they can be inspected, and every ``eval_every`` iterations an evaluation on the
held-out prompts (``eval.parquet`` + ``eval.json``). The student with its LoRA adapter and the
teacher stay loaded across stages and iterations; after each train step the new adapter is
loaded into the resident student.

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
(``renio_core.stages.score_in_train_step``). ``auto`` (the default) takes this path wherever
its conditions hold and the separate score pass elsewhere; the run's first lines say which
and why (:meth:`RunConfig.scoring`).

Filtered runs (``fill_filtered``): the paper's correct-only and incorrect-only comparison is
fair only at equal data, so the loop can sample further prompts until the iteration has
``prompts_per_iteration x n`` rows of the kind ``weight.filter`` keeps (``sample_filled``).

Disk: the optimizer state (``trainer_state.pt``) is kept only in the newest checkpoint and in
every ``keep_checkpoint_every``-th; ``prune_checkpoints`` also removes those older
checkpoints' weights, ``prune_shards`` older iterations' rollouts (with ``fill/``), scores and
weights.

The YAML maps one to one onto :class:`RunConfig`; its sections ``rollout``, ``score``,
``weight``, ``train`` and ``eval`` hold the fields of the stages' own config dataclasses.

Deliberate differences from the official code: prompts for iteration ``i`` are the next
``prompts_per_iteration`` prompts of the prompt file in order, cycling (the official trainer
shuffles its dataset once per epoch); each iteration writes its stages' shards and a checkpoint
(the official trainer keeps its samples in memory), so that every step can be inspected and a
killed run resumes exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import json
import os
import shutil
import time
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from renio_core.backends.hf import HFScorer
from renio_core.backends.rows import prompt_task
from renio_core.data import shards
from renio_core.data.prompt_io import PromptSet, load_prompts
from renio_core.errors import RenioInputError
from renio_core.modeling import models
from renio_core.modeling.toy import chain, ensure_toy_world, reflect
from renio_core.stages.evaluate import EvalConfig, run_eval
from renio_core.stages.rollout import (
    RolloutConfig,
    RolloutSummary,
    fit_to_context,
    make_sampler,
    run_rollout,
)
from renio_core.stages.score import ScoreConfig, resolve, run_score
from renio_core.stages.score_in_train_step import ScoreInTrainStep
from renio_core.stages.tracking import Tracker, check_available
from renio_core.stages.train import TRACKED, TrainConfig, attach_lora, run_train
from renio_core.stages.train_checkpoint import (
    CONFIG_FILE,
    METRICS_FILE,
    STATE_FILE,
    verify_checkpoint,
)
from renio_core.stages.train_losses import LOSS_TABLE
from renio_core.stages.weight import WeightConfig, run_weight

SECTIONS = ("rollout", "score", "weight", "train", "eval")
# Fields of the stage configs that the loop sets itself.
LOOP_OWNED = {
    "rollout": {"model", "prompts", "out", "adapter", "policy_step", "seed", "grade", "shard",
                "overwrite"},
    "score": {"input", "teacher", "out", "student", "adapter", "shard", "overwrite"},
    "weight": {"input", "out", "overwrite"},
    "train": {"weights", "model", "out", "adapter", "teacher", "resume", "overwrite", "seed",
              "init_from", "schedule_steps", "grad_accum", "wandb_project"},
    "eval": {"bench", "out", "model", "adapter", "completions", "overwrite", "summary"},
}
# The eval section's sampling keys: RolloutConfig's and EvalConfig's settings of the same
# name (evaluate.ROLLOUT_SETTINGS), handed from the run's rollout settings to both.
EVAL_SAMPLING = ("n", "temperature", "top_p", "top_k", "max_new_tokens")


@dataclasses.dataclass
class RunConfig:
    """One on-policy distillation run. ``teacher: self`` is OPSD."""

    run_dir: str = ""
    student: str = ""
    teacher: str = ""
    prompts: str = ""
    eval_prompts: str | None = None
    iterations: int = 1
    prompts_per_iteration: int = 64
    eval_every: int = 1
    eval_before: bool = True
    # With weight.filter correct/incorrect: sample further prompts (the next ones in order,
    # at most one pass over the prompt file) until prompts_per_iteration x rollout.n rows of
    # the kept kind exist, and train on exactly that many, so a filtered run takes as many
    # rows per optimizer step as an unfiltered one. Off: filter what was sampled.
    fill_filtered: bool = False
    # Score the rollouts inside the train step, as the official trainer does: one forward of
    # student and teacher instead of two; the scores and weights shards are still written.
    # auto: wherever its conditions hold (train.weights_from: live, one optimizer step per
    # iteration, the jsd loss, no filter, no ema norm, no stored top-k), else the separate
    # score pass; true: refused where they do not hold; false: always the separate pass.
    score_in_train_step: bool | Literal["auto"] = "auto"
    seed: int = 0
    task: str = "math"
    wandb_project: str | None = None  # log steps and iterations to W&B (renio[wandb]); None = off
    # Keep the optimizer state of every k-th iteration's checkpoint (0: only the newest).
    keep_checkpoint_every: int = 0
    # Remove older checkpoints entirely (weights too), except every keep_checkpoint_every-th.
    prune_checkpoints: bool = False
    # Remove older iterations' rollouts, scores and weights shards.
    prune_shards: bool = False
    rollout: dict[str, Any] = dataclasses.field(default_factory=dict)
    score: dict[str, Any] = dataclasses.field(default_factory=dict)
    weight: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want = {"int": int, "bool": bool}.get(f.type)
            if want is not None and (type(value) is not want):
                kind = "an integer" if want is int else "true or false"
                raise RenioInputError(f"{f.name}: must be {kind}, got {value!r}")
            if f.type in ("str", "str | None") and value is not None and not isinstance(value, str):
                raise RenioInputError(f"{f.name}: must be text, got {value!r}")
        for name in ("run_dir", "student", "teacher", "prompts"):
            if not getattr(self, name):
                raise RenioInputError(f"{name}: required (set it in the YAML or as {name}=...)")
        if self.iterations < 1:
            raise RenioInputError(f"iterations: must be >= 1, got {self.iterations}")
        if self.prompts_per_iteration < 1:
            raise RenioInputError(
                f"prompts_per_iteration: must be >= 1, got {self.prompts_per_iteration}")
        if self.eval_every < 0:
            raise RenioInputError(f"eval_every: must be >= 0 (0 = never), got {self.eval_every}")
        if self.keep_checkpoint_every < 0:
            raise RenioInputError(
                f"keep_checkpoint_every: must be >= 0 (0 = only the newest), got "
                f"{self.keep_checkpoint_every}")
        for section in SECTIONS:
            value = getattr(self, section)
            if value is None:
                setattr(self, section, {})
            elif not isinstance(value, dict):
                raise RenioInputError(f"{section}: must be a mapping of that stage's options")
            owned = LOOP_OWNED[section] & set(getattr(self, section))
            if owned:
                raise RenioInputError(
                    f"{section}.{sorted(owned)[0]}: set by the loop itself; remove it "
                    "(top-level keys choose models, prompts and seeds)")
        if self.score.get("backend", "hf") != "hf":
            raise RenioInputError(
                "score.backend: the loop scores with its resident models (exact, already "
                "loaded for training); remove it, or run `renio score --backend vllm` "
                "stage by stage")
        if self.rollout.get("backend", "hf") == "vllm" and not self.train.get("lora", True):
            raise RenioInputError(
                "rollout.backend: vllm in the loop serves the trained LoRA adapter to one "
                "resident engine; a full fine-tune (train.lora: false) would need a new "
                "engine every iteration. Use LoRA, or rollout.backend: hf")
        # Only the frozen teacher is spread over GPUs (score.device_map); the student is
        # trained, and a model being trained is not spread with a device map.
        if self.rollout.get("device_map", "none") != "none":
            raise RenioInputError(
                "rollout.device_map: the loop samples from the resident student being "
                "trained, which is not spread with a device map; remove it (score.device_map "
                "spreads the teacher)")
        if "teacher_device_map" in self.train:
            raise RenioInputError(
                "train.teacher_device_map: the loop trains against its one resident teacher; "
                "set score.device_map instead")
        if (self.score.get("device_map", "none") != "none" and self.teacher == "self"
                and self.lora):
            raise RenioInputError(
                "score.device_map: the OPSD teacher (teacher: self with LoRA) is the student "
                "being trained, which is not spread with a device map; remove it")
        if self.fill_filtered and self.weight.get("filter", "all") not in ("correct", "incorrect"):
            raise RenioInputError(
                "fill_filtered: needs weight.filter correct or incorrect (it fills the "
                "iteration with rows of the kept kind)")
        value = self.score_in_train_step
        if type(value) is not bool and value != "auto":
            raise RenioInputError(
                f"score_in_train_step: must be auto, true or false, got {value!r}")
        if value is True and self._score_in_train_step_unmet():
            raise RenioInputError(
                f"score_in_train_step: needs {self._score_in_train_step_unmet()[0][0]}")
        unknown = sorted(set(self.eval) - {*EVAL_SAMPLING, "limit"})
        if unknown:
            raise RenioInputError(
                f"eval.{unknown[0]}: unknown; the eval section takes "
                f"{', '.join((*EVAL_SAMPLING, 'limit'))}")
        check_available(wandb_project=self.wandb_project)  # before any work
        # Build every stage config once now, so a typo fails before any work.
        self.stage_configs(Path(self.run_dir) / "iter-00000", adapter=None, policy_step=0)

    def _score_in_train_step_unmet(self) -> list[tuple[str, str]]:
        """The conditions of scoring in the train step that this config does not meet, each
        as (what an explicit ``true`` needs, why ``auto`` takes the separate pass)."""
        loss = self.train.get("loss", "jsd")
        weights_from = self.train.get("weights_from", "shard")
        steps = self.steps_per_iteration()
        filt = self.weight.get("filter", "all")
        norm = self.weight.get("norm", "batch_mean")
        topk = self.score.get("topk", 0)
        checks = [
            (weights_from == "live",
             "train.weights_from: live (the step computes the weights from its own log-probs)",
             f"train.weights_from={weights_from} trains on the weight stage's weights, which "
             "need the scores first"),
            (steps == 1,
             "one optimizer step per iteration (train.steps_per_batch 1, epochs 1, no max_steps)",
             f"{steps} optimizer steps per iteration; one step's forward scores the rollouts "
             "only when it is the only step"),
            (LOSS_TABLE[loss].needs_teacher_model if loss in LOSS_TABLE else True,
             "train.loss jsd (the step reads the teacher's logits)",
             f"train.loss={loss} reads the stored scores, not the teacher's logits"),
            (filt == "all",
             "weight.filter all and no fill_filtered",
             f"weight.filter={filt} selects the rows in the weight stage, before training"),
            (not self.fill_filtered,
             "weight.filter all and no fill_filtered",
             "fill_filtered selects the rows in the weight stage, before training"),
            (norm != "ema",
             "weight.norm batch_mean, clamp or none (live weights normalize per micro-batch)",
             "weight.norm=ema normalizes over the whole shard; the step normalizes per "
             "micro-batch"),
            (not topk,
             "score.topk 0",
             f"score.topk={topk} stores the teacher's top-k, which only the score pass writes"),
        ]
        return [(needs, why) for ok, needs, why in checks if not ok]

    def scoring(self) -> tuple[bool, str]:
        """Whether the train step scores the rollouts (``score_in_train_step``), and one
        plain line saying which path the run takes and why."""
        if self.score_in_train_step is False:
            return False, "scoring: separate pass (score_in_train_step: false)"
        if self.score_in_train_step is True:
            return True, "scoring: in the train step (score_in_train_step: true)"
        unmet = self._score_in_train_step_unmet()
        if unmet:
            return False, f"scoring: separate pass ({unmet[0][1]})"
        return True, "scoring: in the train step (live weights, one step per batch, jsd)"

    @property
    def lora(self) -> bool:
        return bool(self.train.get("lora", True))

    def steps_per_iteration(self) -> int:
        """Optimizer steps of one iteration's train stage (its shard's passes x steps)."""
        if self.train.get("max_steps") is not None:
            return int(self.train["max_steps"])
        return int(self.train.get("epochs", 1)) * int(self.train.get("steps_per_batch", 1))

    def stage_configs(self, it_dir: Path, *, adapter: str | None, policy_step: int,
                      iteration: int = 0, grade: bool = True) -> dict[str, Any]:
        """The four stage configs of one iteration (validated by their own ``__post_init__``).

        ``adapter`` is the previous iteration's checkpoint (None in the first): a LoRA adapter
        on the student, or with ``train.lora: false`` the fully fine-tuned student itself.
        """

        def build(cls: type, section: str, **owned: Any) -> Any:
            values = train_section if section == "train" else getattr(self, section)
            try:
                return cls(**{**values, **owned})
            except TypeError as exc:
                raise RenioInputError(f"{section}: {exc}") from None
            except RenioInputError as exc:
                raise RenioInputError(f"{section}: {exc}") from None

        # A full fine-tune's checkpoint is the student; LoRA's is an adapter on it.
        student = adapter if (adapter is not None and not self.lora) else self.student
        # The loop owns its iteration folders: a shard there that is not this iteration's
        # complete output (cut short, damaged, another iteration's) is made again, and a
        # complete one is still recognized and kept.
        redo = {"overwrite": True}
        lora_adapter = adapter if self.lora else None
        train_section = {"steps_per_batch": 1, **self.train}
        rollouts = str(it_dir / "rollouts.parquet")
        scores = str(it_dir / "scores.parquet")
        weights = str(it_dir / "weights.parquet")
        return {
            "rollout": build(RolloutConfig, "rollout", model=student, prompts=self.prompts,
                             out=rollouts, adapter=lora_adapter, policy_step=policy_step,
                             seed=self.seed * 100003 + iteration, grade=grade, task=self.task,
                             **redo),
            "score": build(ScoreConfig, "score", input=rollouts, teacher=self.teacher, out=scores,
                           student=student, adapter=lora_adapter, **redo),
            "weight": build(WeightConfig, "weight", input=scores, out=weights, **redo),
            "train": build(TrainConfig, "train",
                           weights=weights, model=student, out=str(it_dir / "ckpt"),
                           adapter=lora_adapter, init_from=adapter,
                           schedule_steps=self.iterations * self.steps_per_iteration(),
                           teacher=self.teacher if LOSS_TABLE[self.train.get("loss", "jsd")].needs_teacher_model
                           else None,
                           seed=self.seed * 100003 + iteration, **redo),
        }


COMMAND_LINE = "the command line"


def load_run_config(path: str | os.PathLike | None, overrides: list[str]) -> RunConfig:
    """YAML file, then ``key=value`` overrides (dotted keys reach into sections:
    ``weight.threshold=1.0``). Values are parsed as YAML scalars.

    Every key is checked against the config dataclasses (RunConfig's fields, each section's
    stage config) before any of them is built: an unknown key names the nearest valid one, a
    value of the wrong type names the type expected, and both name where the value came from
    (the YAML file or the command line). A hand parser rather than OmegaConf's dotlist: that
    reports neither the source of a value nor the nearest key, and checking the sections'
    types would mean declaring the five stage configs a second time as structured configs.
    """
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}  # dotted key -> the file or the command line that set it
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise RenioInputError(f"cannot read run config: {exc}", file=path) from None
        if not isinstance(loaded, dict):
            raise RenioInputError("a run config must be a mapping", file=path)
        data = loaded
        for key, value in data.items():
            sources[str(key)] = os.fspath(path)
            if isinstance(value, dict):
                sources.update({f"{key}.{sub}": os.fspath(path) for sub in value})
    for item in overrides:
        if "=" not in item:
            raise RenioInputError(f"override {item!r}: expected key=value (e.g. iterations=2)")
        key, raw = item.split("=", 1)
        key = key.strip()
        value = _scalar(raw) if raw else None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RenioInputError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
        sources[key] = COMMAND_LINE
    _check_keys_and_types(data, sources)
    try:
        return RunConfig(**data)
    except RenioInputError as exc:
        raise _blamed(exc, sources) from None


def _section_types(section: str) -> dict[str, Any]:
    """The keys a section takes (the loop's own excluded) and their types."""
    if section == "eval":
        rollout = typing.get_type_hints(RolloutConfig)
        return {**{k: rollout[k] for k in EVAL_SAMPLING}, "limit": int | None}
    cls = {"rollout": RolloutConfig, "score": ScoreConfig, "weight": WeightConfig,
           "train": TrainConfig}[section]
    return {k: v for k, v in typing.get_type_hints(cls).items() if k not in LOOP_OWNED[section]}


def _check_keys_and_types(data: dict[str, Any], sources: dict[str, str]) -> None:
    """Refuse an unknown key or a value of the wrong type, naming the key, where it was set,
    the type expected and the nearest valid key. Numbers written as text in the YAML
    (``lr: 1e-4``, which YAML 1.1 reads as a string) become numbers where a number is due."""
    top = {k: v for k, v in typing.get_type_hints(RunConfig).items() if k not in SECTIONS}
    sections = {name: _section_types(name) for name in SECTIONS}
    for key in list(data):
        name = str(key)
        if name in SECTIONS:
            values = data[key]
            if not isinstance(values, dict):
                continue  # RunConfig says a section must be a mapping
            for sub in list(values):
                dotted = f"{name}.{sub}"
                if str(sub) in LOOP_OWNED.get(name, ()):
                    continue  # RunConfig says the loop sets it
                if str(sub) not in sections[name]:
                    raise _unknown(dotted, sources, sections)
                values[sub] = _typed(dotted, values[sub], sections[name][str(sub)], sources)
        elif name not in top:
            raise _unknown(name, sources, sections)
        else:
            data[key] = _typed(name, data[key], top[name], sources)


def _where(dotted: str, sources: dict[str, str]) -> str:
    source = sources.get(dotted) or sources.get(dotted.split(".")[0])
    return f"from {source}" if source else "in the run config"


def _unknown(dotted: str, sources: dict[str, str], sections: dict[str, dict[str, Any]]
             ) -> RenioInputError:
    section, _, name = dotted.rpartition(".")
    prefix = f"{section}." if section else ""
    names = list(sections[section]) if section else [f.name for f in dataclasses.fields(RunConfig)]
    # The right key in the wrong place (rollout.lr: train.lr), a shortened key (eval.temp:
    # eval.temperature), then the closest spelling (train.lrr: train.lr).
    near = [f"{other}.{name}" for other in SECTIONS if name in sections[other]]
    near += [prefix + k for k in names if len(name) >= 3 and k.startswith(name)]
    near += [prefix + k for k in difflib.get_close_matches(name, names, n=1, cutoff=0.6)]
    hint = f"; did you mean {near[0]}?" if near else ""
    if not near and section:
        hint = f"; the {section} section takes {', '.join(sorted(sections[section]))}"
    return RenioInputError(f"{dotted}: unknown key ({_where(dotted, sources)}){hint}")


def _typed(dotted: str, value: Any, want: Any, sources: dict[str, str]) -> Any:
    """``value`` as type ``want`` (an int may stand for a float, a numeric string for a
    number), or a one-line refusal naming the type expected."""
    options = typing.get_args(want) if isinstance(want, types.UnionType) else (want,)
    if value is None and type(None) in options:
        return value
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return value
            if isinstance(value, str):
                with contextlib.suppress(ValueError):
                    return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is tuple and (
                isinstance(value, str) or isinstance(value, list)
                and all(isinstance(v, str) for v in value)):
            return value
        if (option not in (bool, int, float, str, type(None))
                and typing.get_origin(option) is not tuple):
            return value  # a mapping or Any: its own config checks it
    names = [TYPE_NAMES.get(o, "a list of names") for o in options if o is not type(None)]
    if type(None) in options:
        names.append("null")
    raise RenioInputError(
        f"{dotted}: expected {' or '.join(names)}, got {value!r} ({_where(dotted, sources)})")


TYPE_NAMES = {bool: "bool (true or false)", int: "int (an integer)", float: "float (a number)",
              str: "str (text)"}


def _blamed(exc: RenioInputError, sources: dict[str, str]) -> RenioInputError:
    """A config's own refusal (``train: lr: must be > 0``), with where the key was set."""
    parts = [p.strip() for p in str(exc).split(":")[:2]]
    keys = [parts[0]]
    if len(parts) == 2 and parts[0] in SECTIONS:
        keys.insert(0, f"{parts[0]}.{parts[1].lstrip('-').replace('-', '_')}")
    for key in keys:
        if key in sources:
            return RenioInputError(f"{exc} ({_where(key, sources)})")
    return exc


def _scalar(raw: str) -> Any:
    """A YAML scalar, except that ``1e-4`` is a number (YAML 1.1 reads it as a string)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _resolve_prompts(spec: str, which: str) -> str:
    if spec.startswith("toy-reflect:"):
        return reflect.resolve_reflect_prompts(spec, which)
    if spec.startswith("toy-chain:"):
        files = {"toy-chain:train": "train_prompts", "toy-chain:test": "test_prompts"}
        if spec not in files:  # before building: a full chain world takes minutes
            raise RenioInputError(f"{which}: unknown chain prompt set {spec!r} "
                                  "(toy-chain:train or toy-chain:test)")
        return str(getattr(chain.ensure_chain_world(), files[spec]))
    if spec.startswith("toy:"):
        world = ensure_toy_world()
        if spec == "toy:train":
            return str(world.train_prompts)
        if spec == "toy:test":
            return str(world.test_prompts)
        raise RenioInputError(f"{which}: unknown toy prompt set {spec!r} (toy:train or toy:test)")
    return spec


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


@dataclasses.dataclass
class RunSummary:
    run_dir: Path
    base_eval_accuracy: float | None
    iterations: list[IterationRecord]
    final_eval_accuracy: float | None
    final_adapter: Path


class _Resident:
    """The models kept loaded for the whole run."""

    def __init__(self, cfg: RunConfig, stage_defaults: dict[str, Any], tokenizers: _Tokenizers):
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
    train_prompts = load_prompts(_resolve_prompts(cfg.prompts, "prompts"))
    eval_spec = _resolve_prompts(cfg.eval_prompts, "eval_prompts") if cfg.eval_prompts else None
    eval_prompts = load_prompts(eval_spec) if eval_spec else None
    _check_grading_needs(cfg, train_prompts)
    run_dir = _check_run_dir(cfg)
    tokenizers = _Tokenizers(cfg)
    train_prompts, eval_prompts = _fit_run_prompts(cfg, tokenizers, train_prompts, eval_spec,
                                                   eval_prompts, say)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_run_dir(run_dir)
    say(cfg.scoring()[1])  # once the run is surely this process's: a refused one says only why
    try:
        (run_dir / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        tracker = Tracker(wandb_project=cfg.wandb_project, run_name=run_dir.name,
                          config=dataclasses.asdict(cfg))
        resident = _Resident(cfg, cfg.rollout, tokenizers)
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


class _Tokenizers:
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


def _fit_run_prompts(cfg: RunConfig, tokenizers: _Tokenizers, train_prompts: PromptSet,
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

    def __init__(self, cfg: RunConfig, resident: _Resident, run_dir: Path,
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
        done = _read_records(self.metrics_path)
        base_acc = None
        if cfg.eval_before and cfg.eval_every > 0:
            base_json = run_dir / "eval-base" / "eval.json"
            if done and base_json.is_file():
                base_acc = _eval_accuracy(base_json)
            else:
                base_acc = self.evaluate(run_dir / "eval-base", None, 0, "base")
        records: list[IterationRecord] = []
        ckpt: str | None = None
        ckpt_iter = -1  # the iteration whose checkpoint ckpt is
        policy_step = 0
        for i in range(cfg.iterations):
            it_ckpt = run_dir / f"iter-{i:05d}" / "ckpt"
            if i in done and (i + 1 in done or _checkpoint_finished(it_ckpt)
                              or _trained_nothing(done[i])):
                record = done[i]  # finished before a kill: nothing to redo
                self.say(f"iter {i}: done earlier, skipped")
                last = i if not _trained_nothing(record) else ckpt_iter
                if i == cfg.iterations - 1 and last >= 0:
                    self.check_checkpoint(last)  # the run's result, handed on as it is
            else:
                if ckpt is not None:
                    self.check_checkpoint(ckpt_iter)  # the one this iteration continues
                record = self.iteration(i, ckpt, policy_step)
                _append_metrics(self.metrics_path, record)
                self.tracker.log("iter", {**dataclasses.asdict(record), **{
                    f"{k}_seconds": v for k, v in record.time.items()}}, record.policy_step)
                # The checkpoint the next iteration continues from keeps its trainer state.
                self.prune(i, keep=ckpt_iter if _trained_nothing(record) else i)
            records.append(record)
            if not _trained_nothing(record):
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
            if not (_checkpoint_finished(ckpt) and (ckpt / STATE_FILE).is_file()):
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
            why = _damaged(Path(stage_cfgs[stage].out))
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
        steps = _checkpoint_metrics(ckpt)
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
        if _checkpoint_finished(ckpt):
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
        (renio_core/stages/score_in_train_step.py) and says how long each took. A checkpoint
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


def _damaged(path: Path) -> str | None:
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


def _checkpoint_finished(ckpt: Path) -> bool:
    """A checkpoint written at the end of its training: not a mid-training ``save_every``."""
    try:
        info = json.loads((ckpt / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return bool(info.get("finished"))


def _checkpoint_metrics(ckpt: Path) -> list[dict[str, Any]]:
    """The per-step metrics the trainer wrote next to a checkpoint (empty if none)."""
    path = ckpt / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _eval_accuracy(path: Path) -> float | None:
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


def _trained_nothing(record: IterationRecord) -> bool:
    """The iteration found no row to train on (``fill_filtered``) and saved no checkpoint."""
    return record.fill_kept == 0


def _read_records(path: Path) -> dict[int, IterationRecord]:
    fields = {f.name for f in dataclasses.fields(IterationRecord)}
    out = {}
    for _line, data in _metric_lines(path):
        out[int(data["iteration"])] = IterationRecord(
            **{k: v for k, v in data.items() if k in fields})
    return out


def _append_metrics(path: Path, record: IterationRecord) -> None:
    existing = [ln for ln, data in _metric_lines(path)
                if data.get("iteration") != record.iteration]
    existing.append(json.dumps(dataclasses.asdict(record)))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(existing) + "\n")
    os.replace(tmp, path)
