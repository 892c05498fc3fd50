"""The physical limit: the endpoints' queries issued by bare asyncpg and redis, no HTTP.

``python -m benchmarks.baseline [--quick]``. The same work as each endpoint (the
same SQL and Redis commands, a pool of 10 each, as many concurrent workers as
the HTTP benchmark has connections), from one process on uvloop: no server, no
framework, no library. No app can serve more than this on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import uvloop
from redis.asyncio import BlockingConnectionPool, Redis

from .apps._common import (
    CACHE_TTL,
    COUNT_LOGS,
    INSERT_ITEM,
    INSERT_LOG,
    POOL_SIZE,
    SELECT_USER,
    database_url,
    redis_url,
)
from .runner import ENDPOINT_ORDER, ENDPOINTS
from .schema import USERS, setup

Op = Callable[[int], Awaitable[object]]


def operations(pool: asyncpg.Pool, redis: Redis) -> dict[str, Op]:
    async def users(i: int) -> object:
        async with pool.acquire() as conn:
            return await conn.fetchrow(SELECT_USER, random.randint(1, USERS))

    async def combo(i: int) -> object:
        await redis.set("last_access", "bare")
        async with pool.acquire() as conn:
            return await conn.fetchval(COUNT_LOGS)

    async def cache(i: int) -> object:
        return await redis.set(f"k{random.randint(1, 1000)}", f"v{i}", ex=CACHE_TTL)

    async def items(i: int) -> object:
        async with pool.acquire() as conn, conn.transaction():
            item_id = await conn.fetchval(INSERT_ITEM, f"item {i}")
            return await conn.execute(INSERT_LOG, item_id, f"created item {i}")

    return {"users": users, "combo": combo, "cache": cache, "items": items}


async def _load(op: Op, *, workers: int, duration: float) -> dict[str, float]:
    latencies: list[float] = []
    stop = time.perf_counter() + duration
    cap = int(max(duration, 1.0) * 200_000)  # bounded in count too, not only in time
    counter = 0

    async def worker() -> None:
        nonlocal counter
        while time.perf_counter() < stop and counter < cap:
            counter += 1
            t = time.perf_counter()
            await op(counter)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "ops": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


async def _run(
    endpoints: Sequence[str], *, workers: int, duration: float, warmup: float, rounds: int
) -> dict[str, Any]:
    pool = await asyncpg.create_pool(database_url(), min_size=POOL_SIZE, max_size=POOL_SIZE)
    redis = Redis(
        connection_pool=BlockingConnectionPool.from_url(redis_url(), max_connections=POOL_SIZE)
    )
    results: dict[str, Any] = {}
    try:
        ops = operations(pool, redis)
        for endpoint in endpoints:
            op = ops[endpoint]
            await _load(op, workers=workers, duration=warmup)
            samples = [await _load(op, workers=workers, duration=duration) for _ in range(rounds)]
            results[endpoint] = {
                key: statistics.median(s[key] for s in samples)
                for key in ("rps", "p50_ms", "p99_ms")
            }
    finally:
        await redis.aclose(close_connection_pool=True)
        await pool.close()
    return results


def run_baseline(
    *,
    endpoints: Sequence[str] = ENDPOINT_ORDER,
    workers: int = 32,
    duration: float = 10.0,
    warmup: float = 2.0,
    rounds: int = 3,
) -> dict[str, Any]:
    """Operations per second of each endpoint's I/O alone; resets the schema afterwards."""
    asyncio.run(setup(reset=True))
    try:
        return uvloop.run(_run(endpoints, workers=workers, duration=duration, warmup=warmup,
                               rounds=rounds))
    finally:
        asyncio.run(setup(reset=True))


def table(result: dict[str, Any]) -> str:
    lines = ["| endpoint's I/O | ops/s (median) | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    for endpoint, r in result.items():
        lines.append(f"| {ENDPOINTS[endpoint][1]} | {r['rps']:.0f} | {r['p50_ms']:.2f} "
                     f"| {r['p99_ms']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--duration", type=float)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run_baseline(
        workers=args.workers,
        duration=args.duration or (2.0 if args.quick else 10.0),
        warmup=1.0 if args.quick else 2.0,
        rounds=args.rounds or (1 if args.quick else 3),
    )
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
