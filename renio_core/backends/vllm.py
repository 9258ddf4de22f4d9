"""The optional vLLM backend of ``rollout`` and ``score`` (the official ReNIO code,
arXiv 2606.23104, samples with vLLM; this is the fast path on GPUs).

vLLM is imported lazily: a missing package or a missing GPU is one clear error line. The
adapter is deliberately thin. Everything that turns vLLM's outputs into renio rows is a pure
function of plain values (:func:`completion_from_vllm`, :func:`logprobs_from_prompt_logprobs`)
with its own tests, so the backend's only untested lines are the calls into vLLM itself.

Rollout: ``LLM.generate`` with one request per trajectory, ``n=1`` and a per-row seed
(``formulas.sampling.row_seed``), so rows do not depend on sharding either (they are not the
same tokens as the HF backend's: the two samplers draw differently).

Scoring: the completion is folded into the prompt and the request asks for one new token
with ``prompt_logprobs``: a prefill-only pass. vLLM computes prompt log-probs from the raw
logits, that is at temperature 1, so at any other scoring temperature this backend refuses
rather than silently differ from the HF backend (:func:`check_scoring_temperature`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from renio_core.backends.rows import (
    Completion,
    build_rows,
    render_prompt,
    teacher_prompt_ids,
    with_scores,
)
from renio_core.errors import RenioInputError
from renio_core.formulas.sampling import row_seed
from renio_core.modeling import models


def require_vllm() -> Any:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RenioInputError(
            "--backend vllm needs the 'vllm' package, which is not installed "
            "(pip install 'renio[vllm]'), or use --backend hf"
        ) from None
    # vLLM decides where it can run (a CUDA GPU, or the CPU for a CPU build of vLLM); ask it
    # rather than torch, so a CPU build is usable and a CUDA build on a GPU-less node fails
    # here with one line instead of deep inside engine start-up.
    try:
        from vllm.platforms import current_platform

        unusable = current_platform.is_unspecified()
    except Exception:  # an older or unusual vLLM: fall back to asking torch
        unusable = not torch.cuda.is_available()
    if unusable:
        raise RenioInputError("--backend vllm found no device vLLM can run on (no CUDA GPU "
                              "is visible and this vLLM is not a CPU build); use --backend hf")
    return vllm


def check_scoring_temperature(temperature: float) -> None:
    if abs(float(temperature) - 1.0) > 1e-12:
        raise RenioInputError(
            f"--backend vllm cannot score exactly at temperature {temperature:g}: vLLM's "
            "prompt log-probs are taken at temperature 1. Use --backend hf, or "
            "--temperature 1 if that is what you want"
        )


# --------------------------------------------------------------------------------------------
# Pure conversions (tested without vLLM)
# --------------------------------------------------------------------------------------------


def completion_from_vllm(token_ids: Sequence[int], finish_reason: str | None,
                         stop_reason: Any, eos_ids: Sequence[int]) -> tuple[list[int], str]:
    """A vLLM ``CompletionOutput``'s fields → (completion_ids, finish_reason) of the contract.

    ``finish_reason`` is ``stop`` only for an EOS or stop token, whose id is kept (vLLM
    versions differ on whether ``token_ids`` ends with it; ``stop_reason`` says which id it
    was, None for the model's own EOS). Anything else (``length``, ``abort``) is ``length``.
    """
    ids = [int(t) for t in token_ids]
    if finish_reason != "stop":
        return ids, "length"
    if ids and ids[-1] in eos_ids:
        return ids, "stop"
    if isinstance(stop_reason, int):
        return ids + [int(stop_reason)], "stop"
    if stop_reason is None and eos_ids:
        return ids + [int(eos_ids[0])], "stop"
    raise ValueError(f"vLLM stopped on a stop string {stop_reason!r}; renio sets none")


def _entry_logprob(entry: Any) -> float:
    return float(entry.logprob if hasattr(entry, "logprob") else entry)


def _entry_rank(entry: Any) -> int | None:
    return getattr(entry, "rank", None)


def logprobs_from_prompt_logprobs(
    prompt_logprobs: Sequence[Mapping[int, Any] | None],
    token_ids: Sequence[int],
    start: int,
    end: int,
    topk: int = 0,
) -> tuple[list[float], list[list[int]] | None, list[list[float]] | None]:
    """Log-probs of ``token_ids[start:end]`` from vLLM's ``prompt_logprobs`` of the whole
    sequence (entry p is a dict id → Logprob for position p; entry 0 is None).

    Top-k: the ``topk`` entries with the best rank, largest first (the dict may also hold the
    actual token with a worse rank)."""
    if len(prompt_logprobs) < end:
        raise ValueError(f"got {len(prompt_logprobs)} prompt log-probs for {end} tokens")
    lps: list[float] = []
    ids_out: list[list[int]] = []
    lps_out: list[list[float]] = []
    for p in range(start, end):
        entry = prompt_logprobs[p]
        if entry is None:
            raise ValueError(f"no prompt log-prob at position {p}")
        tok = int(token_ids[p])
        if tok not in entry:
            raise ValueError(f"vLLM returned no log-prob for the token at position {p}")
        lps.append(_entry_logprob(entry[tok]))
        if topk:
            items = sorted(entry.items(), key=lambda kv: (-_entry_logprob(kv[1]), kv[0]))
            ranked = [kv for kv in items if _entry_rank(kv[1]) is None or _entry_rank(kv[1]) <= topk]
            best = ranked[:topk]
            if len(best) < topk:
                raise ValueError(f"vLLM returned {len(best)} top log-probs, asked for {topk}")
            ids_out.append([int(k) for k, _ in best])
            lps_out.append([_entry_logprob(v) for _, v in best])
    return lps, (ids_out if topk else None), (lps_out if topk else None)


# vLLM sizes its LoRA buffers for one of these ranks (``LoRAConfig.max_lora_rank``).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def engine_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of rank ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise RenioInputError(f"--backend vllm: LoRA rank {rank} is above vLLM's largest "
                          f"({VLLM_LORA_RANKS[-1]}); use --backend hf")


def adapter_rank(adapter: str | os.PathLike) -> int:
    """The rank ``r`` of a peft LoRA adapter directory, from its ``adapter_config.json``."""

    path = Path(adapter) / "adapter_config.json"
    try:
        rank = json.loads(path.read_text())["r"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RenioInputError(f"not a LoRA adapter ({type(exc).__name__}: {exc}); vLLM takes "
                              "peft LoRA adapters only", file=path) from None
    if not isinstance(rank, int) or rank < 1:
        raise RenioInputError(f"'r' must be a positive integer, got {rank!r}", file=path)
    return rank


def lora_engine_args(rank: int | None) -> dict[str, Any]:
    """``LLM(...)`` keyword arguments for an engine that takes adapters up to ``rank``."""
    if rank is None:
        return {}
    return {"enable_lora": True, "max_lora_rank": engine_lora_rank(rank), "max_loras": 1}


def check_tensor_parallel(tensor_parallel_size: int, backend: str) -> None:
    """The config-time checks of ``--tensor-parallel-size`` (no machine needed)."""
    tp = tensor_parallel_size
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise RenioInputError(f"--tensor-parallel-size: must be an integer >= 1, got {tp!r}")
    if tp > 1 and backend != "vllm":
        raise RenioInputError(
            f"--tensor-parallel-size {tp}: needs --backend vllm (the hf backend spreads a "
            "model over GPUs with --device-map auto)")


def engine_parallel_args(tensor_parallel_size: int, device_count: int,
                         is_cpu_build: bool) -> dict[str, Any]:
    """``LLM(...)`` keyword arguments for ``tensor_parallel_size`` on a machine with
    ``device_count`` visible CUDA GPUs (or vLLM's CPU build), or one line saying why not."""
    tp = tensor_parallel_size
    check_tensor_parallel(tp, "vllm")
    if tp > 1 and is_cpu_build:
        raise RenioInputError(f"--tensor-parallel-size {tp}: this vLLM is a CPU build; "
                              "tensor parallelism needs CUDA GPUs (leave it at 1)")
    if not is_cpu_build and tp > device_count:
        raise RenioInputError(f"--tensor-parallel-size {tp}: only {device_count} CUDA "
                              f"GPU{'s' if device_count != 1 else ''} visible "
                              "(CUDA_VISIBLE_DEVICES); ask for at most that many")
    return {"tensor_parallel_size": tp}


def _parallel_args(tensor_parallel_size: int) -> dict[str, Any]:
    """:func:`engine_parallel_args` on this machine."""
    from vllm.platforms import current_platform

    return engine_parallel_args(tensor_parallel_size, torch.cuda.device_count(),
                                current_platform.is_cpu())


# --------------------------------------------------------------------------------------------
# Thin adapters over vLLM
# --------------------------------------------------------------------------------------------


def _dtype_arg(dtype: str) -> str:
    """renio's ``--dtype auto`` means bfloat16 on a GPU and float32 on a CPU, for both
    backends; vLLM's own ``auto`` would run a float32 checkpoint in bfloat16 on a CPU too."""
    if dtype != "auto":
        return dtype
    from vllm.platforms import current_platform

    return "float32" if current_platform.is_cpu() else "bfloat16"


def start_engine(vllm: Any, model: str, **kwargs: Any) -> Any:
    """``vllm.LLM(model, ...)``, with a failed start turned into one line. vLLM logs the root
    cause from its engine process above; the usual ones are named here."""
    try:
        return vllm.LLM(model=model, **kwargs)
    except (RuntimeError, ValueError, OSError) as exc:
        raise RenioInputError(
            f"vLLM could not start an engine for {model!r} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}); "
            "its log above gives the cause. Common ones: --vllm-memory above what is free "
            "(on a GPU, or of RAM on vLLM's CPU build), or a model vLLM cannot run on this "
            "device; --backend hf runs any model"
        ) from None


def shutdown(*llms: Any) -> None:
    """Stop the engines' worker processes now. Left to garbage collection at exit, two engines
    in one process can abort the interpreter (``terminate called without an active
    exception``) after the output is already written, turning a good run into exit 134."""
    seen: set[int] = set()
    for llm in llms:
        if llm is None or id(llm) in seen:
            continue
        seen.add(id(llm))
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


class VllmSampler:
    """The vLLM ``Sampler`` (``backends.protocols``), interchangeable with ``HFSampler``.

    One engine can serve a whole ``renio run``: built with ``lora_rank``, it takes each new
    adapter through :meth:`set_adapter` (a fresh ``LoRARequest`` id, so vLLM loads the new
    weights instead of reusing its cached copy of the previous iteration's)."""

    def __init__(self, cfg: Any, tokenizer: Any, *, lora_rank: int | None = None):
        vllm = require_vllm()
        self.vllm = vllm
        self.tokenizer = tokenizer
        if lora_rank is None and cfg.adapter is not None:
            lora_rank = adapter_rank(cfg.adapter)
        self.llm = start_engine(vllm, models.resolve_name(cfg.model), seed=cfg.seed,
                                dtype=_dtype_arg(cfg.dtype),
                                gpu_memory_utilization=cfg.vllm_memory,
                                **_parallel_args(cfg.tensor_parallel_size),
                                **lora_engine_args(lora_rank))
        self.lora_rank = lora_rank
        self.lora: Any = None
        self._lora_ids = 0
        self.set_adapter(cfg.adapter)
        self.eos_ids = models.eos_token_ids(_GenConfigView(cfg.model), tokenizer)

    def set_adapter(self, adapter: str | os.PathLike | None) -> None:
        """Sample from the base model plus ``adapter`` (None: the base model alone)."""
        if adapter is None:
            self.lora = None
            return
        if self.lora_rank is None:
            raise RenioInputError("this vLLM engine was built without LoRA support; "
                                  "cannot apply an adapter", file=adapter)
        rank = adapter_rank(adapter)
        if rank > self.lora_rank:
            raise RenioInputError(f"adapter rank {rank} is above the engine's {self.lora_rank}",
                                  file=adapter)
        from vllm.lora.request import LoRARequest

        self._lora_ids += 1
        self.lora = LoRARequest(f"student-{self._lora_ids}", self._lora_ids,
                                os.fspath(adapter))

    def close(self) -> None:
        shutdown(self.llm)

    def sample(self, prompts: Sequence[Any], cfg: Any,
               progress: Callable[[int], None] | None = None) -> Any:
        prompt_ids = [render_prompt(self.tokenizer, p, cfg) for p in prompts]
        requests, params = [], []
        for i, p in enumerate(prompts):
            for s in range(cfg.n):
                requests.append({"prompt_token_ids": prompt_ids[i]})
                params.append(self.vllm.SamplingParams(
                    n=1, temperature=cfg.temperature, top_p=cfg.top_p,
                    top_k=cfg.top_k if cfg.top_k > 0 else -1, max_tokens=cfg.max_new_tokens,
                    seed=row_seed(cfg.seed, p.id, s) % (2**31), stop_token_ids=self.eos_ids,
                    skip_special_tokens=True,
                ))
        outputs = self.llm.generate(requests, params, lora_request=self.lora, use_tqdm=False)
        completions = []
        for out in outputs:
            c = out.outputs[0]
            ids, reason = completion_from_vllm(c.token_ids, c.finish_reason,
                                               getattr(c, "stop_reason", None), self.eos_ids)
            completions.append(Completion(ids, reason))
        if progress is not None:
            progress(len(completions))
        return build_rows(self.tokenizer, prompts, prompt_ids, completions, cfg)


class _GenConfigView:
    """Just enough of a model for ``models.eos_token_ids``: its generation config."""

    def __init__(self, name: str):
        # Imported when used: transformers' generation module is slow to import.
        from transformers import GenerationConfig

        try:
            self.generation_config = GenerationConfig.from_pretrained(models.resolve_name(name))
        except (OSError, ValueError):
            self.generation_config = None


def merge_adapter(base: str, adapter: str | os.PathLike, out_dir: str | os.PathLike,
                  dtype: str) -> str:
    """Write ``base`` + ``adapter`` merged into one plain checkpoint (weights and tokenizer)
    under ``out_dir``, for an engine that must not see the adapter as a LoRA. Done on the
    CPU, so the GPU stays free for the engines."""
    model = models.load_model(base, adapter=adapter, dtype=dtype, device="cpu")
    model.merge_and_unload().save_pretrained(out_dir)
    models.load_tokenizer(base).save_pretrained(out_dir)
    return os.fspath(out_dir)


def score_prefill(vllm: Any, llm: Any, prompts: Sequence[Sequence[int]],
                  completions: Sequence[Sequence[int]], topk: int) -> list[Any]:
    """Per row, the completion's log-probs (and top-k) at temperature 1: the completion is
    folded into the prompt and one new token is asked for, so vLLM only runs the prefill."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    params = vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=topk)
    outs = llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
    return [logprobs_from_prompt_logprobs(o.prompt_logprobs, s, len(p), len(s), topk)
            for o, s, p in zip(outs, seqs, prompts)]


class VllmScorer:
    """The vLLM ``Scorer`` (``backends.protocols``), interchangeable with ``HFScorer``; prefill-only.

    A student adapter is merged into a plain checkpoint first rather than served as a LoRA:
    vLLM's prompt log-probs do not apply LoRA correctly (on vLLM 0.32's CPU build the engine
    crashes; upstream reports wrong mappings and a dropped lm_head delta, vllm-project/vllm
    issues 16668 and 51594), and scoring must be exact. The merged copy lives beside the
    output and is removed by :meth:`close`."""

    def __init__(self, cfg: Any, resolved: Any, student_tok: Any, teacher_tok: Any):

        vllm = require_vllm()
        check_scoring_temperature(resolved.temperature)
        # Both engines spread over the same GPUs, each with its share of their memory.
        parallel = _parallel_args(cfg.tensor_parallel_size)
        self.vllm = vllm
        self.cfg = cfg
        self.resolved = resolved
        dtype = _dtype_arg(cfg.dtype)
        self._merged: str | None = None
        student_path = models.resolve_name(resolved.student)
        if resolved.adapter is not None:
            parent = Path(cfg.out).resolve().parent
            parent.mkdir(parents=True, exist_ok=True)
            self._merged = tempfile.mkdtemp(prefix=f".{Path(cfg.out).name}.merged-student-",
                                            dir=parent)
            student_path = merge_adapter(resolved.student, resolved.adapter, self._merged,
                                         dtype)
        # OPSD without an adapter scores both sides with one engine (the teacher is the
        # student's base); otherwise two engines share the memory budget.
        one_engine = cfg.self_distill and resolved.adapter is None
        share = cfg.vllm_memory if one_engine else cfg.vllm_memory / 2
        # vLLM refuses more top log-probs per position than max_logprobs (default 20).
        max_logprobs = max(20, cfg.topk)
        teacher_path = (models.resolve_name(resolved.student) if cfg.self_distill
                        else models.resolve_name(cfg.teacher))
        self.student_llm: Any = None
        self.teacher_llm: Any = None
        try:
            self.student_llm = start_engine(vllm, student_path, dtype=dtype,
                                            gpu_memory_utilization=share,
                                            max_logprobs=max_logprobs, **parallel)
            self.teacher_llm = (self.student_llm if one_engine else
                                start_engine(vllm, teacher_path, dtype=dtype,
                                             gpu_memory_utilization=share,
                                             max_logprobs=max_logprobs, **parallel))
        except BaseException:
            self.close()  # the engine that did start, and the merged copy
            raise
        self.teacher_tok = student_tok if cfg.self_distill else teacher_tok
        self._vocab = {"student": models.config_vocab_size(student_path),
                       "teacher": models.config_vocab_size(teacher_path)}

    def vocab_sizes(self) -> dict[str, int]:
        """Logit rows of each model, from its config (what vLLM sizes the head by)."""
        return dict(self._vocab)

    def close(self) -> None:

        shutdown(self.student_llm, self.teacher_llm)
        if self._merged is not None:
            shutil.rmtree(self._merged, ignore_errors=True)
            self._merged = None

    def score_table(self, table: Any, progress: Callable[[int], None] | None = None) -> Any:
        import torch

        prompts = table.column("prompt_ids").to_pylist()
        completions = table.column("completion_ids").to_pylist()
        teacher_prompts = teacher_prompt_ids(table, self.teacher_tok, self.cfg.privileged,
                                             self.resolved)
        s = score_prefill(self.vllm, self.student_llm, prompts, completions, 0)
        t = score_prefill(self.vllm, self.teacher_llm, teacher_prompts, completions,
                          self.cfg.topk)

        def result(rows: Any, topk: int) -> models.LogprobResult:
            lp = [torch.tensor(r[0], dtype=torch.float32) for r in rows]
            if not topk:
                return models.LogprobResult(lp, None, None)
            return models.LogprobResult(lp, [torch.tensor(r[1]) for r in rows],
                                        [torch.tensor(r[2]) for r in rows])

        if progress is not None:
            progress(table.num_rows)
        return with_scores(table, teacher_prompts, result(s, 0), result(t, self.cfg.topk),
                           self.cfg.topk)
