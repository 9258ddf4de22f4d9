"""``renio run``: the on-policy loop, rollout -> score -> weight -> train, in one process.

On-policy distillation (arXiv 2606.23104, Alg. 1) alternates sampling from the current student
and training it on those samples. Each iteration ``i`` writes every stage's shards under
``RUN_DIR/iter-0000i/`` (``rollouts.parquet``, ``scores.parquet``, ``weights.parquet``,
``ckpt/``) so they can be inspected, and every ``eval_every`` iterations an evaluation on the
held-out prompts (``eval.parquet`` + ``eval.json``). The student with its LoRA adapter and the
teacher stay loaded across stages and iterations; after each train step the new adapter is
loaded into the resident student.

Resuming: every stage is idempotent on its outputs (complete parts are skipped; a complete
checkpoint is not retrained), so running the same command again after a kill continues from
the last complete stage.

The YAML maps one to one onto :class:`RunConfig`; its sections ``rollout``, ``score``,
``weight``, ``train`` and ``eval`` hold the fields of the stages' own config dataclasses.

Deliberate differences from the official code: the optimizer state starts fresh each
iteration (each iteration is one ``renio train`` over that iteration's weights shard,
continuing the previous adapter); prompts for iteration ``i`` are the next
``prompts_per_iteration`` prompts of the prompt file, cycling.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from renio_core import models, shards
from renio_core.errors import RenioInputError
from renio_core.prompt_io import PromptSet, load_prompts

SECTIONS = ("rollout", "score", "weight", "train", "eval")
# Fields of the stage configs that the loop sets itself.
LOOP_OWNED = {
    "rollout": {"model", "prompts", "out", "adapter", "policy_step", "seed", "grade", "shard",
                "overwrite"},
    "score": {"input", "teacher", "out", "student", "adapter", "shard", "overwrite"},
    "weight": {"input", "out", "overwrite"},
    "train": {"weights", "model", "out", "adapter", "teacher", "resume", "overwrite", "seed"},
    "eval": {"bench", "out", "model", "adapter", "completions", "overwrite", "summary"},
}
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
    seed: int = 0
    task: str = "math"
    rollout: dict[str, Any] = dataclasses.field(default_factory=dict)
    score: dict[str, Any] = dataclasses.field(default_factory=dict)
    weight: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
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
        unknown = sorted(set(self.eval) - {*EVAL_SAMPLING, "limit"})
        if unknown:
            raise RenioInputError(
                f"eval.{unknown[0]}: unknown; the eval section takes "
                f"{', '.join((*EVAL_SAMPLING, 'limit'))}")
        # Build every stage config once now, so a typo fails before any work.
        self.stage_configs(Path(self.run_dir) / "iter-00000", adapter=None, policy_step=0)

    def stage_configs(self, it_dir: Path, *, adapter: str | None, policy_step: int,
                      iteration: int = 0) -> dict[str, Any]:
        """The four stage configs of one iteration (validated by their own ``__post_init__``)."""
        from renio_core.rollout_stage import RolloutConfig
        from renio_core.score_stage import ScoreConfig
        from renio_core.train_stage import TrainConfig
        from renio_core.weight_stage import WeightConfig

        def build(cls: type, section: str, **owned: Any) -> Any:
            try:
                return cls(**{**getattr(self, section), **owned})
            except TypeError as exc:
                raise RenioInputError(f"{section}: {exc}") from None
            except RenioInputError as exc:
                raise RenioInputError(f"{section}: {exc}") from None

        rollouts = str(it_dir / "rollouts.parquet")
        scores = str(it_dir / "scores.parquet")
        weights = str(it_dir / "weights.parquet")
        return {
            "rollout": build(RolloutConfig, "rollout", model=self.student, prompts=self.prompts,
                             out=rollouts, adapter=adapter, policy_step=policy_step,
                             seed=self.seed * 100003 + iteration, grade=True, task=self.task),
            "score": build(ScoreConfig, "score", input=rollouts, teacher=self.teacher, out=scores,
                           student=self.student, adapter=adapter),
            "weight": build(WeightConfig, "weight", input=scores, out=weights),
            "train": build(TrainConfig, "train", weights=weights, model=self.student,
                           out=str(it_dir / "ckpt"), adapter=adapter,
                           teacher=None if self.train.get("loss", "jsd") != "jsd" else self.teacher,
                           seed=self.seed + iteration, overwrite=True),
        }


def load_run_config(path: str | os.PathLike | None, overrides: list[str]) -> RunConfig:
    """YAML file, then ``key=value`` overrides (dotted keys reach into sections:
    ``weight.threshold=1.0``). Values are parsed as YAML scalars."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise RenioInputError(f"cannot read run config: {exc}", file=path) from None
        if not isinstance(loaded, dict):
            raise RenioInputError("a run config must be a mapping", file=path)
        data = loaded
    for item in overrides:
        if "=" not in item:
            raise RenioInputError(f"override {item!r}: expected key=value (e.g. iterations=2)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RenioInputError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RenioInputError(f"unknown key '{unknown[0]}' in the run config", file=path)
    return RunConfig(**data)


def _resolve_prompts(spec: str, which: str) -> str:
    if spec.startswith("toy:"):
        from renio_core.toy import ensure_toy_world

        world = ensure_toy_world()
        if spec == "toy:train":
            return str(world.train_prompts)
        if spec == "toy:test":
            return str(world.test_prompts)
        raise RenioInputError(f"{which}: unknown toy prompt set {spec!r} (toy:train or toy:test)")
    return spec


def _iteration_prompts(prompts: PromptSet, cfg: RunConfig, iteration: int) -> PromptSet:
    n = len(prompts.prompts)
    start = (iteration * cfg.prompts_per_iteration) % n
    picked = [prompts.prompts[(start + j) % n] for j in range(min(cfg.prompts_per_iteration, n))]
    return dataclasses.replace(prompts, prompts=picked)


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


@dataclasses.dataclass
class RunSummary:
    run_dir: Path
    base_eval_accuracy: float | None
    iterations: list[IterationRecord]
    final_eval_accuracy: float | None
    final_adapter: Path


class _Resident:
    """The models kept loaded for the whole run."""

    def __init__(self, cfg: RunConfig, stage_defaults: dict[str, Any]):
        self.student_name = models.resolve_name(cfg.student)
        self.tokenizer = models.load_tokenizer(self.student_name)
        device = stage_defaults.get("device", "auto")
        dtype = stage_defaults.get("dtype", "auto")
        self.student = models.load_model(self.student_name, dtype=dtype, device=device)
        self.teacher = None
        self.teacher_tok = None
        if cfg.teacher != "self":
            self.teacher_tok = models.load_tokenizer(cfg.teacher)
            models.check_tokenizers_compatible(self.tokenizer, self.teacher_tok,
                                               student_name=cfg.student, teacher_name=cfg.teacher)
            self.teacher = models.load_model(cfg.teacher, dtype=dtype, device=device)
        self.adapter: str | None = None
        self.loaded = 0
        self.vllm_sampler: Any = None

    def sampler(self, rollout_cfg: Any, lora_rank: int) -> Any:
        """With ``backend: vllm``, one engine for the whole run, built on first use with LoRA
        enabled up to the trainer's rank; each rollout (and eval) swaps in the newest
        adapter. None for the HF backend, which samples from the resident student."""
        if rollout_cfg.backend != "vllm":
            return None
        if self.vllm_sampler is None:
            from renio_core.vllm_backend import VllmSampler

            self.vllm_sampler = VllmSampler(
                dataclasses.replace(rollout_cfg, adapter=None), self.tokenizer,
                lora_rank=lora_rank)
        self.vllm_sampler.set_adapter(rollout_cfg.adapter)
        return self.vllm_sampler

    def close(self) -> None:
        if self.vllm_sampler is not None:
            self.vllm_sampler.close()
            self.vllm_sampler = None

    def use_adapter(self, adapter: str | None) -> None:
        """Make the resident student the base model plus ``adapter`` (a checkpoint dir).

        Only needed when a resumed run starts from a checkpoint on disk: otherwise the resident
        student is the one just trained, already equal to the newest checkpoint.
        """
        if adapter == self.adapter or adapter is None:
            return
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        if isinstance(self.student, PeftModel):
            set_peft_model_state_dict(self.student,
                                      load_file(str(Path(adapter) / "adapter_model.safetensors")))
        else:
            with models.quiet_peft():
                self.student = PeftModel.from_pretrained(self.student, adapter, is_trainable=True)
        self.student.eval()
        self.adapter = adapter

    def train(self, train_cfg: Any, out: str, on_step: Any) -> Any:
        """Train the resident student in place (continuing its adapter) and record that it
        now equals the checkpoint written to ``out``."""
        from renio_core.train_stage import attach_lora, run_train

        self.student = attach_lora(self.student, train_cfg)
        try:
            summary = run_train(train_cfg, on_step, student=self.student, teacher=self.teacher)
        finally:
            self.student.eval()
        self.adapter = out
        return summary


def run_loop(
    cfg: RunConfig,
    log: Callable[[str], None] | None = None,
    progress_factory: Callable[[str, int | None], Any] | None = None,
) -> RunSummary:
    """Run (or resume) ``cfg``. ``log`` gets one line per stage; ``progress_factory(desc,
    total)`` returns a context manager yielding ``advance(n)`` for a stage's progress bar."""
    from contextlib import nullcontext

    say = log or (lambda _msg: None)

    def bar(desc: str, total: int | None):
        return progress_factory(desc, total) if progress_factory else nullcontext(None)

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    train_prompts = load_prompts(_resolve_prompts(cfg.prompts, "prompts"))
    eval_spec = _resolve_prompts(cfg.eval_prompts, "eval_prompts") if cfg.eval_prompts else None
    eval_prompts = load_prompts(eval_spec) if eval_spec else None
    resident = _Resident(cfg, cfg.rollout)
    try:
        return _run_iterations(cfg, resident, run_dir, train_prompts, eval_spec, eval_prompts,
                               say, bar)
    finally:
        resident.close()  # a vLLM engine's worker processes


def _run_iterations(cfg: RunConfig, resident: _Resident, run_dir: Path,
                    train_prompts: PromptSet, eval_spec: str | None,
                    eval_prompts: PromptSet | None, say: Callable[[str], None],
                    bar: Callable[[str, int | None], Any]) -> RunSummary:
    from renio_core.eval_stage import EvalConfig, run_eval
    from renio_core.rollout_stage import RolloutConfig, run_rollout
    from renio_core.score_stage import Scorer, resolve, run_score
    from renio_core.weight_stage import run_weight

    metrics_path = run_dir / "metrics.jsonl"
    lora_rank = cfg.stage_configs(run_dir / "iter-00000", adapter=None,
                                  policy_step=0)["train"].lora_r

    def evaluate(where: Path, adapter: str | None, policy_step: int, label: str) -> float | None:
        if eval_prompts is None:
            return None
        resident.use_adapter(adapter)
        sampling = {k: cfg.eval[k] for k in EVAL_SAMPLING if k in cfg.eval}
        limit = cfg.eval.get("limit")
        prompt_set = eval_prompts
        if limit is not None:
            prompt_set = dataclasses.replace(eval_prompts, prompts=eval_prompts.prompts[:limit])
        rcfg = RolloutConfig(
            **{**{k: v for k, v in cfg.rollout.items() if k not in EVAL_SAMPLING}, **sampling},
            model=cfg.student, prompts=eval_spec, out=str(where / "eval_rollouts.parquet"),
            adapter=adapter, policy_step=policy_step, seed=cfg.seed + 7919, grade=True,
        )
        with bar(f"{label}: eval sampling", len(prompt_set.prompts) * rcfg.n) as advance:
            run_rollout(rcfg, advance, prompt_set=prompt_set, model=resident.student,
                        tokenizer=resident.tokenizer,
                        sampler=resident.sampler(rcfg, lora_rank))
        ecfg = EvalConfig(bench=eval_spec, out=str(where / "eval.parquet"),
                          completions=str(where / "eval_rollouts.parquet"),
                          n=rcfg.n, temperature=rcfg.temperature, top_p=rcfg.top_p,
                          top_k=rcfg.top_k, max_new_tokens=rcfg.max_new_tokens,
                          limit=limit, summary=str(where / "eval.json"))
        result = run_eval(ecfg)
        acc = result.summary.get("metrics", {}).get("avg_at_n")
        say(f"{label}: eval avg@{rcfg.n} = {acc:.3f}" if acc is not None else f"{label}: eval done")
        return acc

    base_acc = None
    if cfg.eval_before and cfg.eval_every > 0:
        base_acc = evaluate(run_dir / "eval-base", None, 0, "base")

    records: list[IterationRecord] = []
    adapter: str | None = None
    policy_step = 0
    for i in range(cfg.iterations):
        t0 = time.perf_counter()
        it_dir = run_dir / f"iter-{i:05d}"
        label = f"iter {i}"
        c = cfg.stage_configs(it_dir, adapter=adapter, policy_step=policy_step, iteration=i)
        resident.use_adapter(adapter)
        prompt_set = _iteration_prompts(train_prompts, cfg, i)

        with bar(f"{label}: rollout", len(prompt_set.prompts) * c["rollout"].n) as advance:
            r = run_rollout(c["rollout"], advance, prompt_set=prompt_set, model=resident.student,
                            tokenizer=resident.tokenizer,
                            sampler=resident.sampler(c["rollout"], lora_rank))
        rollout_acc = r.correct / r.graded if r.graded else None

        inputs = shards.open_inputs(c["score"].input, [])
        resolved = resolve(c["score"], inputs)
        scorer = Scorer(c["score"], resolved, resident.student, resident.tokenizer,
                        resident.teacher, resident.teacher_tok)
        with bar(f"{label}: score", inputs.total_rows) as advance:
            run_score(c["score"], advance, scorer=scorer)

        w = run_weight(c["weight"])
        say(f"{label}: {w.rows} rollouts, accuracy "
            f"{'-' if rollout_acc is None else f'{rollout_acc:.3f}'}, pivotal share "
            f"{w.pivotal_share:.2%}, AUROC "
            f"{'-' if w.auroc_incorrect is None else f'{w.auroc_incorrect:.3f}'}")

        ckpt = it_dir / "ckpt"
        if _checkpoint_complete(ckpt):
            say(f"{label}: checkpoint already complete, not retrained")
        else:
            with bar(f"{label}: train", None) as advance:
                def on_step(step: int, total: int, metrics: dict[str, Any]) -> None:
                    if advance is not None:
                        advance(1)
                resident.train(c["train"], str(ckpt), on_step)
        steps = _checkpoint_metrics(ckpt)
        train_loss = steps[-1].get("loss") if steps else None
        policy_step += max((r.get("step", 0) for r in steps), default=0)
        adapter = str(ckpt)

        eval_acc = None
        if cfg.eval_every and ((i + 1) % cfg.eval_every == 0 or i == cfg.iterations - 1):
            eval_acc = evaluate(it_dir, adapter, policy_step, label)
        record = IterationRecord(
            iteration=i, policy_step=policy_step, rollout_accuracy=rollout_acc,
            mean_weight_correct=w.mean_weight_correct,
            mean_weight_incorrect=w.mean_weight_incorrect, auroc_incorrect=w.auroc_incorrect,
            pivotal_share=w.pivotal_share, train_loss=train_loss, eval_accuracy=eval_acc,
            seconds=time.perf_counter() - t0,
        )
        records.append(record)
        _append_metrics(metrics_path, record)

    final = next((r.eval_accuracy for r in reversed(records) if r.eval_accuracy is not None), None)
    last_eval = next((run_dir / f"iter-{r.iteration:05d}" / "eval.json" for r in reversed(records)
                      if r.eval_accuracy is not None), None)
    if last_eval is not None:
        # A stable name for the newest evaluation, for `renio eval --compare`.
        tmp = run_dir / "eval-final.json.tmp"
        tmp.write_text(last_eval.read_text())
        os.replace(tmp, run_dir / "eval-final.json")
    return RunSummary(run_dir, base_acc, records, final, Path(adapter) if adapter else run_dir)




def _checkpoint_complete(ckpt: Path) -> bool:
    from renio_core.train_stage import STATE_FILE

    return (ckpt / STATE_FILE).is_file()


def _checkpoint_metrics(ckpt: Path) -> list[dict[str, Any]]:
    """The per-step metrics the trainer wrote next to a checkpoint (empty if none)."""
    from renio_core.train_stage import METRICS_FILE

    path = ckpt / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _append_metrics(path: Path, record: IterationRecord) -> None:
    existing = []
    if path.exists():
        existing = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("iteration") != record.iteration]
    existing.append(json.dumps(dataclasses.asdict(record)))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(existing) + "\n")
    os.replace(tmp, path)
