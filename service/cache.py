"""The cache: Redis when ``REDIS_URL`` is set, else a TTL dict in this process.

Both have the same small interface (:class:`Cache`), so routes never know which
one they talk to. Values are strings; every key gets the configured prefix, so
several services (or test runs) can share one Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import redis.asyncio


class Cache(Protocol):
    """What the routes need from a cache."""

    async def get(self, key: str) -> str | None:
        """The value stored under *key*, or None when it is missing or expired."""
        ...

    async def set(self, key: str, value: str, ttl: int) -> None:
        """Store *value* under *key* for *ttl* seconds."""
        ...


class MemoryCache:
    """A TTL dict for one process; expired entries are dropped when met or on writes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = 10_000):
        self._clock = clock
        self._max_entries = max_entries
        self._data: dict[str, tuple[float, str]] = {}

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> str | None:
        """The value under *key*, or None when it is missing or expired."""
        entry = self._data.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._data[key]
            return None
        return value

    async def set(self, key: str, value: str, ttl: int) -> None:
        """Store *value* for *ttl* seconds; past *max_entries* the oldest entries go."""
        now = self._clock()
        self._data.pop(key, None)
        self._data[key] = (now + ttl, value)
        if len(self._data) > self._max_entries:
            self._evict(now)

    def _evict(self, now: float) -> None:
        for key in [k for k, (expires, _) in self._data.items() if expires <= now]:
            del self._data[key]
        while len(self._data) > self._max_entries:  # still full: drop the oldest writes
            del self._data[next(iter(self._data))]


class RedisCache:
    """The cache on a shared Redis: every replica sees the same entries."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix

    async def get(self, key: str) -> str | None:
        """The value under *key*, or None when it is missing or expired."""
        value = await self._client.get(self._prefix + key)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def set(self, key: str, value: str, ttl: int) -> None:
        """Store *value* for *ttl* seconds (Redis expires it)."""
        await self._client.set(self._prefix + key, value, ex=ttl)
