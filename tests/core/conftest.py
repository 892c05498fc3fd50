"""Core tests run on asyncio and on trio: the core is anyio-only."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every core test runs once per event loop."""
    return str(request.param)
