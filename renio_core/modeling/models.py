"""Loading models and tokenizers, fingerprinting them, and exact chunked log-probs.

Shared by ``rollout``, ``score``, ``train`` and ``eval`` (arXiv 2606.23104 scores every
sampled token under a student and a teacher at the rollout temperature; this module is the
exact, memory-bounded way to get those numbers from a Hugging Face causal LM).

* ``load_tokenizer`` / ``load_model`` accept a hub name, a local path, or a toy-world name
  (``toy:student``), an optional PEFT adapter, and a dtype/device choice.
* ``tokenizer_fingerprint`` identifies a vocabulary (token → id, special ids); two tokenizers
  with the same fingerprint produce the same ids. ``model_fingerprint`` identifies weights
  cheaply (config + weight-file headers, never a full hash of the weights).
* ``check_tokenizers_compatible`` enforces the OPD requirement that student and teacher give
  the same ids to the same tokens; a teacher vocabulary padded larger is accepted.
* ``sequence_logprobs`` computes ``log_softmax(logits / T)`` at given target tokens without
  ever materializing batch × length × vocabulary: the decoder runs once, then the LM head and
  the log-softmax run over the needed positions only, ``chunk`` positions at a time.

Deliberate differences from the official code: the official trainer takes the full logits
tensor and a log-softmax over it; here only completion positions are projected, in chunks.
Models whose heads post-process logits (soft-capping, a logit scale) are handled for the
config keys ``final_logit_softcapping`` and ``logit_scale`` (:func:`postprocess_logits`, used by
scoring and training alike); other exotic heads would need an entry there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from renio_core.errors import RenioInputError
from renio_core.modeling.toy import resolve_model
from renio_core.modeling.toy.chain import resolve_chain_model
from renio_core.modeling.toy.reflect import resolve_reflect_model

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("none", "auto")


# --------------------------------------------------------------------------------------------
# Names, devices, dtypes
# --------------------------------------------------------------------------------------------


def resolve_name(name: str | os.PathLike) -> str:
    """A loadable path or hub name; ``toy:<role>``, ``toy-chain:<role>`` and
    ``toy-reflect:<role>`` go through the addition, chain and reflect toy worlds."""
    text = os.fspath(name)
    if text.startswith("toy-reflect:"):
        return resolve_reflect_model(text)
    if text.startswith("toy-chain:"):
        return resolve_chain_model(text)
    if text.startswith("toy:"):
        return os.fspath(resolve_model(text))
    if not os.path.exists(text) and _looks_like_path(text):
        raise RenioInputError("no such model folder (and not a hub model name like "
                              "'Qwen/Qwen3-1.7B')", file=text)
    return text


def _looks_like_path(text: str) -> bool:
    """A hub id is 'name' or 'owner/name'; anything else is meant as a local path."""
    return (text.startswith(("/", ".", "~")) or text.endswith("/") or text.count("/") > 1
            or os.sep != "/" and os.sep in text)


def choose_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RenioInputError(f"--device {device}: no CUDA device is available")
    return torch.device(device)


def choose_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU that supports it, float32 otherwise (exact on CPU)."""
    if dtype not in DTYPES:
        raise RenioInputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def device_map_problem(device_map: str, device: str, backend: str, cuda_count: int,
                       has_accelerate: bool) -> str | None:
    """Why ``--device-map device_map`` cannot be used here (None: it can). A pure function
    of what the machine has, so every refusal is tested on any machine."""
    if device_map not in DEVICE_MAPS:
        return f"must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}"
    if device_map == "none":
        return None
    if backend != "hf":
        return ("auto is for --backend hf; vLLM spreads a model with "
                "--tensor-parallel-size")
    if device not in ("auto", "cuda"):
        return f"auto places the model itself; leave --device at auto (got {device!r})"
    if cuda_count < 1:
        return "auto needs CUDA GPUs; on a CPU leave it unset"
    if not has_accelerate:
        return "auto needs the 'accelerate' package (pip install accelerate)"
    return None


def check_device_map(device_map: str, device: str = "auto", backend: str = "hf",
                     flag: str = "--device-map") -> None:
    """:func:`device_map_problem` on this machine, as one ``RenioInputError`` line."""
    cuda = torch.cuda.device_count() if device_map == "auto" else 0
    has_accelerate = importlib.util.find_spec("accelerate") is not None
    problem = device_map_problem(device_map, device, backend, cuda, has_accelerate)
    if problem is not None:
        raise RenioInputError(f"{flag}: {problem}")


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: its first parameter's device, which with
    ``device_map="auto"`` is the device of the embedding (accelerate's hooks move the
    activations on between layers)."""
    return next(causal_lm(model).parameters()).device


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _quiet_transformers() -> None:
    # Loading bars from transformers would interleave with the stage's own progress bar.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@contextlib.contextmanager
def quiet_peft():
    """peft still reads transformers' renamed ``is_gradient_checkpointing``; that warning is
    about peft, not about anything a renio user can change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        yield


def load_tokenizer(name: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    _quiet_transformers()

    path = resolve_name(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise RenioInputError(f"cannot load tokenizer {os.fspath(name)!r}: {exc}") from None
    return tok


def load_model(
    name: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
) -> Any:
    """A causal LM in eval mode, optionally wrapped by a PEFT adapter (kept unmerged, so
    OPSD can disable it to get the base weights).

    ``device_map="auto"``: the layers are spread over the visible CUDA GPUs by transformers
    (accelerate); its inputs go to :func:`input_device`. Not for a model being trained
    (DDP/FSDP is that path)."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    spread = device_map not in (None, "none")
    if spread:
        check_device_map(device_map, device)
    dev = choose_device("cuda" if spread else device)
    torch_dtype = choose_dtype(dtype, dev)
    path = resolve_name(name)
    try:
        extra = {"device_map": "auto"} if spread else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
    except (OSError, ValueError) as exc:
        raise RenioInputError(f"cannot load model {os.fspath(name)!r}: {exc}") from None
    if adapter is not None:
        from peft import PeftModel

        if not Path(adapter).exists():
            raise RenioInputError("adapter not found", file=adapter)
        try:
            with quiet_peft():
                model = PeftModel.from_pretrained(model, os.fspath(adapter))
        except (OSError, ValueError) as exc:
            raise RenioInputError(f"cannot load adapter: {exc}", file=adapter) from None
    if not spread:
        model.to(dev)
    model.eval()
    return model


def has_adapter(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the generation config's (often a list) and the
    tokenizer's."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    value = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(value, int):
        ids.append(value)
    elif value is not None:
        ids.extend(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


# --------------------------------------------------------------------------------------------
# Fingerprints and compatibility
# --------------------------------------------------------------------------------------------


def _sha(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identity of the token → id mapping and the special ids (not of the chat template).

    Kept on the tokenizer object with its size and special ids: ``renio run`` asks for it in
    every stage of every iteration, and a 151k-token vocabulary takes a moment to hash."""
    special = {
        "eos": tokenizer.eos_token_id,
        "bos": tokenizer.bos_token_id,
        "pad": tokenizer.pad_token_id,
    }
    key = (len(tokenizer), tuple(special.values()))
    cached = getattr(tokenizer, "_renio_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    fingerprint = _sha({"vocab": vocab, "special": special})
    try:
        tokenizer._renio_fingerprint = (key, fingerprint)
    except AttributeError:  # a tokenizer that takes no new attributes is hashed every time
        pass
    return fingerprint


def _file_digest(path: Path, edge: int = 1 << 16) -> dict[str, Any]:
    """Size plus a hash of the first and last ``edge`` bytes: a safetensors header lists every
    tensor's shape and offset, so this changes whenever the file's content layout does, and
    the tail catches changed values in the last tensors, without reading gigabytes."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(edge))
        if size > edge:
            fh.seek(max(edge, size - edge))
            h.update(fh.read(edge))
    return {"name": path.name, "size": size, "sha": h.hexdigest()[:16]}


def path_fingerprint(name: str | os.PathLike | None) -> str | None:
    if name is None:
        return None
    path = Path(resolve_name(name))
    if not path.is_dir():
        return _sha({"name": os.fspath(name)})
    files = sorted(
        p for p in path.iterdir()
        if p.is_file() and (p.suffix in (".safetensors", ".bin", ".json", ".pt", ".model"))
    )
    return _sha([_file_digest(p) for p in files])


def model_fingerprint(name: str | os.PathLike, adapter: str | os.PathLike | None = None) -> str:
    return _sha({"model": path_fingerprint(name), "adapter": path_fingerprint(adapter)})


def model_record(name: str | os.PathLike, adapter: str | os.PathLike | None = None) -> dict:
    """What the shard metadata says about a model: name or path, adapter, fingerprint."""
    return {
        "name": os.fspath(name),
        "adapter": os.fspath(adapter) if adapter is not None else None,
        "fingerprint": model_fingerprint(name, adapter),
    }


def check_tokenizers_compatible(
    student: Any, teacher: Any, *, student_name: str = "student", teacher_name: str = "teacher"
) -> None:
    """Student and teacher must map every student token to the same id.

    The teacher may know more tokens (a vocabulary padded larger): log-probs at the sampled
    ids are still comparable. Anything else is one ``RenioInputError`` line.
    """
    s_vocab = student.get_vocab()
    t_vocab = teacher.get_vocab()
    for token, sid in sorted(s_vocab.items(), key=lambda kv: kv[1]):
        tid = t_vocab.get(token)
        if tid != sid:
            found = "is missing" if tid is None else f"has id {tid}"
            raise RenioInputError(
                f"tokenizer mismatch: token {token!r} has id {sid} in the student "
                f"({student_name}) but {found} in the teacher ({teacher_name}); student and "
                "teacher must share a vocabulary"
            )


# --------------------------------------------------------------------------------------------
# Exact log-probs, chunked over positions
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LogprobResult:
    """Per-row results of :func:`sequence_logprobs`, each of the row's span length."""

    logprobs: list[torch.Tensor]  # per row: [n_b] float32
    topk_ids: list[torch.Tensor] | None  # per row: [n_b, K] int64
    topk_logprobs: list[torch.Tensor] | None  # per row: [n_b, K] float32


def causal_lm(model: Any) -> Any:
    """The transformers CausalLM inside a PEFT wrapper (LoRA layers stay injected)."""
    return model.get_base_model() if has_adapter(model) else model


def _cache_kwarg(module: Any) -> str:
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def postprocess_logits(config: Any, logits: torch.Tensor) -> torch.Tensor:
    """Heads that scale or soft-cap their logits (config keys ``logit_scale``,
    ``final_logit_softcapping``). Scoring and training both go through here, so they agree."""
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale not in (0, 1):
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def head_logits(lm: Any, hidden_NH: torch.Tensor) -> torch.Tensor:
    """The causal LM's logits for hidden states (N, H) -> (N, V), post-processed."""
    return postprocess_logits(lm.config, lm.get_output_embeddings()(hidden_NH))


def config_vocab_size(name: str | os.PathLike) -> int:
    """The vocabulary a model's config declares (its LM head's rows), without loading it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_name(name))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def load_config(name: str | os.PathLike) -> Any:
    """A model's config (no weights), refused in one line when it cannot be read."""
    from transformers import AutoConfig

    _quiet_transformers()
    try:
        return AutoConfig.from_pretrained(resolve_name(name))
    except (OSError, ValueError) as exc:
        raise RenioInputError(f"cannot load model config {os.fspath(name)!r}: {exc}") from None


# transformers gives a tokenizer with no declared limit a model_max_length of 1e30: no limit.
_NO_TOKENIZER_LIMIT = 10**9


def context_length(config: Any, tokenizer: Any = None) -> int | None:
    """The most tokens (prompt and completion) the model takes: its config's
    ``max_position_embeddings``, or the tokenizer's ``model_max_length`` where that is
    smaller; None where neither declares one."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [getattr(text, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits
              if isinstance(x, int) and not isinstance(x, bool) and 0 < x < _NO_TOKENIZER_LIMIT]
    return min(limits) if limits else None


def vocab_rows(model: Any) -> int:
    """Rows of the model's LM head (a padded vocabulary has more than its tokenizer)."""
    return causal_lm(model).get_output_embeddings().weight.shape[0]


def auto_chunk(vocab: int, budget_bytes: float, *, bytes_per_element: int = 4,
               live_copies: int = 6, minimum: int = 16, maximum: int = 1024) -> int:
    """Positions per chunk so that ``live_copies`` chunk x vocab blocks fit in ``budget_bytes``.

    ``floor(budget / (vocab * bytes_per_element * live_copies))``, clamped to
    [minimum, maximum]. The train chunk holds about six such blocks at once (student and teacher
    logits, their log-softmaxes, the mixture and the gradient); scoring two (logits and their
    log-softmax). A character vocabulary gets the maximum; Qwen3's 151,936 tokens with 256 MB
    gives 73.
    """
    per_position = vocab * bytes_per_element * live_copies
    return max(minimum, min(maximum, int(budget_bytes // per_position)))


def sequence_logprobs(
    model: Any,
    input_ids_BL: torch.Tensor,
    attention_BL: torch.Tensor,
    spans: Sequence[tuple[int, int]],
    *,
    temperature: float = 1.0,
    chunk: int = 1024,
    topk: int = 0,
) -> LogprobResult:
    """``log_softmax(logits / T)`` of each row's tokens ``input_ids[b, start:end]``, each
    conditioned on its prefix.

    Rows are right-padded (``attention_BL`` is 1 on real tokens), so positions need no
    shifting. ``spans[b] = (start, end)`` with ``start >= 1``. The decoder runs once over the
    batch; the LM head, the temperature and the log-softmax then run on the gathered
    predicting positions, ``chunk`` at a time, so the peak extra memory is
    ``chunk × vocabulary`` floats however long or wide the batch is.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    lm = causal_lm(model)
    decoder = lm.get_decoder()
    B, L = input_ids_BL.shape
    with torch.no_grad():
        out = decoder(input_ids=input_ids_BL, attention_mask=attention_BL, use_cache=False)
        hidden_BLH = out.last_hidden_state
        # Token at position p is predicted by the hidden state at p - 1.
        rows, cols, lengths = [], [], []
        for b, (start, end) in enumerate(spans):
            if start < 1 or end > L or end < start:
                raise ValueError(f"bad span {start, end} for a row of length {L}")
            rows.append(torch.full((end - start,), b, dtype=torch.long))
            cols.append(torch.arange(start - 1, end - 1, dtype=torch.long))
            lengths.append(end - start)
        # The last hidden states' device; with a model spread by device_map="auto" it is
        # not the inputs' (the first layer's), and the head may sit on a third.
        device = hidden_BLH.device
        rows_N = torch.cat(rows).to(device)
        cols_N = torch.cat(cols).to(device)
        targets_N = input_ids_BL.to(device)[rows_N, cols_N + 1]
        n_total = rows_N.numel()
        lp_N = torch.empty(n_total, dtype=torch.float32, device=device)
        topk_ids_NK = torch.empty((n_total, topk), dtype=torch.long, device=device) if topk else None
        topk_lp_NK = torch.empty((n_total, topk), dtype=torch.float32, device=device) if topk else None
        for lo in range(0, n_total, max(1, chunk)):
            hi = min(n_total, lo + max(1, chunk))
            h_CH = hidden_BLH[rows_N[lo:hi], cols_N[lo:hi]]
            logits_CV = head_logits(lm, h_CH).float().to(device)
            if temperature != 1.0:
                logits_CV = logits_CV / temperature
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            lp_N[lo:hi] = logits_CV.gather(1, targets_N[lo:hi, None]).squeeze(1) - lse_C
            if topk:
                vals_CK, ids_CK = logits_CV.topk(topk, dim=-1)
                topk_ids_NK[lo:hi] = ids_CK
                topk_lp_NK[lo:hi] = vals_CK - lse_C[:, None]
            del logits_CV
    splits = [int(x) for x in lengths]
    logprobs = list(lp_N.cpu().split(splits))
    ids = list(topk_ids_NK.cpu().split(splits)) if topk else None
    tlp = list(topk_lp_NK.cpu().split(splits)) if topk else None
    return LogprobResult(logprobs, ids, tlp)


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into ``ids_BL`` and ``attention_BL``."""
    L = max(len(s) for s in seqs)
    ids_BL = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn_BL = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids_BL[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        attn_BL[b, : len(s)] = 1
    return ids_BL, attn_BL
