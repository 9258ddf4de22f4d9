"""The chain world's student shown OPSD's privileged prompt, against its plain prompt.

    python experiments/chain_privileged.py

One sample of each of the 256 test problems at the rollout's sampling (T 1.1, top-p 0.95,
top-k 20), with the student's plain prompt and with the privileged prompt (problem, reference
solution, instruction) that OPSD's self-teacher sees. Prints accuracy and mean completion length
in tokens for each. The addition world's student learned to redo a shown solution
(``privileged_fraction`` in its build); the chain world's did not, which this measures.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from renio_core.data.prompts import privileged_messages, render_ids, student_messages
from renio_core.modeling import models
from renio_core.modeling.toy import chain
from renio_core.modeling.toy import task as toy_task
from renio_core.modeling.toy.build import generate_completions


def main() -> None:
    torch.set_num_threads(1)
    world = chain.ensure_chain_world()
    tok = models.load_tokenizer(chain.resolve_chain_model("toy-chain:tokenizer"))
    student = models.load_model(chain.resolve_chain_model("toy-chain:student"),
                                dtype="float32", device="cpu")
    items = [json.loads(line) for line in Path(world.test_prompts).read_text().splitlines()]
    prompts = {
        "plain": [student_messages(it["problem"], chain.TASK) for it in items],
        "privileged": [privileged_messages(it["problem"], it["solution"], chain.TASK)
                       for it in items],
    }
    for name, messages in prompts.items():
        texts = generate_completions(student, tok, [render_ids(tok, m) for m in messages],
                                     greedy=False, seed=0, max_new_tokens=chain.MAX_NEW_TOKENS)
        ok = [toy_task.grade(t, it["answer"]) for t, it in zip(texts, items)]
        lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        print(f"{name:>10}: accuracy {sum(ok) / len(ok):.1%}, mean length "
              f"{sum(lengths) / len(lengths):.1f} tokens, e.g. {texts[0]!r}")


if __name__ == "__main__":
    main()
