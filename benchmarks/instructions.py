"""Instructions per request: the benchmark that machine noise cannot move.

``python -m benchmarks.instructions [--apps scoped,plain] [--endpoints users,cache]``

Each app is driven in-process through ASGI with real I/O (as
:mod:`benchmarks.hotpath` does) under ``valgrind --tool=callgrind``, which counts
the instructions the process executes. Two runs per app and endpoint, of
*small* and *large* requests after the same warm-up, give the count per request
as ``(large - small) / (large - small requests)``: start-up and warm-up cancel
out. The same code and inputs give the same count to about 0.1%, whatever else
the machine is doing, where requests/s on this shared machine move by 10%.

What it counts and what it does not:

* only the server process: not PostgreSQL's or Redis's work, not the HTTP parser
  or the network (the wrk run measures the whole);
* *concurrency* (default 8) stays below the pool size (10), so nothing queues.
  Under valgrind a request takes about 50 times longer, so anything driven by the
  clock (a gate's re-check timer while waiters queue, the disconnect watcher that
  starts for a request still running after 50 ms) would be charged about 50 times
  its real share. For the same reason the scoped app's disconnect watcher starts
  after 10 minutes here instead of 50 ms: its per-request registration is counted,
  the watcher task that about 1% of requests get natively is not.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

APPS = ("scoped", "plain", "fastapi_fn", "dishka_di")
ENDPOINTS = ("users", "combo", "cache", "items")
MICRO_SIZES = (1, 3, 10)
WARMUP = 100
VALGRIND_INSTALL = "apt-get install -y valgrind"
ROOT = Path(__file__).resolve().parent.parent


def _child(app: str, endpoint: str, requests: int, concurrency: int) -> None:
    """Run inside valgrind: warm up, then *requests* requests, then exit."""
    import uvloop

    from .hotpath import InProcess

    async def main() -> None:
        client = InProcess(app)
        resources = getattr(sys.modules.get(f"benchmarks.apps.{app}"), "resources", None)
        if resources is not None and hasattr(resources, "watch_disconnect_after"):
            resources.watch_disconnect_after = 600.0  # before the lifespan: see the docstring
        async with client:
            await client.load(endpoint, WARMUP, concurrency)
            if requests:
                await client.load(endpoint, requests, concurrency)
            if client.failures:
                raise SystemExit(f"{app} {endpoint}: {client.failures} failed requests")

    uvloop.run(main())


def _micro_child(variant: str, n: int, loops: int) -> None:
    """Run inside valgrind: *loops* micro requests of *variant* with *n* resources."""
    import uvloop

    from .micro import Config, exitstack_request, scoped_registry, scoped_request

    async def main() -> None:
        resources, made = scoped_registry(n)
        async with resources.open() as app_scope:
            one = (scoped_request(app_scope, made) if variant == "scoped"
                   else exitstack_request(Config(), n))

            async def run() -> None:
                for _ in range(loops):
                    await one()

            # In a task of its own, as micro.py times it and as a server runs requests.
            await asyncio.ensure_future(run())

    uvloop.run(main())


def _count(*child: str) -> int:
    """Instructions the whole child process (``--child`` or ``--micro-child``) executed."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit(f"valgrind is not installed ({VALGRIND_INSTALL})")
    cmd = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
           "-m", "benchmarks.instructions", *child]
    # A fixed hash seed: dict and set layouts, and so the count, do not vary by run.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"}
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    match = re.search(r"Collected\s*:\s*(\d+)", run.stderr)
    if run.returncode != 0 or match is None:
        raise RuntimeError(f"{' '.join(child)}: the counted run failed:\n{run.stderr[-2000:]}")
    return int(match.group(1))


def run_micro_instructions(
    sizes: Sequence[int] = MICRO_SIZES, *, small: int = 1000, large: int = 6000,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Instructions per micro request (:mod:`benchmarks.micro`'s, without I/O), per size.

    ``scoped`` (a child scope and *n* resources) and ``exitstack`` (a bare
    ``AsyncExitStack`` entering *n* ``@asynccontextmanager`` generators), counted as
    the endpoints are: two runs, of *small* and *large* requests.
    """
    runs = [(variant, n, loops) for n in sizes for variant in ("scoped", "exitstack")
            for loops in (small, large)]
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        counts = list(pool.map(lambda r: _count("--micro-child", r[0], str(r[1]), str(r[2])),
                               runs))
    total = dict(zip(runs, counts, strict=True))
    per_request = {
        str(n): {variant: (total[(variant, n, large)] - total[(variant, n, small)])
                 / (large - small) for variant in ("scoped", "exitstack")}
        for n in sizes
    }
    return {"settings": {"small": small, "large": large}, "per_request": per_request}


def micro_table(result: dict[str, Any]) -> str:
    lines = ["| resources | scoped | AsyncExitStack | scoped / ExitStack |",
             "|---:|---:|---:|---:|"]
    for n, counts in result["per_request"].items():
        scoped, stack = counts["scoped"], counts["exitstack"]
        lines.append(f"| {n} | {scoped / 1000:,.1f}k | {stack / 1000:,.1f}k | "
                     f"{scoped / stack:.2f}x |")
    return "\n".join(lines)


def run_instructions(
    apps: Sequence[str] = APPS,
    endpoints: Sequence[str] = ENDPOINTS,
    *,
    small: int = 100,
    large: int = 600,
    concurrency: int = 8,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Instructions per request of each app on each endpoint, and each app against plain."""
    from .schema import setup

    asyncio.run(setup(reset=True))
    runs = [(app, endpoint, n) for endpoint in endpoints for app in apps for n in (small, large)]
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        counts = list(pool.map(
            lambda r: _count("--child", r[0], r[1], str(r[2]), str(concurrency)), runs))
    asyncio.run(setup(reset=True))
    total = dict(zip(runs, counts, strict=True))
    per_request: dict[str, dict[str, float]] = {endpoint: {} for endpoint in endpoints}
    for endpoint in endpoints:
        for app in apps:
            extra = total[(app, endpoint, large)] - total[(app, endpoint, small)]
            per_request[endpoint][app] = extra / (large - small)
    return {
        "settings": {"small": small, "large": large, "concurrency": concurrency,
                     "warmup": WARMUP},
        "per_request": per_request,
    }


def table(result: dict[str, Any]) -> str:
    per_request = result["per_request"]
    apps = list(next(iter(per_request.values())))
    lines = ["| endpoint | " + " | ".join(apps) + " |", "|---|" + "---:|" * len(apps)]
    for endpoint, counts in per_request.items():
        base = counts.get("plain")
        cells = []
        for app in apps:
            k = counts[app] / 1000
            ratio = f" ({counts[app] / base:.3f}x)" if base else ""
            cells.append(f"{k:,.0f}k{ratio}")
        lines.append(f"| {endpoint} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", default=",".join(APPS))
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--micro", action="store_true",
                        help="count the micro benchmark's requests instead of the endpoints'")
    parser.add_argument("--child", nargs=4, metavar=("APP", "ENDPOINT", "N", "CONCURRENCY"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--micro-child", nargs=3, metavar=("VARIANT", "SIZE", "N"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        app, endpoint, n, concurrency = args.child
        _child(app, endpoint, int(n), int(concurrency))
        return
    if args.micro_child:
        variant, size, n = args.micro_child
        _micro_child(variant, int(size), int(n))
        return
    if args.micro:
        print("instructions per micro request:")
        print(micro_table(run_micro_instructions()))
        return
    result = run_instructions(args.apps.split(","), args.endpoints.split(","),
                              concurrency=args.concurrency)
    print("instructions per request (against plain):")
    print(table(result))


if __name__ == "__main__":
    main()
