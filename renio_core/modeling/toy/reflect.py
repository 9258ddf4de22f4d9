"""The "reflect" toy world: a student that already reflects sometimes, near its boundary.

The third toy world, built to hold the premise of ReNIO (arXiv 2606.23104): the student
samples wrong steps it gives low probability, notices some of them, and then writes a
one-token reflection marker and redoes the step, as a reasoning model writes ``Wait``.
Correct-only training can take that habit away; incorrect samples and ReNIO's weights keep
it. The task is the chain world's (``renio_core.modeling.toy.chain``): a start digit and K
operations (K 3-8) applied left to right modulo 10, one line per step, answer in ``\\boxed{}``.

Differences from the chain world:

* **Tokenizer.** The toy tokenizer plus one added token ``wait``, so the marker is a single
  position the student can sample, as Qwen3's ``Wait`` is one token.
* **Student** (Qwen3, hidden 64 x 2 layers) trained on traces in which a share
  ``inject`` of steps is first written with a wrong result. The wrong line carries loss, so
  the student learns to sample wrong results with low probability, as a reasoning model's
  errors are. For the first ``always_reflect_until`` of its steps every wrong line is followed
  by ``wait`` and the right line; after that only a share ``reflect_late`` is, and after the
  others the trace carries on from the wrong value. Discrimination between wrong and right
  lines is learned from the traces that always reflect; the late phase sets how often the
  student acts on it. A share ``privileged`` of its examples are OPSD privileged prompts
  (the problem with the reference solution) answered with the teacher's traces, so that
  self-distillation has a teacher.
* **Teacher** (hidden 128 x 4) trained on recovering traces only: wrong lines carry no loss,
  and every one is followed by ``wait`` and the redo, as in the chain world.

Deliberate difference from the issue that asked for this world: its first target says the
student's injected wrong lines carry no loss, while its calibration recipe trains on every
line including the wrong ones. A student that never learns to write a wrong line is right
nearly always when sampled, so it would not sit near its capability boundary; this world
follows the calibration recipe for the student and keeps the wrong lines loss-free for the
teacher and for the privileged traces.

Addressed as ``toy-reflect:teacher|student|tokenizer`` and ``toy-reflect:train|test``;
built by ``renio toy build --world reflect`` into ``<toy cache>/reflect-seed<seed>-<digest>``.
``measure_reflect`` gives every promised number; ``TARGETS`` lists them.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
import re
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from renio_core.data.prompts import privileged_messages, render_ids, student_messages
from renio_core.data.shards import row_offsets
from renio_core.errors import RenioInputError
from renio_core.formulas.weighting import auroc, trajectory_weights
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
from renio_core.modeling.toy.chain import (
    K_MAX,
    K_MIN,
    TASK,
    ChainProblem,
    marker_probability,
    prompt_row,
    random_chains,
    solution,
    split_chains,
    step_lines,
)
from renio_core.modeling.toy.tokenizer import build_tokenizer

MARKER = "wait"
N_TRAIN, N_TEST = 1024, 256
MAX_NEW_TOKENS = 128
# The ReNIO weight settings of the sample configs, for the AUROC the world promises.
WEIGHT_CLIP, WEIGHT_THRESHOLD, WEIGHT_TEM = 2.0, 1.0, 1.0
SAMPLES_PER_PROMPT = 4  # samples per test prompt in the build's measurements


@dataclass(frozen=True)
class ReflectTrainSpec:
    steps: int
    batch_size: int
    lr: float
    warmup: int
    # Share of steps first written with a wrong result.
    inject: float
    # Whether the wrong line itself is trained (student) or only what follows it (teacher).
    train_wrong: bool
    # Share of the steps (from the start) in which every wrong line is followed by `wait`.
    always_reflect_until: float = 1.0
    # After that, the share of wrong lines followed by `wait` (the others carry on).
    reflect_late: float = 1.0
    # After that, the share of steps first written wrong (None: ``inject`` throughout). The
    # early phase needs many wrong lines to learn to tell them from right ones; the late
    # phase sets how often the student errs, and so where its accuracy sits.
    inject_late: float | None = None
    # Share of examples shown as OPSD privileged prompts, answered with recovering traces.
    privileged: float = 0.0


TEACHER_MODEL = ModelSpec(128, 4, 4, 2, 32, 384)
STUDENT_MODEL = ModelSpec(64, 2, 4, 2, 16, 192)
TEACHER_TRAIN = ReflectTrainSpec(steps=900, batch_size=32, lr=2e-3, warmup=50, inject=0.2,
                                 train_wrong=False)
# Calibrated on the targets only (seed 0, before any distillation run on this world). With
# 1500 steps at lr 1e-3 the student told wrong lines from right ones barely (P(wait) 0.09
# against 0.03); 2500 steps at lr 2e-3 learned it (0.15 against 0.006) but erred too often
# (34% sampled); a late phase with fewer wrong lines (15%) sets the accuracy near 50%.
STUDENT_TRAIN = ReflectTrainSpec(steps=2500, batch_size=32, lr=2e-3, warmup=50, inject=0.2,
                                 train_wrong=True, always_reflect_until=0.6, reflect_late=0.2,
                                 inject_late=0.15, privileged=0.15)
QUICK_STEPS = 4


def build_reflect_tokenizer():
    """The toy tokenizer with ``wait`` as one added (non-special) token."""
    from tokenizers import AddedToken

    tok = build_tokenizer()
    tok.add_tokens([AddedToken(MARKER, special=False, normalized=False)])
    return tok


def apply_op(value: int, op: str, d: int) -> int:
    return (value + d) % 10 if op == "+" else (value * d) % 10


def trace_pieces(p: ChainProblem, wrong: dict[int, int], reflect: frozenset[int], *,
                 train_wrong: bool) -> list[tuple[str, bool]]:
    """One trace as (text, trained) pieces. Step ``j`` in ``wrong`` is written with result
    ``wrong[j]``; if ``j`` is in ``reflect``, ``wait`` and the right line follow, else the
    trace carries on from the wrong value."""
    pieces: list[tuple[str, bool]] = []
    value = p.start
    for j, (op, d) in enumerate(p.ops):
        right = apply_op(value, op, d)
        head = f"{value}{op}{d}="
        if j in wrong:
            pieces.append((f"{head}{wrong[j]}\n", train_wrong))
            if j in reflect:
                pieces.append((MARKER + "\n", True))
                pieces.append((f"{head}{right}\n", True))
                value = right
            else:
                value = wrong[j]
        else:
            pieces.append((f"{head}{right}\n", True))
            value = right
    pieces.append((f"\\boxed{{{value}}}", True))
    return pieces


def _sample_trace(p: ChainProblem, rng: random.Random, inject: float, reflect_share: float
                  ) -> tuple[dict[int, int], frozenset[int]]:
    """Which steps are written wrong (and with what), and which of them are reflected on.
    The wrong result differs from the right one for the operand the trace has written."""
    wrong: dict[int, int] = {}
    reflect: set[int] = set()
    value = p.start
    for j, (op, d) in enumerate(p.ops):
        right = apply_op(value, op, d)
        if rng.random() < inject:
            wrong[j] = rng.choice([x for x in range(10) if x != right])
            if rng.random() < reflect_share:
                reflect.add(j)
                value = right
            else:
                value = wrong[j]
        else:
            value = right
    return wrong, frozenset(reflect)


def _reflect_batches(tok: Any, spec: ReflectTrainSpec, steps: int, seed: int, name: str,
                     exclude: frozenset[ChainProblem]):
    import torch

    rng = random.Random(f"renio-reflect-{name}-{seed}")
    stream = random_chains(rng, exclude)
    switch = int(round(spec.always_reflect_until * steps))
    for step in range(steps):
        rows = []
        for _ in range(spec.batch_size):
            p = next(stream)
            if rng.random() < spec.privileged:
                # The privileged student copies the reference like the teacher recovers: its
                # wrong lines carry no loss and are always redone.
                messages = privileged_messages(p.problem, solution(p), TASK)
                wrong, reflect = _sample_trace(p, rng, spec.inject, 1.0)
                train_wrong = False
            else:
                messages = student_messages(p.problem, TASK)
                late = step >= switch
                share = spec.reflect_late if late else 1.0
                inject = spec.inject_late if late and spec.inject_late is not None else spec.inject
                wrong, reflect = _sample_trace(p, rng, inject, share)
                train_wrong = spec.train_wrong
            prompt = render_ids(tok, messages)
            ids, labels = list(prompt), [-100] * len(prompt)
            for text, trained in trace_pieces(p, wrong, reflect, train_wrong=train_wrong):
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


# ----------------------------------------------------------------------------- parsing

_LINE = re.compile(r"^(\d)([+*])(\d)=(\d)$")


@dataclass(frozen=True)
class TraceAnalysis:
    """What one sampled completion did, line by line."""

    wrong_lines: int         # lines whose result is wrong for the operands they wrote
    wrong_then_marker: int   # of those, followed directly by the marker line
    redos: int               # marker lines preceded by a wrong line
    redos_right: int         # of those, followed by the same step with the right result
    markers: int             # marker lines in all
    # Character offsets just after each wrong line's newline (teacher-forcing prefixes).
    wrong_line_ends: tuple[int, ...]


def analyse(text: str) -> TraceAnalysis:
    """Parse a completion of the chain format; lines that are not steps are skipped."""
    lines = text.split("\n")
    wrong = then_marker = redos = redos_right = markers = 0
    ends: list[int] = []
    offset = 0
    for i, line in enumerate(lines):
        offset += len(line) + 1
        if line == MARKER:
            markers += 1
            continue
        m = _LINE.match(line)
        if not m:
            continue
        a, op, d, v = int(m[1]), m[2], int(m[3]), int(m[4])
        if v == apply_op(a, op, d):
            continue
        wrong += 1
        if i + 1 < len(lines):  # a line ends here, so the prefix ends with its newline
            ends.append(offset)
        if i + 1 < len(lines) and lines[i + 1] == MARKER:
            then_marker += 1
            redos += 1
            right = f"{a}{op}{d}={apply_op(a, op, d)}"
            if i + 2 < len(lines) and lines[i + 2] == right:
                redos_right += 1
    return TraceAnalysis(wrong, then_marker, redos, redos_right, markers, tuple(ends))


# ----------------------------------------------------------------------------- measurement


def _sampled_logprobs(model: Any, tok: Any, prompts: Sequence[list[int]],
                      completions: Sequence[list[int]]) -> list[np.ndarray]:
    """Log-probs (temperature 1, as ``renio score``) of each completion's tokens."""
    import torch

    out: list[np.ndarray] = []
    for start in range(0, len(prompts), 128):
        rows = [list(p) + list(c) for p, c in zip(prompts[start:start + 128],
                                                  completions[start:start + 128])]
        length = max(len(r) for r in rows)
        ids_BL = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
        mask_BL = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids_BL[i, :len(r)] = torch.tensor(r)
            mask_BL[i, :len(r)] = 1
        with torch.no_grad():
            logp_BLV = torch.log_softmax(model(input_ids=ids_BL, attention_mask=mask_BL)
                                         .logits.float(), -1)
        for i, (p, c) in enumerate(zip(prompts[start:start + 128], completions[start:start + 128])):
            pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            out.append(logp_BLV[i, pos, torch.tensor(list(c), dtype=torch.long)].numpy())
    return out


def teacher_forced_marker(model: Any, tok: Any, problems: Sequence[ChainProblem],
                          rng: random.Random) -> tuple[list[float], list[float]]:
    """P(``wait`` next) after one injected wrong line and after the right line, at one step per
    problem chosen by ``rng`` (the lines before it right)."""
    wrong_prefixes, right_prefixes = [], []
    for p in problems:
        prompt = render_ids(tok, student_messages(p.problem, TASK))
        j = rng.randrange(p.k)
        lines = step_lines(p)
        before = "".join(line + "\n" for line in lines[:j])
        head, value = lines[j].split("=")
        bad = rng.choice([d for d in range(10) if d != int(value)])
        wrong_prefixes.append(prompt + tok(f"{before}{head}={bad}\n", add_special_tokens=False)
                              ["input_ids"])
        right_prefixes.append(prompt + tok(f"{before}{lines[j]}\n", add_special_tokens=False)
                              ["input_ids"])
    return (marker_probability(model, tok, wrong_prefixes),
            marker_probability(model, tok, right_prefixes))


def measure_reflect(teacher: Any, student: Any, tok: Any, problems: Sequence[ChainProblem], *,
                    seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Every number the reflect world promises (``TARGETS``), on ``problems``.

    Sampled numbers use the rollout's sampling and ``SAMPLES_PER_PROMPT`` samples per problem;
    teacher-forced ones one step per problem chosen by a seeded coin.
    """
    steps = 6
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress("measure reflect world", done, steps)

    out: dict[str, Any] = {}
    prompts = [render_ids(tok, student_messages(p.problem, TASK)) for p in problems]
    many = [p for p in problems for _ in range(SAMPLES_PER_PROMPT)]
    many_prompts = [q for q in prompts for _ in range(SAMPLES_PER_PROMPT)]

    # The student's own rollouts.
    texts = generate_completions(student, tok, many_prompts, greedy=False, seed=seed,
                                 max_new_tokens=MAX_NEW_TOKENS)
    ok = np.array([toy_task.grade(t, p.answer) for t, p in zip(texts, many)])
    out["student_sampled"] = float(ok.mean())
    by_k: dict[str, list[bool]] = {}
    for p, good in zip(many, ok):
        by_k.setdefault(str(p.k), []).append(bool(good))
    out["student_by_k"] = {k: sum(v) / len(v) for k, v in sorted(by_k.items(), key=lambda kv: int(kv[0]))}
    info = [analyse(t) for t in texts]
    wrong_lines = sum(a.wrong_lines for a in info)
    out["own_wrong_lines"] = wrong_lines
    out["own_wrong_then_marker"] = (sum(a.wrong_then_marker for a in info) / wrong_lines
                                    if wrong_lines else float("nan"))
    out["completions_with_marker"] = float(np.mean([a.markers > 0 for a in info]))
    redos = sum(a.redos for a in info)
    out["own_redos"] = redos
    out["redo_right"] = sum(a.redos_right for a in info) / redos if redos else float("nan")
    out["markers_after_right_line"] = sum(a.markers - a.redos for a in info)
    tick()
    greedy = generate_completions(student, tok, prompts, greedy=True, seed=seed,
                                  max_new_tokens=MAX_NEW_TOKENS)
    out["student_greedy"] = float(np.mean([toy_task.grade(t, p.answer)
                                           for t, p in zip(greedy, problems)]))
    priv = [render_ids(tok, privileged_messages(p.problem, solution(p), TASK)) for p in problems]
    priv_texts = generate_completions(student, tok, priv, greedy=False, seed=seed + 1,
                                      max_new_tokens=MAX_NEW_TOKENS)
    out["student_privileged_sampled"] = float(np.mean([toy_task.grade(t, p.answer)
                                                       for t, p in zip(priv_texts, problems)]))
    tick()
    teacher_texts = generate_completions(teacher, tok, prompts, greedy=False, seed=seed + 2,
                                         max_new_tokens=MAX_NEW_TOKENS)
    out["teacher_sampled"] = float(np.mean([toy_task.grade(t, p.answer)
                                            for t, p in zip(teacher_texts, problems)]))
    tick()

    # Teacher forcing: the student's discrimination, the teacher's marker.
    sw, sr = teacher_forced_marker(student, tok, problems, random.Random(f"renio-reflect-{seed}"))
    out["student_p_wait_wrong"] = float(np.mean(sw))
    out["student_p_wait_right"] = float(np.mean(sr))
    tw, tr = teacher_forced_marker(teacher, tok, problems, random.Random(f"renio-reflect-{seed}"))
    out["student_wait_ratio"] = out["student_p_wait_wrong"] / max(out["student_p_wait_right"], 1e-12)
    out["teacher_p_wait_wrong"] = float(np.mean(tw))
    out["teacher_p_wait_right"] = float(np.mean(tr))
    # The teacher after the student's own wrong lines.
    own_prefixes = [q + tok(t[:end], add_special_tokens=False)["input_ids"]
                    for q, t, a in zip(many_prompts, texts, info) for end in a.wrong_line_ends]
    out["teacher_p_wait_after_own_wrong"] = (float(np.mean(marker_probability(teacher, tok, own_prefixes)))
                                             if own_prefixes else float("nan"))
    tick()

    # ReNIO's signal on the student's own rollouts: the raw weight against correctness.
    completions = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                   for t in texts]
    s_lp = _sampled_logprobs(student, tok, many_prompts, completions)
    tick()
    t_lp = _sampled_logprobs(teacher, tok, many_prompts, completions)
    _, _, raw_B = trajectory_weights(
        np.concatenate(s_lp), np.concatenate(t_lp), row_offsets([len(c) for c in completions]),
        clip=WEIGHT_CLIP, threshold=WEIGHT_THRESHOLD, tem=WEIGHT_TEM)
    out["raw_weight_auroc_incorrect"] = auroc(raw_B, ~ok)
    recovered = np.array([a.redos_right > 0 for a in info]) & ok
    out["recovered_rollouts"] = int(recovered.sum())
    out["raw_weight_mean"] = {
        "correct": float(raw_B[ok & ~recovered].mean()) if (ok & ~recovered).any() else float("nan"),
        "recovered": float(raw_B[recovered].mean()) if recovered.any() else float("nan"),
        "incorrect": float(raw_B[~ok].mean()) if (~ok).any() else float("nan"),
    }
    tick()
    return out


# The numbers the reflect world promises, on the test prompts at the rollout's sampling.
TARGETS = {
    "student_p_wait_wrong": "0.10-0.30",
    "student_p_wait_right": "<= 0.01",
    "student_wait_ratio": ">= 10",
    "own_wrong_then_marker": "8-35%",
    "completions_with_marker": "3-25%",
    "redo_right": ">= 85%",
    "student_sampled": "35-65%",
    "student_by_k": "K=3 at least 15 points above K=8",
    "student_privileged_sampled": ">= 80%",
    "teacher_sampled": ">= 95%",
    "teacher_p_wait_after_own_wrong": ">= 0.9",
    "raw_weight_auroc_incorrect": ">= 0.85",
}


def target_failures(m: dict[str, Any]) -> list[str]:
    """The targets ``measure_reflect``'s numbers ``m`` miss, one line each (empty: all met)."""
    out = []

    def need(ok: bool, text: str) -> None:
        if not ok:
            out.append(text)

    pw, pr = m["student_p_wait_wrong"], m["student_p_wait_right"]
    need(0.10 <= pw <= 0.30, f"student P(wait | wrong line) {pw:.3f} outside 0.10-0.30")
    need(pr <= 0.01, f"student P(wait | right line) {pr:.4f} > 0.01")
    need(pr > 0 and pw / pr >= 10, f"student P(wait) ratio wrong/right {pw / max(pr, 1e-12):.1f} < 10")
    r = m["own_wrong_then_marker"]
    need(0.08 <= r <= 0.35, f"own wrong lines followed by wait {r:.1%} outside 8-35%")
    c = m["completions_with_marker"]
    need(0.03 <= c <= 0.25, f"completions with a marker {c:.1%} outside 3-25%")
    rr = m["redo_right"]
    need(rr >= 0.85, f"redo after a sampled wait right {rr:.1%} < 85%")
    s = m["student_sampled"]
    need(0.35 <= s <= 0.65, f"student sampled accuracy {s:.1%} outside 35-65%")
    by_k = m["student_by_k"]
    lo, hi = by_k.get(str(K_MIN), math.nan), by_k.get(str(K_MAX), math.nan)
    need(lo - hi >= 0.15, f"student K={K_MIN} {lo:.1%} not 15 points above K={K_MAX} {hi:.1%}")
    pv = m["student_privileged_sampled"]
    need(pv >= 0.80, f"student with the privileged prompt {pv:.1%} < 80%")
    t = m["teacher_sampled"]
    need(t >= 0.95, f"teacher sampled accuracy {t:.1%} < 95%")
    tw = m["teacher_p_wait_after_own_wrong"]
    need(tw >= 0.9, f"teacher P(wait | the student's own wrong line) {tw:.3f} < 0.9")
    a = m["raw_weight_auroc_incorrect"]
    need(a >= 0.85, f"AUROC of the raw weight for incorrect rollouts {a:.3f} < 0.85")
    return out


# ----------------------------------------------------------------------------- build


MODELS = {"teacher": (TEACHER_MODEL, TEACHER_TRAIN, 0), "student": (STUDENT_MODEL, STUDENT_TRAIN, 1)}


def _train_model(name: str, root: Path, seed: int, quick: bool,
                 progress: Progress | None) -> None:
    """Train one of the world's models from scratch and save it to ``root/name``."""
    mspec, tspec, offset = MODELS[name]
    _, test = split_chains(seed, N_TRAIN, N_TEST)
    tok = build_reflect_tokenizer()
    steps = QUICK_STEPS if quick else tspec.steps
    with build_settings():  # again: the teacher trains in a fresh process
        model = _new_model(mspec, tok, seed + offset)
        fit(model, _reflect_batches(tok, tspec, steps, seed + offset, name, frozenset(test)),
            lr=tspec.lr, warmup=tspec.warmup, steps=steps, seed=seed + offset,
            label=f"train reflect {name}", progress=progress)
        _save_model(model, tok, root / name)


def _load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def build_reflect_world(out_dir: str | Path, *, seed: int = 0, quick: bool = False,
                        progress: Progress | None = None) -> ToyWorld:
    """Build the reflect world into ``out_dir``; the same files layout as the other worlds."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    world = ToyWorld.at(root)
    with build_settings():
        train, test = split_chains(seed, N_TRAIN, N_TEST)
        write_prompt_file(world.train_prompts, (prompt_row(p) for p in train))
        write_prompt_file(world.test_prompts, (prompt_row(p) for p in test))
        tok = build_reflect_tokenizer()
        tok.save_pretrained(str(world.tokenizer))
        if quick:
            for name in ("teacher", "student"):
                _train_model(name, root, seed, quick, progress)
        else:
            # The teacher trains in a process of its own, one thread each, so the two models
            # take the two cores of a small machine; each one's bytes do not depend on it.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                teacher_done = pool.submit(_train_model, "teacher", root, seed, quick, None)
                _train_model("student", root, seed, quick, progress)
                teacher_done.result()
        metrics = {} if quick else measure_reflect(_load(world.teacher), _load(world.student),
                                                   tok, test, seed=seed, progress=progress)
        manifest = {
            "world": "reflect",
            "seed": seed,
            "quick": quick,
            "task": f"chain of {K_MIN}-{K_MAX} dependent mod-10 steps, one line per step, "
                    "answer in \\boxed{}; `wait` is one token",
            "n_train": len(train),
            "n_test": len(test),
            "teacher": {"model": asdict(TEACHER_MODEL), "train": asdict(TEACHER_TRAIN)
                        | {"steps": QUICK_STEPS if quick else TEACHER_TRAIN.steps}},
            "student": {"model": asdict(STUDENT_MODEL), "train": asdict(STUDENT_TRAIN)
                        | {"steps": QUICK_STEPS if quick else STUDENT_TRAIN.steps}},
            "sampling": ROLLOUT_SAMPLING,
            "samples_per_prompt": SAMPLES_PER_PROMPT,
            "max_new_tokens": MAX_NEW_TOKENS,
            "accuracy": metrics,
        }
        (root / "world.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return world


# ----------------------------------------------------------------------------- cache

REFLECT_NAMES = {"toy-reflect:teacher": "teacher", "toy-reflect:student": "student",
                 "toy-reflect:tokenizer": "tokenizer"}
PROMPT_SETS = {"toy-reflect:train": "train_prompts", "toy-reflect:test": "test_prompts"}


def _reflect_digest() -> str:
    """Changes whenever the code that determines the reflect world's bytes changes."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("task.py", "tokenizer.py", "build.py", "chain.py", "reflect.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:12]


def ensure_reflect_world(cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0,
                         progress: Progress | None = None) -> ToyWorld:
    """The cached reflect world for ``seed`` (next to the other worlds), built first if
    missing."""
    return ensure_world(cache_root(cache_dir), f"reflect-seed{seed}-{_reflect_digest()}",
                        build_reflect_world, seed=seed, progress=progress)


def resolve_reflect_model(name: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """``toy-reflect:teacher|student|tokenizer`` -> a local path (built on first use)."""
    if name not in REFLECT_NAMES:
        raise RenioInputError(f"unknown reflect-world model {name!r}; expected one of "
                              f"{', '.join(REFLECT_NAMES)}")
    return str(getattr(ensure_reflect_world(cache_dir), REFLECT_NAMES[name]))


def resolve_reflect_prompts(spec: str, which: str) -> str:
    """``toy-reflect:train|test`` -> the prompt file's path (built on first use)."""
    if spec not in PROMPT_SETS:  # before building: a full world takes minutes
        raise RenioInputError(f"{which}: unknown reflect prompt set {spec!r} "
                              f"({' or '.join(PROMPT_SETS)})")
    return str(getattr(ensure_reflect_world(), PROMPT_SETS[spec]))


def table_rows(m: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(measure, target, measured) rows for the build's table and the docs, in one order."""

    def pct(key: str) -> str:
        v = m.get(key)
        return "-" if v is None else f"{v:.1%}"

    def num(key: str, spec: str = ".3f") -> str:
        v = m.get(key)
        return "-" if v is None else format(v, spec)

    pw, pr = m.get("student_p_wait_wrong"), m.get("student_p_wait_right")
    ratio = "-" if pw is None or pr is None else f"{pw / max(pr, 1e-12):.1f}"
    rows = [
        ("student accuracy, sampled", "35-65%", pct("student_sampled")),
        ("student accuracy, greedy", "(reported)", pct("student_greedy")),
    ]
    for k, v in m.get("student_by_k", {}).items():
        rows.append((f"  student sampled, K = {k}", f"K={K_MIN} >= K={K_MAX} + 15 pts",
                     f"{v:.1%}"))
    rows += [
        ("student P(wait | wrong line), forced", "0.10-0.30", num("student_p_wait_wrong")),
        ("student P(wait | right line), forced", "<= 0.01", num("student_p_wait_right", ".4f")),
        ("  ratio wrong / right", ">= 10", ratio),
        ("own wrong lines followed by wait", "8-35%", pct("own_wrong_then_marker")),
        ("completions with a marker", "3-25%", pct("completions_with_marker")),
        ("redo after a sampled wait right", ">= 85%", pct("redo_right")),
        ("student with the privileged prompt, sampled", ">= 80%",
         pct("student_privileged_sampled")),
        ("teacher accuracy, sampled", ">= 95%", pct("teacher_sampled")),
        ("teacher P(wait | student's own wrong line)", ">= 0.9",
         num("teacher_p_wait_after_own_wrong")),
        ("AUROC, raw weight for incorrect rollouts", ">= 0.85", num("raw_weight_auroc_incorrect")),
    ]
    means = m.get("raw_weight_mean", {})
    for kind in ("correct", "recovered", "incorrect"):
        if kind in means:
            rows.append((f"  mean raw weight, {kind} rollouts", "(reported)", f"{means[kind]:.3f}"))
    return rows
