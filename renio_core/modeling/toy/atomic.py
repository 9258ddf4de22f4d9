"""Putting a built toy world in place: one build at a time, seen only when complete.

Every world reaches its folder this way: the toy cache (``build.ensure_world``) and
``renio toy build --out`` (``place.build_toy_world_into``). A build writes into a temporary
folder ``.NAME.tmp-PID`` beside the world and is renamed into place when it has finished, so an
interrupted build is never taken for a world and leaves nothing that the next build trips
on. The lock ``.NAME.lock`` beside the world keeps two builds of it apart; holding it, any
temporary folder left there is a killed build's.

Kept apart from ``build.py``, ``chain.py`` and ``reflect.py``, whose sources are the worlds'
cache keys: how a finished world is put in place does not change its bytes, and a change here
must not send every cached world to be rebuilt. Imports nothing of the worlds, so ``build.py``
can import it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from renio_core.data.shards import exclusive_lock
from renio_core.errors import RenioInputError


def put_world(final: Path, build: Callable[[Path], object], *, reuse: bool,
              overwrite: bool = False) -> None:
    """Run ``build(tmp)`` on a temporary folder beside ``final`` and rename it to ``final``.

    ``reuse`` (the toy cache): a ``final`` with its world.json is complete and used as is; a
    second caller waits for a build under way and then uses its world; the lock file stays.
    Otherwise (``--out``): ``final`` is always built anew; a second build at the same time is
    refused with one line; a non-empty ``final`` is replaced, after the build has succeeded,
    only with ``overwrite``; the lock file is removed with the lock.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    if reuse and (final / "world.json").is_file():
        return
    with _lock(final, wait=reuse):
        if reuse and (final / "world.json").is_file():  # built by the caller we waited for
            return
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        try:
            if not reuse and not overwrite and final.exists() and (not final.is_dir()
                                                                    or any(final.iterdir())):
                raise RenioInputError("exists and is not empty; pass --overwrite to replace it",
                                      file=final)
            for stale in final.parent.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            build(tmp)
            if not reuse and final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _lock(final: Path, *, wait: bool) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``final``: waiting for it (``wait``), else refusing at once
    with one line (``shards.exclusive_lock``)."""
    path = final.parent / f".{final.name}.lock"
    if wait:
        with open(path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
        return
    lock = exclusive_lock(path, what=final)
    try:
        yield
    finally:
        lock.release()
