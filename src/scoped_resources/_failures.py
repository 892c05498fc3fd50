"""What a failure means: an outage (503, retry later), a refusal by the data, or a bug.

One classification for every adapter, the FastAPI integration and the apps built
on them, so that a database, cache or broker that went away is always answered
503 with ``Retry-After`` (never 500), and one log line per failure says which
resource, which route and why, with the traceback only when it helps.

An error is an outage when it, or anything in its chain (``__cause__``,
``__context__``, a driver error wrapped by SQLAlchemy, the members of an
exception group), is one of:

* a lost or refused network connection (``ConnectionError``, ``TimeoutError``,
  an ``OSError`` with a network errno, a failed name lookup);
* a PostgreSQL error of class 08 (connection exception), 57P01-57P03 (the server
  is shutting down, crashed, or still starting up) or 53300 (too many
  connections), from asyncpg directly or through SQLAlchemy;
* a SQLAlchemy error that invalidated its connection;
* redis-py's ``ConnectionError`` or ``TimeoutError``; aio-pika's (aiormq's)
  connection errors and closed channels;
* a release that overran its deadline (:class:`ReleaseTimeout`);
* an error an adapter marked with :func:`mark_outage`, because it saw that its
  connection had died (asyncpg's "another operation is in progress" after the
  server sent a fatal error and hung up, say).

A driver module that was never imported cannot have raised, so nothing here
imports a driver.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import re
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

from .exceptions import ReleaseTimeout

__all__ = [
    "TracebackLimiter",
    "cause_of",
    "current_route",
    "log_failure",
    "mark_outage",
    "outage_of",
]

_MARK = "__scoped_resources_outage__"

#: "GET /items/{item_id}" of the request being served (set by the FastAPI integration).
current_route: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "scoped_resources_route", default=None
)

_NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNREFUSED",
        "ECONNRESET",
        "ECONNABORTED",
        "EPIPE",
        "ETIMEDOUT",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ENETDOWN",
        "EHOSTDOWN",
        "ENOTCONN",
        "ESHUTDOWN",
    )
    if hasattr(errno, name)
)
_OUTAGE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})
#: SQLSTATE classes of errors that the data (or the database's rules) caused.
_REFUSED_SQLSTATE_CLASSES = frozenset({"22", "23", "40", "P0"})
_MAX_CHAIN = 12

# (module that defines them, names): checked only once that module is imported.
_DRIVER_OUTAGES = (
    ("redis.exceptions", ("ConnectionError", "TimeoutError")),
    ("aiormq.exceptions", ("AMQPConnectionError", "ChannelInvalidStateError")),
    ("sqlalchemy.exc", ("TimeoutError",)),
)


def _chain(err: BaseException) -> Iterator[BaseException]:
    """*err* and what caused it, breadth first, each once, at most _MAX_CHAIN."""
    todo = [err]
    seen: set[int] = set()
    while todo and len(seen) < _MAX_CHAIN:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        if isinstance(cur, BaseExceptionGroup):
            todo.extend(cur.exceptions)
        for attr in ("orig", "driver_exception"):
            inner = getattr(cur, attr, None)
            if isinstance(inner, BaseException):
                todo.append(inner)
        if cur.__cause__ is not None:
            todo.append(cur.__cause__)
        elif cur.__context__ is not None and not cur.__suppress_context__:
            todo.append(cur.__context__)


def _driver_outage_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = []
    for module_name, names in _DRIVER_OUTAGES:
        module = sys.modules.get(module_name)
        if module is not None:
            found.extend(getattr(module, name) for name in names if hasattr(module, name))
    return tuple(found)


def _sqlstate(err: BaseException) -> str | None:
    state = getattr(err, "sqlstate", None) or getattr(err, "pgcode", None)
    return state if isinstance(state, str) and len(state) == 5 else None


def _kind(err: BaseException) -> str:
    module = type(err).__module__.split(".", 1)[0]
    return {
        "asyncpg": "database",
        "sqlalchemy": "database",
        "psycopg": "database",
        "aiosqlite": "database",
        "redis": "cache",
        "aiormq": "broker",
        "aio_pika": "broker",
    }.get(module, "")


def mark_outage(err: BaseException, kind: str) -> None:
    """Record that *err* happened because *kind* (``"database"``...) went away."""
    with contextlib.suppress(AttributeError, TypeError):  # a type with __slots__
        setattr(err, _MARK, kind)


def _is_outage(err: BaseException, drivers: tuple[type[BaseException], ...]) -> bool:
    if getattr(err, _MARK, None):
        return True
    if isinstance(err, ReleaseTimeout | ConnectionError | TimeoutError | socket.gaierror):
        return True
    if isinstance(err, OSError) and err.errno in _NETWORK_ERRNOS:
        return True
    if drivers and isinstance(err, drivers):
        return True
    if getattr(err, "connection_invalidated", False) is True:
        return True
    state = _sqlstate(err)
    return state is not None and (state.startswith("08") or state in _OUTAGE_SQLSTATES)


def outage_of(err: BaseException) -> str | None:
    """What went away when *err* is an outage (``"database"``, ``"cache"``, ...); else None.

    The answer names the kind of server when a driver's error says it
    (``"database"``, ``"cache"``, ``"broker"``), and is ``"connection"`` for a
    bare network error or a timeout. A constraint or data error is never an outage.
    """
    if not isinstance(err, Exception):
        return None  # a cancellation or an interrupt is never an outage, whatever its context
    drivers = _driver_outage_types()
    chain = list(_chain(err))
    for cur in chain:
        state = _sqlstate(cur)
        if state is not None and state[:2] in _REFUSED_SQLSTATE_CLASSES:
            return None  # the data was refused, even if the connection went down later
    for cur in chain:
        if _is_outage(cur, drivers):
            kinds = [k for k in map(_kind, chain) if k]
            return kinds[0] if kinds else "connection"
    return None


def refused_by_data(err: BaseException) -> bool:
    """True when the database refused *err*'s work: a constraint, bad data, a conflict."""
    for cur in _chain(err):
        state = _sqlstate(cur)
        if state is not None and state[:2] in _REFUSED_SQLSTATE_CLASSES:
            return True
    return False


def cause_of(err: BaseException) -> str:
    """A one-line cause for a log or a problem document: the root error and what it names.

    ``UniqueViolationError (23505) on constraint 'users_name_key'``, or
    ``CannotConnectNowError: the database system is shutting down``.
    """
    chain = list(_chain(err))
    stated = [c for c in chain if _sqlstate(c) is not None]
    named = [c for c in stated if getattr(c, "constraint_name", None)]
    candidates = named or stated
    root: BaseException | None = candidates[-1] if candidates else None
    if root is None:
        leaves = [c for c in chain if not isinstance(c, BaseExceptionGroup)]
        root = leaves[-1] if leaves else err
    name = type(root).__name__
    state = _sqlstate(root)
    constraint = getattr(root, "constraint_name", None)
    if constraint:
        return f"{name} ({state}) on constraint {constraint!r}"
    text = str(root).strip().splitlines()[0][:200] if str(root).strip() else ""
    where = f" ({state})" if state else ""
    return f"{name}{where}: {text}" if text else f"{name}{where}"


_SHAPE = re.compile(r"\d+|'[^']*'|\"[^\"]*\"")


def _shape(text: str) -> str:
    """*text* with its numbers and quoted values blanked: one shape per kind of message."""
    return _SHAPE.sub("#", text)[:200]


class TracebackLimiter:
    """Lets one traceback per distinct cause through per *window* seconds.

    A cause is its resource, the exception type and the shape of its message
    (numbers and quoted values blanked), so a hundred refused commits of one
    constraint share a key while a new kind of failure is shown at once. At most
    *max_keys* causes are remembered (the oldest are forgotten first).
    """

    def __init__(
        self,
        window: float = 60.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._last: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def key(self, resource: str, err: BaseException) -> tuple[str, str, str]:
        """The cause key of *err* on *resource*."""
        leaves = [c for c in _chain(err) if not isinstance(c, BaseExceptionGroup)]
        root = leaves[-1] if leaves else err
        return (resource, f"{type(err).__name__}/{type(root).__name__}", _shape(str(root)))

    def allow(self, resource: str, err: BaseException) -> bool:
        """True (and remembered) when this cause had no traceback within the window."""
        key = self.key(resource, err)
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.window:
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        return True


_limiter = TracebackLimiter()


def log_failure(
    logger: logging.Logger,
    what: str,
    resource: str,
    err: BaseException,
    *,
    limiter: TracebackLimiter | None = None,
) -> None:
    """Log one record for *err*: level by meaning, traceback at DEBUG or once per cause.

    An outage or a refusal by the data is a WARNING, anything else (a bug) an
    ERROR. The record carries ``resource``, ``route``, ``cause`` and ``outage``
    as attributes (for structured log output) and names them in its message.
    """
    outage = outage_of(err)
    level = logging.WARNING if outage or refused_by_data(err) else logging.ERROR
    if not logger.isEnabledFor(level):
        return
    route = current_route.get()
    cause = cause_of(err)
    limiter = limiter or _limiter
    show = logger.isEnabledFor(logging.DEBUG) or limiter.allow(resource, err)
    where = f" on {route}" if route else ""
    kind = f"; the {outage} is unavailable" if outage else ""
    more = "" if show else " (traceback shown once a minute per cause, or at DEBUG)"
    logger.log(
        level,
        "%s resource %r failed%s: %s%s%s",
        what,
        resource,
        where,
        cause,
        kind,
        more,
        exc_info=err if show else None,
        extra={"resource": resource, "route": route, "cause": cause, "outage": outage},
    )
