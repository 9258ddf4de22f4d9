"""Fixed chunks of work, their assignment to ``--shard i/N`` jobs, and their output parts.

The expensive stages (``rollout``, ``score``) cut their work into fixed chunks: chunk ``k`` is
part ``part-0000k.parquet`` and belongs to shard ``k % N``. So sharded and unsharded runs
write the same parts, N jobs write disjoint parts of one directory, and a re-run skips parts
that are complete (``shards.OutputTarget.existing_part``).

A single-file ``--out x.parquet`` is resumable too: its parts are staged in ``x.parquet.parts/``
and merged into ``x.parquet`` (atomically) once all exist; the staging directory is then
removed. Sharding needs a directory ``--out``, since N jobs cannot share one file.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from renio_core.data import shards
from renio_core.errors import RenioInputError


@dataclasses.dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def owns(self, chunk: int) -> bool:
        return chunk % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str | Shard | None) -> Shard:
    """``"i/N"`` with ``0 <= i < N``."""
    if text is None:
        return Shard(0, 1)
    if isinstance(text, Shard):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise RenioInputError(f"--shard must look like i/N (e.g. 0/4), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise RenioInputError(f"--shard {text}: need N >= 1 and 0 <= i < N")
    return Shard(i, n)


class ChunkedOutput:
    """Parts of one stage output, written chunk by chunk."""

    def __init__(self, out: str | Path, *, shard: Shard, overwrite: bool = False):
        self.final = shards.OutputTarget(out, overwrite=overwrite)
        self.shard = shard
        self.overwrite = overwrite
        if self.final.single_file:
            if shard.count != 1:
                raise RenioInputError(
                    f"--shard {shard} needs a directory --out (N jobs cannot share one file)",
                    file=out,
                )
            self.staging_dir: Path | None = Path(str(self.final.out) + ".parts")
            self.parts = shards.OutputTarget(self.staging_dir, overwrite=overwrite)
        else:
            self.staging_dir = None
            self.parts = self.final

    @staticmethod
    def part_meta(base_meta: dict[str, Any], index: int, num_parts: int) -> dict[str, Any]:
        return dict(base_meta, part={"index": index, "num_parts": num_parts})

    def already_final(self, base_meta: dict[str, Any]) -> bool:
        """A single-file output that is already complete for these inputs and config."""
        return self.final.single_file and self.final.existing_part(0, base_meta)

    def prepare(self, num_chunks: int) -> None:
        """Take this shard's lock on the output (a second job writing the same shard of the
        same output gets one line), then remove what a killed run of this shard left."""
        self._lock = shards.exclusive_lock(self._lock_path(), what=self.final.out)
        if self.shard.count == 1:
            self.parts.remove_stale_tmp()
        else:  # the other shards' jobs may be writing their parts now
            for k in owned_chunks(self.shard, num_chunks):
                Path(str(self.parts.part_path(k)) + ".tmp").unlink(missing_ok=True)
        if self.staging_dir is not None:
            self.final.remove_stale_tmp()

    def _lock_path(self) -> Path:
        if self.final.single_file:
            self.final.out.parent.mkdir(parents=True, exist_ok=True)
            return Path(str(self.final.out) + ".lock")
        self.final.out.mkdir(parents=True, exist_ok=True)
        return self.final.out / f".lock-shard-{self.shard.index}-of-{self.shard.count}"

    def release(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()
            self._lock = None

    def is_complete(self, index: int, meta: dict[str, Any]) -> bool:
        return self.parts.existing_part(index, meta)

    def write(self, index: int, table: pa.Table, meta: dict[str, Any]) -> Path:
        if self.staging_dir is not None and meta["part"]["num_parts"] == 1:
            # One chunk into one file: nothing to resume part by part, so it is written in
            # place (atomically) rather than staged and then copied (the loop's shards).
            base = {k: v for k, v in meta.items() if k != "part"}
            shards.write_table_atomic(self.final.out, table, base)
            return self.final.out
        path = self.parts.part_path(index)
        shards.write_table_atomic(path, table, meta)
        return path

    def finalize(self, num_parts: int, base_meta: dict[str, Any]) -> Path:
        """Merge staged parts into the single output file; a directory output needs nothing."""
        if self.staging_dir is None:
            return self.final.out
        if num_parts == 1 and self.final.existing_part(0, base_meta):
            shutil.rmtree(self.staging_dir, ignore_errors=True)  # written in place
            return self.final.out
        paths = [self.parts.part_path(k) for k in range(num_parts)]
        schema = shards.open_parquet(paths[0]).schema_arrow.remove_metadata()
        with shards.AtomicParquetWriter(self.final.out, schema, base_meta) as writer:
            for p in paths:
                for rb in shards.open_parquet(p).iter_batches():
                    writer.write(rb)
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        return self.final.out


@dataclasses.dataclass
class ChunksWritten:
    written: int  # parts computed and written now
    skipped: int  # parts found complete
    busy: float  # seconds inside ``work``: the backend's loading left out


def write_chunks(
    out: ChunkedOutput,
    num_chunks: int,
    base_meta: dict[str, Any],
    work: Callable[[Any, int], pa.Table],
    *,
    make_backend: Callable[[], Any],
    backend: Any = None,
    first_use: Callable[[Any], None] | None = None,
    on_skip: Callable[[int], None] | None = None,
) -> ChunksWritten:
    """The whole write of an expensive stage's output (``rollout``, ``score``), once its
    caller has found it not already final: take the output's lock, write every missing part
    this shard owns, merge them (a single-file output), release the lock.

    ``work(backend, k)`` computes chunk ``k`` with the stage's sampler or scorer: the
    caller's ``backend`` (kept open), or one made by ``make_backend()`` at the first missing
    part (never when every part is complete) and closed here. ``first_use(backend)`` runs
    before the first part is computed (checks that must fail before anything is written).
    """
    own = backend is None
    state: dict[str, Any] = {"backend": backend, "used": False}
    busy = 0.0

    def make_chunk(k: int) -> pa.Table:
        nonlocal busy
        if state["backend"] is None:
            state["backend"] = make_backend()
        if not state["used"]:
            state["used"] = True
            if first_use is not None:
                first_use(state["backend"])
        t0 = time.perf_counter()
        table = work(state["backend"], k)
        busy += time.perf_counter() - t0
        return table

    out.prepare(num_chunks)
    try:
        try:
            written, skipped = run_chunks(out, num_chunks, base_meta, make_chunk,
                                          on_skip=on_skip)
        finally:
            if own and state["backend"] is not None:
                state["backend"].close()  # a vLLM engine's worker processes
        out.finalize(num_chunks, base_meta)
    finally:
        out.release()  # the output's lock
    return ChunksWritten(written, skipped, busy)


def run_chunks(
    out: ChunkedOutput,
    num_chunks: int,
    base_meta: dict[str, Any],
    make_chunk: Callable[[int], pa.Table],
    *,
    on_skip: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Write every chunk this shard owns that is not yet complete; returns (written, skipped).

    ``make_chunk(k)`` computes chunk ``k``'s table; it is only called for missing parts.
    """
    # Every part's status first: an output made with other settings is refused before any
    # part is written.
    owned = list(owned_chunks(out.shard, num_chunks))
    complete = {k: out.is_complete(k, out.part_meta(base_meta, k, num_chunks)) for k in owned}
    written = skipped = 0
    for k in owned:
        if complete[k]:
            skipped += 1
            if on_skip is not None:
                on_skip(k)
            continue
        out.write(k, make_chunk(k), out.part_meta(base_meta, k, num_chunks))
        written += 1
    return written, skipped


def owned_chunks(shard: Shard, num_chunks: int) -> Iterable[int]:
    return (k for k in range(num_chunks) if shard.owns(k))
