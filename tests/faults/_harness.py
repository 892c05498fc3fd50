"""Helpers of the fault suite: the service process, the database behind it, load and figures.

The service runs as a real process (``python -m service``, started by
``tests.service.processes``); the test looks behind it with its own asyncpg
connections, which carry the application name :data:`PROBE_APP` so that they are
never counted as the service's.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg

from tests.service.processes import service_process, started_service

#: application_name of every connection the test itself opens.
PROBE_APP = "sr_faults_probe"
#: Lines that must never appear in a clean service log.
DIRTY_LOG = ("Traceback", "Event loop is closed", "unclosed", "ERROR", "CRITICAL")


def report(scenario: str, **figures: Any) -> None:
    """Print one scenario's figures as a single greppable line (``FAULTS <scenario> {...}``)."""
    print(f"FAULTS {scenario} {json.dumps(figures, sort_keys=True, default=str)}", flush=True)


def with_port(dsn: str, port: int) -> str:
    """*dsn* with its port replaced (to point it at a proxy)."""
    parts = urlsplit(dsn)
    host = parts.hostname or "127.0.0.1"
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}{host}:{port}"))


def dirty_lines(log: str) -> list[str]:
    """The lines of *log* that a clean run must not have."""
    return [line for line in log.splitlines() if any(bad in line for bad in DIRTY_LOG)]


# -- latency -------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """The *q*-th percentile (0-100, nearest rank) of *samples*; NaN when empty."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_ms(samples: Sequence[float]) -> dict[str, float]:
    """p50, p95 and max of *samples* (seconds), in milliseconds."""
    return {
        "p50": round(percentile(samples, 50) * 1000, 1),
        "p95": round(percentile(samples, 95) * 1000, 1),
        "max": round(max(samples, default=math.nan) * 1000, 1),
    }


# -- the service process -------------------------------------------------------------


@dataclass
class Service:
    """A running service: its base URL and its log (stderr)."""

    url: str
    log: Path
    port: int = field(init=False)

    def __post_init__(self) -> None:
        self.port = urlsplit(self.url).port or 80

    def log_text(self) -> str:
        """Everything the service wrote to stderr so far."""
        return self.log.read_text(errors="replace")


@asynccontextmanager
async def running_service(env: dict[str, str], workdir: Path) -> AsyncIterator[Service]:
    """``tests.service.processes.service_process``, entered in a thread.

    In a thread because the start-up (which reads the service's first line) may
    need this event loop: the outage scenario's TCP proxy runs in it.
    """
    log = workdir / "service.log"
    cm = service_process(env, log)
    url = await anyio.to_thread.run_sync(cm.__enter__)
    try:
        yield Service(url, log)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(cm.__exit__, None, None, None)


@dataclass
class OwnedProcess:
    """A service process whose signals and exit code the test handles itself."""

    proc: subprocess.Popen[str]
    url: str
    log: Path

    def log_text(self) -> str:
        """Everything the service wrote (stdout after its first line, and stderr)."""
        return self.log.read_text(errors="replace")


@contextmanager
def owned_service(env: dict[str, str], workdir: Path) -> Iterator[OwnedProcess]:
    """Start ``python -m service`` like ``service_process``, but hand out the process.

    ``service_process`` yields only the URL; the shutdown scenario must send the
    signal and read the exit code itself. Killed at the end whatever happened.
    """
    log = workdir / "service.log"
    with started_service(env, log, log_level="info") as (proc, url):
        yield OwnedProcess(proc, url, log)


# -- the database behind the service ---------------------------------------------------


async def probe(dsn: str) -> asyncpg.Connection:
    """A connection of the test's own (application name :data:`PROBE_APP`).

    Without TLS (the server is on loopback): asyncpg's default first asks for a TLS
    upgrade, and a connection lost in that exchange after its caller gave up leaves
    an exception on a future no one awaits, which fails the test that made it.
    """
    return await asyncpg.connect(
        dsn, ssl=False, server_settings={"application_name": PROBE_APP}
    )


_BACKENDS = (
    "SELECT pid, state, wait_event_type, wait_event, left(query, 80) AS query"
    " FROM pg_stat_activity WHERE datname = $1 AND application_name <> $2"
    " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


async def backends_on(conn: asyncpg.Connection, database: str) -> list[dict[str, Any]]:
    """The service's sessions on *database*, read through the probe connection *conn*."""
    return [dict(row) for row in await conn.fetch(_BACKENDS, database, PROBE_APP)]


async def service_backends(dsn: str, database: str) -> list[dict[str, Any]]:
    """The service's sessions on *database*: pid, state, wait event, query."""
    conn = await probe(dsn)
    try:
        return await backends_on(conn, database)
    finally:
        await conn.close()


def busy(backends: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sessions that are ``active`` or ``idle in transaction`` (the leaks)."""
    return [b for b in backends if b["state"] in ("active", "idle in transaction")]


def lock_waiters(backends: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sessions waiting for a lock."""
    return [b for b in backends if b["wait_event_type"] == "Lock"]


@asynccontextmanager
async def table_lock(dsn: str, table: str = "items") -> AsyncIterator[asyncpg.Connection]:
    """Hold ``ACCESS EXCLUSIVE`` on *table* until the block ends: a database that hangs."""
    conn = await probe(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
        try:
            yield conn
        finally:
            with anyio.CancelScope(shield=True):
                await tx.rollback()
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()


async def fetchval(dsn: str, sql: str, *args: Any) -> Any:
    """One value from the service's database, read behind its back."""
    conn = await probe(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.05
) -> float | None:
    """Poll *check* until true; the seconds it took, or None after *timeout*."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        await anyio.sleep(interval)


# -- clients that vanish ---------------------------------------------------------------


def item_request(port: int, name: str) -> bytes:
    """A complete ``POST /items`` request for an item called *name*."""
    body = json.dumps({"name": name}).encode()
    head = (
        f"POST /items HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def vanishing_client(port: int, name: str, rng: random.Random, max_wait: float) -> str:
    """Send (part of) a ``POST /items`` and close the socket at a random moment.

    Returns when the client vanished: ``connect`` (nothing sent), ``headers``
    (partial head), ``body`` (partial body) or ``waiting`` (whole request sent,
    closed while the service works on it), or ``answered`` if a response came first.
    """
    data = item_request(port, name)
    split = data.index(b"\r\n\r\n") + 4
    roll = rng.random()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if roll < 0.1:
            moment = "connect"
        elif roll < 0.2:
            writer.write(data[: rng.randrange(1, split)])
            moment = "headers"
        elif roll < 0.3:
            writer.write(data[: rng.randrange(split, len(data))])
            moment = "body"
        else:
            writer.write(data)
            moment = "waiting"
        await writer.drain()
        with anyio.move_on_after(rng.uniform(0, max_wait)):
            if await reader.read(1):
                moment = "answered"
    finally:
        if rng.random() < 0.5:
            writer.transport.abort()  # a reset: the client crashed
        else:
            writer.close()  # a FIN: the client gave up
    return moment
