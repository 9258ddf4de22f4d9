"""The reflect toy world: its traces, its one-token marker, the parsing of sampled traces, a
deterministic quick build, and the measurement of every number it promises (mechanics only:
the full build's numbers are in docs/toy-worlds.md)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from renio_core.data.prompts import PRIVILEGED_HEADER, render_ids, student_messages
from renio_core.errors import RenioInputError
from renio_core.formulas.eval_metrics import count_markers
from renio_core.modeling.toy import chain, reflect
from renio_core.modeling.toy.tokenizer import build_tokenizer

P = chain.ChainProblem(3, (("+", 5), ("*", 7), ("+", 9)))  # 3+5=8, 8*7=6, 6+9=5


def _text(pieces) -> str:
    return "".join(t for t, _ in pieces)


def test_traces_by_hand() -> None:
    plain = reflect.trace_pieces(P, {}, frozenset(), train_wrong=True)
    assert _text(plain) == "3+5=8\n8*7=6\n6+9=5\n\\boxed{5}"
    # Step 1 written 2, then `wait` and the redo: the answer stays right.
    redo = reflect.trace_pieces(P, {1: 2}, frozenset({1}), train_wrong=False)
    assert _text(redo) == "3+5=8\n8*7=2\nwait\n8*7=6\n6+9=5\n\\boxed{5}"
    assert [trained for _, trained in redo] == [True, False, True, True, True, True]
    # Step 0 written 1 and not reflected on: the trace carries on from 1 (1*7=7, 7+9=6).
    carry = reflect.trace_pieces(P, {0: 1}, frozenset(), train_wrong=True)
    assert _text(carry) == "3+5=1\n1*7=7\n7+9=6\n\\boxed{6}"
    assert all(trained for _, trained in carry)


def test_sampled_traces_write_wrong_results_only() -> None:
    rng = random.Random(0)
    seen_reflect = seen_carry = 0
    for _ in range(300):
        p = chain.random_chain(rng)
        wrong, refl = reflect._sample_trace(p, rng, 0.3, 0.5)
        assert refl <= set(wrong)
        text = _text(reflect.trace_pieces(p, wrong, refl, train_wrong=True))
        a = reflect.analyse(text)
        # Every injected line is wrong for the operand the trace wrote, and only those.
        assert a.wrong_lines == len(wrong)
        assert a.wrong_then_marker == a.redos == a.redos_right == a.markers == len(refl)
        seen_reflect += len(refl)
        seen_carry += len(wrong) - len(refl)
    assert seen_reflect > 50 and seen_carry > 50


def test_marker_is_one_token_here_and_four_elsewhere() -> None:
    tok = reflect.build_reflect_tokenizer()
    ids = tok("8*7=2\nwait\n", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("8*7=2\n") + 2
    assert tok.decode(ids) == "8*7=2\nwait\n"
    assert len(tok) == len(build_tokenizer()) + 1
    # The other worlds' tokenizer is unchanged: `wait` is spelled out there.
    assert len(build_tokenizer()("wait", add_special_tokens=False)["input_ids"]) == 4
    # renio eval counts it as a reflection marker.
    assert count_markers("8*7=2\nwait\n8*7=6")["wait"] == 1


def test_batches_train_what_each_kind_of_trace_should() -> None:
    tok = reflect.build_reflect_tokenizer()
    wait_id = tok.convert_tokens_to_ids("wait")
    spec = reflect.ReflectTrainSpec(steps=2, batch_size=64, lr=1e-3, warmup=1, inject=0.5,
                                    train_wrong=True, always_reflect_until=0.5,
                                    reflect_late=0.0, privileged=0.3)
    header = tok.convert_tokens_to_ids(PRIVILEGED_HEADER)  # one token of the toy tokenizer
    think_end = tok.convert_tokens_to_ids("</think>")
    batches = list(reflect._reflect_batches(tok, spec, 2, 0, "student", frozenset()))
    kinds = set()
    for step, (ids_BL, mask_BL, labels_BL) in enumerate(batches):
        for ids, mask, labels in zip(ids_BL, mask_BL, labels_BL):
            ids = ids[mask.bool()].tolist()
            labels = labels[: len(ids)].tolist()
            start = ids.index(think_end) + 3  # "</think>", "\n", "\n"
            completion = tok.decode(ids[start:-1])
            a = reflect.analyse(completion)
            privileged = header in ids
            kinds.add((step, privileged, a.wrong_lines > 0))
            if step == 1 and not privileged:
                assert a.markers == 0  # the late phase: reflect_late is 0 here
            if privileged or step == 0:
                assert a.wrong_lines == a.redos == a.redos_right  # always redone
            # A wrong line's result is trained exactly when it is the student's own.
            for end in a.wrong_line_ends:
                pos = start + len(tok(completion[:end], add_special_tokens=False)["input_ids"]) - 2
                assert tok.decode([ids[pos]]).isdigit()
                assert (labels[pos] != -100) == (not privileged)
            # The marker is always trained.
            for pos, token in enumerate(ids):
                if token == wait_id:
                    assert labels[pos] == wait_id
    assert {(0, True, True), (0, False, True), (1, True, True), (1, False, True)} <= kinds


def test_analyse_by_hand() -> None:
    a = reflect.analyse("3+5=9\nwait\n3+5=8\n8*7=1\n1+9=0\n\\boxed{0}")
    assert (a.wrong_lines, a.wrong_then_marker, a.redos, a.redos_right, a.markers) == (2, 1, 1, 1, 1)
    assert a.wrong_line_ends == (6, 23)  # after "3+5=9\n" and after "...8*7=1\n"
    b = reflect.analyse("3+5=9\nwait\n3+5=7\n7*7=9\nwait\n\\boxed{3}")
    assert (b.wrong_lines, b.wrong_then_marker, b.redos, b.redos_right, b.markers) == (2, 1, 1, 0, 2)
    assert reflect.analyse("") == reflect.TraceAnalysis(0, 0, 0, 0, 0, ())
    # A wrong last line without a newline gives no teacher-forcing prefix.
    assert reflect.analyse("3+5=9").wrong_line_ends == ()


def _all_met() -> dict:
    return {"student_p_wait_wrong": 0.2, "student_p_wait_right": 0.005,
            "own_wrong_then_marker": 0.2, "completions_with_marker": 0.1, "redo_right": 0.9,
            "student_sampled": 0.5, "student_by_k": {"3": 0.7, "8": 0.3},
            "student_privileged_sampled": 0.9, "teacher_sampled": 0.97,
            "teacher_p_wait_after_own_wrong": 0.95, "raw_weight_auroc_incorrect": 0.9}


@pytest.mark.parametrize("key,value,words", [
    ("student_p_wait_wrong", 0.31, "outside 0.10-0.30"),
    ("student_p_wait_wrong", 0.09, "outside 0.10-0.30"),
    ("student_p_wait_right", 0.011, "> 0.01"),
    ("student_p_wait_right", 0.0201, "ratio"),
    ("own_wrong_then_marker", 0.36, "8-35%"),
    ("completions_with_marker", 0.02, "3-25%"),
    ("redo_right", 0.84, "< 85%"),
    ("student_sampled", 0.66, "35-65%"),
    ("student_by_k", {"3": 0.44, "8": 0.3}, "15 points"),
    ("student_privileged_sampled", 0.79, "< 80%"),
    ("teacher_sampled", 0.949, "< 95%"),
    ("teacher_p_wait_after_own_wrong", 0.89, "< 0.9"),
    ("raw_weight_auroc_incorrect", 0.84, "< 0.85"),
])
def test_target_failures_by_hand(key, value, words) -> None:
    assert reflect.target_failures(_all_met()) == []
    m = _all_met() | {key: value}
    if key == "student_p_wait_right" and value > 0.02:
        m["student_p_wait_wrong"] = 0.2  # ratio 9.95 < 10, and also > 0.01
    missed = reflect.target_failures(m)
    assert any(words in line for line in missed), missed


@pytest.fixture(scope="module")
def quick_reflect(tmp_path_factory: pytest.TempPathFactory):
    return reflect.build_reflect_world(tmp_path_factory.mktemp("reflect") / "w", seed=0,
                                       quick=True)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_quick_build_is_deterministic_and_loads(quick_reflect, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    again = reflect.build_reflect_world(tmp_path / "again", seed=0, quick=True)
    first, second = _tree_bytes(quick_reflect.root), _tree_bytes(again.root)
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k] != second[k]] == []
    assert quick_reflect.manifest["world"] == "reflect"
    teacher = AutoModelForCausalLM.from_pretrained(str(quick_reflect.teacher))
    tok = AutoTokenizer.from_pretrained(str(quick_reflect.tokenizer))
    assert len(tok) == teacher.config.vocab_size
    assert len(tok("wait", add_special_tokens=False)["input_ids"]) == 1


def test_measure_reflect_mechanics(quick_reflect) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(quick_reflect.tokenizer))
    teacher = AutoModelForCausalLM.from_pretrained(str(quick_reflect.teacher)).eval()
    student = AutoModelForCausalLM.from_pretrained(str(quick_reflect.student)).eval()
    problems = chain.split_chains(0, 0, 8)[1]
    m = reflect.measure_reflect(teacher, student, tok, problems, seed=0)
    for key in ("student_sampled", "student_greedy", "student_privileged_sampled",
                "teacher_sampled", "student_p_wait_wrong", "student_p_wait_right",
                "teacher_p_wait_wrong", "completions_with_marker"):
        assert 0.0 <= m[key] <= 1.0, key
    assert set(m["student_by_k"]) == {str(p.k) for p in problems}
    assert isinstance(reflect.target_failures(m), list)
    assert len(reflect.table_rows(m)) >= 15
    # Deterministic (compared as JSON, where NaN equals NaN).
    again = reflect.measure_reflect(teacher, student, tok, problems, seed=0)
    assert json.dumps(again, sort_keys=True) == json.dumps(m, sort_keys=True)


def test_teacher_forced_marker_matches_a_plain_forward(quick_reflect) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(quick_reflect.tokenizer))
    model = AutoModelForCausalLM.from_pretrained(str(quick_reflect.student)).eval()
    problems = [P, chain.ChainProblem(1, (("*", 3), ("+", 2), ("*", 9), ("+", 1)))]
    got_wrong, got_right = reflect.teacher_forced_marker(model, tok, problems, random.Random(5))
    # Independently: the same coin flips, an unpadded forward, softmax at the last position.
    rng = random.Random(5)
    wait_id = tok.convert_tokens_to_ids("wait")
    for i, p in enumerate(problems):
        j = rng.randrange(p.k)
        lines = chain.step_lines(p)
        head, value = lines[j].split("=")
        bad = rng.choice([d for d in range(10) if d != int(value)])
        before = "".join(x + "\n" for x in lines[:j])
        for text, got in ((f"{before}{head}={bad}\n", got_wrong[i]), (f"{before}{lines[j]}\n", got_right[i])):
            ids = render_ids(tok, student_messages(p.problem, chain.TASK)) + \
                tok(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
            assert got == pytest.approx(float(probs[wait_id]), rel=1e-4)


def test_raw_weight_of_equal_models_is_one(quick_reflect) -> None:
    """Identity: a student scored against itself has no pivotal token, so every raw weight
    is exp(0) = 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(quick_reflect.tokenizer))
    student = AutoModelForCausalLM.from_pretrained(str(quick_reflect.student)).eval()
    prompts = [render_ids(tok, student_messages(P.problem, chain.TASK))] * 2
    completions = [tok("3+5=9\nwait\n3+5=8", add_special_tokens=False)["input_ids"], []]
    s = reflect._sampled_logprobs(student, tok, prompts, completions)
    assert [len(x) for x in s] == [len(completions[0]), 0]
    from renio_core.formulas.weighting import raw_weights, trajectory_log_ratios

    offsets = np.array([0, len(s[0]), len(s[0])])
    mean_B, count_B = trajectory_log_ratios(np.concatenate(s), np.concatenate(s), offsets,
                                            clip=2.0, threshold=1.0)
    assert count_B.tolist() == [0, 0] and raw_weights(mean_B, 1.0).tolist() == [1.0, 1.0]


def test_cli_quick_build_and_unknown_names(tmp_path: Path) -> None:
    out = tmp_path / "w"
    cmd = [sys.executable, "-m", "renio_cli.main", "toy", "build", "--world", "reflect",
           "--out", str(out), "--quick"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "reflect toy world" in proc.stdout and (out / "student" / "model.safetensors").is_file()
    with pytest.raises(RenioInputError, match="toy-reflect:teacher"):
        reflect.resolve_reflect_model("toy-reflect:nope")
    with pytest.raises(RenioInputError, match="toy-reflect:train or toy-reflect:test"):
        reflect.resolve_reflect_prompts("toy-reflect:nope", "prompts")
