"""Evidence on the addition toy world for issue 14's explanation of the replication.

    RENIO_TOY_CACHE=... python experiments/addition_evidence.py [--problems 64] [--out docs/addition-world-evidence.md]

The README's replication found no benefit from incorrect samples or from ReNIO on the addition
world and explained it so: every error is one dropped carry, and the teacher, which never saw a
wrong line, offers no way back after one. This script measures the two facts that explanation
rests on, with the addition world's own models:

1. **Gradient cosine.** For a problem with a carry, a correct completion (the solution) and an
   incorrect one (the same solution with the first carry dropped) are scored as ``renio train``
   scores a sample: the full-vocabulary divergence KL(teacher || student) (``jsd``, beta 0,
   temperature 1, no token clip), mean over completion tokens. The cosine between the gradients
   of the two losses (all student parameters) is compared with the cosine between the
   gradients of correct completions of two different problems.
2. **The teacher after a dropped carry.** Teacher-forced on the incorrect completion up to and
   including the wrong line, the teacher's next-token distribution, its probability of the
   reflection marker ``wait``, and where its greedy continuation ends: the answer the wrong
   chain implies (it "just continues") or the right one (it recovers).

Everything is deterministic (teacher forcing and greedy decoding; problems from a fixed seed).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from renio_core.data.prompts import render_ids, student_messages
from renio_core.formulas.losses import token_divergence
from renio_core.modeling.toy import ensure_toy_world
from renio_core.modeling.toy import task as toy_task
from renio_core.modeling.toy.build import generate_completions

ROOT = Path(__file__).resolve().parents[1]


def completion_loss(student, teacher, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Per-token KL(teacher || student) on the completion; renio train's sample loss is its mean."""
    ids = torch.tensor([prompt + completion])
    s_logits = student(input_ids=ids).logits[:, len(prompt) - 1:-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits[:, len(prompt) - 1:-1]
    return token_divergence(s_logits, t_logits, beta=0.0, temperature=1.0, token_clip=0.0)[0]


def flat_grad(student, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss.mean(), params)
    return torch.cat([g.reshape(-1) for g in grads])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "addition-world-evidence.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    world = ensure_toy_world()
    tok = AutoTokenizer.from_pretrained(str(world.tokenizer))
    student = AutoModelForCausalLM.from_pretrained(str(world.student)).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(world.teacher)).eval()
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731

    rng = random.Random("addition-evidence-0")
    problems = []
    for p in toy_task.random_problems(rng):
        # The first carry goes into a step line (not only into the final digit), so that the
        # wrong line is a step the teacher can react to before the answer.
        if toy_task.carry_columns(p) and toy_task.carry_columns(p)[0] < toy_task.DIGITS \
                and p not in problems:
            problems.append(p)
        if len(problems) == args.problems:
            break

    same, different, token_rows = [], [], []
    wait_ids = enc("wait")
    p_wait, p_digit_right, continues, recovers, other = [], [], 0, 0, 0
    top_after_line: dict[str, float] = {}
    top_after_digit: dict[str, float] = {}
    prev_grad = None
    wrong_prefixes, wrong_answers = [], []
    for p in problems:
        prompt = render_ids(tok, student_messages(p.problem, toy_task.TASK))
        col = toy_task.carry_columns(p)[0]
        right_text = toy_task.solution(p)
        wrong_text = toy_task.solution(p, drop_carries=frozenset({col}))
        right = enc(right_text) + [tok.eos_token_id]
        wrong = enc(wrong_text) + [tok.eos_token_id]
        g_right = flat_grad(student, completion_loss(student, teacher, prompt, right))
        g_wrong = flat_grad(student, completion_loss(student, teacher, prompt, wrong))
        same.append(cosine(g_right, g_wrong))
        if prev_grad is not None:
            different.append(cosine(g_right, prev_grad))
        prev_grad = g_right
        # Per-token losses: identical before the first differing token, then apart.
        with torch.no_grad():
            lr_ = completion_loss(student, teacher, prompt, right)
            lw_ = completion_loss(student, teacher, prompt, wrong)
        first = next(i for i, (a, b) in enumerate(zip(right, wrong)) if a != b)
        # Position `first` predicts the dropped carry from the shared prefix, so its full-
        # vocabulary loss is shared too; the samples differ only from position first + 1.
        token_rows.append((float((lr_[:first + 1] - lw_[:first + 1]).abs().max()),
                           float(lr_[first]),
                           float(lw_[first + 1:].mean()), float(lr_[first + 1:].mean())))
        # The teacher at the dropped carry, and after the whole wrong line.
        wrong_lines = wrong_text.split("\n")
        prefix_text = "\n".join(wrong_lines[:col + 1]) + "\n"  # lines 0..col; line col is wrong
        prefix = prompt + enc(prefix_text)
        with torch.no_grad():
            at_carry = torch.softmax(teacher(input_ids=torch.tensor([prompt + wrong[:first]])).logits[0, -1], -1)
            p_digit_right.append(float(at_carry[right[first]]))
            after_digit = torch.softmax(teacher(input_ids=torch.tensor([prompt + wrong[:first + 1]])).logits[0, -1], -1)
        for tid, pr in zip(*[x.tolist() for x in torch.topk(after_digit, 3)][::-1]):
            key = tok.decode([tid]).replace("\n", "\\n")
            top_after_digit[key] = top_after_digit.get(key, 0.0) + pr / len(problems)
        with torch.no_grad():
            ids = torch.tensor([prefix + wait_ids])
            logp = torch.log_softmax(teacher(input_ids=ids).logits[0].float(), -1)
        n = len(prefix)
        p_wait.append(float(torch.exp(sum(logp[n - 1 + i, wait_ids[i]] for i in range(len(wait_ids))))))
        for tid, pr in zip(*[x.tolist() for x in torch.topk(logp[n - 1].exp(), 3)][::-1]):
            key = tok.decode([tid]).replace("\n", "\\n")
            top_after_line[key] = top_after_line.get(key, 0.0) + pr / len(problems)
        wrong_prefixes.append(prefix)
        wrong_answers.append((toy_task.extract_boxed(wrong_text), p.answer))
    conts = generate_completions(teacher, tok, wrong_prefixes, greedy=True, seed=0, max_new_tokens=40)
    for text, (wrong_ans, right_ans) in zip(conts, wrong_answers):
        got = toy_task.extract_boxed(text)
        if got == wrong_ans:
            continues += 1
        elif got == right_ans:
            recovers += 1
        else:
            other += 1

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    n = len(problems)
    rows = list(zip(*token_rows))
    lines = [
        "# Evidence on the addition world (issue 14)",
        "",
        "Made by `python experiments/addition_evidence.py` "
        f"({n} problems with at least one carry, fixed seed; the addition world's student and "
        f"teacher, seed 0; {time.perf_counter() - t0:.0f} s on a shared 2-core CPU). "
        "Incorrect sample = the problem's solution with its first carry dropped (the addition "
        "world's only kind of error). Loss = `renio train`'s per-sample loss (KL(teacher || "
        "student) over the full vocabulary, token mean over the completion).",
        "",
        "## 1. Gradients of a correct and an incorrect sample of the same problem",
        "",
        "| pair | mean cosine of the full-parameter gradients | min | max |",
        "| --- | --- | --- | --- |",
        f"| correct and incorrect sample, same problem | {mean(same):.3f} | {min(same):.3f} | {max(same):.3f} |",
        f"| correct samples of two different problems (reference) | {mean(different):.3f} | "
        f"{min(different):.3f} | {max(different):.3f} |",
        "",
        "The full-vocabulary loss at a position depends only on the tokens before it, so the two "
        "samples' per-token losses are identical up to and including the position that predicts "
        f"the carry (largest difference {max(rows[0]):.1e}; the loss there is {mean(rows[1]):.3f} "
        "on average, the same for both samples). The samples differ only after the dropped "
        f"carry, where the mean token loss is {mean(rows[2]):.3f} on the incorrect sample and "
        f"{mean(rows[3]):.3f} on the correct one.",
        "",
        "## 2. The teacher after an injected dropped carry",
        "",
        f"- At the carry digit the teacher puts {mean(p_digit_right):.3f} on the right carry "
        "on average (so the dropped carry is a clear pivotal token).",
        "- Right after the dropped (wrong) carry digit, the teacher's next tokens (mass of the "
        "tokens in a problem's top 3, averaged over problems): " + ", ".join(
            f"`{k}` {v:.3f}" for k, v in sorted(top_after_digit.items(), key=lambda kv: -kv[1])[:4]) + ".",
        f"- After the whole wrong line, the teacher's probability of `wait` (the reflection "
        f"marker, all four characters) is {mean(p_wait):.2e} on average (max {max(p_wait):.2e}).",
        "- Its next-token distribution there (mass of the tokens that are in a problem's top 3, "
        "averaged over problems): " + ", ".join(
            f"`{k}` {v:.3f}" for k, v in sorted(top_after_line.items(), key=lambda kv: -kv[1])[:6]) + ".",
        f"- Greedy continuation from there: the teacher ends on the wrong chain's answer in "
        f"{continues} of {n} problems, recovers the right answer in {recovers}, and ends "
        f"elsewhere in {other}.",
        "",
        "## Reading",
        "",
        "Against the explanation in the README's replication section: the same-problem cosine, "
        "against the cross-problem reference, says how much of a correct and an incorrect "
        "sample's update is shared (everything up to the error is); the teacher's mass on "
        "`wait` and its greedy continuation say whether it offers any recovery after an error "
        "for incorrect-only training to teach.",
        "",
        f"- Measured: the same-problem cosine ({mean(same):.3f}) is "
        + ("not above" if mean(same) <= mean(different) else "above")
        + f" the cross-problem reference ({mean(different):.3f}). "
        + ("The shared prefix does not make the two updates alike, most likely because the "
           "gradient is dominated by the positions after the error, where the incorrect "
           "sample's loss is larger (not measured separately): a correct and an incorrect "
           "sample are not redundant updates." if mean(same) <= mean(different) else
           "The shared prefix makes the two updates more alike than unrelated samples."),
        f"- Measured: after a dropped carry the teacher's mass on `wait` is about "
        f"{mean(p_wait):.0e} and its greedy continuation ends on the wrong chain's answer in "
        f"{continues} of {n} problems. After an error the teacher teaches the student to "
        "continue the wrong chain consistently, never to check or redo. This is the part of the "
        "explanation the numbers support: there is no reflection for correct-only training to "
        "lose, nor for incorrect-only training to gain.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
