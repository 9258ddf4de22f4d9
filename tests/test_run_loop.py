"""`renio run`: the on-policy loop on the toy world, killed and resumed through the real CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from renio_core.errors import RenioInputError
from renio_core.run.config import load_run_config

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
    with pytest.raises(RenioInputError, match="iteration: unknown key .*did you mean iterations"):
        load_run_config(CONFIG, ["iteration=2"])
    with pytest.raises(RenioInputError, match="weight: .*norm"):
        load_run_config(CONFIG, ["weight.norm=mean"])
    with pytest.raises(RenioInputError, match="eval.temp: unknown key .* eval.temperature"):
        load_run_config(CONFIG, ["eval.temp=1.0"])
    with pytest.raises(RenioInputError, match="rollout.out: set by the loop"):
        load_run_config(CONFIG, ["rollout.out=x.parquet"])
    with pytest.raises(RenioInputError, match="score.backend: the loop scores with its resident"):
        load_run_config(CONFIG, ["score.backend=vllm"])
    with pytest.raises(RenioInputError, match="rollout.backend: vllm .* LoRA"):
        load_run_config(CONFIG, ["rollout.backend=vllm", "train.lora=false"])
    with pytest.raises(RenioInputError, match="rollout: --vllm-memory: must be in"):
        load_run_config(CONFIG, ["rollout.vllm_memory=1.5"])
    with pytest.raises(RenioInputError, match="rollout: --tensor-parallel-size 2: needs "
                                              "--backend vllm"):
        load_run_config(CONFIG, ["rollout.tensor_parallel_size=2"])
    with pytest.raises(RenioInputError, match="rollout.device_map: the loop samples from the "
                                              "resident student being trained"):
        load_run_config(CONFIG, ["rollout.device_map=auto"])
    with pytest.raises(RenioInputError, match="train.teacher_device_map: .* set "
                                              "score.device_map"):
        load_run_config(CONFIG, ["train.teacher_device_map=auto"])
    with pytest.raises(RenioInputError, match="score.device_map: the OPSD teacher"):
        load_run_config(CONFIG, ["teacher=self", "score.device_map=auto"])
    if not torch.cuda.is_available():
        with pytest.raises(RenioInputError, match="score: --device-map: auto needs CUDA GPUs"):
            load_run_config(CONFIG, ["score.device_map=auto"])
    cfg = load_run_config(CONFIG, ["rollout.backend=vllm", "rollout.tensor_parallel_size=4"])
    assert cfg.stage_configs(tmp_path, adapter=None, policy_step=0)[
        "rollout"].tensor_parallel_size == 4  # reaches the loop's VllmSampler
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


# --------------------------------------------------------------------------------------------
# The official loop's dynamics: one optimizer, fresh rollouts per step, exact resume
# --------------------------------------------------------------------------------------------

ONE_STEP = ["prompts_per_iteration=8", "rollout.n=1", "eval_every=0", "rollout.max_new_tokens=48",
            "train.lr_schedule=linear"]
LIVE = "train.weights_from=live"  # the ReNIO weight from the train step's own forward


def _adapter_bytes(ckpt: Path) -> bytes:
    return (ckpt / "adapter_model.safetensors").read_bytes()


def _records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("seconds"), rec.pop("time")
        out.append(rec)
    return out


def _step_lrs(ckpt: Path) -> list[float]:
    return [json.loads(x)["lr"] for x in (ckpt / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_one_optimizer_across_iterations_equals_the_stages_by_hand(tmp_path, toy_world):
    """Three iterations of `renio run` == rollout, score, weight, train --init-from by hand."""
    from renio_core.run.loop import run_loop

    cfg = load_run_config(CONFIG, [f"run_dir={tmp_path / 'run'}", "iterations=3", *ONE_STEP])
    run_loop(cfg)
    run_dir = tmp_path / "run"
    # One optimizer step per iteration on a linear schedule over the run's 3 steps:
    # lr = 3e-4 * (3 - s) / 3 for global step s = 0, 1, 2.
    lrs = [_step_lrs(run_dir / f"iter-{i:05d}" / "ckpt") for i in range(3)]
    assert lrs == [[pytest.approx(3e-4 * 2 / 3)], [pytest.approx(3e-4 * 1 / 3)], [0.0]]
    assert [r["policy_step"] for r in _records(run_dir)] == [1, 2, 3]

    prompts = [json.loads(x) for x in toy_world.train_prompts.read_text().splitlines()]
    prev = None
    for i in range(3):
        d = tmp_path / f"hand-{i}"
        d.mkdir()
        (d / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts[8 * i: 8 * i + 8]))
        adapter = ["--adapter", str(prev)] if prev else []
        _cli("rollout", "--model", "toy:student", *adapter, "--prompts", d / "p.jsonl",
             "--out", d / "r.parquet", "--n", "1", "--temperature", "1.1", "--top-p", "0.95",
             "--top-k", "20", "--max-new-tokens", "48", "--batch-size", "128",
             "--seed", str(i), "--grade")
        _cli("score", "--in", d / "r.parquet", "--teacher", "toy:teacher", "--out", d / "s.parquet")
        _cli("weight", "--in", d / "s.parquet", "--out", d / "w.parquet", "--clip", "2.0",
             "--threshold", "1.0", "--group-size", "8")
        init = ["--init-from", str(prev)] if prev else []
        _cli("train", "--weights", d / "w.parquet", "--model", "toy:student", "--out", d / "ckpt",
             "--teacher", "toy:teacher", "--token-clip", "0", "--lora-r", "16", "--lora-alpha", "32",
             "--lr", "3e-4", "--lr-schedule", "linear", "--schedule-steps", "3",
             "--steps-per-batch", "1", "--seed", str(i), *init)
        prev = d / "ckpt"
        assert _adapter_bytes(prev) == _adapter_bytes(run_dir / f"iter-{i:05d}" / "ckpt"), i


def _cli(*args) -> None:
    proc = subprocess.run([*RENIO, *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _run_killed_when(args: list[str], ready) -> None:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.integration
@pytest.mark.parametrize("moment", ["scored", "mid-train-save"])
def test_sigkill_mid_iteration_then_rerun_is_exact(tmp_path, toy_world, moment):
    """A run killed inside an iteration and rerun ends with the bytes and metrics of a run that
    was never killed. 'mid-train-save': killed after a save_every checkpoint of an unfinished
    train stage, which must not count as finished: the rerun would skip the rest of its steps."""
    common = ["iterations=3", *ONE_STEP, "train.steps_per_batch=4", "train.save_every=1",
              "rollout.n=4", "weight.group_size=8"]
    whole = tmp_path / "whole"
    _cli("run", "--config", CONFIG, f"run_dir={whole}", *common)

    cut = tmp_path / "cut"
    args = [*RENIO, "run", "--config", str(CONFIG), f"run_dir={cut}", *common]
    it1 = cut / "iter-00001"
    if moment == "scored":
        ready = lambda: (it1 / "scores.parquet").exists()  # noqa: E731
    else:
        def ready() -> bool:
            try:
                info = json.loads((it1 / "ckpt" / "train_config.json").read_text())
            except (OSError, ValueError):
                return False
            return info["step"] >= 1 and not info["finished"]
    _run_killed_when(args, ready)
    if moment == "mid-train-save":
        info = json.loads((it1 / "ckpt" / "train_config.json").read_text())
        assert not info["finished"]  # the kill really landed mid-training
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "iter 0: done earlier" in done.stderr
    for i in range(3):
        a, b = whole / f"iter-{i:05d}" / "ckpt", cut / f"iter-{i:05d}" / "ckpt"
        assert _adapter_bytes(a) == _adapter_bytes(b), i
    assert _records(whole) == _records(cut)
    assert [r["policy_step"] for r in _records(cut)] == [4, 8, 12]


@pytest.mark.integration
def test_disk_stays_bounded(tmp_path, toy_world):
    """Only the newest checkpoint keeps its optimizer state (and every k-th if asked);
    pruning removes older checkpoints and shards; the time split is recorded."""
    from renio_core.run.loop import run_loop
    from renio_core.run.records import TIME_KEYS

    run_dir = tmp_path / "run"
    run_loop(load_run_config(CONFIG, [f"run_dir={run_dir}", "iterations=4", *ONE_STEP,
                                      "keep_checkpoint_every=2"]))
    has_state = [(run_dir / f"iter-{i:05d}" / "ckpt" / "trainer_state.pt").exists() for i in range(4)]
    assert has_state == [False, True, False, True]
    assert all((run_dir / f"iter-{i:05d}" / "ckpt" / "adapter_model.safetensors").exists()
               for i in range(4))
    assert (run_dir / "iter-00000" / "weights.parquet").exists()
    for rec in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()):
        assert set(rec["time"]) == set(TIME_KEYS)
        assert sum(rec["time"][k] for k in ("sample", "score", "weight", "train", "eval", "other")) \
            == pytest.approx(rec["seconds"], rel=1e-3, abs=1e-3)
        assert 0 < rec["time"]["train_steps"] <= rec["time"]["train"]
        assert 0 < rec["time"]["sample_work"] <= rec["time"]["sample"]

    pruned = tmp_path / "pruned"
    run_loop(load_run_config(CONFIG, [f"run_dir={pruned}", "iterations=3", *ONE_STEP,
                                      "prune_checkpoints=true", "prune_shards=true"]))
    assert not (pruned / "iter-00000" / "ckpt").exists() and not (pruned / "iter-00001" / "ckpt").exists()
    assert (pruned / "iter-00002" / "ckpt" / "trainer_state.pt").exists()
    assert not list((pruned / "iter-00000").glob("*s.parquet"))
    assert (pruned / "iter-00002" / "weights.parquet").exists()


@pytest.mark.integration
def test_full_finetune_runs_resumes_and_evaluates(tmp_path, toy_world):
    """train.lora=false: each checkpoint is the whole student; a rerun with more iterations
    continues from it (loaded from disk) exactly as an uninterrupted run."""
    from safetensors.torch import load_file

    common = [*ONE_STEP, "train.lora=false", "train.lr=1e-4", "train.lr_schedule=constant",
              "eval_every=2", "eval.limit=8", "eval.n=1"]
    whole = tmp_path / "whole"
    _cli("run", "--config", CONFIG, f"run_dir={whole}", "iterations=2", *common)
    part = tmp_path / "part"
    _cli("run", "--config", CONFIG, f"run_dir={part}", "iterations=1", *common)
    _cli("run", "--config", CONFIG, f"run_dir={part}", "iterations=2", *common)
    for i in range(2):
        a = load_file(str(whole / f"iter-{i:05d}" / "ckpt" / "model.safetensors"))
        b = load_file(str(part / f"iter-{i:05d}" / "ckpt" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), i
    base = load_file(str(Path(toy_world.student) / "model.safetensors"))
    a = load_file(str(whole / "iter-00001" / "ckpt" / "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in base if k in a)  # it trained
    assert json.loads((whole / "eval-final.json").read_text())["metrics"]["avg_at_n"] is not None
    meta = json.loads(pq.read_schema(whole / "iter-00001" / "rollouts.parquet").metadata[b"renio"])
    assert meta["config"]["model"].endswith("iter-00000/ckpt") and meta["config"]["adapter"] is None


@pytest.mark.integration
def test_live_weights_equal_the_weight_stage_with_one_step_per_batch(tmp_path, toy_world):
    """train.weights_from=live recomputes each row's ReNIO weight inside the train step from
    that forward pass; before the step's update the student is the one that was scored, so
    the weights equal the weight stage's (LoRA dropout is 0)."""
    from renio_core.run.loop import run_loop

    run_dir = tmp_path / "run"
    run_loop(load_run_config(CONFIG, [f"run_dir={run_dir}", "iterations=2", *ONE_STEP,
                                      "rollout.n=4", LIVE, "score_in_train_step=false"]))
    for i in range(2):
        it = run_dir / f"iter-{i:05d}"
        stage = pq.read_table(it / "weights.parquet").column("weight").to_pylist()
        (step,) = [json.loads(x) for x in (it / "ckpt" / "metrics.jsonl").read_text().splitlines()]
        assert len(step["live_weights"]) == len(stage) == 32
        assert max(abs(a - b) for a, b in zip(step["live_weights"], stage)) < 1e-5
        assert max(stage) > 1.5 * min(stage)  # the weights are not all alike


def test_config_errors_name_the_key_its_source_the_type_and_the_nearest_key(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(CONFIG.read_text().replace("  lr: 0.0003", "  lr: fast"))
    cases = [
        (CONFIG, ["train.lr=fast"],
         "train.lr: expected float (a number), got 'fast' (from the command line)"),
        (yaml_file, [], f"train.lr: expected float (a number), got 'fast' (from {yaml_file})"),
        (CONFIG, ["train.lrr=1"], "train.lrr: unknown key (from the command line); did you "
                                  "mean train.lr?"),
        # A key of another section, and a command-line typo with a YAML file given.
        (CONFIG, ["rollout.lr=1"], "rollout.lr: unknown key (from the command line); did you "
                                   "mean train.lr?"),
        (CONFIG, ["itrations=2"], "itrations: unknown key (from the command line); did you "
                                  "mean iterations?"),
        (CONFIG, ["rollout.max_new_tokens=1.5"],
         "rollout.max_new_tokens: expected int (an integer), got 1.5 (from the command line)"),
        (CONFIG, ["eval.limit=all"],
         "eval.limit: expected int (an integer) or null, got 'all' (from the command line)"),
        (CONFIG, ["train.lr=-1"], "train: lr: must be > 0, got -1 (from the command line)"),
    ]
    for path, overrides, message in cases:
        with pytest.raises(RenioInputError) as err:
            load_run_config(path, overrides)
        assert str(err.value) == message
    # In the YAML, a number YAML 1.1 reads as text (1e-4) is a number where one is due.
    yaml_file.write_text(CONFIG.read_text().replace("  lr: 0.0003", "  lr: 1e-4"))
    assert load_run_config(yaml_file, []).train["lr"] == 1e-4
    proc = subprocess.run([*RENIO, "run", "--config", str(CONFIG), "train.lr=fast"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "train.lr: expected float (a number), got 'fast' (from the command line)" in proc.stderr


def test_overrides_read_exponent_numbers(tmp_path):
    cfg = load_run_config(CONFIG, [f"run_dir={tmp_path}", "train.lr=1e-4", "seed=3"])
    assert cfg.train["lr"] == 1e-4 and cfg.seed == 3


def test_fill_filtered_needs_a_filter():
    with pytest.raises(RenioInputError, match="fill_filtered: needs weight.filter correct or"):
        load_run_config(CONFIG, ["fill_filtered=true"])
    load_run_config(CONFIG, ["fill_filtered=true", "weight.filter=correct"])


@pytest.mark.integration
def test_fill_filtered_trains_on_as_many_rows_as_unfiltered(tmp_path, toy_world):
    """weight.filter with fill_filtered samples further prompts until prompts_per_iteration x n
    rows of the kept kind exist; the rows are the ordinary rollout rows of those prompts, the
    first ones of the kind in prompt order, and the student's own accuracy is recorded over
    every row sampled."""
    from renio_core.run.loop import run_loop

    common = ["iterations=1", "prompts_per_iteration=8", "rollout.n=2", "eval_every=0",
              "rollout.max_new_tokens=48", "weight.filter=incorrect", "weight.scheme=uniform"]
    plain, filled = tmp_path / "plain", tmp_path / "filled"
    run_loop(load_run_config(CONFIG, [f"run_dir={plain}", *common]))
    run_loop(load_run_config(CONFIG, [f"run_dir={filled}", *common, "fill_filtered=true"]))
    it_plain, it_filled = plain / "iter-00000", filled / "iter-00000"
    plain_rows = pq.read_table(it_plain / "rollouts.parquet")
    n_wrong = plain_rows.column("correct").to_pylist().count(False)
    assert 0 < n_wrong < 16, "the toy student should get some but not all of 16 rows wrong"
    assert pq.read_metadata(it_plain / "weights.parquet").num_rows == n_wrong

    rounds = sorted((it_filled / "fill").glob("rollouts-*.parquet"))
    assert len(rounds) >= 2
    # Round 0 is exactly the unfilled iteration's rollout: same prompts, same seed, same rows.
    drop = ["created_at"] if "created_at" in plain_rows.schema.names else []
    assert pq.read_table(rounds[0]).drop_columns(drop).equals(plain_rows.drop_columns(drop))
    pooled = [r for path in rounds for r in pq.read_table(path).to_pylist()]
    wanted = [r for r in pooled if r["correct"] is False][:16]
    # It stops at the first round that completes the 16: the rounds before had too few.
    assert sum(r["correct"] is False for r in pooled[:-16]) < 16
    got = pq.read_table(it_filled / "rollouts.parquet").to_pylist()
    key = lambda r: (r["prompt_id"], r["sample_index"], tuple(r["completion_ids"]))  # noqa: E731
    assert [key(r) for r in got] == [key(r) for r in wanted] and len(got) == 16
    assert pq.read_metadata(it_filled / "weights.parquet").num_rows == 16
    (rec,) = [json.loads(x) for x in (filled / "metrics.jsonl").read_text().splitlines()]
    assert rec["fill_kept"] == 16 and rec["fill_sampled"] == len(pooled) == 16 * len(rounds)
    right = sum(r["correct"] is True for r in pooled)
    assert rec["rollout_accuracy"] == pytest.approx(right / len(pooled))


@pytest.mark.integration
def test_fill_filtered_with_no_row_of_its_kind_trains_nothing_and_carries_on(tmp_path, toy_world):
    """A pass over the prompts that finds no row of the kept kind (a correct-only run whose
    student never gets these right: here their answers cannot be matched) is an iteration
    without an optimizer step, not a crash; the run ends, evaluates the student it has, and
    a rerun skips what is done."""
    prompts = [json.loads(x) for x in toy_world.train_prompts.read_text().splitlines()[:4]]
    bench = tmp_path / "never.jsonl"
    bench.write_text("".join(json.dumps({**p, "answer": "never"}) + "\n" for p in prompts))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "renio_cli.main", "run", "--config", str(CONFIG),
           f"run_dir={run_dir}", f"prompts={bench}", f"eval_prompts={bench}", "iterations=2",
           "prompts_per_iteration=2", "rollout.max_new_tokens=24", "eval_every=1", "eval.n=1",
           "eval.max_new_tokens=24", "weight.filter=correct", "fill_filtered=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nothing to train on" in proc.stdout + proc.stderr
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["fill_kept"], r["fill_sampled"], r["policy_step"]) for r in records] \
        == [(0, 0, 4, 0), (1, 0, 4, 0)]
    assert all(r["train_loss"] is None and r["eval_accuracy"] == 0.0 for r in records)
    assert not any(run_dir.glob("iter-*/ckpt"))  # no step, no checkpoint
    assert (run_dir / "eval-final.json").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (again.stdout + again.stderr).count("done earlier, skipped") == 2


@pytest.mark.parametrize("name", ["opd", "opd-renio"])
def test_chain_configs_differ_from_the_addition_ones_only_in_the_world(tmp_path, name):
    """make demo runs the chain world with the same recipe as the addition world's configs."""
    base = load_run_config(CONFIG.parent / f"toy-{name}.yaml", [f"run_dir={tmp_path}"])
    chain = load_run_config(CONFIG.parent / f"toy-chain-{name}.yaml", [f"run_dir={tmp_path}"])
    assert (chain.student, chain.teacher, chain.prompts, chain.eval_prompts) == (
        "toy-chain:student", "toy-chain:teacher", "toy-chain:train", "toy-chain:test")
    a, b = dataclasses.asdict(base), dataclasses.asdict(chain)
    for key in ("student", "teacher", "prompts", "eval_prompts"):
        a.pop(key), b.pop(key)
    assert b["rollout"].pop("max_new_tokens") == 128 and a["rollout"].pop("max_new_tokens") == 64
    assert b["eval"].pop("max_new_tokens") == 128 and b["eval"].pop("limit") == 256
    a["eval"].pop("limit")
    assert a == b


@pytest.mark.integration
def test_code_prompts_run_ungraded_and_refuse_filters(tmp_path, toy_world):
    """Code prompts are graded by running them (renio eval's sandbox), not at rollout: the
    loop samples them ungraded, and refuses a filter that needs grades before any work."""
    from tiny_models import write_prompts

    prompts = write_prompts(tmp_path / "code.jsonl", 8, task="code")
    run_dir = tmp_path / "run"
    _cli("run", "--config", CONFIG, f"run_dir={run_dir}", f"prompts={prompts}", "eval_every=0",
         "iterations=1", "prompts_per_iteration=8", "rollout.n=1", "rollout.max_new_tokens=16")
    rows = pq.read_table(run_dir / "iter-00000" / "rollouts.parquet").to_pylist()
    assert len(rows) == 8 and all(r["correct"] is None and r["task"] == "code" for r in rows)
    assert pq.read_metadata(run_dir / "iter-00000" / "weights.parquet").num_rows == 8
    for extra in (["weight.filter=correct"], ["weight.filter=incorrect", "fill_filtered=true"]):
        other = tmp_path / f"refused-{len(extra)}"
        proc = subprocess.run([*RENIO, "run", "--config", str(CONFIG), f"run_dir={other}",
                               f"prompts={prompts}", *extra], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "needs graded rollouts" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not other.exists()


IN_STEP = ["train.weights_from=live", "score_in_train_step=true"]


def test_score_in_train_step_true_refuses_what_it_cannot_do():
    with pytest.raises(RenioInputError,
                       match="score_in_train_step: needs train.weights_from: live"):
        load_run_config(CONFIG, ["score_in_train_step=true"])
    for extra, what in (("train.steps_per_batch=2", "one optimizer step per iteration"),
                        ("train.epochs=2", "one optimizer step per iteration"),
                        ("train.loss=rkl", "train.loss jsd"),
                        ("weight.filter=correct", "weight.filter all"),
                        ("weight.norm=ema", "weight.norm batch_mean"),
                        ("score.topk=4", "score.topk 0")):
        with pytest.raises(RenioInputError, match=f"score_in_train_step: needs {what}"):
            load_run_config(CONFIG, [*IN_STEP, extra])
    load_run_config(CONFIG, IN_STEP)
    for bad in ("maybe", "2"):
        with pytest.raises(RenioInputError, match="score_in_train_step: must be auto, true or "
                                                  "false, got .* \\(from the command line\\)"):
            load_run_config(CONFIG, [f"score_in_train_step={bad}"])


def test_score_in_train_step_auto_takes_the_step_where_it_can_and_says_why():
    """auto (the default): the train step scores wherever its conditions hold, the separate
    pass elsewhere, each with one line naming the reason; an explicit value wins."""
    def scoring(*extra: str) -> tuple[bool, str]:
        return load_run_config(CONFIG, list(extra)).scoring()

    assert load_run_config(CONFIG, []).score_in_train_step == "auto"
    assert scoring(LIVE) == (
        True, "scoring: in the train step (live weights, one step per batch, jsd)")
    separate = "scoring: separate pass ({})"
    assert scoring() == (False, separate.format(
        "train.weights_from=shard trains on the weight stage's weights, which need the scores "
        "first"))
    assert scoring(LIVE, "weight.filter=correct") == (False, separate.format(
        "weight.filter=correct selects the rows in the weight stage, before training"))
    assert scoring(LIVE, "weight.filter=incorrect", "fill_filtered=true") == (
        False, separate.format(
            "weight.filter=incorrect selects the rows in the weight stage, before training"))
    assert scoring(LIVE, "train.steps_per_batch=2") == (False, separate.format(
        "2 optimizer steps per iteration; one step's forward scores the rollouts only when it "
        "is the only step"))
    assert scoring(LIVE, "train.max_steps=3") == (False, separate.format(
        "3 optimizer steps per iteration; one step's forward scores the rollouts only when it "
        "is the only step"))
    assert scoring(LIVE, "train.loss=rkl") == (False, separate.format(
        "train.loss=rkl reads the stored scores, not the teacher's logits"))
    assert scoring(LIVE, "weight.norm=ema") == (False, separate.format(
        "weight.norm=ema normalizes over the whole shard; the step normalizes per micro-batch"))
    assert scoring(LIVE, "score.topk=4") == (False, separate.format(
        "score.topk=4 stores the teacher's top-k, which only the score pass writes"))
    assert scoring(LIVE, "score_in_train_step=false") == (
        False, "scoring: separate pass (score_in_train_step: false)")
    assert scoring(*IN_STEP) == (True, "scoring: in the train step (score_in_train_step: true)")


@pytest.mark.integration
def test_renio_run_says_which_scoring_path_it_takes_and_takes_it(tmp_path, toy_world):
    """The real CLI: the first thing `renio run` says is its scoring path. With live weights
    and nothing against it, the train step scores (the scores shard says so, no score pass
    ran); a filter, or score_in_train_step=false, keeps the separate pass."""
    common = ["iterations=1", "prompts_per_iteration=8", "rollout.n=2", "eval_every=0",
              "rollout.max_new_tokens=48", LIVE]
    cases = {
        "in-step": ([], "scoring: in the train step (live weights, one step per batch, jsd)"),
        "filter": (["weight.filter=correct"], "scoring: separate pass (weight.filter=correct "
                   "selects the rows in the weight stage, before training)"),
        "false": (["score_in_train_step=false"],
                  "scoring: separate pass (score_in_train_step: false)"),
    }
    for name, (extra, line) in cases.items():
        run_dir = tmp_path / name
        proc = subprocess.run([*RENIO, "run", "--config", str(CONFIG), f"run_dir={run_dir}",
                               *common, *extra], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        said = [x for x in proc.stderr.splitlines() if x.startswith("renio run ")]
        assert said[0] == f"renio run {line}", (name, said[:3])
        assert sum(line in x for x in said) == 1
        meta = json.loads(pq.read_schema(run_dir / "iter-00000" / "scores.parquet")
                          .metadata[b"renio"])
        (rec,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        if name == "in-step":
            assert meta.get("score_in_train_step") is True and rec["time"]["score_work"] == 0.0
        else:
            assert "score_in_train_step" not in meta and rec["time"]["score_work"] > 0


@pytest.mark.integration
@pytest.mark.parametrize("teacher", ["toy:teacher", "self"])
def test_score_in_train_step_writes_the_shards_the_separate_pass_writes(tmp_path, toy_world,
                                                                        teacher):
    """score_in_train_step: the train step scores its rollouts. Its scores shard holds the
    log-probs the separate score pass gives (float rounding apart), the weights shard the
    weights the step trained with, and the adapter is the separate pass's. OPSD ('self')
    scores the privileged prompt with the adapter switched off."""
    from safetensors.torch import load_file

    from renio_core.run.loop import run_loop

    common = [f"teacher={teacher}", "iterations=2", *ONE_STEP, "rollout.n=4", LIVE]
    separate, in_step = tmp_path / "separate", tmp_path / "in-step"
    run_loop(load_run_config(CONFIG, [f"run_dir={separate}", *common,
                                      "score_in_train_step=false"]))
    run_loop(load_run_config(CONFIG, [f"run_dir={in_step}", *common]))
    a_it, b_it = separate / "iter-00000", in_step / "iter-00000"
    assert pq.read_table(a_it / "rollouts.parquet").equals(pq.read_table(b_it / "rollouts.parquet"))
    a, b = pq.read_table(a_it / "scores.parquet"), pq.read_table(b_it / "scores.parquet")
    assert a.schema.names == b.schema.names and a.num_rows == b.num_rows == 32
    assert a.column("teacher_prompt_ids").equals(b.column("teacher_prompt_ids"))
    for col in ("student_logprobs", "teacher_logprobs"):
        x = [v for row in a.column(col).to_pylist() for v in row]
        y = [v for row in b.column(col).to_pylist() for v in row]
        assert len(x) == len(y) > 0 and max(abs(p - q) for p, q in zip(x, y)) < 1e-4, col
    meta = json.loads(pq.read_schema(b_it / "scores.parquet").metadata[b"renio"])
    assert meta.get("score_in_train_step") is True
    for it in (in_step / "iter-00000", in_step / "iter-00001"):
        stage = pq.read_table(it / "weights.parquet").column("weight").to_pylist()
        (step,) = [json.loads(x) for x in (it / "ckpt" / "metrics.jsonl").read_text().splitlines()]
        assert stage == [float(np.float32(w)) for w in step["live_weights"]]
        assert max(stage) > 1.5 * min(stage)  # the weights are not all alike
    x = load_file(str(a_it / "ckpt" / "adapter_model.safetensors"))
    y = load_file(str(b_it / "ckpt" / "adapter_model.safetensors"))
    assert x.keys() == y.keys() and max((x[k] - y[k]).abs().max().item() for k in x) < 1e-5
    rec = [json.loads(x) for x in (in_step / "metrics.jsonl").read_text().splitlines()]
    assert all(r["time"]["score_work"] == 0.0 and r["time"]["train_steps"] > 0 for r in rec)
    assert [r["pivotal_share"] for r in _records(in_step)][0] == pytest.approx(
        _records(separate)[0]["pivotal_share"], abs=1e-3)


@pytest.mark.integration
def test_score_in_train_step_killed_after_its_shards_reruns_exactly(tmp_path, toy_world):
    """Scored in the train step, the shards are written inside the train call, before the
    checkpoint: a run killed once iteration 1's scores exist retrains that iteration and ends
    as an unkilled run."""
    common = ["iterations=3", *ONE_STEP, "rollout.n=4", *IN_STEP]
    whole = tmp_path / "whole"
    _cli("run", "--config", CONFIG, f"run_dir={whole}", *common)
    cut = tmp_path / "cut"
    args = [*RENIO, "run", "--config", str(CONFIG), f"run_dir={cut}", *common]
    _run_killed_when(args, lambda: (cut / "iter-00001" / "scores.parquet").exists())
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for i in range(3):
        a, b = whole / f"iter-{i:05d}", cut / f"iter-{i:05d}"
        assert _adapter_bytes(a / "ckpt") == _adapter_bytes(b / "ckpt"), i
        assert pq.read_table(a / "weights.parquet").equals(pq.read_table(b / "weights.parquet")), i
    assert _records(whole) == _records(cut)


@pytest.mark.integration
def test_a_second_run_on_one_run_dir_is_refused_at_once(tmp_path, toy_world):
    from renio_core.run.loop import _lock_run_dir

    run_dir = tmp_path / "run"
    args = [*RENIO, "run", "--config", str(CONFIG), f"run_dir={run_dir}", *SMALL]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (run_dir / "run_config.json").exists():
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.05)
        second = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second was refused"
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines() == [
            f"error: another renio run (pid {first.pid}) holds {run_dir}; wait for it to end, "
            "or choose another run_dir"]
    finally:
        first.kill()
        first.wait()
    os.close(_lock_run_dir(run_dir))  # a killed holder's lock is gone with it


@pytest.mark.integration
def test_skip_long_prompts_runs_without_them(tmp_path, toy_world):
    prompts = tmp_path / "p.jsonl"
    short = toy_world.train_prompts.read_text().splitlines(True)[:4]
    long = json.dumps({"id": "long", "problem": "7" * 5000, "answer": "1", "task": "math"})
    prompts.write_text("".join(short[:2]) + long + "\n" + "".join(short[2:]))
    run_dir = tmp_path / "run"
    done = subprocess.run([*RENIO, "run", "--config", str(CONFIG), f"run_dir={run_dir}",
                           f"prompts={prompts}", "iterations=1", "prompts_per_iteration=4",
                           "eval_every=0", "rollout.n=1", "rollout.max_new_tokens=16",
                           "rollout.skip_long_prompts=true"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "skipped 1 of 5 prompts longer than the context (2,048 tokens with max_new_tokens 16)" \
        in " ".join(done.stderr.split())
    ids = pq.read_table(run_dir / "iter-00000" / "rollouts.parquet").column("prompt_id").to_pylist()
    assert sorted(ids) == sorted(json.loads(line)["id"] for line in short)
