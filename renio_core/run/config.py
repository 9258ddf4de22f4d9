"""``renio run``'s configuration: :class:`RunConfig`, read by :func:`load_run_config` from a
YAML file and ``key=value`` overrides, each key checked against the stages' config
dataclasses; and the names of the toy worlds' prompt sets (:func:`resolve_prompts`).

The YAML maps one to one onto :class:`RunConfig`; its sections ``rollout``, ``score``,
``weight``, ``train`` and ``eval`` hold the fields of the stages' own config dataclasses.

The ``key=value`` syntax is torchtune's and verl's, whose parsers are OmegaConf's dotlist and
structured configs. renio parses it itself (YAML values, types from the stage dataclasses)
because the errors are better for the same checks: OmegaConf 2.4 also names an unknown key
with a "did you mean", but its messages run to four lines with internal type names
(``Value 'fast' of type 'str' could not be converted to Float / full_key: train.lr /
reference_type=... / object_type=...``) and, once a file and overrides are merged, cannot say
which of them a bad value came from; here one line says ``train.lr: expected float (a
number), got 'fast' (from the command line)``. It would also need a structured class for
each section (the stage's fields less the loop's own, ``LOOP_OWNED``) and two more
dependencies (omegaconf, antlr4-python3-runtime), to save at most the ~100 lines of the
checks below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from renio_core.errors import RenioInputError
from renio_core.modeling.toy import chain, ensure_toy_world, reflect
from renio_core.stages.rollout import (
    RolloutConfig,
)
from renio_core.stages.score import ScoreConfig
from renio_core.stages.train import TrainConfig
from renio_core.stages.weight import WeightConfig
from renio_core.tracking import check_available
from renio_core.training.losses import LOSS_TABLE

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


def resolve_prompts(spec: str, which: str) -> str:
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

