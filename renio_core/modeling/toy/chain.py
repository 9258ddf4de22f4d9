"""The "chain" toy world: K dependent mod-10 steps, a teacher that checks and recovers.

A second toy world (issue 14), built so that the mechanism the paper (ReNIO, arXiv 2606.23104)
argues for can act: reflective recovery after a wrong step. A problem is a start digit and K
operations (K from 3 to 8), applied left to right modulo 10, one line per step::

    7+5*3+9          (mod 10, left to right)
    7+5=2
    2*3=6
    6+9=5
    \\boxed{5}

Operations are ``+d`` (d in 1..9) and ``*d`` (d in 3, 7, 9: invertible mod 10, so a chain
never collapses to a constant). Every step uses the previous result, so one wrong line makes
the answer wrong, and a student's chance to finish right falls with K.

Models (same tokenizer and ``from_pretrained`` loading as the addition world):

* **teacher** (Qwen3, hidden 128 x 4 layers), trained on traces that recover: in a share
  ``TEACHER_TRAIN.inject`` of steps the line is first written with a wrong result, followed by
  the line ``wait`` (a reflection marker that ``renio eval`` counts) and the correct line.
  The injected wrong lines carry no loss, so the teacher learns what follows a wrong line
  (``wait`` and the redo) without learning to write one.
* **student** (hidden 64 x 2 layers), trained less and on plain traces (no checks, no
  recovery), so its errors come from limited capacity and training and accumulate with K.

Addressed as ``toy-chain:teacher``, ``toy-chain:student``, ``toy-chain:tokenizer``; built by
``renio toy build --world chain`` into ``<toy cache>/chain-seed<seed>-<source digest>``.
``measure_chain`` gives the numbers the world promises (README, "The chain world").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from renio_core.data.prompts import render_ids, student_messages
from renio_core.errors import RenioInputError
from renio_core.modeling.toy import task as toy_task
from renio_core.modeling.toy.build import (
    ROLLOUT_SAMPLING,
    ModelSpec,
    Progress,
    ToyWorld,
    _new_model,
    _save_model,
    build_settings,
    cache_root,
    ensure_world,
    fit,
    generate_completions,
    write_prompt_file,
)
from renio_core.modeling.toy.tokenizer import build_tokenizer

TASK = "math"
K_MIN, K_MAX = 3, 8
PLUS_DIGITS = tuple(range(1, 10))
TIMES_DIGITS = (3, 7, 9)
MARKER = "wait"
N_TRAIN, N_TEST = 1024, 256
MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class ChainProblem:
    start: int
    ops: tuple[tuple[str, int], ...]  # ("+", d) or ("*", d)

    @property
    def k(self) -> int:
        return len(self.ops)

    @property
    def id(self) -> str:
        return "chain-" + str(self.start) + "".join(
            ("p" if o == "+" else "t") + str(d) for o, d in self.ops)

    @property
    def problem(self) -> str:
        return str(self.start) + "".join(f"{o}{d}" for o, d in self.ops)

    def values(self) -> list[int]:
        """The running results after each step."""
        out, v = [], self.start
        for o, d in self.ops:
            v = (v + d) % 10 if o == "+" else (v * d) % 10
            out.append(v)
        return out

    @property
    def answer(self) -> str:
        return str(self.values()[-1])


def step_lines(p: ChainProblem) -> list[str]:
    prev = [p.start] + p.values()[:-1]
    return [f"{a}{o}{d}={v}" for a, (o, d), v in zip(prev, p.ops, p.values())]


def solution(p: ChainProblem) -> str:
    return "\n".join(step_lines(p) + [f"\\boxed{{{p.answer}}}"])


def wrong_line(p: ChainProblem, step: int, rng: random.Random) -> str:
    """Line ``step`` with a wrong result (any digit but the right one)."""
    right = step_lines(p)[step]
    head, value = right.split("=")
    wrong = rng.choice([d for d in range(10) if d != int(value)])
    return f"{head}={wrong}"


def recovering_pieces(p: ChainProblem, wrong_steps: dict[int, str]) -> list[tuple[str, bool]]:
    """The teacher's trace as (text, trained) pieces: injected wrong lines are not trained."""
    pieces: list[tuple[str, bool]] = []
    for j, line in enumerate(step_lines(p)):
        if j in wrong_steps:
            pieces.append((wrong_steps[j] + "\n", False))
            pieces.append((MARKER + "\n", True))
        pieces.append((line + "\n", True))
    pieces.append((f"\\boxed{{{p.answer}}}", True))
    return pieces


def random_chain(rng: random.Random) -> ChainProblem:
    k = rng.randint(K_MIN, K_MAX)
    ops = tuple(("+", rng.choice(PLUS_DIGITS)) if rng.random() < 0.5
                else ("*", rng.choice(TIMES_DIGITS)) for _ in range(k))
    return ChainProblem(rng.randint(0, 9), ops)


def random_chains(rng: random.Random, exclude: frozenset[ChainProblem] = frozenset()
                  ) -> Iterator[ChainProblem]:
    while True:
        p = random_chain(rng)
        if p not in exclude:
            yield p


def split_chains(seed: int, n_train: int, n_test: int) -> tuple[list[ChainProblem], list[ChainProblem]]:
    rng = random.Random(f"renio-chain-split-{seed}")
    seen: set[ChainProblem] = set()
    out: list[ChainProblem] = []
    for p in random_chains(rng):
        if p not in seen:
            seen.add(p)
            out.append(p)
            if len(out) == n_train + n_test:
                break
    return out[:n_train], out[n_train:]


def prompt_row(p: ChainProblem) -> dict[str, Any]:
    return {"id": p.id, "problem": p.problem, "solution": solution(p), "answer": p.answer,
            "task": TASK, "k": p.k}


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class ChainTrainSpec:
    steps: int
    batch_size: int
    lr: float
    warmup: int
    # Share of steps whose line is first written wrong, then `wait`, then redone (teacher).
    inject: float = 0.0


TEACHER_MODEL = ModelSpec(128, 4, 4, 2, 32, 384)
STUDENT_MODEL = ModelSpec(64, 2, 4, 2, 16, 192)
TEACHER_TRAIN = ChainTrainSpec(steps=900, batch_size=32, lr=2e-3, warmup=50, inject=0.2)
# The student's accuracy is set by its training length (plain traces, no injected errors): at
# this size and lr it learns the task abruptly. Sampled accuracy on the test prompts (seed 0):
# 250 steps 13%, 400 steps 17% (flat in K: it guesses), 500 steps 54% (K 3-8: 66, 67, 59, 47,
# 42, 36%: a per-step error of ~12% that compounds with K), 1000 steps 100%. A smaller student
# (hidden 32 x 2) still guesses after 1000 steps (21%, flat in K). 500 steps meets 20-60%
# falling with K, and costs ~35 CPU-seconds. Being on the steep part of the curve, it is
# sensitive to any change of the recipe: re-measure after one.
STUDENT_TRAIN = ChainTrainSpec(steps=500, batch_size=32, lr=2e-3, warmup=30)
QUICK_STEPS = 4


def _chain_batches(tok: Any, spec: ChainTrainSpec, steps: int, seed: int, name: str,
                   exclude: frozenset[ChainProblem]):
    import torch

    rng = random.Random(f"renio-chain-{name}-{seed}")
    stream = random_chains(rng, exclude)
    for _ in range(steps):
        rows = []
        for _ in range(spec.batch_size):
            p = next(stream)
            wrong = {j: wrong_line(p, j, rng) for j in range(p.k) if rng.random() < spec.inject}
            prompt = render_ids(tok, student_messages(p.problem, TASK))
            ids, labels = list(prompt), [-100] * len(prompt)
            for text, trained in recovering_pieces(p, wrong):
                piece = tok(text, add_special_tokens=False)["input_ids"]
                ids += piece
                labels += piece if trained else [-100] * len(piece)
            ids.append(tok.eos_token_id)
            labels.append(tok.eos_token_id)
            rows.append((ids, labels))
        length = max(len(a) for a, _ in rows)
        ids_BL = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
        mask_BL = torch.zeros((len(rows), length), dtype=torch.long)
        labels_BL = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, (ids, labels) in enumerate(rows):
            ids_BL[i, :len(ids)] = torch.tensor(ids)
            mask_BL[i, :len(ids)] = 1
            labels_BL[i, :len(ids)] = torch.tensor(labels)
        yield ids_BL, mask_BL, labels_BL


# ----------------------------------------------------------------------------- measurement


def marker_logprobs(model: Any, tok: Any, prefixes: Sequence[list[int]]) -> list[list[float]]:
    """After each token-id prefix, the log-probability of each token of ``wait`` in turn
    (teacher forcing: the marker's earlier tokens are given)."""
    import torch

    marker = tok(MARKER, add_special_tokens=False)["input_ids"]
    out: list[list[float]] = []
    for start in range(0, len(prefixes), 128):
        chunk = [list(p) + marker for p in prefixes[start:start + 128]]
        length = max(len(c) for c in chunk)
        ids_BL = torch.full((len(chunk), length), tok.pad_token_id, dtype=torch.long)
        mask_BL = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, c in enumerate(chunk):
            ids_BL[i, :len(c)] = torch.tensor(c)
            mask_BL[i, :len(c)] = 1
        with torch.no_grad():
            logp_BLV = torch.log_softmax(model(input_ids=ids_BL, attention_mask=mask_BL).logits.float(), -1)
        for i, c in enumerate(chunk):
            n = len(c)
            out.append([float(logp_BLV[i, t, c[t + 1]]) for t in range(n - len(marker) - 1, n - 1)])
    return out


def marker_probability(model: Any, tok: Any, prefixes: Sequence[list[int]]) -> list[float]:
    """P(the next tokens spell ``wait``) after each token-id prefix (teacher forcing)."""
    return [math.exp(sum(steps)) for steps in marker_logprobs(model, tok, prefixes)]


def marker_prefixes(tok: Any, problems: Sequence[ChainProblem],
                    rng: random.Random) -> tuple[list[list[int]], list[list[int]]]:
    """For each problem, one step chosen by ``rng``: the student prompt and the lines before it,
    then that step written wrong (first list) or right (second list), each ending its line."""
    wrong_prefixes, right_prefixes = [], []
    for p in problems:
        prompt = render_ids(tok, student_messages(p.problem, TASK))
        j = rng.randrange(p.k)
        lines = step_lines(p)
        before = "".join(line + "\n" for line in lines[:j])
        wrong = before + wrong_line(p, j, rng) + "\n"
        right = before + lines[j] + "\n"
        wrong_prefixes.append(prompt + tok(wrong, add_special_tokens=False)["input_ids"])
        right_prefixes.append(prompt + tok(right, add_special_tokens=False)["input_ids"])
    return wrong_prefixes, right_prefixes


def measure_chain(teacher: Any, student: Any, tok: Any, problems: Sequence[ChainProblem], *,
                  seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """The numbers the chain world promises, on ``problems`` at the rollout's sampling.

    teacher_sampled / student_sampled: accuracy of one sample per problem; student_by_k:
    the student's accuracy per chain length; marker_after_wrong / marker_after_right: the
    teacher's mean probability of ``wait`` right after an injected wrong line, and after a
    right line, at one step per problem chosen by a seeded coin.
    """
    prompts = [render_ids(tok, student_messages(p.problem, TASK)) for p in problems]
    out: dict[str, Any] = {}
    for i, (key, model) in enumerate((("teacher_sampled", teacher), ("student_sampled", student))):
        texts = generate_completions(model, tok, prompts, greedy=False, seed=seed + i,
                                     max_new_tokens=MAX_NEW_TOKENS)
        ok = [toy_task.grade(t, p.answer) for t, p in zip(texts, problems)]
        out[key] = sum(ok) / len(ok)
        if key == "student_sampled":
            by_k: dict[str, list[bool]] = {}
            for p, good in zip(problems, ok):
                by_k.setdefault(str(p.k), []).append(good)
            out["student_by_k"] = {k: sum(v) / len(v) for k, v in sorted(by_k.items())}
        if key == "teacher_sampled":
            out["teacher_marker_rate"] = sum(MARKER in t for t in texts) / len(texts)
        if progress is not None:
            progress("measure chain world", i + 1, 3)
    wrong_prefixes, right_prefixes = marker_prefixes(
        tok, problems, random.Random(f"renio-chain-measure-{seed}"))
    pw = marker_probability(teacher, tok, wrong_prefixes)
    pr = marker_probability(teacher, tok, right_prefixes)
    out["marker_after_wrong"] = sum(pw) / len(pw)
    out["marker_after_right"] = sum(pr) / len(pr)
    if progress is not None:
        progress("measure chain world", 3, 3)
    return out


# The numbers the chain world promises (README, "The chain world"), on the test prompts at the
# rollout's sampling.
TARGETS = {
    "teacher_sampled": ">= 85%",
    "student_sampled": "20-60%",
    "student_by_k": "falls with K (K = 3 above K = 8, and no rise of more than 10 points)",
    "marker_after_wrong": ">= 0.5",
    "marker_after_right": "<= 0.05",
}


def target_failures(m: dict[str, Any]) -> list[str]:
    """The targets ``measure_chain``'s numbers ``m`` miss, one line each (empty: all met)."""
    out = []
    if m["teacher_sampled"] < 0.85:
        out.append(f"teacher sampled accuracy {m['teacher_sampled']:.1%} < 85%")
    if not 0.20 <= m["student_sampled"] <= 0.60:
        out.append(f"student sampled accuracy {m['student_sampled']:.1%} outside 20-60%")
    by_k = [m["student_by_k"][k] for k in sorted(m["student_by_k"], key=int)]
    if len(by_k) < 2 or by_k[0] <= by_k[-1] or any(b - a > 0.10 for a, b in zip(by_k, by_k[1:])):
        out.append("student accuracy does not fall with K: "
                   + ", ".join(f"K={k} {m['student_by_k'][k]:.0%}"
                               for k in sorted(m["student_by_k"], key=int)))
    if m["marker_after_wrong"] < 0.5:
        out.append(f"P(wait | wrong line) {m['marker_after_wrong']:.3f} < 0.5")
    if m["marker_after_right"] > 0.05:
        out.append(f"P(wait | right line) {m['marker_after_right']:.3f} > 0.05")
    return out


# ----------------------------------------------------------------------------- build


def build_chain_world(out_dir: str | Path, *, seed: int = 0, quick: bool = False,
                      progress: Progress | None = None) -> ToyWorld:
    """Build the chain world into ``out_dir``; the same files layout as the addition world."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    world = ToyWorld.at(root)
    with build_settings():
        train, test = split_chains(seed, N_TRAIN, N_TEST)
        write_prompt_file(world.train_prompts, (prompt_row(p) for p in train))
        write_prompt_file(world.test_prompts, (prompt_row(p) for p in test))
        tok = build_tokenizer()
        tok.save_pretrained(str(world.tokenizer))
        exclude = frozenset(test)
        models = {}
        for name, mspec, tspec, mseed in (("teacher", TEACHER_MODEL, TEACHER_TRAIN, seed),
                                          ("student", STUDENT_MODEL, STUDENT_TRAIN, seed + 1)):
            steps = QUICK_STEPS if quick else tspec.steps
            model = _new_model(mspec, tok, mseed)
            fit(model, _chain_batches(tok, tspec, steps, mseed, name, exclude), lr=tspec.lr,
                warmup=tspec.warmup, steps=steps, seed=mseed, label=f"train chain {name}",
                progress=progress)
            _save_model(model, tok, getattr(world, name))
            models[name] = model
        metrics = {} if quick else measure_chain(models["teacher"], models["student"], tok, test,
                                                 seed=seed, progress=progress)
        manifest = {
            "world": "chain",
            "seed": seed,
            "quick": quick,
            "task": f"chain of {K_MIN}-{K_MAX} dependent mod-10 steps, one line per step, "
                    "answer in \\boxed{}",
            "n_train": len(train),
            "n_test": len(test),
            "teacher": {"model": asdict(TEACHER_MODEL), "train": asdict(TEACHER_TRAIN)
                        | {"steps": QUICK_STEPS if quick else TEACHER_TRAIN.steps}},
            "student": {"model": asdict(STUDENT_MODEL), "train": asdict(STUDENT_TRAIN)
                        | {"steps": QUICK_STEPS if quick else STUDENT_TRAIN.steps}},
            "sampling": ROLLOUT_SAMPLING,
            "max_new_tokens": MAX_NEW_TOKENS,
            "accuracy": metrics,
        }
        (root / "world.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return world


# ----------------------------------------------------------------------------- cache

CHAIN_NAMES = {"toy-chain:teacher": "teacher", "toy-chain:student": "student",
               "toy-chain:tokenizer": "tokenizer"}


def _chain_digest() -> str:
    """Changes whenever the code that determines the chain world's bytes changes."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("task.py", "tokenizer.py", "build.py", "chain.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:12]


def ensure_chain_world(cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0,
                       progress: Progress | None = None) -> ToyWorld:
    """The cached chain world for ``seed`` (next to the addition world), built first if
    missing (``build.ensure_world``)."""
    return ensure_world(cache_root(cache_dir), f"chain-seed{seed}-{_chain_digest()}",
                        build_chain_world, seed=seed, progress=progress)


def resolve_chain_model(name: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """``toy-chain:teacher|student|tokenizer`` -> a local path (built on first use)."""
    if name not in CHAIN_NAMES:
        raise RenioInputError(f"unknown chain-world model {name!r}; expected one of "
                              f"{', '.join(CHAIN_NAMES)}")
    return str(getattr(ensure_chain_world(cache_dir), CHAIN_NAMES[name]))
