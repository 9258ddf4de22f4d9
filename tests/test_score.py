"""renio score: exact log-probs (OPD, OPSD, top-k), defaults, tokenizer check, resuming."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_models import make_model, toy_subset

from renio_core.backends.hf import token_budget_batches
from renio_core.data import shards
from renio_core.data.prompts import privileged_messages, render_ids, student_messages
from renio_core.errors import RenioInputError
from renio_core.modeling import models
from renio_core.stages.rollout import RolloutConfig, run_rollout
from renio_core.stages.score import ScoreConfig, run_score


@pytest.fixture(scope="module")
def world(toy_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("score_world")
    w = toy_subset(toy_world, root)
    # A teacher with its own vocabulary, and one with the toy vocabulary padded larger.
    w["reversed"] = str(make_model(root / "reversed", seed=3, reverse_tokenizer=True))
    w["padded"] = str(make_model(root / "padded", seed=4, vocab_pad=29,
                                 tokenizer_from=toy_world.tokenizer))
    # A LoRA adapter on the student, so OPSD's "adapter disabled" teacher differs from it.
    from peft import LoraConfig, get_peft_model

    base = models.load_model(w["student"], dtype="float32", device="cpu")
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                    init_lora_weights=False)).save_pretrained(root / "adapter")
    w["adapter"] = str(root / "adapter")
    common = dict(prompts=w["prompts"], n=2, max_new_tokens=10, chunk_prompts=4,
                  dtype="float32", device="cpu")
    w["rollout"] = str(run_rollout(RolloutConfig(model=w["student"], out=str(root / "ro"),
                                                 **common)).out)
    w["rollout_adapter"] = str(run_rollout(RolloutConfig(
        model=w["student"], adapter=w["adapter"], out=str(root / "ro_ad"), **common)).out)
    return w


def direct_logprobs(model, prompt, completion, T):
    """Independent reference: one full forward pass, log_softmax(logits / T) at the tokens."""
    ids = list(prompt) + list(completion)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits / T, dim=-1)
    P = len(prompt)
    rows = lp[P - 1: len(ids) - 1]
    return rows.gather(1, torch.tensor(completion)[:, None]).squeeze(1), rows


@pytest.mark.parametrize("mode,topk", [("opd", 0), ("opd", 3), ("opsd", 0), ("opsd", 3)])
def test_scores_equal_direct_forward(world, tmp_path, mode, topk):
    T = 1.1  # the rollout's temperature, taken from the metadata
    if mode == "opd":
        cfg = ScoreConfig(input=world["rollout"], teacher=world["teacher"],
                          out=str(tmp_path / "s.parquet"), topk=topk, rows_per_part=5,
                          max_batch_tokens=200, chunk=7, dtype="float32", device="cpu")
        student = models.load_model(world["student"], dtype="float32", device="cpu")
        teacher = models.load_model(world["teacher"], dtype="float32", device="cpu")
    else:
        cfg = ScoreConfig(input=world["rollout_adapter"], teacher="self",
                          out=str(tmp_path / "s.parquet"), topk=topk, rows_per_part=5,
                          max_batch_tokens=200, chunk=7, dtype="float32", device="cpu")
        student = models.load_model(world["student"], adapter=world["adapter"],
                                    dtype="float32", device="cpu")
        teacher = models.load_model(world["student"], dtype="float32", device="cpu")
    summary = run_score(cfg)
    assert summary.temperature == T
    tok = models.load_tokenizer(world["student"])
    table = shards.read_table(cfg.out)
    assert table.num_rows == 24
    for r in table.to_pylist():
        comp = r["completion_ids"]
        if mode == "opd":
            assert r["teacher_prompt_ids"] == r["prompt_ids"]
        else:
            want = render_ids(tok, privileged_messages(r["problem"], r["solution"], "math"))
            assert r["teacher_prompt_ids"] == want
        s_want, _ = direct_logprobs(student, r["prompt_ids"], comp, T)
        t_want, t_rows = direct_logprobs(teacher, r["teacher_prompt_ids"], comp, T)
        assert torch.allclose(torch.tensor(r["student_logprobs"]), s_want, atol=1e-5)
        assert torch.allclose(torch.tensor(r["teacher_logprobs"]), t_want, atol=1e-5)
        if topk:
            vals, ids = t_rows.topk(topk, dim=-1)
            assert torch.equal(torch.tensor(r["teacher_topk_ids"]), ids)
            assert torch.allclose(torch.tensor(r["teacher_topk_logprobs"]), vals, atol=1e-5)
        else:
            assert r["teacher_topk_ids"] is None and r["teacher_topk_logprobs"] is None
    meta = shards.read_metadata(Path(cfg.out))
    assert meta["stage"] == "score" and meta["upstream"]["stage"] == "rollout"


def test_opsd_adapter_student_differs_from_teacher(world, tmp_path):
    out = run_score(ScoreConfig(input=world["rollout_adapter"], teacher="self",
                                out=str(tmp_path / "s.parquet"), dtype="float32",
                                device="cpu")).out
    t = shards.read_table(out)
    assert t.column("student_logprobs").to_pylist() != t.column("teacher_logprobs").to_pylist()


def test_temperature_override_and_padded_teacher(world, tmp_path):
    cfg = ScoreConfig(input=world["rollout"], teacher=world["padded"], temperature=0.7,
                      out=str(tmp_path / "s.parquet"), dtype="float32", device="cpu")
    run_score(cfg)
    teacher = models.load_model(world["padded"], dtype="float32", device="cpu")
    r = shards.read_table(cfg.out).slice(0, 1).to_pylist()[0]
    want, _ = direct_logprobs(teacher, r["prompt_ids"], r["completion_ids"], 0.7)
    assert torch.allclose(torch.tensor(r["teacher_logprobs"]), want, atol=1e-5)


def test_four_shards_equal_one_run(world, tmp_path):
    kw = dict(input=world["rollout"], teacher=world["teacher"], rows_per_part=5,
              dtype="float32", device="cpu")
    run_score(ScoreConfig(out=str(tmp_path / "whole.parquet"), **kw))
    for i in range(4):
        run_score(ScoreConfig(out=str(tmp_path / "sharded"), shard=f"{i}/4", **kw))
    cols = ["prompt_id", "sample_index", "student_logprobs", "teacher_logprobs"]
    whole = shards.read_table(tmp_path / "whole.parquet", columns=cols).to_pylist()
    sharded = shards.read_table(tmp_path / "sharded", columns=cols).to_pylist()
    assert sharded == whole  # same rows, same order (parts follow the input)


def test_tokenizer_mismatch_cli_one_line_exit_2(world, tmp_path):
    out = tmp_path / "s.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "renio_cli.main", "score", "--in", world["rollout"],
         "--teacher", world["reversed"], "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tokenizer mismatch" in lines[0]
    assert not out.exists() and not Path(str(out) + ".parts").exists()


def test_opsd_missing_solution_names_the_row(world, tmp_path):
    table = shards.read_table(world["rollout"])
    sol = table.column("solution").to_pylist()
    sol[5] = None
    bad = table.set_column(table.schema.get_field_index("solution"), "solution",
                           pa.array(sol, pa.string()))
    meta = shards.read_metadata(shards.resolve_inputs(world["rollout"])[0])
    shards.write_table_atomic(tmp_path / "bad.parquet", bad, meta)
    with pytest.raises(RenioInputError, match=r"row 5, column 'solution'.*reference solution"):
        run_score(ScoreConfig(input=str(tmp_path / "bad.parquet"), teacher="self",
                              out=str(tmp_path / "s.parquet")))
    assert not (tmp_path / "s.parquet").exists()


def test_opd_privileged_teacher_prompt(world, tmp_path):
    """--teacher-prompt privileged: the separate OPD teacher sees the problem and the reference
    solution (the official collator's OPD teacher input), scored exactly after that prompt."""
    cfg = ScoreConfig(input=world["rollout"], teacher=world["teacher"], teacher_prompt="privileged",
                      out=str(tmp_path / "s.parquet"), dtype="float32", device="cpu")
    run_score(cfg)
    tok = models.load_tokenizer(world["student"])
    teacher = models.load_model(world["teacher"], dtype="float32", device="cpu")
    rows = shards.read_table(cfg.out).to_pylist()
    for r in rows[:4]:
        want = render_ids(tok, privileged_messages(r["problem"], r["solution"], "math"))
        assert r["teacher_prompt_ids"] == want != r["prompt_ids"]
        assert r["solution"] in tok.decode(r["teacher_prompt_ids"])
        t_want, _ = direct_logprobs(teacher, want, r["completion_ids"], 1.1)
        assert torch.allclose(torch.tensor(r["teacher_logprobs"]), t_want, atol=1e-5)
    assert shards.read_metadata(Path(cfg.out))["teacher_prompt"] == "privileged"
    plain = run_score(ScoreConfig(input=world["rollout"], teacher=world["teacher"],
                                  out=str(tmp_path / "p.parquet"), dtype="float32", device="cpu"))
    assert shards.read_metadata(Path(plain.out))["teacher_prompt"] == "plain"
    with pytest.raises(RenioInputError, match="--teacher-prompt: plain with --teacher self"):
        ScoreConfig(input="x", teacher="self", out="y", teacher_prompt="plain")
    with pytest.raises(RenioInputError, match="--teacher-prompt: must be one of plain, privileged"):
        ScoreConfig(input="x", teacher="t", out="y", teacher_prompt="gold")


def test_privileged_without_solutions_is_one_line_exit_2(world, tmp_path):
    table = shards.read_table(world["rollout"]).drop_columns(["solution"])
    meta = shards.read_metadata(shards.resolve_inputs(world["rollout"])[0])
    shards.write_table_atomic(tmp_path / "nosol.parquet", table, meta)
    out = tmp_path / "s.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "renio_cli.main", "score", "--in", str(tmp_path / "nosol.parquet"),
         "--teacher", world["teacher"], "--teacher-prompt", "privileged", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'solution'" in lines[0] and "--teacher-prompt privileged" in lines[0]
    assert not out.exists()


def test_foreign_file_needs_student_and_temperature(world, tmp_path):
    table = shards.read_table(world["rollout"]).replace_schema_metadata(None)
    pq.write_table(table, tmp_path / "foreign.parquet")
    base = dict(input=str(tmp_path / "foreign.parquet"), teacher=world["teacher"],
                out=str(tmp_path / "s.parquet"), dtype="float32", device="cpu")
    with pytest.raises(RenioInputError, match="config.model.*--student"):
        run_score(ScoreConfig(**base))
    with pytest.raises(RenioInputError, match="--temperature"):
        run_score(ScoreConfig(student=world["student"], **base))
    run_score(ScoreConfig(student=world["student"], temperature=1.0, **base))
    assert shards.read_table(base["out"]).num_rows == 24


def test_student_tokenizer_must_match_the_rollout(world, tmp_path):
    with pytest.raises(RenioInputError, match="different tokenizer"):
        run_score(ScoreConfig(input=world["rollout"], teacher=world["teacher"],
                              student=world["reversed"], out=str(tmp_path / "s.parquet")))


def test_vllm_backend_refuses_inexact_temperature_and_missing_package(world, tmp_path):
    base = dict(input=world["rollout"], teacher=world["teacher"], backend="vllm",
                out=str(tmp_path / "s.parquet"))
    with pytest.raises(RenioInputError, match="cannot score exactly at temperature 1.1"):
        run_score(ScoreConfig(**base))
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(RenioInputError, match="'vllm' package"):
            run_score(ScoreConfig(temperature=1.0, **base))
    assert not (tmp_path / "s.parquet").exists()


def test_token_budget_batches():
    lengths = [5, 1, 9, 3, 3, 20]
    batches = token_budget_batches(lengths, 10)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert longest * len(b) <= 10 or len(b) == 1
    assert batches[-1] == [5]  # longer than the budget: alone
    assert token_budget_batches([4, 4, 4], 12) == [[0, 1, 2]]


@pytest.mark.integration
def test_cli_sigkill_then_rerun_completes(world, tmp_path):
    out = tmp_path / "scores"
    args = [sys.executable, "-m", "renio_cli.main", "score", "--in", world["rollout"],
            "--teacher", world["teacher"], "--out", str(out), "--rows-per-part", "1",
            "--dtype", "float32", "--device", "cpu", "--topk", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "part-00001.parquet").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("part-*.parquet")))
    assert 0 < done_before < 24, "the kill should land mid-run"
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "already complete" in proc.stdout
    assert not list(out.glob("*.tmp"))
    cols = ["prompt_id", "sample_index", "student_logprobs", "teacher_logprobs"]
    got = shards.read_table(out, columns=cols).to_pylist()
    ref = run_score(ScoreConfig(input=world["rollout"], teacher=world["teacher"],
                                out=str(tmp_path / "ref.parquet"), topk=2, dtype="float32",
                                device="cpu")).out
    want = shards.read_table(ref, columns=cols).to_pylist()
    assert len(got) == 24
    for g, w in zip(got, want):
        assert (g["prompt_id"], g["sample_index"]) == (w["prompt_id"], w["sample_index"])
        assert torch.allclose(torch.tensor(g["teacher_logprobs"]),
                              torch.tensor(w["teacher_logprobs"]), atol=1e-5)


@pytest.mark.integration
def test_opsd_teacher_prefers_the_reference_solution(toy_world, tmp_path):
    """The privileged prompt (holding the solution) makes the student's own base weights
    more confident in the reference solution than the plain student prompt does."""
    import json

    tok = models.load_tokenizer(toy_world.student)
    problems = [json.loads(line) for line in
                Path(toy_world.test_prompts).read_text().splitlines()[:16]]
    prompt_ids, completion_ids = [], []
    for p in problems:
        prompt_ids.append(render_ids(tok, student_messages(p["problem"], "math")))
        completion_ids.append(tok(p["solution"], add_special_tokens=False)["input_ids"]
                              + [tok.eos_token_id])
    table = pa.table({
        "prompt_id": [p["id"] for p in problems],
        "sample_index": pa.array([0] * len(problems), pa.int32()),
        "problem": [p["problem"] for p in problems],
        "solution": [p["solution"] for p in problems],
        "prompt_ids": pa.array(prompt_ids, pa.list_(pa.int32())),
        "completion_ids": pa.array(completion_ids, pa.list_(pa.int32())),
    })
    pq.write_table(table, tmp_path / "refs.parquet")
    out = run_score(ScoreConfig(input=str(tmp_path / "refs.parquet"), teacher="self",
                                student=str(toy_world.student), temperature=1.0,
                                out=str(tmp_path / "s.parquet"), dtype="float32",
                                device="cpu")).out
    scored = shards.read_table(out).to_pylist()
    student = [sum(r["student_logprobs"]) for r in scored]
    teacher = [sum(r["teacher_logprobs"]) for r in scored]
    assert sum(teacher) > sum(student)
    assert sum(t > s for t, s in zip(teacher, student)) >= 0.75 * len(scored)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("bfloat16", 0.25)])
def test_cuda_scores_match_the_cpu_direct_forward(world, tmp_path, dtype, atol):
    """Written for GPU machines (docs/cluster.md says which have run on one). bf16 is loose: its
    log-probs differ from float32 by about its precision times the logit scale."""
    cfg = ScoreConfig(input=world["rollout"], teacher=world["teacher"],
                      out=str(tmp_path / "s.parquet"), topk=3, dtype=dtype, device="cuda")
    run_score(cfg)
    student = models.load_model(world["student"], dtype="float32", device="cpu")
    teacher = models.load_model(world["teacher"], dtype="float32", device="cpu")
    for r in shards.read_table(cfg.out).to_pylist():
        s_want, _ = direct_logprobs(student, r["prompt_ids"], r["completion_ids"], 1.1)
        t_want, _ = direct_logprobs(teacher, r["prompt_ids"], r["completion_ids"], 1.1)
        assert torch.allclose(torch.tensor(r["student_logprobs"]), s_want, atol=atol)
        assert torch.allclose(torch.tensor(r["teacher_logprobs"]), t_want, atol=atol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_map_auto_scores_equal_the_single_device_run(world, tmp_path):
    """The toy world's student and teacher spread by transformers' device_map="auto" (over
    every visible GPU; on one GPU it is still the accelerate-hooked path) score the same
    numbers as the same models on one device, in float32."""
    pytest.importorskip("accelerate")
    common = {"input": world["rollout"], "teacher": world["teacher"], "topk": 3,
              "dtype": "float32"}
    one = run_score(ScoreConfig(out=str(tmp_path / "one.parquet"), device="cuda", **common))
    spread = run_score(ScoreConfig(out=str(tmp_path / "spread.parquet"), device_map="auto",
                                   **common))
    rows_one = shards.read_table(one.out).to_pylist()
    rows_spread = shards.read_table(spread.out).to_pylist()
    assert len(rows_one) == len(rows_spread) > 0
    for a, b in zip(rows_one, rows_spread):
        for col in ("student_logprobs", "teacher_logprobs", "teacher_topk_logprobs"):
            assert torch.allclose(torch.tensor(b[col]), torch.tensor(a[col]), atol=1e-4), col
        assert b["teacher_topk_ids"] == a["teacher_topk_ids"]
