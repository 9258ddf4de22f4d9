"""No command writes over, or deletes, any of its own inputs, whatever the flags (one line,
exit 2, the inputs' bytes unchanged). Each case runs the real CLI on real toy-world shards."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from renio_core.stages.rollout import RolloutConfig, run_rollout
from renio_core.stages.score import ScoreConfig, run_score
from renio_core.stages.weight import WeightConfig, run_weight

RENIO = [sys.executable, "-m", "renio_cli.main"]


@pytest.fixture(scope="module")
def shards_(toy_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    prompts = root / "p.jsonl"
    prompts.write_text("".join(toy_world.train_prompts.read_text().splitlines(True)[:4]))
    run_rollout(RolloutConfig(model="toy:student", prompts=str(prompts), out=str(root / "r.parquet"),
                              n=2, max_new_tokens=16, grade=True, device="cpu"))
    run_score(ScoreConfig(input=str(root / "r.parquet"), teacher="toy:teacher",
                          out=str(root / "s.parquet"), device="cpu"))
    run_weight(WeightConfig(input=str(root / "s.parquet"), out=str(root / "wd"), group_size=4,
                            rows_per_part=4))
    student = root / "stud"
    shutil.copytree(toy_world.student, student)
    return {"root": root, "prompts": prompts, "rollouts": root / "r.parquet",
            "scores": root / "s.parquet", "weights_dir": root / "wd", "student": student}


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _refused(args: list, *protected: Path, needle: str = "would write over its own input") -> None:
    before = [_digest(p) for p in protected]
    proc = subprocess.run([*RENIO, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert [_digest(p) for p in protected] == before


def test_rollout_never_overwrites_its_prompts(shards_):
    s = shards_
    _refused(["rollout", "--model", "toy:student", "--prompts", s["prompts"], "--out",
              s["prompts"], "--overwrite"], s["prompts"])


def test_score_never_overwrites_its_rollouts(shards_):
    s = shards_
    _refused(["score", "--in", s["rollouts"], "--teacher", "toy:teacher", "--out",
              s["rollouts"], "--overwrite"], s["rollouts"])


def test_weight_never_overwrites_its_scores(shards_):
    s = shards_
    _refused(["weight", "--in", s["scores"], "--out", s["scores"], "--overwrite"], s["scores"])
    # An output folder that holds the input.
    _refused(["weight", "--in", s["scores"], "--out", s["root"], "--overwrite"], s["scores"])


def test_train_never_deletes_its_weights_or_its_model(shards_):
    s = shards_
    common = ["--lora-r", "4", "--lora-alpha", "8", "--max-steps", "1", "--overwrite"]
    _refused(["train", "--weights", s["weights_dir"], "--model", s["student"], "--out",
              s["weights_dir"], *common], s["weights_dir"])
    _refused(["train", "--weights", s["weights_dir"], "--model", s["student"], "--out",
              s["student"], *common], s["student"])
    _refused(["train", "--weights", s["weights_dir"], "--model", s["student"], "--out",
              s["weights_dir"] / "ckpt", *common], s["weights_dir"])


def test_eval_never_overwrites_its_completions(shards_):
    s = shards_
    _refused(["eval", "--completions", s["rollouts"], "--bench", s["prompts"], "--out",
              s["rollouts"], "--overwrite"], s["rollouts"], s["prompts"])
    _refused(["eval", "--completions", s["rollouts"], "--bench", s["prompts"], "--out",
              s["root"] / "e.parquet", "--summary", s["prompts"]], s["rollouts"], s["prompts"])


def test_inspect_html_never_replaces_a_shard_or_an_existing_file(shards_, tmp_path):
    s = shards_
    first = next(s["weights_dir"].glob("*.parquet"))
    _refused(["inspect", s["weights_dir"], "--html", first, "--overwrite"], s["weights_dir"],
             needle="--html")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    _refused(["inspect", s["scores"], "--html", notes], notes, needle="--overwrite")
    proc = subprocess.run([*RENIO, "inspect", str(s["scores"]), "--html", str(notes),
                           "--overwrite"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert notes.read_text().startswith("<!DOCTYPE html>") or "<html" in notes.read_text()
