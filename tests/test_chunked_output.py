"""The write protocol of the expensive stages' outputs (data/chunked_output.write_chunks), on
real Parquet parts: the backend is made only when a part is missing and closed only when made
here, checks run before the first part, and a failure leaves complete parts for the rerun."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from renio_core.data import shards
from renio_core.data.chunked_output import ChunkedOutput, parse_shard, write_chunks

META = shards.build_metadata(stage="rollout", inputs=None, config={"n": 2})


class Backend:
    def __init__(self, log: list[str]):
        self.log = log
        log.append("made")

    def close(self) -> None:
        self.log.append("closed")


def _work(fail_at: int | None = None):
    def work(backend: Backend, k: int) -> pa.Table:
        if k == fail_at:
            raise RuntimeError(f"chunk {k} failed")
        backend.log.append(f"chunk {k}")
        return pa.table({"k": [k, k]})
    return work


def _out(path) -> ChunkedOutput:
    return ChunkedOutput(str(path), shard=parse_shard(None))


def test_made_once_closed_here_checked_first_merged(tmp_path):
    log: list[str] = []
    done = write_chunks(_out(tmp_path / "o.parquet"), 3, META, _work(),
                        make_backend=lambda: Backend(log),
                        first_use=lambda b: b.log.append("checked"))
    assert log == ["made", "checked", "chunk 0", "chunk 1", "chunk 2", "closed"]
    assert (done.written, done.skipped) == (3, 0) and done.busy >= 0
    assert pq.read_table(tmp_path / "o.parquet").column("k").to_pylist() == [0, 0, 1, 1, 2, 2]
    assert not (tmp_path / "o.parquet.parts").exists()


def test_a_callers_backend_is_kept_open_and_a_failure_keeps_complete_parts(tmp_path):
    log: list[str] = []
    mine = Backend(log)
    with pytest.raises(RuntimeError, match="chunk 1 failed"):
        write_chunks(_out(tmp_path / "d"), 3, META, _work(fail_at=1),
                     make_backend=lambda: Backend(log), backend=mine)
    assert log == ["made", "chunk 0"]  # the caller's, used, not closed; no second one made
    assert sorted(p.name for p in (tmp_path / "d").glob("*.parquet")) == ["part-00000.parquet"]
    # The rerun skips the complete part; a backend made here is closed even on success.
    log.clear()
    skipped: list[int] = []
    done = write_chunks(_out(tmp_path / "d"), 3, META, _work(),
                        make_backend=lambda: Backend(log), on_skip=skipped.append)
    assert skipped == [0] and (done.written, done.skipped) == (2, 1)
    assert log == ["made", "chunk 1", "chunk 2", "closed"]


def test_no_backend_when_every_part_is_complete(tmp_path):
    log: list[str] = []
    write_chunks(_out(tmp_path / "d"), 2, META, _work(), make_backend=lambda: Backend(log))
    log.clear()
    done = write_chunks(_out(tmp_path / "d"), 2, META, _work(),
                        make_backend=lambda: Backend(log))
    assert log == [] and (done.written, done.skipped) == (0, 2)
