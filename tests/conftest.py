"""Shared fixtures and helpers.

``toy_world``: the fully trained toy world, built at most once per run. The world lives in the
toy cache (env RENIO_TOY_CACHE, else ~/.cache/renio/toy), so a CI job that sets
RENIO_TOY_CACHE to a cached directory builds it once for all runs.

``require_component(name, missing_reason)``: what a test calls instead of a bare skip when an
optional system component (chromium, bwrap, slurm) is missing. It skips, unless the
environment variable ``RENIO_REQUIRE`` (comma-separated component names, set by ``.ci/run``)
names the component: then the test fails, so CI cannot pass without exercising it.
"""

from __future__ import annotations

import os

import pytest

from renio_core.modeling.toy import ToyWorld, ensure_toy_world


def required_components() -> set[str]:
    """The components named in RENIO_REQUIRE (comma- or space-separated, case-insensitive)."""
    raw = os.environ.get("RENIO_REQUIRE", "")
    return {part.strip().lower() for part in raw.replace(" ", ",").split(",") if part.strip()}


def require_component(name: str, missing_reason: str | None) -> None:
    """Call with ``missing_reason`` None when ``name`` is present (nothing happens); else skip,
    or fail when RENIO_REQUIRE names it."""
    if missing_reason is None:
        return
    if name.lower() in required_components():
        pytest.fail(f"{name} is required here (RENIO_REQUIRE) but missing: {missing_reason}",
                    pytrace=False)
    pytest.skip(missing_reason)


@pytest.fixture(scope="session")
def toy_world() -> ToyWorld:
    return ensure_toy_world()


def required() -> set[str]:
    """The same as :func:`required_components` (the Slurm test's name for it)."""
    return required_components()


def skip_or_fail(name: str, reason: str) -> None:
    """:func:`require_component` for a component known to be missing."""
    require_component(name, reason)
