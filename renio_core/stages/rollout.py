"""The ``rollout`` stage: sample completions from the student (arXiv 2606.23104, Alg. 1,
"sample y ~ pi_theta(.|x)").

Each prompt goes through the chat template with the task's instruction
(:mod:`renio_core.data.prompts`), then ``n`` completions are sampled at temperature / top-p / top-k
(official: 1.1 / 0.95 / 20, 1024 new tokens).

HF backend: our own batched sampling loop with a KV cache. Rows are grouped by prompt length
and left-padded (positions count real tokens only); rows that hit EOS leave the batch and the
cache, so a long tail does not keep finished rows running. ``refill`` (off by default)
instead prefills the next job and splices it into the cache in the finished row's slot
(continuous batching: every row is right-aligned in the cache, with its own positions and
attention mask), so the batch stays full while jobs remain. Its rows are those of fixed
batches, up to the float noise padding causes in either (each row as sampled alone, in
tests/test_rollout.py). It pays where lengths are uneven and costs where they are near-equal
(docs/benchmarks.md: 1.09x the fixed batches on reasoning-like lengths, 0.86x on the toy
student's).
Randomness is per row: row
``(prompt_id, sample_index)`` draws its uniforms from a generator seeded by
``hash(seed, prompt_id, sample_index)`` and samples by inverse CDF over the filtered
distribution. So the same seed gives the same tokens, and ``--shard`` changes nothing (a
chunk is always batched the same way). A different ``batch_size`` changes the padding, hence
the logits' last bits, which can rarely flip a sampled token; it is part of the config
fingerprint for that reason.

Work is cut into fixed chunks of ``chunk_prompts`` prompts (``renio_core.data.chunked_output``):
chunk k is part k, owned by shard k % N; a re-run skips complete parts.

Deliberate differences from the official code (which samples with vLLM): the HF backend is
exact and deterministic rather than fast; top-k is applied before top-p, both after the
temperature, as in vLLM and transformers. ``task`` is carried as an extra column so ``score``
can build OPSD's privileged prompt per row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from renio_core import option_help
from renio_core.backends import vllm as vllm_backend
from renio_core.backends.hf import HFSampler
from renio_core.backends.protocols import Sampler
from renio_core.backends.rows import prompt_task, render_prompt
from renio_core.data import shards
from renio_core.data.chunked_output import ChunkedOutput, parse_shard, write_chunks
from renio_core.data.prompt_io import Prompt, PromptSet, load_prompts
from renio_core.data.prompts import TASKS
from renio_core.errors import RenioInputError
from renio_core.modeling import models

BACKENDS = ("hf", "vllm")


@dataclasses.dataclass
class RolloutConfig:
    """Settings of ``renio rollout``; sampling defaults are the official ones."""

    model: str = dataclasses.field(
        default="", metadata={"help": "Student: hub name, local path, or toy:student."})
    prompts: str = dataclasses.field(
        default="", metadata={"help": "Prompts: .jsonl/.json/.parquet, or a datasets name "
                                      "NAME[:CONFIG][@SPLIT]."})
    out: str = dataclasses.field(
        default="", metadata={"help": "Output: a .parquet file, or a directory of parts."})
    adapter: str | None = dataclasses.field(
        default=None, metadata={"help": "PEFT adapter directory on top of --model."})
    n: int = dataclasses.field(default=1, metadata={"help": "Samples per prompt."})
    temperature: float = dataclasses.field(
        default=1.1, metadata={"help": "Sampling temperature (0 is greedy)."})
    top_p: float = dataclasses.field(
        default=0.95, metadata={"help": "Nucleus sampling mass (1 disables it)."})
    top_k: int = dataclasses.field(default=20, metadata={"help": "Top-k filter (0 disables it)."})
    max_new_tokens: int = dataclasses.field(
        default=1024, metadata={"help": "Completion length limit."})
    seed: int = dataclasses.field(default=0, metadata={"help": option_help.SEED})
    task: str = dataclasses.field(
        default="math", metadata={"help": "math or code: the instruction added to each prompt "
                                          "(a prompt's own 'task' wins)."})
    enable_thinking: bool = dataclasses.field(
        default=False, metadata={"help": "Passed to chat templates that know it (Qwen3)."})
    grade: bool = dataclasses.field(
        default=False, metadata={"help": "Fill 'correct' (math: math-verify on the last "
                                         "\\boxed{})."})
    shard: str = dataclasses.field(default="0/1", metadata={"help": option_help.SHARD})
    policy_step: int = dataclasses.field(
        default=0, metadata={"help": "Train step of the student, recorded per row."})
    backend: str = dataclasses.field(default="hf", metadata={"help": option_help.BACKEND})
    vllm_memory: float = dataclasses.field(
        default=0.9, metadata={"help": option_help.VLLM_MEMORY})
    tensor_parallel_size: int = dataclasses.field(
        default=1, metadata={"help": option_help.TENSOR_PARALLEL})
    device_map: str = dataclasses.field(default="none", metadata={"help": option_help.DEVICE_MAP})
    batch_size: int = dataclasses.field(
        default=64, metadata={"help": "Trajectories sampled together (HF backend)."})
    refill: bool = dataclasses.field(
        default=False, metadata={"help": "Keep the batch full: a finished row's slot goes to "
                                         "the next sample (HF backend; the same rows up to "
                                         "float noise). Pays "
                                         "where lengths are uneven: 1.94x model.generate's "
                                         "throughput on reasoning-like lengths (fixed batches: "
                                         "1.78x), but 0.86x the fixed batches on the toy "
                                         "student's near-equal lengths (docs/benchmarks.md)."})
    chunk_prompts: int = dataclasses.field(
        default=64, metadata={"help": "Prompts per output part (the unit of resuming and "
                                      "sharding)."})
    dtype: str = dataclasses.field(default="auto", metadata={"help": option_help.DTYPE})
    device: str = dataclasses.field(default="auto", metadata={"help": option_help.DEVICE})
    math_instruction: str | None = dataclasses.field(
        default=None, metadata={"help": "Replace the math instruction."})
    code_instruction: str | None = dataclasses.field(
        default=None, metadata={"help": "Replace the code instruction."})
    skip_long_prompts: bool = dataclasses.field(
        default=False, metadata={"help": option_help.SKIP_LONG_PROMPTS})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": option_help.OVERWRITE})

    def __post_init__(self) -> None:
        def bad(field: str, msg: str) -> RenioInputError:
            return RenioInputError(f"--{field.replace('_', '-')}: {msg}")

        if not self.model:
            raise bad("model", "a model name or path is required")
        if not self.prompts:
            raise bad("prompts", "a prompt file or dataset is required")
        if not self.out:
            raise bad("out", "an output path is required")
        if self.n < 1:
            raise bad("n", f"must be >= 1, got {self.n}")
        if not self.temperature >= 0:
            raise bad("temperature", f"must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise bad("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise bad("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.task not in TASKS:
            raise bad("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.backend not in BACKENDS:
            raise bad("backend", f"must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not 0 < self.vllm_memory <= 1:
            raise bad("vllm_memory", f"must be in (0, 1], got {self.vllm_memory}")
        vllm_backend.check_tensor_parallel(self.tensor_parallel_size, self.backend)
        models.check_device_map(self.device_map, self.device, self.backend)
        if self.batch_size < 1:
            raise bad("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.chunk_prompts < 1:
            raise bad("chunk_prompts", f"must be >= 1, got {self.chunk_prompts}")
        if self.policy_step < 0:
            raise bad("policy_step", f"must be >= 0, got {self.policy_step}")
        if self.dtype not in models.DTYPES:
            raise bad("dtype", f"must be one of {', '.join(models.DTYPES)}")
        parse_shard(self.shard)

    def fingerprint_fields(self) -> dict[str, Any]:
        """What decides the rows: everything but where they go and how the work is split."""
        d = dataclasses.asdict(self)
        # skip_long_prompts changes the rows only through the prompts it drops, which the
        # input fingerprint holds.
        for key in ("out", "shard", "overwrite", "device", "vllm_memory", "tensor_parallel_size",
                    "device_map", "skip_long_prompts"):
            d.pop(key)
        # Refilling splices caches, which can change a logit's last bits as batch_size can,
        # so it counts when on. Off, it is left out: a complete output made by a renio
        # without the option is still recognized.
        if not d["refill"]:
            d.pop("refill")
        return d

    def instruction(self, task: str) -> str | None:
        return self.math_instruction if task == "math" else self.code_instruction


@dataclasses.dataclass
class RolloutSummary:
    out: Path
    rows: int = 0
    tokens: int = 0
    stopped: int = 0
    graded: int = 0
    correct: int = 0
    parts_written: int = 0
    parts_skipped: int = 0
    long_prompts_skipped: int = 0  # with skip_long_prompts: prompts too long for the context
    seconds: float = 0.0  # spent sampling, model loading excluded
    sampler: str = ""  # how this run sampled (a sampler made here), for the summary

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def check_grading(cfg: RolloutConfig, prompt_set: PromptSet) -> None:
    if not cfg.grade:
        return
    for i, p in enumerate(prompt_set.prompts):
        if prompt_task(p, cfg.task) == "code":
            raise RenioInputError(
                "--grade grades math answers only; code is graded by running it, which "
                "renio eval --completions does in its sandbox; run without --grade",
                file=prompt_set.source, row=i, column="task",
            )


@dataclasses.dataclass
class FittedPrompts:
    """The prompts that fit the model's context, and the ids of those skipped as too long."""

    prompts: PromptSet
    skipped: list[str]


def fit_to_context(cfg: Any, prompt_set: PromptSet, tokenizer: Any, context: int | None, *,
                   skip_hint: str = "--skip-long-prompts") -> FittedPrompts:
    """Refuse (or with ``cfg.skip_long_prompts`` drop) every prompt whose rendered tokens plus
    ``cfg.max_new_tokens`` exceed ``context``, before any work: the sampler would otherwise
    allocate a KV cache for the whole sequence (tens of GB for one 100,000-character prompt)
    and die, or a position past the model's table would give garbage. ``cfg`` is a
    ``RolloutConfig`` (its task, instructions and thinking switch render the prompt)."""
    if context is None:
        return FittedPrompts(prompt_set, [])
    kept: list[Prompt] = []
    skipped: list[str] = []
    for row, prompt in enumerate(prompt_set.prompts):
        # Rendered as the sampler will (template and instruction included): the exact count,
        # at a fraction of the cost of sampling the prompt.
        length = len(render_prompt(tokenizer, prompt, cfg))
        if length + cfg.max_new_tokens <= context:
            kept.append(prompt)
        elif cfg.skip_long_prompts:
            skipped.append(prompt.id)
        else:
            raise RenioInputError(
                f"prompt {prompt.id!r} is {length:,} tokens, and with max_new_tokens "
                f"{cfg.max_new_tokens:,} needs {length + cfg.max_new_tokens:,}, more than the "
                f"model's context of {context:,} tokens; shorten or remove it, lower "
                f"max_new_tokens, or pass {skip_hint}",
                file=prompt_set.source, row=row, column="problem")
    if prompt_set.prompts and not kept:
        raise RenioInputError(
            f"all {len(skipped):,} prompts need more than the model's context of {context:,} "
            f"tokens (with max_new_tokens {cfg.max_new_tokens:,}); nothing left to sample",
            file=prompt_set.source)
    if not skipped:
        return FittedPrompts(prompt_set, [])
    return FittedPrompts(dataclasses.replace(prompt_set, prompts=kept), skipped)


def fit_rollout_prompts(cfg: RolloutConfig, prompt_set: PromptSet, tokenizer: Any,
                        model: Any = None) -> FittedPrompts:
    """:func:`fit_to_context` against ``cfg.model``'s context (a preloaded ``model``'s
    config, else the one on disk)."""
    config = model.config if model is not None else models.load_config(cfg.model)
    return fit_to_context(cfg, prompt_set, tokenizer, models.context_length(config, tokenizer))


def make_sampler(cfg: RolloutConfig, tokenizer: Any, *, model: Any = None,
                 lora_rank: int | None = None) -> Sampler:
    """The one place a sampler is chosen by ``cfg.backend`` (for ``rollout``, ``eval`` and the
    ``renio run`` loop): a ``VllmSampler`` (its engine built with LoRA up to ``lora_rank``
    when given, else to ``cfg.adapter``'s rank), or an ``HFSampler`` over ``model`` (loaded
    from ``cfg.model`` plus ``cfg.adapter`` when not given) that refills with ``cfg.refill``.
    The caller closes it (``Sampler.close``: a vLLM engine's worker processes)."""
    if cfg.backend == "vllm":
        return vllm_backend.VllmSampler(cfg, tokenizer, lora_rank=lora_rank)
    if model is None:
        model = models.load_model(cfg.model, adapter=cfg.adapter, dtype=cfg.dtype,
                                  device=cfg.device, device_map=cfg.device_map)
    return HFSampler(model, tokenizer, refill=cfg.refill)


def num_chunks(num_prompts: int, cfg: RolloutConfig) -> int:
    return -(-num_prompts // cfg.chunk_prompts)


def planned_rows(cfg: RolloutConfig, num_prompts: int) -> int:
    """Rows this shard is responsible for (complete parts included), for a progress total."""
    shard = parse_shard(cfg.shard)
    total = 0
    for k in range(num_chunks(num_prompts, cfg)):
        if shard.owns(k):
            total += min(cfg.chunk_prompts, num_prompts - k * cfg.chunk_prompts) * cfg.n
    return total


def run_rollout(
    cfg: RolloutConfig,
    progress: Callable[[int], None] | None = None,
    *,
    prompt_set: PromptSet | None = None,
    model: Any = None,
    tokenizer: Any = None,
    sampler: Sampler | None = None,
    fitted: FittedPrompts | None = None,
) -> RolloutSummary:
    """Sample this shard's chunks of ``cfg.prompts`` and write them to ``cfg.out``.

    ``model``/``tokenizer`` may be passed preloaded (the ``renio run`` loop), or a whole
    ``sampler`` (a ``VllmSampler`` kept across iterations; the caller closes it).
    ``progress(n)`` is called with the number of rows finished (or found complete) since the
    last call. ``fitted``: the caller's :func:`fit_rollout_prompts` of ``prompt_set`` with
    this ``cfg`` and ``tokenizer`` (the CLI's, made to size its progress bar), not redone here.
    """
    shards.refuse_overwriting_inputs(cfg.out, cfg.prompts, cfg.model, cfg.adapter)
    prompt_set = prompt_set if prompt_set is not None else load_prompts(cfg.prompts)
    check_grading(cfg, prompt_set)
    if cfg.backend == "vllm":
        vllm_backend.require_vllm()  # a missing package or GPU fails before anything else
    shard = parse_shard(cfg.shard)
    if tokenizer is None:
        tokenizer = models.load_tokenizer(cfg.model)
    if fitted is None:
        fitted = fit_rollout_prompts(cfg, prompt_set, tokenizer, model)
    prompt_set = fitted.prompts
    out = ChunkedOutput(cfg.out, shard=shard, overwrite=cfg.overwrite)
    meta = shards.build_metadata(
        stage="rollout",
        config=cfg,
        inputs=None,
        config_for_fingerprint=cfg.fingerprint_fields(),
        models={"student": models.model_record(cfg.model, cfg.adapter)},
        tokenizer_fingerprint=models.tokenizer_fingerprint(tokenizer),
        extra={"inputs": [{"source": prompt_set.source, "files": prompt_set.files}],
               "input_fingerprint": prompt_set.fingerprint()},
    )
    summary = RolloutSummary(out=Path(cfg.out), long_prompts_skipped=len(fitted.skipped))
    n_chunks = num_chunks(len(prompt_set), cfg)

    def chunk_prompts(k: int) -> list[Prompt]:
        return prompt_set.prompts[k * cfg.chunk_prompts: (k + 1) * cfg.chunk_prompts]

    def count(table: pa.Table) -> None:
        summary.rows += table.num_rows
        lengths = pc.list_value_length(table.column("completion_ids"))
        summary.tokens += int(pc.sum(lengths).as_py() or 0)
        summary.stopped += int(pc.sum(
            pc.equal(table.column("finish_reason"), "stop")).as_py() or 0)
        graded = table.column("correct").drop_null()
        summary.graded += len(graded)
        summary.correct += int(pc.sum(graded).as_py() or 0) if len(graded) else 0

    if out.already_final(meta):
        summary.parts_skipped = n_chunks
        if progress is not None:
            progress(planned_rows(cfg, len(prompt_set)))
        count(shards.read_table(cfg.out))
        summary.tokens = 0  # nothing sampled now: tokens/s only counts fresh work
        return summary

    def new_sampler() -> Sampler:
        made = make_sampler(cfg, tokenizer, model=model)
        # A refill the model's cache cannot take falls back; say so.
        summary.sampler = (
            "vLLM" if not isinstance(made, HFSampler) else
            "refilled batches" if made.refill else
            "fixed batches (this model's cache cannot be refilled)" if cfg.refill else
            "fixed batches")
        return made

    fresh_tokens = 0

    def sample_chunk(sampler_now: Sampler, k: int) -> pa.Table:
        nonlocal fresh_tokens
        table = sampler_now.sample(chunk_prompts(k), cfg, progress)
        count(table)
        fresh_tokens += int(pc.sum(
            pc.list_value_length(table.column("completion_ids"))).as_py() or 0)
        return table

    def on_skip(k: int) -> None:
        if progress is not None:
            progress(len(chunk_prompts(k)) * cfg.n)
        count(shards.read_table(out.parts.part_path(k)))

    done = write_chunks(out, n_chunks, meta, sample_chunk, make_backend=new_sampler,
                        backend=sampler, on_skip=on_skip)
    summary.parts_written, summary.parts_skipped = done.written, done.skipped
    summary.seconds = done.busy
    summary.tokens = fresh_tokens
    return summary

