"""Shared fixtures. ``toy_world``: the fully trained toy world, built at most once per run.

The world lives in the toy cache (env RENIO_TOY_CACHE, else ~/.cache/renio/toy), so a CI
job that sets RENIO_TOY_CACHE to a cached directory builds it once for all runs.
"""

from __future__ import annotations

import os

import pytest

from renio_core.toy import ToyWorld, ensure_toy_world


@pytest.fixture(scope="session")
def toy_world() -> ToyWorld:
    return ensure_toy_world()


def required() -> set[str]:
    """Names in ``RENIO_REQUIRE`` (comma list, e.g. ``slurm,wandb``): optional set-ups whose
    absence must fail a test instead of skipping it (CI sets it; see .ci/run)."""
    return {n.strip() for n in os.environ.get("RENIO_REQUIRE", "").split(",") if n.strip()}


def skip_or_fail(name: str, reason: str) -> None:
    """Skip with ``reason``, or fail where ``RENIO_REQUIRE`` names ``name``."""
    if name in required():
        pytest.fail(f"{reason} (RENIO_REQUIRE names {name!r})")
    pytest.skip(reason)
