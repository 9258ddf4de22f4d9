"""`renio run`: the on-policy loop on the toy world, killed and resumed through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from renio_core.errors import RenioInputError
from renio_core.run_loop import load_run_config

RENIO = [sys.executable, "-m", "renio_cli.main"]
CONFIG = Path(__file__).resolve().parents[1] / "sample_configs" / "toy-opd-renio.yaml"
SMALL = ["iterations=2", "prompts_per_iteration=8", "rollout.n=2", "eval_every=0",
         "rollout.max_new_tokens=48"]


def test_sample_configs_parse_and_overrides_apply(tmp_path):
    cfg = load_run_config(CONFIG, [f"run_dir={tmp_path}", "weight.threshold=1.5", "iterations=5"])
    assert cfg.weight["threshold"] == 1.5 and cfg.iterations == 5
    c = cfg.stage_configs(tmp_path / "iter-00003", adapter="a", policy_step=7, iteration=3)
    assert c["weight"].threshold == 1.5 and c["rollout"].policy_step == 7
    assert c["train"].adapter == "a" and c["score"].input == c["rollout"].out
    for path in sorted(CONFIG.parent.glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# renio run --config sample_configs/"), path
        load_run_config(path, [f"run_dir={tmp_path / path.stem}"])


def test_bad_run_configs(tmp_path):
    with pytest.raises(RenioInputError, match="unknown key 'iteration'"):
        load_run_config(CONFIG, ["iteration=2"])
    with pytest.raises(RenioInputError, match="weight: .*norm"):
        load_run_config(CONFIG, ["weight.norm=mean"])
    with pytest.raises(RenioInputError, match="eval.temp: unknown"):
        load_run_config(CONFIG, ["eval.temp=1.0"])
    with pytest.raises(RenioInputError, match="rollout.out: set by the loop"):
        load_run_config(CONFIG, ["rollout.out=x.parquet"])
    with pytest.raises(RenioInputError, match="score.backend: the loop scores with its resident"):
        load_run_config(CONFIG, ["score.backend=vllm"])
    with pytest.raises(RenioInputError, match="rollout.backend: vllm .* LoRA"):
        load_run_config(CONFIG, ["rollout.backend=vllm", "train.lora=false"])
    with pytest.raises(RenioInputError, match="rollout: --vllm-memory: must be in"):
        load_run_config(CONFIG, ["rollout.vllm_memory=1.5"])
    proc = subprocess.run([*RENIO, "run", "--config", str(CONFIG), "iterations=0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "iterations: must be >= 1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.integration
def test_kill_and_resume(tmp_path, toy_world):
    run_dir = tmp_path / "run"
    args = [*RENIO, "run", "--config", str(CONFIG), f"run_dir={run_dir}", *SMALL]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run_dir / "iter-00000" / "weights.parquet"
    deadline = time.time() + 300
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "iter-00001").exists()
    rollouts = run_dir / "iter-00000" / "rollouts.parquet"
    before = rollouts.stat().st_mtime_ns

    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert rollouts.stat().st_mtime_ns == before  # complete stages are not redone
    for i in range(2):
        it = run_dir / f"iter-{i:05d}"
        for name in ("rollouts", "scores", "weights"):
            assert pq.read_metadata(it / f"{name}.parquet").num_rows == 16
        assert (it / "ckpt" / "adapter_config.json").exists()
    # Iteration 1 sampled from the student trained in iteration 0.
    meta = json.loads(pq.read_schema(run_dir / "iter-00001" / "rollouts.parquet").metadata[b"renio"])
    assert meta["config"]["adapter"].endswith("iter-00000/ckpt")
    assert pq.read_table(run_dir / "iter-00001" / "rollouts.parquet").column("policy_step")[0].as_py() > 0
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [ln["iteration"] for ln in lines] == [0, 1]
    assert "renio run" in done.stdout
