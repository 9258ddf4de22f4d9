"""The Hugging Face backend: renio's own sampler and scorer on a loaded ``transformers`` model.

Sampling (arXiv 2606.23104, Alg. 1, "sample y ~ pi_theta(.|x)"): our own batched loop with a
KV cache. Rows are grouped by prompt length and left-padded (positions count real tokens
only); rows that hit EOS leave the batch and the cache, so a long tail does not keep finished
rows running. ``HFSampler(refill=True)`` instead prefills the next job and splices it into
the cache in the finished row's slot (continuous batching: every row is right-aligned in the
cache, with its own positions and attention mask), so the batch stays full while jobs remain.
It gives the same tokens per row, up to float noise; it is ``renio rollout --refill``
(``rollout.refill``), off by default, as it pays only where lengths are uneven
(docs/benchmarks.md). Each token is drawn by
:func:`renio_core.formulas.sampling.sample_tokens` with the row's own uniforms.

Scoring: one forward pass per budget of tokens (:func:`token_budget_batches`), the
completion's log-probs at the scoring temperature, chunked over the vocabulary
(``models.sequence_logprobs``).

Deliberate difference from the official code (which samples with vLLM): exact and
deterministic rather than fast. ``renio_core.backends.vllm`` is the fast path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import torch

from renio_core.backends.rows import (
    Completion,
    build_rows,
    render_prompt,
    teacher_prompt_ids,
    with_scores,
)
from renio_core.data.prompt_io import Prompt
from renio_core.formulas.sampling import row_seed, row_uniforms, sample_tokens
from renio_core.modeling import models


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

    lm = models.causal_lm(model)
    device = models.input_device(lm)
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
                # CPU indices: a model spread by device_map keeps each layer's cache on its
                # own GPU, and a CUDA tensor takes CPU indices whatever its device.
                cache.batch_select_indices(keep_idx.cpu())
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

    lm = models.causal_lm(model)
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
    lm = models.causal_lm(model)
    device = models.input_device(lm)
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
                    cache.batch_select_indices(torch.tensor(keep))  # CPU: as above
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


class HFSampler:
    """Keeps a model loaded and samples rows for any list of prompts (for ``rollout``, the
    ``renio run`` loop and ``eval``).

    ``refill=False`` (the default) cuts the jobs into fixed batches of ``batch_size`` that
    shrink as rows finish (:func:`generate_batch`). ``refill=True`` keeps the batch full: a
    finished row's slot goes to the next job (:func:`generate_refill`); both give each row
    the tokens it gets sampled alone, up to the float noise of padding
    (tests/test_rollout.py). Models whose cache is not one plain tensor per layer (sliding
    window) always take fixed batches."""

    def __init__(self, model: Any, tokenizer: Any, *, refill: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = models.eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self.refill = refill and refill_supported(model)

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""

    def sample(self, prompts: Sequence[Prompt], cfg: Any,
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
# Scoring
# --------------------------------------------------------------------------------------------


def token_budget_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches whose padded size (rows × longest) fits the budget; rows
    sorted by length so padding is small. A row longer than the budget is a batch alone."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        longest_if = max(longest, lengths[i])
        if current and longest_if * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current, longest_if = [], lengths[i]
        current.append(i)
        longest = longest_if
    if current:
        batches.append(current)
    return batches


def score_sequences(
    model: Any,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    temperature: float,
    topk: int = 0,
    chunk: int = 1024,
    max_batch_tokens: int = 16384,
    pad_id: int = 0,
    progress: Callable[[int], None] | None = None,
) -> models.LogprobResult:
    """Log-probs of every completion token after its prompt; results in input order."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    n = len(seqs)
    lp: list[Any] = [None] * n
    ids: list[Any] = [None] * n
    tlp: list[Any] = [None] * n
    for batch in token_budget_batches([len(s) for s in seqs], max_batch_tokens):
        ids_BL, attn_BL = models.pad_right([seqs[i] for i in batch], pad_id)
        device = models.input_device(model)
        spans = [(len(prompts[i]), len(seqs[i])) for i in batch]
        res = models.sequence_logprobs(model, ids_BL.to(device), attn_BL.to(device), spans,
                                       temperature=temperature, chunk=chunk, topk=topk)
        for j, i in enumerate(batch):
            lp[i] = res.logprobs[j]
            if topk:
                ids[i] = res.topk_ids[j]
                tlp[i] = res.topk_logprobs[j]
        if progress is not None:
            progress(len(batch))
    return models.LogprobResult(lp, ids if topk else None, tlp if topk else None)


class HFScorer:
    """Student and teacher kept loaded; scores tables of rollout rows (``run_score``, the
    ``renio run`` loop). Exact: a plain forward pass at the scoring temperature."""

    def __init__(self, cfg: Any, resolved: Any, student_model: Any,
                 student_tok: Any, teacher_model: Any | None, teacher_tok: Any | None):
        self.cfg = cfg
        self.resolved = resolved
        self.student_model = student_model
        self.student_tok = student_tok
        # OPSD: the teacher is the student's own model object, adapter disabled.
        self.teacher_model = student_model if cfg.self_distill else teacher_model
        self.teacher_tok = student_tok if cfg.self_distill else teacher_tok
        self.pad_id = student_tok.pad_token_id or 0

    def teacher_prompts(self, table: pa.Table) -> list[list[int]]:
        return teacher_prompt_ids(table, self.teacher_tok, self.cfg.privileged, self.resolved)

    def vocab_sizes(self) -> dict[str, int]:
        """Logit rows of each model (a padded teacher has more than its tokenizer)."""
        return {name: models.vocab_rows(m) for name, m in
                (("student", self.student_model), ("teacher", self.teacher_model))}

    def close(self) -> None:
        """Nothing to release: the models belong to the caller."""

    def score_table(self, table: pa.Table, progress: Callable[[int], None] | None = None
                    ) -> pa.Table:
        cfg, T = self.cfg, self.resolved.temperature
        prompts = table.column("prompt_ids").to_pylist()
        completions = table.column("completion_ids").to_pylist()
        teacher_prompts = self.teacher_prompts(table)
        chunk = cfg.chunk or _auto_score_chunk(self.student_model, cfg.chunk_budget_mb)
        common = dict(temperature=T, chunk=chunk, max_batch_tokens=cfg.max_batch_tokens,
                      pad_id=self.pad_id)
        student = score_sequences(self.student_model, prompts, completions, **common)
        if cfg.self_distill and models.has_adapter(self.student_model):
            with self.student_model.disable_adapter():
                teacher = score_sequences(self.teacher_model, teacher_prompts, completions,
                                          topk=cfg.topk, progress=progress, **common)
        else:
            teacher = score_sequences(self.teacher_model, teacher_prompts, completions,
                                      topk=cfg.topk, progress=progress, **common)
        return with_scores(table, teacher_prompts, student, teacher, cfg.topk)


def _auto_score_chunk(model: Any, budget_mb: float) -> int:
    """Positions per log-softmax chunk: two chunk x vocab float32 blocks (logits, log-softmax)."""
    return models.auto_chunk(models.vocab_rows(model), budget_mb * 2**20, live_copies=2)

