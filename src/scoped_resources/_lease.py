"""Lease: one live instance of a resource in a scope, and its states.

A lease goes ``acquiring -> held -> releasing -> released`` (or ``terminated`` when
its release ran past the deadline, ``failed`` when acquiring it failed).
"""

from __future__ import annotations

import asyncio
import traceback
from typing import Any

import anyio

from ._resource import Resource

# Lease states.
ACQUIRING, HELD, RELEASING, RELEASED, TERMINATED, FAILED = range(6)
_LEASE_STATES = ("acquiring", "held", "releasing", "released", "terminated", "failed")


class Lease:
    """One live instance of a resource in a scope."""

    __slots__ = (
        "acquired_at",
        "at",
        "error",
        "exit",
        "fired",
        "resource",
        "site",
        "state",
        "task",
        "value",
        "waiters",
    )

    # Set while its acquire or release is on the loop's deadline wheel: the lease is
    # the wheel's record of that step (see ``_guard.Timed``), so a step allocates none.
    at: float
    task: asyncio.Task[Any]
    fired: bool

    def __init__(self, resource: Resource[Any]) -> None:
        self.resource = resource
        self.state = ACQUIRING
        self.value: Any = None
        self.exit: Any = None
        self.error: BaseException | None = None
        self.waiters: anyio.Event | None = None
        #: When it was acquired, on the monotonic clock (the loop's, where the
        #: acquire ran on the loop's deadline wheel: read when the acquire began).
        self.acquired_at = 0.0
        #: Where it was acquired (debug mode only): the innermost frames of the stack.
        self.site: list[traceback.FrameSummary] | None = None

    @property
    def state_name(self) -> str:
        return _LEASE_STATES[self.state]

    def __repr__(self) -> str:
        return f"<Lease {self.resource.name!r} {self.state_name}>"
