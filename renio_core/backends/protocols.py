"""The two interfaces a backend implements; the stages and the run loop see only these.

:class:`Sampler` is ``HFSampler`` (``renio_core.backends.hf``) or ``VllmSampler``
(``renio_core.backends.vllm``); :class:`Scorer` is ``HFScorer`` or ``VllmScorer``. Both return
Arrow tables whose columns are declared in ``renio_core.data.schema``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import pyarrow as pa

from renio_core.data.prompt_io import Prompt


class Sampler(Protocol):
    """Samples ``cfg.n`` completions of every prompt: rollout rows in (prompt, sample) order."""

    def sample(self, prompts: Sequence[Prompt], cfg: Any,
               progress: Callable[[int], None] | None = None) -> pa.Table: ...

    def close(self) -> None: ...


class Scorer(Protocol):
    """Adds the score columns (student and teacher log-probs of every completion token)."""

    def score_table(self, table: pa.Table,
                    progress: Callable[[int], None] | None = None) -> pa.Table: ...

    def vocab_sizes(self) -> dict[str, int]:
        """Logit rows of the student's and the teacher's heads, by ``"student"``/``"teacher"``:
        every token id of the input must be below both."""
        ...

    def close(self) -> None: ...
