"""Instrumented resources whose every step is recorded, for event-order tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from scoped_resources import Resource, Resources


@dataclass
class Journal:
    """What happened, in order, and which instances are open now."""

    events: list[str] = field(default_factory=list)
    open: set[str] = field(default_factory=set)

    def add(self, event: str) -> None:
        self.events.append(event)


class Checkpoints:
    """Counts await points and cancels a scope at the N-th one."""

    def __init__(self, cancel_at: int | None = None) -> None:
        self.cancel_at = cancel_at
        self.seen = 0
        self.scope: anyio.CancelScope | None = None

    async def point(self) -> None:
        self.seen += 1
        if self.seen == self.cancel_at and self.scope is not None:
            self.scope.cancel()
        await anyio.lowlevel.checkpoint()


def generator_resource(
    resources: Resources,
    journal: Journal,
    name: str,
    *,
    scope: str = "request",
    awaits: int = 0,
    points: Checkpoints | None = None,
    fail_release: Exception | None = None,
    **options: Any,
) -> Resource[str]:
    """Declare a generator resource named *name* that journals acquire and release."""

    async def factory() -> AsyncIterator[str]:
        for _ in range(awaits):
            if points is not None:
                await points.point()
        journal.add(f"acquire {name}")
        journal.open.add(name)
        try:
            yield name
        except BaseException as exc:
            journal.add(f"release {name} after {type(exc).__name__}")
            raise
        else:
            journal.add(f"release {name}")
        finally:
            for _ in range(awaits):
                if points is not None:
                    await points.point()
            journal.open.discard(name)
            if fail_release is not None:
                raise fail_release

    factory.__name__ = name
    declare: Callable[..., Any] = resources.app if scope == "app" else resources.request
    return declare(**options)(factory)  # type: ignore[no-any-return]
