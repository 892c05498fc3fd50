"""The memory check: RSS of an app after 10,000 and after 100,000 requests.

``python -m benchmarks.memory [--quick]``. The app runs under uvicorn as in the
HTTP benchmark; wrk sends the four endpoints in turn (``mix``) in chunks bounded
by count and time until each checkpoint is reached, and the server's RSS is read
from ``/proc``. Target: the scoped app's RSS at the last checkpoint within 5% of
the first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runner import check, find_wrk, run_wrk, serving
from .schema import setup


def run_memory(
    *,
    apps: Sequence[str] = ("scoped", "plain"),
    checkpoints: Sequence[int] = (10_000, 100_000),
    connections: int = 32,
    threads: int = 1,
    log: bool = True,
) -> dict[str, Any]:
    """RSS (MiB) of each app at each checkpoint; resets the schema afterwards."""
    wrk = find_wrk()
    asyncio.run(setup(reset=True))
    results: dict[str, Any] = {}
    try:
        for app in apps:
            with serving([app]) as servers:
                server = servers[app]
                check(server)
                done, rate = 0, 1000.0
                rss: dict[str, float] = {"start": server.rss_mib()}
                for target in checkpoints:
                    while done < target:
                        remaining = target - done
                        seconds = min(10.0, max(1.0, math.ceil(remaining / rate)))
                        t = time.perf_counter()
                        out = run_wrk(wrk, server.url, "mix", duration=seconds,
                                      connections=connections, threads=threads,
                                      # wrk stops a thread with its requests in flight
                                      # uncounted: ask for that many more.
                                      max_requests=remaining + connections)
                        done += out["requests"]
                        rate = max(out["requests"] / (time.perf_counter() - t), 100.0)
                        bad = out["non2xx"] + out["connect_errors"] + out["read_errors"]
                        if bad:
                            raise RuntimeError(f"{app}: {bad} failed requests")
                    rss[str(target)] = server.rss_mib()
                    if log:
                        print(f"  {app:<7} after {done:>7} requests: RSS "
                              f"{rss[str(target)]:.1f} MiB", flush=True)
                first, last = rss[str(checkpoints[0])], rss[str(checkpoints[-1])]
                results[app] = {"rss_mib": rss, "growth": last / first - 1,
                                "requests": done}
    finally:
        asyncio.run(setup(reset=True))
    return results


def table(result: dict[str, Any]) -> str:
    apps = list(result)
    points = [k for k in next(iter(result.values()))["rss_mib"] if k != "start"]
    lines = ["| app | RSS at start | " + " | ".join(f"after {int(p):,}" for p in points)
             + " | growth |", "|---|" + "---:|" * (len(points) + 2)]
    for app in apps:
        r = result[app]
        cells = " | ".join(f"{r['rss_mib'][p]:.1f} MiB" for p in points)
        lines.append(f"| {app} | {r['rss_mib']['start']:.1f} MiB | {cells} "
                     f"| {r['growth'] * 100:+.1f}% |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 and 20,000 requests")
    parser.add_argument("--apps", default="scoped,plain")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    checkpoints = (2_000, 20_000) if args.quick else (10_000, 100_000)
    result = run_memory(apps=args.apps.split(","), checkpoints=checkpoints,
                        connections=args.connections)
    print(table(result))
    growth = result.get("scoped", {}).get("growth")
    if growth is not None:
        print(f"{'MET ' if abs(growth) <= 0.05 else 'MISS'} scoped RSS within 5%: "
              f"{growth * 100:+.1f}%")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
