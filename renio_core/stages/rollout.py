"""The ``rollout`` stage: sample completions from the student (arXiv 2606.23104, Alg. 1,
"sample y ~ pi_theta(.|x)").

Each prompt goes through the chat template with the task's instruction
(:mod:`renio_core.data.prompts`), then ``n`` completions are sampled at temperature / top-p / top-k
(official: 1.1 / 0.95 / 20, 1024 new tokens).

HF backend: our own batched sampling loop with a KV cache. Rows are grouped by prompt length
and left-padded (positions count real tokens only); rows that hit EOS leave the batch and the
cache, so a long tail does not keep finished rows running. ``HFSampler(refill=True)`` instead
prefills the next job and splices it into the cache in the finished row's slot (continuous
batching: every row is right-aligned in the cache, with its own positions and attention
mask), so the batch stays full while jobs remain. It gives the same tokens per row; it is
not the default yet because its speed has not been measured on a quiet machine.
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
import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from renio_core.modeling import models

from renio_core.data import shards
from renio_core.data.chunked_output import ChunkedOutput, parse_shard, run_chunks
from renio_core.errors import RenioInputError
from renio_core.data.prompt_io import Prompt, PromptSet, load_prompts
from renio_core.data.prompts import TASKS, render_ids, student_messages
from renio_core.stages import option_help

BACKENDS = ("hf", "vllm")

ROLLOUT_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("sample_index", pa.int32()),
    ("problem", pa.string()),
    ("solution", pa.string()),
    ("answer", pa.string()),
    ("tests", pa.string()),
    ("task", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("completion_ids", pa.list_(pa.int32())),
    ("completion_text", pa.string()),
    ("finish_reason", pa.string()),
    ("policy_step", pa.int64()),
    ("correct", pa.bool_()),
])


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
    batch_size: int = dataclasses.field(
        default=64, metadata={"help": "Trajectories sampled together (HF backend)."})
    chunk_prompts: int = dataclasses.field(
        default=64, metadata={"help": "Prompts per output part (the unit of resuming and "
                                      "sharding)."})
    dtype: str = dataclasses.field(default="auto", metadata={"help": option_help.DTYPE})
    device: str = dataclasses.field(default="auto", metadata={"help": option_help.DEVICE})
    math_instruction: str | None = dataclasses.field(
        default=None, metadata={"help": "Replace the math instruction."})
    code_instruction: str | None = dataclasses.field(
        default=None, metadata={"help": "Replace the code instruction."})
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
        for key in ("out", "shard", "overwrite", "device", "vllm_memory"):
            d.pop(key)
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
    seconds: float = 0.0  # spent sampling, model loading excluded

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Sampling: pure pieces
# --------------------------------------------------------------------------------------------


def row_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """A 63-bit seed for one trajectory; independent of where the row is computed."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt_id}\x1f{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_uniforms(seed: int, length: int) -> torch.Tensor:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return torch.rand(length, generator=g, dtype=torch.float64)


def sample_tokens(
    logits_BV: torch.Tensor,
    uniforms_B: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
) -> torch.Tensor:
    """One token per row: temperature, then top-k, then top-p, then inverse-CDF sampling
    with the row's uniform in [0, 1). Temperature 0 is greedy."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    scaled_BV = logits_BV.float() / temperature
    V = scaled_BV.shape[-1]
    if 0 < top_k < V:
        vals_BK, ids_BK = scaled_BV.topk(top_k, dim=-1)  # sorted, largest first
    else:
        vals_BK, ids_BK = scaled_BV.sort(dim=-1, descending=True)
    probs_BK = torch.softmax(vals_BK, dim=-1).double()
    if top_p < 1.0:
        before_BK = probs_BK.cumsum(dim=-1) - probs_BK  # mass strictly above each token
        probs_BK = probs_BK.masked_fill(before_BK >= top_p, 0.0)  # the top token always stays
    cdf_BK = probs_BK.cumsum(dim=-1)
    target_B1 = uniforms_B.to(cdf_BK.device, torch.float64)[:, None] * cdf_BK[:, -1:]
    pick_B = torch.searchsorted(cdf_BK, target_B1, right=True).squeeze(1)
    pick_B = pick_B.clamp(max=cdf_BK.shape[-1] - 1)
    return ids_BK.gather(1, pick_B[:, None]).squeeze(1)


# --------------------------------------------------------------------------------------------
# HF sampling loop
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Completion:
    ids: list[int]
    finish_reason: str  # "stop" or "length"


def _pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids_BL = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn_BL = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids_BL[b, L - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            attn_BL[b, L - len(s):] = 1
    return ids_BL, attn_BL


def generate_batch(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    uniforms_BT: torch.Tensor,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    temperature: float,
    top_k: int,
    top_p: float,
    max_new_tokens: int,
) -> list[Completion]:
    """Sample one completion per prompt with a KV cache; ``uniforms_BT[b, t]`` drives row b's
    t-th token. Stops a row at its first EOS (kept in its ids) or after ``max_new_tokens``."""
    from transformers import DynamicCache

    lm = models._causal_lm(model)
    device = next(lm.parameters()).device
    cache_kw = models._cache_kwarg(lm)
    ids_BL, attn_BL = _pad_left(prompt_ids, pad_id)
    ids_BL, attn_BL = ids_BL.to(device), attn_BL.to(device)
    # Left padding: positions count real tokens, so padded rows see the same positions as
    # they would alone.
    pos_BL = (attn_BL.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    B = len(prompt_ids)
    out_ids: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    alive_A = torch.arange(B, device=device)  # original row of each row still running
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        out = lm(input_ids=ids_BL, attention_mask=attn_BL, position_ids=pos_BL,
                 use_cache=True, logits_to_keep=1, **{cache_kw: cache})
        logits_AV = out.logits[:, -1]
        last_pos_A = pos_BL[:, -1]
        for t in range(max_new_tokens):
            tok_A = sample_tokens(logits_AV, uniforms_BT[alive_A.cpu(), t], temperature=temperature,
                                  top_k=top_k, top_p=top_p)
            tok_list = tok_A.tolist()
            for row, tok in zip(alive_A.tolist(), tok_list):
                out_ids[row].append(tok)
            done_A = torch.isin(tok_A, eos)
            for row in alive_A[done_A].tolist():
                reasons[row] = "stop"
            if t == max_new_tokens - 1:
                break
            keep_A = ~done_A
            if not keep_A.any():
                break
            if not keep_A.all():
                keep_idx = keep_A.nonzero().squeeze(1)
                cache.batch_select_indices(keep_idx)
                alive_A, tok_A = alive_A[keep_idx], tok_A[keep_idx]
                attn_BL, last_pos_A = attn_BL[keep_idx], last_pos_A[keep_idx]
            attn_BL = torch.cat([attn_BL, attn_BL.new_ones((attn_BL.shape[0], 1))], dim=1)
            last_pos_A = last_pos_A + 1
            out = lm(input_ids=tok_A[:, None], attention_mask=attn_BL,
                     position_ids=last_pos_A[:, None], use_cache=True, logits_to_keep=1,
                     **{cache_kw: cache})
            logits_AV = out.logits[:, -1]
    return [Completion(ids, r) for ids, r in zip(out_ids, reasons)]


def _fit_left(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Keep the last ``length`` entries of ``dim``, or left-pad it with zeros up to ``length``."""
    have = x.shape[dim]
    if have >= length:
        return x.narrow(dim, have - length, length)
    shape = list(x.shape)
    shape[dim] = length - have
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _merge_right_aligned(
    lm: Any, parts: Sequence[tuple[Any, torch.Tensor]]
) -> tuple[Any, torch.Tensor]:
    """Stack caches of right-aligned rows into one batch. Every row's last token sits in the
    last column, so each part is left-padded (or left-trimmed of columns no row attends to)
    to the longest live row; the attention mask follows the same columns."""
    from transformers import DynamicCache

    length = max(int(attn_BL.sum(-1).max()) for _, attn_BL in parts)
    merged = DynamicCache(config=lm.config)
    for li in range(len(parts[0][0].layers)):
        keys_BHLD = torch.cat([_fit_left(c.layers[li].keys, length, 2) for c, _ in parts])
        values_BHLD = torch.cat([_fit_left(c.layers[li].values, length, 2) for c, _ in parts])
        merged.update(keys_BHLD, values_BHLD, li)
    attn_BL = torch.cat([_fit_left(a, length, 1) for _, a in parts])
    return merged, attn_BL


def refill_supported(model: Any) -> bool:
    """Splicing needs one plain (full-attention, non-sliding) key/value tensor per layer."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    lm = models._causal_lm(model)
    layers = DynamicCache(config=lm.config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def generate_refill(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    uniforms_JT: torch.Tensor,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    temperature: float,
    top_k: int,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[Completion]:
    """Like :func:`generate_batch` for any number of jobs, keeping ``batch_size`` rows busy:
    when a row ends, the next job is prefilled and spliced into the cache in its slot
    (continuous batching). Each job keeps its own positions and draws ``uniforms_JT[j, t]``
    for its t-th token, so its tokens do not depend on which rows share its batch, up to the
    float noise that padding also causes in :func:`generate_batch`."""
    lm = models._causal_lm(model)
    device = next(lm.parameters()).device
    cache_kw = models._cache_kwarg(lm)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    J = len(prompt_ids)
    out_ids: list[list[int]] = [[] for _ in range(J)]
    reasons = ["length"] * J

    def prefill(jobs: list[int]) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        from transformers import DynamicCache

        ids_BL, attn_BL = _pad_left([prompt_ids[j] for j in jobs], pad_id)
        ids_BL, attn_BL = ids_BL.to(device), attn_BL.to(device)
        pos_BL = (attn_BL.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=lm.config)
        out = lm(input_ids=ids_BL, attention_mask=attn_BL, position_ids=pos_BL,
                 use_cache=True, logits_to_keep=1, **{cache_kw: cache})
        return cache, attn_BL, pos_BL[:, -1], out.logits[:, -1]

    next_job = min(batch_size, J)
    job_A = list(range(next_job))  # the job in each slot
    t_A = [0] * next_job  # tokens each slot's job has so far
    if not job_A:
        return []
    with torch.no_grad():
        cache, attn_AL, last_pos_A, logits_AV = prefill(job_A)
        while job_A:
            u_A = uniforms_JT[torch.tensor(job_A), torch.tensor(t_A)]
            tok_A = sample_tokens(logits_AV, u_A, temperature=temperature, top_k=top_k,
                                  top_p=top_p)
            done = torch.isin(tok_A, eos).tolist()
            finished = 0
            for a, (j, tok) in enumerate(zip(job_A, tok_A.tolist())):
                out_ids[j].append(tok)
                t_A[a] += 1
                if done[a]:
                    reasons[j] = "stop"
                elif t_A[a] == max_new_tokens:
                    done[a] = True
                finished += done[a]
            if progress is not None and finished:
                progress(finished)
            keep = [a for a in range(len(job_A)) if not done[a]]
            new_jobs = list(range(next_job, min(next_job + finished, J)))
            next_job += len(new_jobs)
            parts = []
            if keep:
                if len(keep) < len(job_A):
                    keep_idx = torch.tensor(keep, device=device)
                    cache.batch_select_indices(keep_idx)
                    tok_A, attn_AL = tok_A[keep_idx], attn_AL[keep_idx]
                    last_pos_A = last_pos_A[keep_idx]
                    job_A, t_A = [job_A[a] for a in keep], [t_A[a] for a in keep]
                attn_AL = torch.cat([attn_AL, attn_AL.new_ones((attn_AL.shape[0], 1))], dim=1)
                last_pos_A = last_pos_A + 1
                out = lm(input_ids=tok_A[:, None], attention_mask=attn_AL,
                         position_ids=last_pos_A[:, None], use_cache=True, logits_to_keep=1,
                         **{cache_kw: cache})
                parts.append((cache, attn_AL, last_pos_A, out.logits[:, -1]))
            else:
                job_A, t_A = [], []
            if new_jobs:
                parts.append(prefill(new_jobs))
                job_A, t_A = job_A + new_jobs, t_A + [0] * len(new_jobs)
            if len(parts) == 2:
                cache, attn_AL = _merge_right_aligned(lm, [(p[0], p[1]) for p in parts])
                last_pos_A = torch.cat([parts[0][2], parts[1][2]])
                logits_AV = torch.cat([parts[0][3], parts[1][3]])
            elif parts:
                cache, attn_AL, last_pos_A, logits_AV = parts[0]
    return [Completion(ids, r) for ids, r in zip(out_ids, reasons)]


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def prompt_task(prompt: Prompt, default: str) -> str:
    return prompt.task or default


def render_prompt(tokenizer: Any, prompt: Prompt, cfg: RolloutConfig) -> list[int]:
    task = prompt_task(prompt, cfg.task)
    return render_ids(tokenizer, student_messages(prompt.problem, task,
                                                  instruction=cfg.instruction(task)),
                      enable_thinking=cfg.enable_thinking)


def grade_row(task: str, text: str, answer: str | None) -> bool | None:
    if task != "math" or answer is None:
        return None
    from renio_core.grading.grader import grade_math

    return bool(grade_math(text, answer))


def build_rows(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Completion],
    cfg: RolloutConfig,
) -> pa.Table:
    """Rows in (prompt, sample_index) order; ``completions`` are laid out the same way."""
    cols: dict[str, list] = {name: [] for name in ROLLOUT_SCHEMA.names}
    k = 0
    for p, pids in zip(prompts, prompt_ids):
        task = prompt_task(p, cfg.task)
        for s in range(cfg.n):
            c = completions[k]
            k += 1
            text = tokenizer.decode(c.ids, skip_special_tokens=True)
            cols["prompt_id"].append(p.id)
            cols["sample_index"].append(s)
            cols["problem"].append(p.problem)
            cols["solution"].append(p.solution)
            cols["answer"].append(p.answer)
            cols["tests"].append(p.tests)
            cols["task"].append(task)
            cols["prompt_ids"].append(list(pids))
            cols["completion_ids"].append(list(c.ids))
            cols["completion_text"].append(text)
            cols["finish_reason"].append(c.finish_reason)
            cols["policy_step"].append(cfg.policy_step)
            cols["correct"].append(grade_row(task, text, p.answer) if cfg.grade else None)
    return pa.table(cols, schema=ROLLOUT_SCHEMA)


class HFSampler:
    """Keeps a model loaded and samples rows for any list of prompts (for ``rollout``, the
    ``renio run`` loop and ``eval``).

    ``refill=False`` (the default) cuts the jobs into fixed batches of ``batch_size`` that
    shrink as rows finish (:func:`generate_batch`). ``refill=True`` keeps the batch full: a
    finished row's slot goes to the next job (:func:`generate_refill`); both give each row
    the same tokens (tests/test_rollout.py).
    Models whose cache is not one plain tensor per layer (sliding
    window) always take the earlier path."""

    def __init__(self, model: Any, tokenizer: Any, *, refill: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = models.eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self.refill = refill and refill_supported(model)

    def sample(self, prompts: Sequence[Prompt], cfg: RolloutConfig,
               progress: Callable[[int], None] | None = None) -> pa.Table:
        prompt_ids = [render_prompt(self.tokenizer, p, cfg) for p in prompts]
        jobs = [(i, s) for i in range(len(prompts)) for s in range(cfg.n)]
        # Group by prompt length so padding is small; order does not change any token.
        jobs.sort(key=lambda js: (len(prompt_ids[js[0]]), js))

        def uniforms(batch: Sequence[tuple[int, int]]) -> torch.Tensor:
            return torch.stack([
                row_uniforms(row_seed(cfg.seed, prompts[i].id, s), cfg.max_new_tokens)
                for i, s in batch
            ])

        sampling = dict(eos_ids=self.eos_ids, pad_id=self.pad_id, temperature=cfg.temperature,
                        top_k=cfg.top_k, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
        results: dict[tuple[int, int], Completion] = {}
        if self.refill and jobs:
            outs = generate_refill(self.model, [prompt_ids[i] for i, _ in jobs], uniforms(jobs),
                                   batch_size=cfg.batch_size, progress=progress, **sampling)
            results.update(zip(jobs, outs))
        else:
            for lo in range(0, len(jobs), cfg.batch_size):
                batch = jobs[lo: lo + cfg.batch_size]
                outs = generate_batch(self.model, [prompt_ids[i] for i, _ in batch],
                                      uniforms(batch), **sampling)
                results.update(zip(batch, outs))
                if progress is not None:
                    progress(len(batch))
        ordered = [results[(i, s)] for i in range(len(prompts)) for s in range(cfg.n)]
        return build_rows(self.tokenizer, prompts, prompt_ids, ordered, cfg)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def check_grading(cfg: RolloutConfig, prompt_set: PromptSet) -> None:
    if not cfg.grade:
        return
    for i, p in enumerate(prompt_set.prompts):
        if prompt_task(p, cfg.task) == "code":
            raise RenioInputError(
                "--grade is not available for code yet (code grading comes later); "
                "run without --grade", file=prompt_set.source, row=i, column="task",
            )


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
    sampler: Any = None,
) -> RolloutSummary:
    """Sample this shard's chunks of ``cfg.prompts`` and write them to ``cfg.out``.

    ``model``/``tokenizer`` may be passed preloaded (the ``renio run`` loop), or a whole
    ``sampler`` (a ``VllmSampler`` kept across iterations; the caller closes it).
    ``progress(n)`` is called with the number of rows finished (or found complete) since the
    last call.
    """
    shards.refuse_overwriting_inputs(cfg.out, cfg.prompts, cfg.model, cfg.adapter)
    prompt_set = prompt_set if prompt_set is not None else load_prompts(cfg.prompts)
    check_grading(cfg, prompt_set)
    if cfg.backend == "vllm":
        from renio_core.backends import vllm as vllm_backend

        vllm_backend.require_vllm()  # a missing package or GPU fails before anything else
    shard = parse_shard(cfg.shard)
    out = ChunkedOutput(cfg.out, shard=shard, overwrite=cfg.overwrite)
    if tokenizer is None:
        tokenizer = models.load_tokenizer(cfg.model)
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
    summary = RolloutSummary(out=Path(cfg.out))
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
    out.prepare(n_chunks)
    try:

        own_sampler = sampler is None  # one made here is closed here; a caller's is kept

        def get_sampler() -> Any:
            nonlocal sampler, model
            if sampler is None:
                if cfg.backend == "vllm":
                    from renio_core.backends import vllm as vllm_backend

                    sampler = vllm_backend.VllmSampler(cfg, tokenizer)
                else:
                    if model is None:
                        model = models.load_model(cfg.model, adapter=cfg.adapter, dtype=cfg.dtype,
                                                  device=cfg.device)
                    sampler = HFSampler(model, tokenizer)
            return sampler

        fresh_tokens = 0
        busy = [0.0]  # seconds spent sampling (model loading excluded), for tokens/s

        def make_chunk(k: int) -> pa.Table:
            nonlocal fresh_tokens
            sampler_now = get_sampler()
            t0 = time.perf_counter()
            table = sampler_now.sample(chunk_prompts(k), cfg, progress)
            busy[0] += time.perf_counter() - t0
            count(table)
            fresh_tokens += int(pc.sum(
                pc.list_value_length(table.column("completion_ids"))).as_py() or 0)
            return table

        def on_skip(k: int) -> None:
            if progress is not None:
                progress(len(chunk_prompts(k)) * cfg.n)
            count(shards.read_table(out.parts.part_path(k)))

        try:
            summary.parts_written, summary.parts_skipped = run_chunks(
                out, n_chunks, meta, make_chunk, on_skip=on_skip)
        finally:
            if own_sampler and hasattr(sampler, "close"):
                sampler.close()  # a vLLM engine's worker processes
        out.finalize(n_chunks, meta)
    finally:
        out.release()  # the output's lock
    summary.seconds = busy[0]
    summary.tokens = fresh_tokens
    return summary

