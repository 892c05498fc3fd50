"""Acquiring: making a resource's instance and recording how to release it."""

from __future__ import annotations

import inspect
import time
from typing import Any, NoReturn

from ._guard import DeadlineExpired, bounded
from ._lease import HELD, Lease
from ._observe import Observer
from ._release import _release_all
from ._resource import ASYNC_FN, ASYNC_GEN, CONTEXT, INSTANCE
from .exceptions import (
    ResourceBusy,
    ResourceMisuse,
)


async def _enter(lease: Lease, kwargs: dict[str, Any]) -> None:
    """Make the instance; store its value and how to release it on *lease*."""
    res = lease.resource
    kind = res.kind
    factory = res.call
    if kind is ASYNC_GEN:
        gen = factory(**kwargs)
        try:
            value = await anext(gen)
        except StopAsyncIteration:
            raise _no_yield(res) from None
        lease.exit = gen
    elif kind is CONTEXT or kind is INSTANCE:
        cm = factory(**kwargs) if kind is CONTEXT else factory
        value = await cm.__aenter__()
        lease.exit = cm
    else:
        value = await factory(**kwargs) if kind is ASYNC_FN else factory(**kwargs)
        if hasattr(value, "__aenter__") and hasattr(value, "__aexit__"):
            cm = value
            value = await cm.__aenter__()
            lease.exit = cm
    if inspect.iscoroutine(value):
        await _refuse_coroutine(lease, value)
    lease.value = value


def _no_yield(res: Any) -> ResourceMisuse:
    return ResourceMisuse(
        res.name, "its generator ended without yielding", "yield the instance once"
    )


async def _refuse_coroutine(lease: Lease, value: Any) -> NoReturn:
    """The factory made an un-awaited coroutine: close it, release what it opened, raise."""
    value.close()
    lease.value = None
    lease.state = HELD
    misuse = ResourceMisuse(
        lease.resource.name,
        "it produced an un-awaited coroutine",
        "add the missing 'await' where the factory makes its instance",
    )
    if lease.exit is not None:
        # The lease may be its acquire's record on the deadline wheel (Scope._acquire),
        # which this release borrows and leaves without a task: give it back.
        task = getattr(lease, "task", None)
        try:
            await _release_all([lease], misuse, None)
        finally:
            if task is not None:
                lease.task = task
    raise misuse


async def _enter_bounded(lease: Lease, kwargs: dict[str, Any]) -> None:
    """Enter *lease* within its resource's acquire deadline, else ResourceBusy."""
    res = lease.resource
    timeout = res.acquire_timeout
    if timeout is None or res._own_deadline:
        await _enter(lease, kwargs)
        return
    try:
        await bounded(_enter(lease, kwargs), timeout)
    except DeadlineExpired:
        raise ResourceBusy(res.name, timeout) from None


async def _enter_observed(
    lease: Lease, kwargs: dict[str, Any], observer: Observer, *, bounded: bool = True
) -> None:
    res = lease.resource
    observer.acquire_started(res)
    started = time.perf_counter()
    try:
        await (_enter_bounded(lease, kwargs) if bounded else _enter(lease, kwargs))
    except BaseException as exc:
        observer.acquire_failed(res, time.perf_counter() - started, isinstance(exc, ResourceBusy))
        raise
    observer.acquired(res, time.perf_counter() - started)
