"""W&B and TensorBoard logging through renio_core/tracking.py, in W&B's offline mode (no network).

The values W&B recorded are read back from the offline run's own files and compared with the
metrics renio writes itself (``metrics.jsonl`` of the run and of each checkpoint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "sample_configs" / "toy-opd-renio.yaml"


def _records(run_file: Path) -> list[bytes]:
    """The records of a W&B run file: a 7-byte header (":W&B", magic, version), then a
    LevelDB-style log of 32 KiB blocks, each chunk a 7-byte header (crc32, little-endian
    length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B"
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length = int.from_bytes(raw[pos + 4:pos + 6], "little")
        kind = raw[pos + 6]
        chunk = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            out.append(pending)
            pending = b""
    return out


def _history(run_file: Path) -> list[dict]:
    """Every ``wandb.log`` row of an offline run file (.wandb), as {key: value}."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for data in _records(run_file):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows


@pytest.mark.integration
def test_run_logs_steps_and_iterations_to_wandb_offline(toy_world, tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline",
           "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "renio_cli.main", "run", "--config", str(CONFIG),
         f"run_dir={run_dir}", "iterations=1", "prompts_per_iteration=8", "rollout.n=2",
         "rollout.max_new_tokens=48", "eval_before=false", "eval.limit=4", "eval.n=1",
         "train.max_steps=2", "wandb_project=renio-test"],
        env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    rows = _history(run_file)
    steps = [json.loads(ln) for ln in
             (run_dir / "iter-00000" / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == len(steps) == 2
    for logged, step in zip(train_rows, steps):
        assert logged["train/step"] == step["step"]
        for key in ("loss", "lr", "grad_norm", "pivotal_share", "mean_weight"):
            assert logged[f"train/{key}"] == pytest.approx(step[key], rel=1e-6), key
    (it,) = [r for r in rows if "iter/rollout_accuracy" in r]
    (record,) = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("rollout_accuracy", "mean_weight_correct", "mean_weight_incorrect",
                "auroc_incorrect", "pivotal_share", "eval_accuracy"):
        assert it[f"iter/{key}"] == pytest.approx(record[key], rel=1e-6), key
    split = [it[f"iter/{s}_seconds"] for s in ("sample", "score", "weight", "train", "eval", "other")]
    assert all(s >= 0 for s in split)
    assert sum(split) == pytest.approx(it["iter/seconds"], abs=0.5)


BLOCKED = ("import sys; sys.modules['wandb'] = None; sys.argv = ['renio'] + sys.argv[1:]; "
           "from renio_cli.main import app; app()")


@pytest.mark.parametrize("command", ["run", "train"])
def test_missing_wandb_is_one_line(command: str, tmp_path: Path) -> None:
    """Without the package (its import blocked), asking for W&B is one line, exit 2, and
    nothing is written."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    if command == "run":
        args = ["run", "--config", str(CONFIG), f"run_dir={out}", "wandb_project=p"]
    else:
        args = ["train", "--weights", str(REPO / "examples" / "scores.sample.parquet"),
                "--model", "toy:student", "--out", str(out), "--wandb-project", "p"]
    res = subprocess.run([sys.executable, "-c", BLOCKED, *args], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install wandb" in lines[0], res.stderr
    assert not out.exists()
