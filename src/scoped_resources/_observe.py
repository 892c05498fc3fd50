"""The observer interface: what the core reports about leases, at no cost when unused.

The core calls an observer only when one is configured (``Resources(observers=...)``);
otherwise each hook point costs one ``is None`` check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ._resource import Resource

ReleaseOutcome = Literal["ok", "failed", "timeout", "interrupted"]


class Observer:
    """Receives lifecycle events of every resource; override what you need."""

    def acquire_started(self, resource: Resource[object]) -> None:
        """An acquire began waiting (its dependencies are ready)."""

    def acquired(self, resource: Resource[object], seconds: float) -> None:
        """An acquire succeeded after *seconds*: one more lease (or owner) in use."""

    def acquire_failed(self, resource: Resource[object], seconds: float, busy: bool) -> None:
        """An acquire failed after *seconds*; *busy* when it ran past its deadline."""

    def released(self, resource: Resource[object], seconds: float, outcome: str) -> None:
        """A release ended after *seconds* with *outcome* (ok, failed, timeout, interrupted)."""

    def terminated(self, resource: Resource[object]) -> None:
        """The terminate hook ran (a release overran, failed or was interrupted)."""


class _FanOut(Observer):
    """Several observers as one."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self.observers = tuple(observers)

    def acquire_started(self, resource: Resource[object]) -> None:
        for o in self.observers:
            o.acquire_started(resource)

    def acquired(self, resource: Resource[object], seconds: float) -> None:
        for o in self.observers:
            o.acquired(resource, seconds)

    def acquire_failed(self, resource: Resource[object], seconds: float, busy: bool) -> None:
        for o in self.observers:
            o.acquire_failed(resource, seconds, busy)

    def released(self, resource: Resource[object], seconds: float, outcome: str) -> None:
        for o in self.observers:
            o.released(resource, seconds, outcome)

    def terminated(self, resource: Resource[object]) -> None:
        for o in self.observers:
            o.terminated(resource)


def combine(observers: Sequence[Observer]) -> Observer | None:
    """None for no observer (the zero-cost path), the observer itself for one."""
    if not observers:
        return None
    if len(observers) == 1:
        return observers[0]
    return _FanOut(observers)
