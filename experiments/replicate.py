"""The toy replication of the paper's comparisons (arXiv 2606.23104), pre-registered.

    python experiments/replicate.py [--worlds reflect chain addition] [--jobs 2]
                                    [--out runs/replication] [--docs docs]

Everything below is fixed before the first run; the script's constants say the same and
``tests/test_replicate.py`` checks them. A rerun after a stop reuses finished runs and continues
unfinished ones; a world whose runs are all recorded for this code is not even built.

Worlds, in run order (replicate-major inside each world, so a run cut short has complete
replicates of the first world):

    reflect   the chain task with a student that already reflects sometimes and can tell
              when (``toy-reflect:*``; ``wait`` is one token). The world of the primary tests.
    chain     the chain world (``toy-chain:*``; ``wait`` is four tokens; the student never
              reflects)
    addition  the addition world (``toy:*``; every error a dropped carry)

Every run is the real CLI (``renio run``) with the faithful loop of ``sample_configs/toy-*.yaml``
at token clip 0: 64 iterations, each one AdamW step on a fresh batch of 32 prompts x 1 sample,
one linear schedule over the run. The reflect and chain worlds sample up to 128 new tokens
(their own setting), in rollouts and evaluations. Conditions:

    opd                 plain OPD (every sample weighs 1)                toy-opd.yaml
    opd-renio           OPD + ReNIO weights                              toy-opd-renio.yaml
    opsd                plain OPSD (teacher: the student + privileged)   toy-opsd.yaml
    opsd-renio          OPSD + ReNIO weights                             toy-opsd-renio.yaml
    opd-correct-only    OPD on correct samples only, equal rows/steps    weight.filter=correct
    opd-incorrect-only  OPD on incorrect samples only, equal rows/steps  weight.filter=incorrect
    opd-renio-tem4      opd-renio with weight.tem 4 (secondary ablation) weight.tem=4

The reflect world runs all seven; chain and addition the first four. The filtered runs use
``fill_filtered``: each iteration samples further prompts until it has 32 rows of the kept
kind, so every condition takes 64 steps of 32 rows.

Common random numbers: inside replicate r every condition of every world gets the same run
seed ``run_seed(r)``, so within a world they share the base evaluation, the first rollouts
and the evaluation seeds. No seed that one replicate derives inside ``renio run`` is one of
another replicate's (``derived_seeds``). The base student is evaluated once per (world,
replicate): by the world's first condition (``opd``, ``eval_before=true``); the others run
with ``eval_before=false`` and use that evaluation.

Replicates 0-9, fixed; no replicate is added after looking. Evaluation: every test prompt
(256 in each world), 4 samples each at T 1.1 (avg@4 and its standard error), after
iterations 16, 32, 48 and 64.

Primary outcomes (reflect world, final evaluation), paired by replicate, ``PRIMARY``:

    (a)      accuracy, opd-incorrect-only minus opd-correct-only
    (b)      share of completions with a reflection marker (a line that is exactly ``wait``,
             ``reflect.analyse``), opd-incorrect-only minus opd-correct-only
    (c-opd)  accuracy, opd-renio minus opd
    (c-opsd) accuracy, opsd-renio minus opsd

Each is a paired two-sided t test (``scipy.stats.ttest_rel``) with a 95% confidence interval
(``scipy.stats.t.ppf``); Holm's correction over these four at 0.05. A test whose differences
are all zero (zero mean, zero variance: both conditions at the same constant, as both at zero)
is "not measurable (floor)" and counts in Holm's family with p = 1. Verdict: significant after
Holm -> which condition is better; otherwise "no benefit" where the interval's upper end is
below +1.5 points (``MARGIN``), else "inconclusive". Ceiling: an accuracy test that is not
significant and whose baseline's mean accuracy is above 100% - 1.5 points leaves no room for a
benefit of the margin's size, so it is "not measurable (ceiling)", not "no benefit"; its p
stays in Holm's family. A world with fewer than 10 complete
replicates (every condition of the world finished) is reported as "incomplete: N of 10
replicates" with no verdict.

Secondary, labelled so and not corrected: completion length; accuracy by chain length K;
the final students' P(``wait`` | wrong line) and P(``wait`` | right line) by teacher forcing
(``reflect.teacher_forced_marker`` with a fixed rng in the reflect world; the four-token
measurement of ``chain.marker_prefixes`` in the chain world); the reflection rate of the
rollouts over training (the share of sampled rows, fill rounds included, whose completion
carries the marker, per iteration); the tem-4 ablation; the same paired tests in the chain and
addition worlds; the accuracy tests (a), (c-opd) and (c-opsd) at the first evaluation
(iteration 16), ``early_tests``.

Added after the first attempt, before any run at the code that is reported: the ceiling rule
and the iteration-16 tests. That attempt (stopped by a bug after 23 of the reflect world's runs;
no test was computed) showed the students of every condition it ran at 97-100% accuracy by
iteration 64, so a final-accuracy test may sit at the ceiling, where "no benefit" would be
read as a null. Neither changes a run or the primary family. What ReNIO does to the batch, per ReNIO run: the share of the loss weight on
incorrect rows and on recovered rows (a wrong line, ``wait``, the right redo, and a correct
answer), the effective batch size (sum w)^2 / sum w^2 per iteration, averaged; and the
accuracy that mixing plain OPD and incorrect-only at that share would give,
``acc(opd) + (s - f0) / (1 - f0) * (acc(incorrect-only) - acc(opd))`` with ``f0`` the
incorrect share of plain OPD's rows, against ReNIO's own.

Provenance: each run directory carries ``.replicate-stamp.json`` (its config file's text, its
overrides, its seed, the digest of ``renio_core`` and ``renio_cli``, and the git commit); a
finished run is reused only when all but the commit match, and a directory made otherwise is
refused unless ``--rerun-stale``. The child ``renio run`` imports renio from this script's
checkout (``PYTHONPATH``). ``results.json`` and the report name the commit ("+dirty" when
``renio_core`` or ``renio_cli`` differ from it) and the digest.

Records: when a run has finished, its collected numbers (and its stamp) are written to
``experiments/records/<world>/<condition>/rep<k>.json.gz`` (``--records``), which are committed
to git: a run directory is 18 MB and lives on one machine, a record a few tens of KB. A run
whose record matches its stamp is not run again, so the experiment continues on another
machine or in another session from where it stopped, at the same code (check out the commit
the records name, as a worktree, and run from there). The code may change meanwhile:
``--verify`` remakes, at the current code, each condition's lowest recorded replicate made by
other code, and where every collected number is equal to the last bit (wall time aside) that
code's records of that world count for the current code (``RECORDS/verified.json``; the report
names every commit the numbers come from). Where one differs, those records stay apart and
their runs are made again.

Results: ``DOCS/replication.md`` and its plots, raw numbers in ``OUT/results.json``.
``--trial`` runs the same machinery for 2 iterations on a few prompts (a check of the
script, never the experiment; it needs its own --out and --docs).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
# renio is imported from this checkout (a frozen worktree when the experiment runs), never
# from wherever the virtual environment's editable install points.
sys.path.insert(0, str(ROOT))

N_REPLICATES = 10
REPLICATES = tuple(range(N_REPLICATES))
ITERATIONS = 64
EVAL_EVERY = 16
EVAL_N = 4
EVAL_LIMIT = 256  # every test prompt: each world's test split has 256
LONG_MAX_NEW = 128  # the chain and reflect worlds' own max_new_tokens
ALPHA = 0.05
CONFIDENCE = 0.95
MARGIN = 0.015  # +1.5 points: the largest benefit "no benefit" may leave inside its interval
MARKER_RNG = "replicate-marker-probability"

CONDITIONS = {
    "opd": ("toy-opd.yaml", []),
    "opd-renio": ("toy-opd-renio.yaml", []),
    "opsd": ("toy-opsd.yaml", []),
    "opsd-renio": ("toy-opsd-renio.yaml", []),
    "opd-correct-only": ("toy-opd.yaml", ["weight.filter=correct", "fill_filtered=true"]),
    "opd-incorrect-only": ("toy-opd.yaml", ["weight.filter=incorrect", "fill_filtered=true"]),
    "opd-renio-tem4": ("toy-opd-renio.yaml", ["weight.tem=4"]),
}
MAIN = ("opd", "opd-renio", "opsd", "opsd-renio")
RENIO_RUNS = ("opd-renio", "opsd-renio", "opd-renio-tem4")
MIXED = ("opd-renio", "opd-renio-tem4")  # OPD runs: plain OPD and incorrect-only bracket them
BASE_CONDITION = "opd"  # the first condition of every world: it evaluates the base student
COMMON = [f"iterations={ITERATIONS}", f"eval_every={EVAL_EVERY}", f"eval.n={EVAL_N}",
          f"eval.limit={EVAL_LIMIT}", "train.token_clip=0.0"]
LONG = [f"rollout.max_new_tokens={LONG_MAX_NEW}", f"eval.max_new_tokens={LONG_MAX_NEW}"]
WORLDS = {  # in run order
    "reflect": {"prefix": "toy-reflect", "extra": LONG, "conditions": tuple(CONDITIONS)},
    "chain": {"prefix": "toy-chain", "extra": LONG, "conditions": MAIN},
    "addition": {"prefix": "toy", "extra": [], "conditions": MAIN},
}
# A check of the machinery, never the experiment: later keys override COMMON's.
TRIAL = ["iterations=2", "eval_every=1", "eval.limit=16", "prompts_per_iteration=16"]

PRIMARY_WORLD = "reflect"
# (key, metric, baseline, treatment, what a positive difference means, a negative one)
PRIMARY = (
    ("a", "acc", "opd-correct-only", "opd-incorrect-only",
     "incorrect-only is better", "correct-only is better"),
    ("b", "marker_share", "opd-correct-only", "opd-incorrect-only",
     "incorrect-only reflects more", "correct-only reflects more"),
    ("c-opd", "acc", "opd", "opd-renio", "ReNIO is better", "plain OPD is better"),
    ("c-opsd", "acc", "opsd", "opsd-renio", "ReNIO is better", "plain OPSD is better"),
)
# Secondary paired tests, uncorrected: (worlds, metric, baseline, treatment, positive,
# negative, margin or None). The old worlds get the accuracy tests (c); in the reflect world
# they are primary and not repeated here.
OLD_WORLDS = ("chain", "addition")
SECONDARY = (
    (OLD_WORLDS, "acc", "opd", "opd-renio", "ReNIO is better", "plain OPD is better", MARGIN),
    (OLD_WORLDS, "acc", "opsd", "opsd-renio", "ReNIO is better", "plain OPSD is better", MARGIN),
    (tuple(WORLDS), "marker_share", "opd", "opd-renio", "more reflection with ReNIO",
     "less reflection with ReNIO", None),
    (("reflect",), "acc", "opd-renio", "opd-renio-tem4", "tem 4 is better", "tem 1 is better",
     None),
    (("reflect",), "length", "opd-correct-only", "opd-incorrect-only",
     "longer after incorrect-only", "longer after correct-only", None),
    (("reflect",), "p_wait_wrong", "opd-correct-only", "opd-incorrect-only",
     "higher after incorrect-only", "higher after correct-only", None),
)
METRIC_NAMES = {"acc": "accuracy", "marker_share": "completions with a marker",
                "length": "mean completion length (tokens)",
                "p_wait_wrong": "P(wait \\| wrong line)"}
POINTS = ("acc", "marker_share")  # metrics shown in percentage points

# renio run derives, from its seed s: rollout seeds s * 100003 + it, train seeds the same,
# eval seed s + 7919 (renio_core/run/loop.py). A stride larger than 7919 + iterations
# keeps different replicates' ranges apart (tests/test_replicate.py checks it, modulo 2**32
# where a generator truncates).
SEED_STRIDE = 10_000
STAMP = ".replicate-stamp.json"  # hidden: renio run refuses a run_dir holding other files
# A finished run's numbers, kept in git so that the experiment outlives a machine: a run
# directory is 18 MB, its record a few tens of KB. A run with a matching record is not rerun.
RECORDS = ROOT / "experiments" / "records"
NOT_COMPARED = ("commit",)  # recorded in the stamp, not part of the reuse rule


# ----------------------------------------------------------------------------- design


def run_seed(replicate: int) -> int:
    """The ``seed`` of every ``renio run`` of one replicate (all conditions, all worlds)."""
    if replicate < 0:
        raise ValueError(f"replicate must be >= 0, got {replicate}")
    return (replicate + 1) * SEED_STRIDE


def derived_seeds(seed: int, iterations: int) -> set[tuple[str, int]]:
    """The seeds ``renio run`` derives from ``seed``, as the generators see them: rollout rows
    (training and evaluation) hash the full seed (``formulas.sampling.row_seed``); torch's and
    numpy's generators keep only its low 32 bits."""
    out = {("rollout", seed + 7919), ("torch", (seed + 7919) % 2**32)}
    for it in range(iterations):
        out.add(("rollout", seed * 100003 + it))
        out.add(("torch", (seed * 100003 + it) % 2**32))
    return out


def world_conditions(world: str, only: list[str] | None = None) -> tuple[str, ...]:
    names = WORLDS[world]["conditions"]
    return tuple(n for n in names if only is None or n in only)


def world_files(world: str, files: Path | None) -> dict[str, str]:
    """The models and prompt sets of a world: its cached ``prefix:*`` names, or the files of a
    world built into ``files`` (``--world-dir``, for trials on a quick build)."""
    if files is not None:
        return {"student": str(files / "student"), "teacher": str(files / "teacher"),
                "tokenizer": str(files / "tokenizer"), "prompts": str(files / "train.jsonl"),
                "eval_prompts": str(files / "test.jsonl")}
    p = WORLDS[world]["prefix"]
    return {"student": f"{p}:student", "teacher": f"{p}:teacher", "tokenizer": f"{p}:tokenizer",
            "prompts": f"{p}:train", "eval_prompts": f"{p}:test"}


def run_overrides(world: str, name: str, *, files: Path | None = None,
                  trial: bool = False) -> list[str]:
    """The ``key=value`` overrides of one run (besides run_dir and seed)."""
    config, extra = CONDITIONS[name]
    f = world_files(world, files)
    keys = ["student", "prompts", "eval_prompts"]
    if "opsd" not in config:  # OPSD's teacher is the student itself (teacher: self)
        keys.insert(1, "teacher")
    models = [] if world == "addition" and files is None else [f"{k}={f[k]}" for k in keys]
    eval_before = "true" if name == BASE_CONDITION else "false"
    return [*models, *COMMON, *WORLDS[world]["extra"], f"eval_before={eval_before}", *extra,
            *(TRIAL if trial else [])]


def run_dir_of(out: Path, world: str, name: str, replicate: int) -> Path:
    return out / world / name / f"rep{replicate}"


def record_path(records: Path, world: str, name: str, replicate: int) -> Path:
    return records / world / name / f"rep{replicate}.json.gz"


def write_record(path: Path, stamp: dict, run: dict, base: dict | None) -> None:
    """A finished run's stamp and collected numbers (and, for the base condition, the base
    evaluation), gzipped JSON; written to a temporary file and renamed, so a record is whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"stamp": stamp, "run": run, "base": base}, sort_keys=True).encode()
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    # mtime=0: the same numbers give the same bytes, so a rewrite is not a change in git.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(data)
    os.replace(tmp, path)


def load_record(path: Path) -> dict:
    return json.loads(gzip.decompress(path.read_bytes()))


def read_record(path: Path, stamp: dict) -> dict | None:
    """The record at ``path`` if it was made with ``stamp`` (the commit aside), else None. A
    record made by other code counts where the current code was shown to reproduce that
    code's records (``verified_digests``)."""
    if not path.is_file():
        return None
    record = load_record(path)
    found = record["stamp"]
    if found.get("code_digest") in verified_digests(path.parents[2], stamp["code_digest"],
                                                    stamp["world"]):
        found = {**found, "code_digest": stamp["code_digest"]}
    return None if stamp_differences(found, stamp) else record


# ----------------------------------------------------------------------------- verification
#
# The code goes on changing while the experiment runs over several sessions. Runs are
# deterministic, so a record made by older code stands for the current code once the current
# code has remade some of them exactly (``--verify``): one replicate of every condition of a
# world, every collected number equal (wall times aside). Each such check is an entry of
# ``RECORDS/verified.json``: {"world", "digest": new, "same_as": old, "commit", "runs"}; a
# check holds for the world whose runs it remade.
VERIFIED = "verified.json"
NOT_REPRODUCED = ("seconds",)  # wall time: the only collected number a rerun may change


def verified_digests(records: Path, digest: str, world: str) -> set[str]:
    """``digest`` and every digest whose records of ``world`` it reproduces, directly or
    through a chain of checks (new reproduces old, old reproduced older)."""
    path = records / VERIFIED
    entries = json.loads(path.read_text()) if path.is_file() else []
    found, todo = {digest}, [digest]
    while todo:
        d = todo.pop()
        for e in entries:
            if e["world"] == world and e["digest"] == d and e["same_as"] not in found:
                found.add(e["same_as"])
                todo.append(e["same_as"])
    return found


def reproduction_differences(recorded: dict, remade: dict, where: str = "") -> list[str]:
    """Every collected number that differs between a record and a rerun (paths as
    ``a.b[3]``), wall times aside; floats must be equal to the last bit."""
    if isinstance(recorded, dict) and isinstance(remade, dict):
        out = []
        for k in sorted(set(recorded) | set(remade)):
            if k in NOT_REPRODUCED:
                continue
            sub = f"{where}.{k}" if where else str(k)
            if k not in recorded or k not in remade:
                out.append(f"{sub}: only in the {'rerun' if k in remade else 'record'}")
            else:
                out.extend(reproduction_differences(recorded[k], remade[k], sub))
        return out
    if isinstance(recorded, list) and isinstance(remade, list):
        if len(recorded) != len(remade):
            return [f"{where}: {len(recorded)} values recorded, {len(remade)} remade"]
        return [d for i, (a, b) in enumerate(zip(recorded, remade))
                for d in reproduction_differences(a, b, f"{where}[{i}]")]
    # Compared as JSON gives them (a record went through JSON; NaN equals NaN).
    a, b = json.loads(json.dumps(recorded)), json.loads(json.dumps(remade))
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a)
                      and math.isnan(b))
    return [] if same else [f"{where}: recorded {a!r}, remade {b!r}"]


def verification_plan(records: Path, world: str, digest: str) -> dict[str, list]:
    """{old digest: [(world, condition, replicate), ...]} for the records of ``world`` made by
    code not yet shown equivalent to ``digest``: each condition's lowest recorded replicate."""
    accepted = verified_digests(records, digest, world)
    lowest: dict[str, dict[str, int]] = {}
    for path in sorted((records / world).glob("*/rep*.json.gz")):
        stamp = load_record(path)["stamp"]
        d = stamp["code_digest"]
        if d in accepted:
            continue
        by_cond = lowest.setdefault(d, {})
        name, rep = stamp["condition"], stamp["replicate"]
        by_cond[name] = min(rep, by_cond.get(name, rep))
    return {d: [(world, n, r) for n, r in sorted(c.items())] for d, c in lowest.items()}


def verify_run(task: tuple[str, str, int], old: str, scratch: Path, records: Path, digest: str,
               commit: str, threads: int) -> tuple[str, float]:
    """Remake one recorded run at the current code in ``scratch``; RuntimeError listing the
    differences unless every collected number equals the record's."""
    world, name, rep = task
    record = load_record(record_path(records, world, name, rep))
    if record["stamp"]["code_digest"] != old:
        raise RuntimeError(f"{task}: its record is not from code {old}")
    status, seconds = run_one(task, scratch, digest, commit, files={}, trial=False,
                              rerun_stale=True, threads=threads)
    remade = collect_numbers(run_dir_of(scratch, world, name, rep), world, name, None)
    diffs = reproduction_differences({"run": record["run"], "base": record["base"]}, remade)
    if diffs:
        raise RuntimeError(f"{world}/{name} replicate {rep} is not reproduced by code {digest}: "
                           + "; ".join(diffs[:5]) + (f" (and {len(diffs) - 5} more)"
                                                     if len(diffs) > 5 else ""))
    return status, seconds


def add_verified(records: Path, world: str, digest: str, same_as: str, commit: str,
                 runs: list[tuple[str, str, int]]) -> None:
    path = records / VERIFIED
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries.append({"world": world, "digest": digest, "same_as": same_as, "commit": commit,
                    "runs": [list(r) for r in runs]})
    path.write_text(json.dumps(entries, indent=2) + "\n")


def code_digest(root: Path | None = None) -> str:
    """Digest of the code that decides a run's outcome: renio_core and renio_cli. The run's
    config file is in its stamp as text, so another YAML file leaves every run current."""
    root = root or ROOT
    h = hashlib.sha256()
    for sub in ("renio_core", "renio_cli"):
        for path in sorted((root / sub).rglob("*")):
            if path.suffix in (".py", ".yaml", ".jinja") and path.is_file():
                h.update(str(path.relative_to(root)).encode() + b"\0")
                h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_commit(root: Path | None = None) -> str:
    """The checkout's commit, "+dirty" when renio_core or renio_cli differ from it (untracked
    files included); "unknown" outside git."""
    root = root or ROOT
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                 "renio_core", "renio_cli"], check=True, capture_output=True,
                                text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if status else "")


def run_stamp(world: str, name: str, replicate: int, digest: str, commit: str, *,
              files: Path | None = None, trial: bool = False) -> dict:
    """What a run directory must have been made with to be reused."""
    config, _ = CONDITIONS[name]
    return {"world": world, "condition": name, "replicate": replicate,
            "seed": run_seed(replicate), "config_file": config,
            "config_text": (ROOT / "sample_configs" / config).read_text(),
            "overrides": run_overrides(world, name, files=files, trial=trial),
            "code_digest": digest, "commit": commit}


class StaleRun(Exception):
    """A run directory made with another config or code version."""


def stamp_differences(found: dict, wanted: dict) -> list[str]:
    keys = sorted((set(found) | set(wanted)) - set(NOT_COMPARED))
    return [f"{key}: on disk {found.get(key)!r}, now {wanted.get(key)!r}"
            for key in keys if found.get(key) != wanted.get(key)]


def run_state(run_dir: Path, stamp: dict, record: Path | None = None) -> tuple[str, list[str]]:
    """("absent" | "recorded" | "finished" | "unfinished" | "stale", the differences of a stale
    one). "recorded": a record made with ``stamp`` exists at ``record``, whatever the run
    directory holds (it may be gone, on another machine)."""
    if record is not None and read_record(record, stamp) is not None:
        return "recorded", []
    if not run_dir.exists():
        return "absent", []
    stamp_path = run_dir / STAMP
    if stamp_path.is_file():
        problems = stamp_differences(json.loads(stamp_path.read_text()), stamp)
    else:
        problems = [f"no {STAMP} (made by an older replicate.py or another tool)"]
    if problems:
        return "stale", problems
    finished = (run_dir / "eval-final.json").is_file() and (run_dir / "metrics.jsonl").is_file()
    return ("finished" if finished else "unfinished"), []


def reuse_decision(run_dir: Path, stamp: dict, *, rerun_stale: bool = False,
                   record: Path | None = None) -> str:
    """"reuse" (finished or recorded, same stamp), "run" (absent, or unfinished with the same
    stamp: renio run resumes it), or raise StaleRun naming the difference; with
    ``rerun_stale`` a stale directory is deleted and "run" returned."""
    state, problems = run_state(run_dir, stamp, record)
    if state == "stale":
        if not rerun_stale:
            raise StaleRun(f"{run_dir} was made differently ({'; '.join(problems)}); "
                           "delete it or pass --rerun-stale")
        shutil.rmtree(run_dir)
        return "run"
    return "reuse" if state in ("finished", "recorded") else "run"


class BuildLog:
    """A world build's progress as plain lines (start and end of each phase), so that a log
    shows why nothing else happens for minutes. Called only when the world is built."""

    def __init__(self, world: str):
        self.world, self.t0 = world, time.perf_counter()

    def __call__(self, what: str, done: int, total: int) -> None:
        if done in (1, total):
            state = "started" if done == 1 and total > 1 else "done"
            steps = f"{total} step{'s' if total > 1 else ''}"
            print(f"building the {self.world} world: {what} ({steps}) {state}; "
                  f"{(time.perf_counter() - self.t0) / 60:.1f} min", flush=True)


def all_recorded(records: Path, world: str, replicates: list[int], digest: str,
                 commit: str) -> bool:
    """Whether every run of ``world`` has a record that counts for this code."""
    return all(read_record(record_path(records, *task), run_stamp(*task, digest, commit))
               is not None for task in plan([world], replicates))


def plan(worlds: list[str], replicates: list[int], only: list[str] | None = None
         ) -> list[tuple[str, str, int]]:
    """(world, condition, replicate) in run order: world by world in WORLDS' order, replicate
    by replicate, the base condition first."""
    return [(w, name, rep) for w in WORLDS if w in worlds for rep in replicates
            for name in world_conditions(w, only)]


# ----------------------------------------------------------------------------- running


def child_env(threads: int) -> dict[str, str]:
    """The child's environment: renio from ROOT first, and its thread counts."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                        if p)
    return env


def run_one(task: tuple[str, str, int], out: Path, digest: str, commit: str, *,
            files: dict[str, Path], trial: bool, rerun_stale: bool, threads: int,
            records: Path | None = None) -> tuple[str, float]:
    """("reused" | "ran", seconds); raises RuntimeError naming the run when it fails."""
    world, name, replicate = task
    config, _ = CONDITIONS[name]
    run_dir = run_dir_of(out, world, name, replicate)
    stamp = run_stamp(world, name, replicate, digest, commit, files=files.get(world),
                      trial=trial)
    try:
        record = record_path(records, world, name, replicate) if records else None
        if reuse_decision(run_dir, stamp, rerun_stale=rerun_stale, record=record) == "reuse":
            if record is not None and read_record(record, stamp) is None:
                record_run(record, stamp, run_dir, files.get(world))  # finished, not recorded
            return "reused", 0.0
    except StaleRun as exc:
        raise RuntimeError(str(exc)) from None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    cmd = [sys.executable, "-m", "renio_cli.main", "run", "--config",
           str(ROOT / "sample_configs" / config), f"run_dir={run_dir}",
           f"seed={stamp['seed']}", *stamp["overrides"]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=child_env(threads))
    (run_dir / ".replicate-log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{world}/{name} replicate {replicate} (seed {stamp['seed']}) "
                           f"failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    seconds = time.perf_counter() - t0
    if record is not None:  # at once, so that a session that ends mid-experiment keeps it
        record_run(record, stamp, run_dir, files.get(world))
    return "ran", seconds


# Collecting loads models; two runner threads doing it at once in one process is not safe.
_COLLECT_LOCK = threading.Lock()


def collect_numbers(run_dir: Path, world: str, name: str, files: Path | None) -> dict:
    """A finished run's numbers as a record holds them ({"run", "base"}), one run at a time."""
    with _COLLECT_LOCK:
        return {"run": collect_run(run_dir, world, files),
                "base": collect_base(run_dir, world, files) if name == BASE_CONDITION else None}


def record_run(record: Path, stamp: dict, run_dir: Path, files: Path | None) -> None:
    """Write a finished run's record; a failure is a RuntimeError naming the run, so that the
    other runs go on and the next invocation tries again."""
    try:
        numbers = collect_numbers(run_dir, stamp["world"], stamp["condition"], files)
        write_record(record, stamp, numbers["run"], numbers["base"])
    except Exception as exc:  # noqa: BLE001 - reported with the run's name, the rest go on
        raise RuntimeError(f"{run_dir}: finished, but its record could not be written: "
                           f"{type(exc).__name__}: {exc}") from exc


class Progress:
    """One plain line per finished run: elapsed time and an estimate of the time left."""

    def __init__(self, total: int, jobs: int):
        self.total, self.jobs, self.done, self.ran = total, jobs, 0, []
        self.t0 = time.perf_counter()
        self.lock = threading.Lock()

    def line(self, task: tuple[str, str, int], status: str, seconds: float) -> str:
        with self.lock:
            self.done += 1
            if status == "ran":
                self.ran.append(seconds)
            elapsed = time.perf_counter() - self.t0
            left = self.total - self.done
            if self.ran:
                eta = f"about {left * float(np.mean(self.ran)) / self.jobs / 60:.0f} min left"
            else:
                eta = "no estimate yet"
            what = f"{seconds:5.0f} s" if status == "ran" else status
            return (f"[{self.done:3d}/{self.total}] {task[0]:>8} {task[1]:>18} rep {task[2]}: "
                    f"{what}; elapsed {elapsed / 60:.1f} min, {eta}")


def run_all(tasks: list[tuple[str, str, int]], jobs: int, runner) -> list[str]:
    """Run ``tasks`` ``jobs`` at a time in their order; a failure is printed and the others
    go on. Returns the failures' messages."""
    progress = Progress(len(tasks), jobs)
    failures = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(runner, t): t for t in tasks}
        for fut in as_completed(futures):
            task = futures[fut]
            try:
                status, seconds = fut.result()
            except Exception as exc:  # noqa: BLE001 - one run's failure must not stop the log
                failures.append(f"{task}: {type(exc).__name__}: {exc}"
                                if not isinstance(exc, RuntimeError) else str(exc))
                print(f"FAILED {exc}", flush=True)
                status, seconds = "failed", 0.0
            print(progress.line(task, status, seconds), flush=True)
    return failures


# ----------------------------------------------------------------------------- collecting


def chain_length(problem: str) -> int:
    """K of a chain problem such as ``7+5*3+9``: its number of operations."""
    return problem.count("+") + problem.count("*")


def parse_chain(problem: str):
    """``7+5*3+9`` -> the chain world's ChainProblem (start 7, ops +5, *3, +9)."""
    from renio_core.modeling.toy.chain import ChainProblem

    ops = tuple((problem[i], int(problem[i + 1])) for i in range(1, len(problem), 2))
    return ChainProblem(int(problem[0]), ops)


def has_marker(world: str, text: str) -> bool:
    """Whether a completion reflects: a line that is exactly ``wait`` in the chain and
    reflect worlds (``reflect.analyse``), any reflection word in the addition world."""
    if world in ("reflect", "chain"):
        from renio_core.modeling.toy import reflect

        return reflect.analyse(text).markers > 0
    from renio_core.formulas import eval_metrics

    counts = eval_metrics.count_markers(text)
    return sum(counts[m] for m in eval_metrics.REFLECTION_MARKERS) > 0


def is_recovered(text: str, correct: bool | None) -> bool:
    """A wrong line, ``wait``, the right redo, and a correct answer."""
    from renio_core.modeling.toy import reflect

    return bool(correct) and reflect.analyse(text).redos_right > 0


def eval_behaviour(eval_dir: Path, world: str) -> dict:
    """Accuracy (avg@n and its s.e.), completion length, the share of completions with a
    marker, and for the chain-task worlds the accuracy by K, of one evaluation."""
    summary = json.loads((eval_dir / "eval.json").read_text())
    m = summary["metrics"]
    rows = pq.read_table(eval_dir / "eval.parquet",
                         columns=["prompt_id", "correct", "completion_text"]).to_pylist()
    bench = [json.loads(line) for line in Path(summary["bench"]).read_text().splitlines()]
    out = {"acc": m["avg_at_n"], "acc_se": m.get("avg_at_n_se"),
           "length": m["all"]["mean_length"],
           "marker_share": float(np.mean([has_marker(world, r["completion_text"] or "")
                                          for r in rows])),
           "problems": len({r["prompt_id"] for r in rows}), "by_k": {}}
    if world in ("reflect", "chain"):
        ks = {item["id"]: chain_length(item["problem"]) for item in bench}
        by_k: dict[int, list[bool]] = {}
        for r in rows:
            by_k.setdefault(ks[r["prompt_id"]], []).append(bool(r["correct"]))
        out["by_k"] = {str(k): float(np.mean(v)) for k, v in sorted(by_k.items())}
    return out


def marker_probabilities(world: str, bench: Path, adapter: Path | None,
                         files: Path | None) -> dict[str, float]:
    """The student's P(``wait``) right after an injected wrong line and after a right line by
    teacher forcing, one step per test problem chosen by a fixed rng, with ``adapter`` on it
    or without. Reflect world: ``wait`` is one token. Chain world: P of all four tokens, and of
    the first (``w``)."""
    import torch

    from renio_core.modeling import models
    from renio_core.modeling.toy import chain, reflect

    torch.set_num_threads(1)
    names = world_files(world, files)
    tok = models.load_tokenizer(names["tokenizer"])
    model = models.load_model(names["student"], adapter=str(adapter) if adapter else None,
                              dtype="float32", device="cpu")
    problems = [parse_chain(json.loads(line)["problem"]) for line in bench.read_text().splitlines()]
    if world == "reflect":
        wrong, right = reflect.teacher_forced_marker(model, tok, problems, random.Random(MARKER_RNG))
        return {"p_wait_wrong": float(np.mean(wrong)), "p_wait_right": float(np.mean(right))}
    out = {}
    for name, prefixes in zip(("wrong", "right"),
                              chain.marker_prefixes(tok, problems, random.Random(MARKER_RNG))):
        steps = chain.marker_logprobs(model, tok, prefixes)
        out[f"p_w_{name}"] = float(np.mean([math.exp(lp[0]) for lp in steps]))
        out[f"p_wait_{name}"] = float(np.mean([math.exp(sum(lp)) for lp in steps]))
    return out


def batch_stats(weight_B: np.ndarray, incorrect_B: np.ndarray, recovered_B: np.ndarray,
                graded_B: np.ndarray) -> dict:
    """One iteration's weights: their sums on incorrect, recovered and graded rows, and the
    effective batch size (sum w)^2 / sum w^2."""
    w = weight_B.astype(np.float64)
    return {"incorrect": float(w[incorrect_B].sum()), "recovered": float(w[recovered_B].sum()),
            "graded": float(w[graded_B].sum()), "rows_incorrect": int(incorrect_B.sum()),
            "rows_graded": int(graded_B.sum()),
            "ess": float(w.sum() ** 2 / (w ** 2).sum()) if (w ** 2).sum() > 0 else 0.0}


def pool_batches(iters: list[dict]) -> dict:
    """A run's weight shares, pooled over its iterations, and its mean effective batch size."""
    graded = sum(b["graded"] for b in iters)
    rows = sum(b["rows_graded"] for b in iters)
    return {"share_incorrect": sum(b["incorrect"] for b in iters) / graded if graded else None,
            "share_recovered": sum(b["recovered"] for b in iters) / graded if graded else None,
            "rows_incorrect": sum(b["rows_incorrect"] for b in iters) / rows if rows else None,
            "ess": float(np.mean([b["ess"] for b in iters])) if iters else None}


def collect_run(run_dir: Path, world: str, files: Path | None, *, markers: bool = True) -> dict:
    """One finished run: accuracy after every evaluation, the final evaluation's behaviour,
    the weights of every trained row by kind, the batch statistics, the rollouts' reflection
    rate per iteration, and the final student's marker probabilities."""
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps, accs, ses, last_eval = [], [], [], None
    raw, weight, kind, iters, reflect_rate = [], [], [], [], []
    for r in records:
        it = run_dir / f"iter-{r['iteration']:05d}"
        if r["eval_accuracy"] is not None:
            steps.append(r["policy_step"])
            accs.append(r["eval_accuracy"])
            ses.append(json.loads((it / "eval.json").read_text())["metrics"].get("avg_at_n_se"))
            last_eval = it
        fill = sorted((it / "fill").glob("rollouts-*.parquet")) if (it / "fill").is_dir() else []
        texts = [x for f in (fill or [it / "rollouts.parquet"])
                 for x in pq.read_table(f, columns=["completion_text"]).column(0).to_pylist()]
        reflect_rate.append(float(np.mean([has_marker(world, x or "") for x in texts])))
        if r.get("fill_kept") == 0:  # no row of the kept kind: no weights, no step
            continue
        t = pq.read_table(it / "weights.parquet",
                          columns=["raw_weight", "weight", "correct", "completion_text"]).to_pydict()
        correct = t["correct"]
        recovered = np.array([is_recovered(x or "", c) for x, c in zip(t["completion_text"], correct)])
        incorrect = np.array([c is False for c in correct])
        graded = np.array([c is not None for c in correct])
        iters.append(batch_stats(np.array(t["weight"]), incorrect, recovered, graded))
        raw.extend(t["raw_weight"])
        weight.extend(t["weight"])
        kind.extend("recovered" if rec else ("incorrect" if bad else ("correct" if g else "ungraded"))
                    for rec, bad, g in zip(recovered, incorrect, graded))
    final = eval_behaviour(last_eval, world)
    if markers and world in ("reflect", "chain"):
        bench = Path(json.loads((last_eval / "eval.json").read_text())["bench"])
        # The student the run ends with: the newest iteration that trained.
        trained = [r for r in records if r.get("fill_kept") != 0]
        ckpt = run_dir / f"iter-{trained[-1]['iteration']:05d}" / "ckpt" if trained else None
        final.update(marker_probabilities(world, bench, ckpt, files))
    sampled = sum(r.get("fill_sampled") or 0 for r in records)
    kept = sum(r.get("fill_kept") or 0 for r in records)
    return {"steps": steps, "acc": accs, "acc_se": ses, "final": final,
            "raw": raw, "weight": weight, "kind": kind, "batch": pool_batches(iters),
            "rollout_reflection": reflect_rate,
            "rollout_acc": [r["rollout_accuracy"] for r in records],
            "sampled_per_kept": sampled / kept if kept else 1.0,
            "seconds": sum(r["seconds"] for r in records)}


def collect_base(run_dir: Path, world: str, files: Path | None, *, markers: bool = True) -> dict:
    base = eval_behaviour(run_dir / "eval-base", world)
    if markers and world in ("reflect", "chain"):
        bench = Path(json.loads((run_dir / "eval-base" / "eval.json").read_text())["bench"])
        base.update(marker_probabilities(world, bench, None, files))
    return base


def collect(out: Path, world: str, conditions: tuple[str, ...], replicates: list[int],
            digest: str, commit: str, *, files: Path | None, trial: bool,
            markers: bool = True, records: Path | None = None) -> dict:
    """A world's complete replicates (every condition finished or recorded with the current
    stamp): ``{"replicates": [...], "base": [...], "runs": {condition: [...]},
    "commits": [...]}``, the lists in the order of ``replicates``. With ``records``, every
    finished run without a record gets one first (complete replicate or not, so that no
    finished run is lost with its machine), and the numbers always come from the records."""
    out_w = {"replicates": [], "base": [], "runs": {n: [] for n in conditions}, "commits": []}
    for rep in replicates:
        got = {}
        for n in conditions:
            stamp = run_stamp(world, n, rep, digest, commit, files=files, trial=trial)
            run_dir = run_dir_of(out, world, n, rep)
            path = record_path(records, world, n, rep) if records else None
            state = run_state(run_dir, stamp, path)[0]
            if state == "recorded":
                got[n] = read_record(path, stamp)
            elif state == "finished":
                run = collect_run(run_dir, world, files, markers=markers)
                base = (collect_base(run_dir, world, files, markers=markers)
                        if n == BASE_CONDITION else None)
                on_disk = json.loads((run_dir / STAMP).read_text())
                if path is not None:
                    write_record(path, on_disk, run, base)
                    got[n] = read_record(path, stamp)
                else:
                    got[n] = {"stamp": on_disk, "run": run, "base": base}
        if len(got) < len(conditions):
            continue
        out_w["replicates"].append(rep)
        out_w["base"].append(got[BASE_CONDITION]["base"])
        for n in conditions:
            out_w["runs"][n].append(got[n]["run"])
            if got[n]["stamp"].get("commit") not in out_w["commits"]:
                out_w["commits"].append(got[n]["stamp"].get("commit"))
    return out_w


# ----------------------------------------------------------------------------- statistics


def paired_test(a: list[float], b: list[float]) -> dict:
    """Paired two-sided t test of b - a over replicates, with its 95% interval (scipy)."""
    from scipy import stats

    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    n = len(diff)
    out = {"n": n, "mean": float(diff.mean()) if n else float("nan"), "sd": float("nan"),
           "se": float("nan"), "t": float("nan"), "df": n - 1, "p": float("nan"),
           "ci": [float("nan"), float("nan")], "floor": False}
    if n < 2:
        return out
    sd = float(diff.std(ddof=1))
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * se
    out.update(sd=sd, se=se, ci=[out["mean"] - half, out["mean"] + half])
    if sd == 0:
        # Every difference equal: none at all is a floor (nothing to measure), a constant
        # non-zero one is as certain as a paired test can be.
        out["floor"] = out["mean"] == 0
        out["t"] = 0.0 if out["floor"] else math.copysign(math.inf, out["mean"])
        out["p"] = float("nan") if out["floor"] else 0.0
        return out
    res = stats.ttest_rel(b, a)
    out.update(t=float(res.statistic), p=float(res.pvalue))
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values; a NaN (a floor) counts as p = 1 in the family."""
    p = [1.0 if math.isnan(x) else x for x in pvalues]
    m = len(p)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: p[j])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def verdict(test: dict, p: float, positive: str, negative: str, margin: float | None,
            ceiling: bool = False) -> str:
    """The pre-registered rule: a floor is "not measurable (floor)"; significant at ALPHA ->
    which is better; else, at the ceiling (``at_ceiling``), "not measurable (ceiling)";
    else "no benefit" where the interval's upper end is below ``margin``, otherwise
    "inconclusive" (without a margin: "no significant difference")."""
    if test["floor"]:
        return "not measurable (floor)"
    if test["n"] < 2 or math.isnan(p):
        return "not tested (fewer than 2 replicates)"
    if p <= ALPHA:
        return positive if test["mean"] > 0 else negative
    if ceiling:
        return "not measurable (ceiling)"
    if margin is None:
        return "no significant difference"
    return "no benefit" if test["ci"][1] < margin else "inconclusive"


def values(world_results: dict, condition: str, metric: str) -> list[float]:
    return [r["final"][metric] for r in world_results["runs"][condition]]


def at_ceiling(metric: str, baseline: list[float]) -> bool:
    """An accuracy whose baseline mean leaves less than MARGIN of room above it."""
    return metric == "acc" and bool(baseline) and float(np.mean(baseline)) > 1 - MARGIN


def early_tests(world_results: dict) -> list[dict]:
    """Secondary: the primary accuracy tests at the first evaluation (iteration EVAL_EVERY),
    uncorrected."""
    tests = []
    runs = world_results["runs"]
    for key, metric, base, treated, pos, neg in PRIMARY:
        if metric != "acc" or base not in runs or treated not in runs:
            continue
        a, b = ([r["acc"][0] for r in runs[n]] for n in (base, treated))
        t = paired_test(a, b)
        tests.append({"key": key, "metric": metric, "baseline": base, "treatment": treated,
                      **t, "verdict": verdict(t, t["p"], pos, neg, MARGIN, at_ceiling(metric, a))})
    return tests


def primary_tests(world_results: dict) -> list[dict]:
    """The four primary tests with Holm-adjusted p-values and verdicts."""
    tests = []
    for key, metric, base, treated, pos, neg in PRIMARY:
        a = values(world_results, base, metric)
        t = paired_test(a, values(world_results, treated, metric))
        tests.append({"key": key, "metric": metric, "baseline": base, "treatment": treated,
                      "positive": pos, "negative": neg, "ceiling": at_ceiling(metric, a), **t})
    for t, adj in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = adj
        t["verdict"] = verdict(t, adj, t["positive"], t["negative"], MARGIN, t["ceiling"])
    return tests


def secondary_tests(world: str, world_results: dict) -> list[dict]:
    tests = []
    runs = world_results["runs"]
    for worlds, metric, base, treated, pos, neg, margin in SECONDARY:
        if world not in worlds or base not in runs or treated not in runs:
            continue
        if metric not in (runs[base][0]["final"] if runs[base] else {}):
            continue
        a = values(world_results, base, metric)
        t = paired_test(a, values(world_results, treated, metric))
        tests.append({"metric": metric, "baseline": base, "treatment": treated, "positive": pos,
                      "negative": neg, **t, "verdict": verdict(t, t["p"], pos, neg, margin,
                                                                at_ceiling(metric, a))})
    return tests


def mixing_prediction(world_results: dict, renio: str) -> dict | None:
    """Per replicate: ReNIO's accuracy and the accuracy of plain OPD mixed with incorrect-only
    at ReNIO's incorrect weight share s, acc(opd) + (s - f0)/(1 - f0) (acc(inc) - acc(opd))."""
    runs = world_results["runs"]
    if not all(n in runs for n in ("opd", "opd-incorrect-only", renio)):
        return None
    pred, obs = [], []
    for opd, inc, ren in zip(runs["opd"], runs["opd-incorrect-only"], runs[renio]):
        s, f0 = ren["batch"]["share_incorrect"], opd["batch"]["share_incorrect"]
        if s is None or f0 is None or f0 >= 1:
            continue
        a0, a1 = opd["final"]["acc"], inc["final"]["acc"]
        pred.append(a0 + (s - f0) / (1 - f0) * (a1 - a0))
        obs.append(ren["final"]["acc"])
    if not pred:
        return None
    return {"predicted": pred, "observed": obs, "test": paired_test(pred, obs)}


def analyse(results: dict, required: int = N_REPLICATES) -> dict:
    """Tests per world; a world with fewer than ``required`` complete replicates gets none."""
    out = {}
    for world, wr in results.items():
        n = len(wr["replicates"])
        entry = {"n": n, "complete": n >= required and n > 0}
        if entry["complete"]:
            if world == PRIMARY_WORLD and all(
                    c in wr["runs"] for _, _, a, b, _, _ in PRIMARY for c in (a, b)):
                entry["primary"] = primary_tests(wr)
                entry["early"] = early_tests(wr)
            entry["secondary"] = secondary_tests(world, wr)
            entry["mixing"] = {r: m for r in MIXED if r in wr["runs"]
                               for m in [mixing_prediction(wr, r)] if m is not None}
        out[world] = entry
    return out


# ----------------------------------------------------------------------------- report


def fmt_value(metric: str, v: float, signed: bool = True) -> str:
    if metric in POINTS:
        return f"{100 * v:+.1f} pts" if signed else f"{v:.1%}"
    if metric == "length":
        return f"{v:+.2f}" if signed else f"{v:.2f}"
    return f"{v:+.2e}" if signed else f"{v:.2e}"


def fmt_p(p: float) -> str:
    return "-" if p is None or math.isnan(p) else (f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}")


def test_row(t: dict) -> str:
    ci = "-" if math.isnan(t["ci"][0]) else (
        f"[{fmt_value(t['metric'], t['ci'][0])}, {fmt_value(t['metric'], t['ci'][1])}]")
    return (f"{METRIC_NAMES[t['metric']]}: {t['treatment']} - {t['baseline']} | "
            f"{fmt_value(t['metric'], t['mean'])} | {ci} | {t['n']} | {fmt_p(t['p'])}")


def mean_se(xs: list[float]) -> tuple[float, float]:
    arr = np.asarray(xs, dtype=float)
    se = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else float("nan")
    return float(arr.mean()), se


def primary_section(analysis: dict, required: int = N_REPLICATES) -> list[str]:
    entry = analysis.get(PRIMARY_WORLD)
    lines = [f"## Primary outcomes ({PRIMARY_WORLD} world)", ""]
    if entry is None or not entry["complete"]:
        n = 0 if entry is None else entry["n"]
        return lines + [f"incomplete: {n} of {required} replicates; no verdict.", ""]
    if "primary" not in entry:
        return lines + ["not run: a condition of the primary tests is missing; no verdict.", ""]
    lines += ["Paired by replicate; two-sided t tests (scipy.stats.ttest_rel), 95% confidence "
              f"intervals, Holm's correction over the four tests at {ALPHA}. \"No benefit\": not "
              f"significant and the interval's upper end below +{100 * MARGIN:.1f} points.", "",
              "| test | difference | mean | 95% CI | replicates | p | p (Holm) | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in entry["primary"]:
        lines.append(f"| ({t['key']}) | {test_row(t)} | {fmt_p(t['p_holm'])} | {t['verdict']} |")
    if entry.get("early"):
        lines += ["", f"Secondary, uncorrected: the accuracy tests at the first evaluation "
                  f"(iteration {EVAL_EVERY}), before the students near the ceiling.", "",
                  "| test | difference | mean | 95% CI | replicates | p | verdict |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| ({t['key']}) | {test_row(t)} | {t['verdict']} |" for t in entry["early"]]
    return lines + [""]


def world_section(world: str, wr: dict, entry: dict, required: int) -> list[str]:
    n = entry["n"]
    title = f"## The {world} world"
    if not entry["complete"]:
        return [title, "", f"incomplete: {n} of {required} replicates; no verdict.", ""]
    runs, base = wr["runs"], wr["base"]
    lines = [title, "", f"{n} replicates ({', '.join(map(str, wr['replicates']))}). Student "
             f"before training (each replicate's one base evaluation): "
             f"{np.mean([b['acc'] for b in base]):.1%} (s.e. within one evaluation "
             f"{np.mean([b['acc_se'] or 0 for b in base]):.1%}; {base[0]['problems']} problems).", "",
             "| condition | final accuracy (mean ± s.e. over replicates) | gain over the base "
             "| s.e. within one evaluation | rows sampled per row trained |",
             "| --- | --- | --- | --- | --- |"]
    for name, rs in runs.items():
        m, se = mean_se([r["final"]["acc"] for r in rs])
        gain = np.mean([r["final"]["acc"] - b["acc"] for r, b in zip(rs, base)])
        lines.append(f"| {name} | {m:.1%} ± {se:.1%} | {100 * gain:+.1f} pts | "
                     f"{np.mean([r['final']['acc_se'] or 0 for r in rs]):.1%} | "
                     f"{np.mean([r['sampled_per_kept'] for r in rs]):.2f} |")
    lines += ["", "Final accuracy of each replicate:", ""]
    for name, rs in runs.items():
        lines.append(f"- {name}: " + ", ".join(f"{r['final']['acc']:.1%}" for r in rs))
    secondary = entry.get("secondary", [])
    if secondary:
        lines += ["", "Secondary paired tests (uncorrected p; " + (
                  "not part of the primary family" if world == PRIMARY_WORLD else
                  "this world cannot test the paper's premise") + "):", "",
                  "| difference | mean | 95% CI | replicates | p | verdict |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {test_row(t)} | {t['verdict']} |" for t in secondary]
    lines += ["", "Secondary: the students at the final evaluation (mean over replicates; length "
              "in tokens; share of completions with a reflection marker):", "",
              "| condition | accuracy | mean length | completions with a marker |",
              "| --- | --- | --- | --- |",
              f"| before training | {np.mean([b['acc'] for b in base]):.1%} | "
              f"{np.mean([b['length'] for b in base]):.1f} | "
              f"{marker_text([b['marker_share'] for b in base])} |"]
    for name, rs in runs.items():
        f = [r["final"] for r in rs]
        lines.append(f"| {name} | {np.mean([x['acc'] for x in f]):.1%} | "
                     f"{np.mean([x['length'] for x in f]):.1f} | "
                     f"{marker_text([x['marker_share'] for x in f])} |")
    if "p_wait_wrong" in base[0]:
        cols = ["p_wait_wrong", "p_wait_right"] + (["p_w_wrong", "p_w_right"]
                                                   if "p_w_wrong" in base[0] else [])
        what = ("`wait` is one token" if world == "reflect" else
                "`wait` is four tokens; `w` its first")
        lines += ["", f"Secondary: the student's P(`wait`) right after an injected wrong line and "
                  f"after a right line, by teacher forcing, one step of each test problem chosen "
                  f"by a fixed rng ({what}); mean over replicates:", "",
                  "| condition | " + " | ".join(c.replace("p_", "P(").replace("_wrong", " \\| wrong)")
                                                  .replace("_right", " \\| right)") for c in cols)
                  + " | ratio wrong / right |", "| --- |" + " --- |" * (len(cols) + 1)]
        rows = [("before training", base)] + [(name, [r["final"] for r in rs])
                                              for name, rs in runs.items()]
        for label, fs in rows:
            means = [float(np.mean([x[c] for x in fs])) for c in cols]
            ratio = means[0] / means[1] if means[1] > 0 else float("inf")
            lines.append(f"| {label} | " + " | ".join(f"{v:.2e}" for v in means)
                         + f" | {ratio:.1f} |")
    if base[0]["by_k"]:
        ks = list(base[0]["by_k"])
        lines += ["", "Secondary: accuracy by chain length K at the final evaluation (mean over "
                  "replicates):", "", "| condition | " + " | ".join(f"K={k}" for k in ks) + " |",
                  "| --- |" + " --- |" * len(ks),
                  "| before training | " + " | ".join(
                      f"{np.mean([b['by_k'][k] for b in base]):.1%}" for k in ks) + " |"]
        for name, rs in runs.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{np.mean([r['final']['by_k'][k] for r in rs]):.1%}" for k in ks) + " |")
    if world in ("reflect", "chain"):
        n_it = len(next(iter(runs.values()))[0]["rollout_reflection"])
        picks = sorted({0, n_it // 4, n_it // 2, 3 * n_it // 4, n_it - 1})
        lines += ["", "Secondary: the reflection rate of the rollouts over training (share of "
                  "sampled rows, fill rounds included, with a marker; mean over replicates):", "",
                  "| condition | " + " | ".join(f"iteration {i + 1}" for i in picks) + " |",
                  "| --- |" + " --- |" * len(picks)]
        for name, rs in runs.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{np.mean([r['rollout_reflection'][i] for r in rs]):.1%}" for i in picks) + " |")
    renio = [r for r in RENIO_RUNS if r in runs]
    if renio:
        lines += ["", "Secondary: what ReNIO does to the batch (mean ± s.d. over replicates; "
                  "shares of the loss weight, pooled over the run's iterations; effective batch "
                  "size (sum w)^2 / sum w^2 of each 32-row batch, averaged). Plain OPD's "
                  "incorrect share is its share of incorrect rows.", "",
                  "| condition | weight on incorrect rows | incorrect rows | weight on "
                  "recovered rows | effective batch size |", "| --- | --- | --- | --- | --- |"]
        for name in (["opd"] if "opd" in runs else []) + renio:
            b = [r["batch"] for r in runs[name]]
            lines.append(f"| {name} | {sd_text([x['share_incorrect'] for x in b])} | "
                         f"{sd_text([x['rows_incorrect'] for x in b])} | "
                         f"{sd_text([x['share_recovered'] for x in b])} | "
                         f"{np.mean([x['ess'] for x in b]):.1f} |")
        for name, mix in entry.get("mixing", {}).items():
            t = mix["test"]
            lines += ["", f"Secondary: {name} against plain OPD mixed with incorrect-only at "
                      f"{name}'s incorrect weight share: predicted {np.mean(mix['predicted']):.1%}, "
                      f"observed {np.mean(mix['observed']):.1%}; observed - predicted "
                      f"{100 * t['mean']:+.1f} pts (95% CI "
                      f"[{100 * t['ci'][0]:+.1f}, {100 * t['ci'][1]:+.1f}], p = {fmt_p(t['p'])}, "
                      f"uncorrected)."]
    return lines + [""]


def marker_text(xs: list[float]) -> str:
    m = float(np.mean(xs))
    return "0 (floor)" if all(x == 0 for x in xs) else f"{m:.1%}"


def sd_text(xs: list[float | None]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    sd = float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
    return f"{np.mean(xs):.1%} ± {sd:.1%}"


def code_text(run: dict, results: dict) -> str:
    commits = sorted({c for wr in results.values() for c in wr.get("commits", []) if c})
    made = f"commit {run['commit']} (renio_core + renio_cli digest {run['code_digest']})"
    if commits and commits != [run["commit"]]:
        # collect() takes another code's records only where --verify found them equal.
        made += (f"; the runs were made at {', '.join(commits)}, and where that was other code, "
                 "`--verify` remade each condition's first replicate at this code and every "
                 "number was equal to the last bit (`experiments/records/verified.json`)")
    return made


def run_time_text(run: dict, results: dict) -> str:
    """The runs' own time from their records: one invocation's wall time is only the part of
    the experiment that ran in that sitting. Runs made while the machine was shared (or the
    experiment paused) took longer, so the fastest run of each condition, times its number
    of runs, is given beside the sum as the time on a machine to itself."""
    times = [[r.get("seconds", 0.0) for r in rs]
             for wr in results.values() for rs in wr.get("runs", {}).values() if rs]
    n = sum(len(t) for t in times)
    total = sum(sum(t) for t in times) / 3600
    floor = sum(min(t) * len(t) for t in times) / 3600
    return (f"{n} runs whose own times sum to {total:.1f} h, runs made while the machine was "
            f"shared or paused included; the fastest run of each condition times its number of "
            f"runs gives {floor:.1f} h, {floor / run['jobs']:.1f} h of wall time at "
            f"{run['jobs']} runs at a time on a {run['cpus']}-core machine")


def write_report(docs: Path, run: dict, results: dict, analysis: dict) -> str:
    required = run.get("required", N_REPLICATES)
    lines = ["# Toy replication of ReNIO's comparisons (pre-registered)", ""]
    if run.get("trial"):
        lines += ["**A trial of the script's machinery (2 iterations, few prompts), not the "
                  "experiment; its numbers mean nothing.**", ""]
    lines += [
        f"Made by `python experiments/replicate.py` at {code_text(run, results)}; "
        f"{run_time_text(run, results)}. The design, the tests and the decision rule are fixed "
        "in the script's docstring before the first run: replicates 0-9 and no more; inside "
        "a replicate every condition has the same seed, so all start from one base evaluation, "
        "the same first rollouts and the same evaluation seeds; every run is `renio run` with "
        "the faithful loop of `sample_configs/toy-*.yaml` at token clip 0 (64 iterations, each "
        "one AdamW step on 32 fresh prompts x 1 sample); evaluation on every test prompt, "
        f"{EVAL_N} samples each (avg@{EVAL_N}), every {EVAL_EVERY} steps. Everything but the "
        "primary outcomes is secondary.", ""]
    lines += primary_section(analysis, required)
    for world, wr in results.items():
        lines += world_section(world, wr, analysis[world], required)
    lines += ["![accuracy against step](replication-accuracy.png)", "",
              "![weights of correct, recovered and incorrect rollouts](replication-weights.png)",
              ""]
    if any(w in results and analysis[w]["complete"] for w in ("reflect", "chain")):
        lines += ["![accuracy by K](replication-by-k.png)", "",
                  "![reflection rate of the rollouts](replication-reflection.png)", ""]
    text = "\n".join(lines)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "replication.md").write_text(text)
    return text


def plot(docs: Path, results: dict, analysis: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [w for w in results if analysis[w]["complete"]]
    if not worlds:
        return

    def style(name: str) -> str:
        return "-" if "renio" in name else ("--" if name in ("opd", "opsd") else ":")

    fig, axes = plt.subplots(1, len(worlds), figsize=(6.5 * len(worlds), 4.4), squeeze=False)
    for ax, w in zip(axes[0], worlds):
        wr = results[w]
        base = np.array([b["acc"] for b in wr["base"]])
        for name, rs in wr["runs"].items():
            steps = [0] + rs[0]["steps"]
            accs = np.array([[b, *r["acc"]] for b, r in zip(base, rs)])
            m, se = accs.mean(0), accs.std(0, ddof=1) / math.sqrt(len(rs)) if len(rs) > 1 else 0
            ax.plot(steps, m, style(name), marker="o", ms=3, label=name)
            ax.fill_between(steps, m - se, m + se, alpha=0.12)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"held-out accuracy (avg@{EVAL_N})")
        ax.set_title(f"{w} world (mean ± s.e. over {len(base)} replicates)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "replication-accuracy.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 3.8), squeeze=False)
    colors = {"correct": "tab:blue", "recovered": "tab:green", "incorrect": "tab:red"}
    for ax, w in zip(axes[0], worlds):
        pooled_w, pooled_k = [], []
        for name in RENIO_RUNS[:2]:
            for r in results[w]["runs"].get(name, []):
                pooled_w.extend(r["weight"])
                pooled_k.extend(r["kind"])
        if not pooled_w:
            continue
        wts, kinds = np.array(pooled_w), np.array(pooled_k)
        bins = np.linspace(wts.min(), wts.max() + 1e-9, 40)
        for kind, color in colors.items():
            sel = kinds == kind
            if sel.any():
                ax.hist(wts[sel], bins=bins, alpha=0.6, color=color, label=f"{kind} ({sel.sum()})")
        ax.set_xlabel("normalized weight (batch_mean)")
        ax.set_title(f"{w} world, OPD+ReNIO and OPSD+ReNIO rollouts", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(docs / "replication-weights.png", dpi=110)
    plt.close(fig)

    chainlike = [w for w in worlds if w in ("reflect", "chain")]
    if not chainlike:
        return
    fig, axes = plt.subplots(1, len(chainlike), figsize=(6.5 * len(chainlike), 4.2), squeeze=False)
    for ax, w in zip(axes[0], chainlike):
        wr = results[w]
        ks = list(wr["base"][0]["by_k"])
        ax.plot([int(k) for k in ks], [np.mean([b["by_k"][k] for b in wr["base"]]) for k in ks],
                "k-", marker="s", label="before training")
        for name, rs in wr["runs"].items():
            ax.plot([int(k) for k in ks], [np.mean([r["final"]["by_k"][k] for r in rs]) for k in ks],
                    style(name), marker="o", ms=3, label=name)
        ax.set_xlabel("chain length K")
        ax.set_ylabel("held-out accuracy after training")
        ax.set_title(f"{w} world: accuracy by K (mean over replicates)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "replication-by-k.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(chainlike), figsize=(6.5 * len(chainlike), 4.2), squeeze=False)
    for ax, w in zip(axes[0], chainlike):
        for name, rs in results[w]["runs"].items():
            rate = np.array([r["rollout_reflection"] for r in rs]).mean(0)
            ax.plot(np.arange(1, len(rate) + 1), rate, style(name), label=name)
        ax.set_xlabel("iteration")
        ax.set_ylabel("rollouts with a marker")
        ax.set_title(f"{w} world: reflection rate of the rollouts (mean over replicates)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "replication-reflection.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "replication")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    ap.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS),
                    help="which worlds to run now (the report covers every world on disk)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="runs at once, each with (CPU cores / jobs) threads")
    ap.add_argument("--rerun-stale", action="store_true",
                    help="delete and rerun run directories made with another config or code")
    ap.add_argument("--records", type=Path, default=RECORDS,
                    help="where finished runs' records are kept (committed to git): a run with "
                         "a matching record is not run again, even where its directory is gone")
    ap.add_argument("--verify", action="store_true",
                    help="remake, at this code, each condition's lowest recorded replicate made by "
                         "other code; where every number is equal, that code's records count "
                         "for this code (RECORDS/verified.json)")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: report the finished runs on disk")
    ap.add_argument("--trial", action="store_true",
                    help="check the machinery: 2 iterations on a few prompts, replicates 0-1, "
                         "into its own --out and --docs; never the experiment")
    ap.add_argument("--conditions", nargs="+", choices=list(CONDITIONS),
                    help="with --trial: the conditions to run and report")
    ap.add_argument("--world-dir", action="append", default=[], metavar="WORLD=DIR",
                    help="with --trial: use a world built into DIR (renio toy build --quick)")
    args = ap.parse_args(argv)
    if args.verify and (args.trial or args.report_only):
        ap.error("--verify checks the experiment's records: not with --trial or --report-only")
    if not args.trial and (args.conditions or args.world_dir):
        ap.error("--conditions and --world-dir are for --trial only: the experiment's "
                 "conditions and worlds are fixed")
    if args.trial and (args.out.resolve() == (ROOT / "runs" / "replication").resolve()
                       or args.docs.resolve() == (ROOT / "docs").resolve()):
        ap.error("--trial needs its own --out and --docs")
    files = {}
    for item in args.world_dir:
        w, _, d = item.partition("=")
        if w not in WORLDS or not d:
            ap.error(f"--world-dir {item!r}: expected WORLD=DIR with WORLD one of {', '.join(WORLDS)}")
        files[w] = Path(d).resolve()
    replicates = [0, 1] if args.trial else list(REPLICATES)
    required = len(replicates)
    only = args.conditions if args.trial else None

    from renio_core.modeling.toy import chain, ensure_toy_world, reflect

    digest, commit = code_digest(), git_commit()
    # Built once here, not by concurrent runs; not at all where every run of the world is
    # recorded for this code (the build takes minutes, the report seconds).
    builders = {"addition": ensure_toy_world, "chain": chain.ensure_chain_world,
                "reflect": reflect.ensure_reflect_world}
    if not args.report_only:
        for w in args.worlds:
            if w not in files and (args.verify or args.trial or not all_recorded(
                    args.records, w, replicates, digest, commit)):
                builders[w](progress=BuildLog(w))
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    t0 = time.perf_counter()
    failures: list[str] = []
    if args.verify:
        return verify(args, digest, commit, threads)
    tasks = [] if args.report_only else plan(args.worlds, replicates, only)
    if tasks:
        print(f"{len(tasks)} runs, {args.jobs} at a time; code {commit} (digest {digest})",
              flush=True)

        def runner(task):
            return run_one(task, args.out, digest, commit, files=files, trial=args.trial,
                           rerun_stale=args.rerun_stale, threads=threads,
                           records=None if args.trial else args.records)

        failures = run_all(tasks, args.jobs, runner)
    wall = time.perf_counter() - t0

    results = {}
    records = None if args.trial else args.records
    for w in WORLDS:
        if (args.out / w).is_dir() or (records is not None and (records / w).is_dir()):
            results[w] = collect(args.out, w, world_conditions(w, only), replicates, digest,
                                 commit, files=files.get(w), trial=args.trial, records=records)
    analysis = analyse(results, required)
    # Invocations that ran something at this code add up to the experiment's wall time.
    previous = args.out / "results.json"
    invocations = []
    if previous.is_file():
        old = json.loads(previous.read_text())["run"]
        if old.get("code_digest") == digest:
            invocations = old.get("invocations", [])
    if tasks:
        invocations.append({"runs": len(tasks), "jobs": args.jobs, "threads": threads,
                            "wall_s": wall, "failures": len(failures)})
    run = {"commit": commit, "code_digest": digest, "replicates": replicates,
           "required": required, "trial": args.trial, "jobs": args.jobs, "threads": threads,
           "cpus": os.cpu_count(), "invocations": invocations,
           "wall_s": sum(i["wall_s"] for i in invocations),
           "design": {"conditions": {w: list(world_conditions(w, only)) for w in WORLDS},
                      "overrides": {w: {n: run_overrides(w, n, files=files.get(w), trial=args.trial)
                                        for n in world_conditions(w, only)} for w in WORLDS},
                      "seeds": {r: run_seed(r) for r in replicates},
                      "primary": [list(p) for p in PRIMARY], "alpha": ALPHA, "margin": MARGIN}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"run": run, "results": results, "analysis": analysis}))
    args.docs.mkdir(parents=True, exist_ok=True)
    plot(args.docs, results, analysis)
    print(write_report(args.docs, run, results, analysis))
    if failures:
        print(f"{len(failures)} run(s) failed; rerun the same command to retry them.",
              file=sys.stderr)
        return 1
    return 0


def verify(args: argparse.Namespace, digest: str, commit: str, threads: int) -> int:
    """``--verify``: remake the planned runs; record each old digest all of whose runs agree."""
    failed = 0
    for world in args.worlds:
        for old, tasks in verification_plan(args.records, world, digest).items():
            print(f"{world}: {len(tasks)} runs of code {old} remade at code {commit} "
                  f"(digest {digest})", flush=True)
            scratch = args.out / f"verify-{digest}"
            failures = run_all(tasks, args.jobs, lambda t, old=old: verify_run(
                t, old, scratch, args.records, digest, commit, threads))
            if failures:
                failed += 1
                print(f"{world}: code {old}'s records are NOT reproduced; they stay apart",
                      flush=True)
            else:
                add_verified(args.records, world, digest, old, commit, tasks)
                print(f"{world}: every number of the {len(tasks)} runs is reproduced; code "
                      f"{old}'s records count for this code", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
