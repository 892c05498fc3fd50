"""Run an awaitable under a deadline (and a shield), and tell when the deadline hit.

The cancel scope must be entered before the awaitable takes its first step: an
awaitable may open cancel scopes of its own before it first suspends, and those
must nest inside ours. (Entering ours lazily, at the first suspension, corrupts
the cancel-scope stack on trio and anyio's asyncio backend alike.)
"""

from __future__ import annotations

import math
from collections.abc import Awaitable
from typing import TypeVar

import anyio

T = TypeVar("T")


class DeadlineExpired(Exception):
    """Raised when the guarded awaitable was cancelled by its own deadline."""


async def guarded(awaitable: Awaitable[T], timeout: float | None, *, shield: bool) -> T:
    """Await *awaitable* within *timeout* seconds, optionally shielded from outside."""
    if timeout is None and not shield:
        return await awaitable
    deadline = anyio.current_time() + timeout if timeout is not None else math.inf
    with anyio.CancelScope(deadline=deadline, shield=shield) as scope:
        return await awaitable
    # Only reached when our own deadline cancelled the awaitable.
    assert scope.cancelled_caught
    raise DeadlineExpired
