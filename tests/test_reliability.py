"""What a run survives besides a kill: a full disk, damaged state, and being moved.

A full disk is real here: a small tmpfs mounted in a private mount namespace (``unshare``),
with the real CLI writing into it. Where namespaces cannot be made (an unprivileged
container), those tests skip with the reason; CI runs them as root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import require_component

ROOT = Path(__file__).resolve().parents[1]
RENIO = [sys.executable, "-m", "renio_cli.main"]
CONFIG = ROOT / "sample_configs" / "toy-opd-renio.yaml"
ONE_STEP = ["prompts_per_iteration=8", "rollout.n=1", "eval_every=0", "rollout.max_new_tokens=48",
            "train.lr_schedule=linear"]


def _run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*RENIO, *map(str, args)], capture_output=True, text=True, **kw)


def _ok(*args) -> subprocess.CompletedProcess:
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _killed_when(args: list[str], ready) -> None:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _adapter(ckpt: Path) -> bytes:
    return (ckpt / "adapter_model.safetensors").read_bytes()


# --------------------------------------------------------------------------------------------
# A run that moves
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_killed_run_copied_or_restored_from_tar_resumes_to_the_same_adapter(tmp_path, toy_world):
    """Killed inside iteration 1 of 2 (its rollouts and scores complete), then copied with
    `cp -r` (new paths, new mtimes) and, separately, put through tar (whole-second mtimes) and
    the original removed: both resume, reuse iteration 1's complete shards, and end with the
    adapters of a run that was never killed or moved."""
    common = ["iterations=2", *ONE_STEP]
    whole = tmp_path / "whole"
    _ok("run", "--config", CONFIG, f"run_dir={whole}", *common)

    cut = tmp_path / "cut"
    _killed_when([*RENIO, "run", "--config", str(CONFIG), f"run_dir={cut}", *common],
                 lambda: (cut / "iter-00001" / "scores.parquet").exists())
    assert not (cut / "iter-00001" / "ckpt" / "adapter_model.safetensors").exists()
    archive = tmp_path / "cut.tar"
    with tarfile.open(archive, "w", format=tarfile.USTAR_FORMAT) as tar:  # whole-second mtimes
        tar.add(cut, arcname="cut")
    copied = tmp_path / "elsewhere" / "copied"
    copied.parent.mkdir()
    subprocess.run(["cp", "-r", str(cut), str(copied)], check=True)
    shutil.rmtree(cut)  # nothing may still be read from the old place
    restored_root = tmp_path / "restored"
    with tarfile.open(archive) as tar:
        tar.extractall(restored_root, filter="tar")
    restored = restored_root / "cut"
    assert (restored / "iter-00001" / "scores.parquet").stat().st_mtime_ns % 10**9 == 0

    for run_dir in (copied, restored):
        rollouts = run_dir / "iter-00001" / "rollouts.parquet"
        before = rollouts.read_bytes()
        done = _run("run", "--config", CONFIG, f"run_dir={run_dir}", *common)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "iter 0: done earlier, skipped" in done.stderr
        assert rollouts.read_bytes() == before  # recognized as complete, not sampled again
        for i in range(2):
            ckpt = f"iter-{i:05d}/ckpt"
            assert _adapter(run_dir / ckpt) == _adapter(whole / ckpt), (run_dir, i)
