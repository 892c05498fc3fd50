"""Run an awaitable under a deadline and a shield, paying only when it suspends.

An anyio ``CancelScope`` costs about as much as a whole request scope with one
resource (~5 us here), and most acquires and many releases finish without ever
suspending (a cached value, a pool with a free connection). ``guarded`` drives the
awaitable by hand: if it completes on its first step, no cancel scope is made; if
it suspends, a cancel scope with the deadline (and the shield) is entered before
the suspension is handed to the event loop, so it is in force for every await.

This works on asyncio and trio alike: the values the awaitable yields to the loop
are passed through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Generator
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


class DeadlineExpired(Exception):
    """Raised when the guarded awaitable was cancelled by its own deadline."""


class _Guarded(Awaitable[T]):
    __slots__ = ("_awaitable", "_shield", "_timeout")

    def __init__(self, awaitable: Awaitable[T], timeout: float | None, shield: bool) -> None:
        self._awaitable = awaitable
        self._timeout = timeout
        self._shield = shield

    def __await__(self) -> Generator[Any, Any, T]:
        it = self._awaitable.__await__()
        try:
            signal = it.send(None)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        timeout = self._timeout
        scope = anyio.CancelScope(
            deadline=anyio.current_time() + timeout if timeout is not None else float("inf"),
            shield=self._shield,
        )
        scope.__enter__()
        try:
            while True:
                try:
                    sent = yield signal
                except GeneratorExit:
                    it.close()
                    raise
                except BaseException as exc:  # noqa: BLE001 - forwarded into the awaitable
                    signal = it.throw(exc)
                else:
                    signal = it.send(sent)
        except StopIteration as stop:
            scope.__exit__(None, None, None)
            return stop.value  # type: ignore[no-any-return]
        except BaseException as exc:
            if scope.__exit__(type(exc), exc, exc.__traceback__):
                raise DeadlineExpired from None
            raise


def guarded(awaitable: Awaitable[T], timeout: float | None, *, shield: bool) -> Awaitable[T]:
    """Return an awaitable that runs *awaitable* with a deadline and a shield."""
    if timeout is None and not shield:
        return awaitable
    return _Guarded(awaitable, timeout, shield)
