"""How a toy world is put in place, with stand-in builders (no models are trained here).

The toy cache (``build.ensure_world``, behind ``ensure_toy_world``, ``ensure_chain_world`` and
``ensure_reflect_world``) and ``renio toy build --out`` (``place.build_toy_world_into``) build
into a temporary folder beside the world and rename it into place, one build at a time: a
failed or killed build never leaves a world that looks finished, and the next build is clean.
The cache shares a build between callers; ``--out`` refuses a second one. Both are
``atomic.put_world``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from renio_core.data import shards
from renio_core.errors import RenioInputError
from renio_core.modeling.toy.build import ToyWorld, ensure_world
from renio_core.modeling.toy.place import build_toy_world_into


class Builder:
    """Writes a file and then world.json, as every world's build does last; fails while
    ``fail`` is set, after writing the file. Records every call's keyword arguments."""

    def __init__(self, *, fail: bool = False, delay: float = 0.0) -> None:
        self.fail, self.delay, self.calls = fail, delay, []

    def __call__(self, out: Path, **kwargs) -> ToyWorld:
        self.calls.append(kwargs)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.jsonl").write_text("{}\n")
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("build failed")
        (out / "world.json").write_text(json.dumps({"seed": kwargs["seed"]}) + "\n")
        return ToyWorld.at(out)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- the toy cache


def test_cache_failed_build_leaves_nothing_and_the_next_builds(tmp_path: Path) -> None:
    failing = Builder(fail=True)
    with pytest.raises(RuntimeError, match="build failed"):
        ensure_world(tmp_path, "seed3-abc", failing, seed=3)
    assert _names(tmp_path) == [".seed3-abc.lock"]
    builder = Builder()
    world = ensure_world(tmp_path, "seed3-abc", builder, seed=3)
    assert world.root == tmp_path / "seed3-abc"
    assert world.manifest == {"seed": 3}
    assert builder.calls == [{"seed": 3, "progress": None}]
    assert _names(tmp_path) == [".seed3-abc.lock", "seed3-abc"]
    # A complete world is reused, not rebuilt.
    assert ensure_world(tmp_path, "seed3-abc", builder, seed=3).root == world.root
    assert len(builder.calls) == 1


def test_cache_removes_a_killed_build_and_ignores_an_unfinished_world(tmp_path: Path) -> None:
    (tmp_path / ".w.tmp-999999").mkdir()  # a killed build's temporary folder
    (tmp_path / "w").mkdir()  # an empty folder is no world: built over
    builder = Builder()
    ensure_world(tmp_path, "w", builder)
    assert len(builder.calls) == 1
    assert _names(tmp_path) == [".w.lock", "w"]
    assert _names(tmp_path / "w") == ["train.jsonl", "world.json"]


def test_cache_concurrent_callers_share_one_build(tmp_path: Path) -> None:
    builder = Builder(delay=0.5)
    roots: list[Path] = []

    def call() -> None:
        roots.append(ensure_world(tmp_path, "w", builder).root)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert roots == [tmp_path / "w"] * 3
    assert len(builder.calls) == 1
    assert _names(tmp_path) == [".w.lock", "w"]


# ----------------------------------------------------------------------------- --out


def test_out_failed_build_keeps_the_old_world_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    builder = Builder()
    world = build_toy_world_into(out, seed=2, quick=True, builder=builder)
    assert world.root == out and world.manifest == {"seed": 2}
    assert builder.calls == [{"seed": 2, "quick": True, "progress": None}]
    assert _names(tmp_path) == ["toy"]  # the lock file goes with the lock
    with pytest.raises(RuntimeError, match="build failed"):
        build_toy_world_into(out, seed=5, overwrite=True, builder=Builder(fail=True))
    assert _names(tmp_path) == ["toy"]
    assert ToyWorld.at(out).manifest == {"seed": 2}
    build_toy_world_into(out, seed=5, overwrite=True, builder=builder)
    assert ToyWorld.at(out).manifest == {"seed": 5}
    assert _names(tmp_path) == ["toy"]


def test_out_refuses_a_non_empty_folder_or_file_without_overwrite(tmp_path: Path) -> None:
    for out in (tmp_path / "full", tmp_path / "file"):
        if out.name == "full":
            out.mkdir()
            (out / "keep.txt").write_text("mine")
        else:
            out.write_text("mine")
        builder = Builder()
        with pytest.raises(RenioInputError) as err:
            build_toy_world_into(out, builder=builder)
        assert str(err.value) == f"{out}: exists and is not empty; pass --overwrite to replace it"
        assert builder.calls == []
    assert _names(tmp_path) == ["file", "full"]
    assert _names(tmp_path / "full") == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / ".empty.tmp-999999").mkdir()  # a killed build's
    build_toy_world_into(empty, builder=Builder())
    assert _names(empty) == ["train.jsonl", "world.json"]
    build_toy_world_into(tmp_path / "file", overwrite=True, builder=Builder())
    assert (tmp_path / "file" / "world.json").is_file()
    assert _names(tmp_path) == ["empty", "file", "full"]


def test_out_a_second_build_at_the_same_time_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    lock = shards.exclusive_lock(tmp_path / ".toy.lock", what=out)
    try:
        builder, errors = Builder(), []

        def call() -> None:
            try:
                build_toy_world_into(out, builder=builder)
            except RenioInputError as e:
                errors.append(str(e))

        second = threading.Thread(target=call, daemon=True)  # a wait would hang: give up
        second.start()
        second.join(10)
        assert not second.is_alive(), "the second build waited instead of being refused"
        assert errors == [f"{out}: another renio job is writing this output now; wait for it "
                          "to finish, or choose another output path"]
        assert builder.calls == [] and _names(tmp_path) == [".toy.lock"]
    finally:
        lock.release()
