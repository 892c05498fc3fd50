"""The HTTP benchmark: every app under uvicorn, loaded by wrk in interleaved rounds.

``python -m benchmarks.runner --quick`` (or ``python -m benchmarks`` for all the
benchmarks). Each app runs in its own uvicorn process (one worker, uvloop,
httptools, no access log) on 127.0.0.1; every endpoint is checked once, warmed
up, then loaded in interleaved rounds (``A B C``, ``B C A``, ``C A B``, ...) so
that a slow moment of a shared machine hits every app alike. Per endpoint and
app it reports the median of the rounds' requests/s, p50 and p99 latency, the
non-2xx count, the server's CPU time per request, and the ratios to ``plain``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .apps._common import database_url, redis_url
from .contract import check_contract
from .schema import setup

ROOT = Path(__file__).resolve().parent.parent
LUA = Path(__file__).resolve().parent / "wrk" / "bench.lua"
HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: endpoint key -> (wrk mode, label)
ENDPOINTS: dict[str, tuple[str, str]] = {
    "users": ("users", "GET /users/{id}"),
    "combo": ("combo", "GET /combo"),
    "cache": ("cache", "POST /cache/{key}"),
    "items": ("items", "POST /items"),
}
#: POST /items comes last: it adds rows to bench.logs, which GET /combo counts.
ENDPOINT_ORDER = ("users", "combo", "cache", "items")
DB_ENDPOINTS = ("users", "combo", "items")
APPS = ("scoped", "plain", "fastapi_fn", "dishka_di", "naive")
#: Other ways to get the same guarantees: scoped must be ahead of each on every endpoint.
PEERS = ("fastapi_fn", "dishka_di")

WRK_INSTALL = "apt-get update && apt-get install -y wrk"


@dataclass
class Load:
    """One wrk run against one app and endpoint."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    errors: int
    cpu_us_per_request: float | None


@dataclass
class Cell:
    """The rounds of one app on one endpoint, and their medians."""

    app: str
    endpoint: str
    rounds: list[Load] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return statistics.median(r.rps for r in self.rounds)

    @property
    def p50_ms(self) -> float:
        return statistics.median(r.p50_ms for r in self.rounds)

    @property
    def p99_ms(self) -> float:
        return statistics.median(r.p99_ms for r in self.rounds)

    @property
    def non2xx(self) -> int:
        return sum(r.non2xx for r in self.rounds)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.rounds)

    @property
    def cpu_us(self) -> float | None:
        values = [r.cpu_us_per_request for r in self.rounds if r.cpu_us_per_request is not None]
        return statistics.median(values) if values else None

    def summary(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "endpoint": self.endpoint,
            "rps": self.rps,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "non2xx": self.non2xx,
            "errors": self.errors,
            "cpu_us_per_request": self.cpu_us,
            "rounds": [asdict(r) for r in self.rounds],
        }


# -- wrk ---------------------------------------------------------------------------------


def find_wrk() -> str:
    """The wrk executable, or exit saying how to install it."""
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit(f"wrk is not installed; install it with: {WRK_INSTALL}")
    return wrk


def run_wrk(
    wrk: str,
    url: str,
    mode: str,
    *,
    duration: float,
    connections: int,
    threads: int,
    max_requests: int = 0,
) -> dict[str, Any]:
    """Run wrk once (bounded by *duration* and *max_requests*) and return its summary."""
    if not url.startswith(f"http://{HOST}:"):
        raise ValueError(f"load is only sent to {HOST}, not {url}")
    per_thread = -(-max_requests // threads) if max_requests else 0
    cmd = [
        wrk,
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={max(1, round(duration))}s",
        "--timeout=10s",
        f"--script={LUA}",
        url,
        "--",
        mode,
        str(per_thread),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + 30, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line.removeprefix("WRK_JSON "))  # type: ignore[no-any-return]
    raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")


# -- servers -----------------------------------------------------------------------------


@dataclass
class Server:
    """One app under uvicorn."""

    name: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_mib(self) -> float:
        """The resident set size of the server process, in MiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start(app: str, env: dict[str, str]) -> Server:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        f"benchmarks.apps.{app}:app",
        f"--host={HOST}",
        f"--port={port}",
        "--workers=1",
        "--loop=uvloop",
        "--http=httptools",
        "--no-access-log",
        "--log-level=warning",
    ]
    process = subprocess.Popen(cmd, cwd=ROOT, env=env)
    return Server(app, port, process)


def wait_ready(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}")
        try:
            httpx.get(f"{server.url}/openapi.json", timeout=1.0).raise_for_status()
        except httpx.HTTPError:
            time.sleep(0.2)
        else:
            return
    raise RuntimeError(f"{server.name} did not start within {timeout:g} s")


@contextmanager
def serving(apps: Sequence[str]) -> Iterator[dict[str, Server]]:
    """Start *apps*, wait until they answer, and stop them at the end."""
    env = {**os.environ, "DATABASE_URL": database_url(), "REDIS_URL": redis_url()}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    servers: dict[str, Server] = {}
    try:
        for app in apps:
            servers[app] = start(app, env)
        for server in servers.values():
            wait_ready(server)
        yield servers
    finally:
        for server in servers.values():
            server.process.terminate()
        for server in servers.values():
            try:
                server.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()


# -- checking ----------------------------------------------------------------------------


def check(server: Server) -> None:
    """Call every endpoint once and check its answer against the contract."""

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            await check_contract(client, server.name)

    asyncio.run(run())


# -- measuring ---------------------------------------------------------------------------


#: A load stops after this many requests per second of its duration, whichever comes
#: first: far above what one uvicorn worker serves here (~10,000/s with no I/O), so it
#: only bounds a run that went wrong.
SAFETY_CAP_PER_SECOND = 200_000


def safety_cap(duration: float) -> int:
    return int(max(1.0, duration) * SAFETY_CAP_PER_SECOND)


def measure(
    wrk: str, server: Server, mode: str, *, duration: float, connections: int, threads: int
) -> Load:
    cpu_before = server.cpu_seconds()
    out = run_wrk(
        wrk, server.url, mode, duration=duration, connections=connections, threads=threads,
        max_requests=safety_cap(duration),
    )
    cpu = server.cpu_seconds() - cpu_before
    seconds = out["duration_us"] / 1e6
    n = out["requests"]
    return Load(
        requests=n,
        seconds=seconds,
        rps=n / seconds if seconds else 0.0,
        p50_ms=out["p50_us"] / 1000,
        p99_ms=out["p99_us"] / 1000,
        non2xx=out["non2xx"],
        errors=out["connect_errors"] + out["read_errors"] + out["write_errors"] + out["timeouts"],
        cpu_us_per_request=cpu / n * 1e6 if n else None,
    )


def run_http(
    *,
    apps: Sequence[str] = APPS,
    endpoints: Sequence[str] = ENDPOINT_ORDER,
    duration: float,
    warmup: float,
    rounds: int,
    connections: int,
    threads: int,
    settle: float = 1.0,
    ceiling: bool = True,
    log: bool = True,
) -> dict[str, Any]:
    """The HTTP benchmark; returns the cells (and the no-I/O ceiling) as plain data."""
    wrk = find_wrk()
    asyncio.run(setup(reset=True))
    cells: dict[str, dict[str, Cell]] = {}
    order = [e for e in ENDPOINT_ORDER if e in endpoints]
    rss: dict[str, float] = {}
    with serving(apps) as servers:
        for server in servers.values():
            check(server)
        if log:
            print(f"checked every endpoint of {', '.join(servers)}", flush=True)
        for endpoint in order:
            mode, label = ENDPOINTS[endpoint]
            for server in servers.values():
                run_wrk(wrk, server.url, mode, duration=warmup, connections=connections,
                        threads=threads, max_requests=safety_cap(warmup))
            row = cells.setdefault(endpoint, {})
            names = list(servers)
            for n in range(rounds):
                # A B C, B C A, C A B, ...: no app always follows the same one (naive
                # leaves PostgreSQL busy closing connections), then a pause to settle.
                for app in names[n % len(names):] + names[:n % len(names)]:
                    server = servers[app]
                    time.sleep(settle)
                    load = measure(wrk, server, mode, duration=duration,
                                   connections=connections, threads=threads)
                    row.setdefault(app, Cell(app, endpoint)).rounds.append(load)
                    if log:
                        print(f"  {label:<18} round {n + 1}/{rounds} {app:<7} "
                              f"{load.rps:8.0f} req/s  p99 {load.p99_ms:7.2f} ms  "
                              f"non-2xx {load.non2xx}", flush=True)
        rss = {app: server.rss_mib() for app, server in servers.items()}
    result: dict[str, Any] = {
        "settings": {
            "duration": duration, "warmup": warmup, "rounds": rounds,
            "connections": connections, "threads": threads, "apps": list(apps),
            "settle": settle,
        },
        "cells": {e: {a: c.summary() for a, c in row.items()} for e, row in cells.items()},
        "rss_mib_after": rss,
    }
    if ceiling:
        result["ceiling"] = run_ceiling(wrk, duration=duration, warmup=warmup, rounds=rounds,
                                        connections=connections, threads=threads)
    return result


def run_ceiling(
    wrk: str, *, duration: float, warmup: float, rounds: int, connections: int, threads: int
) -> dict[str, Any]:
    """requests/s of a FastAPI endpoint doing no I/O: the framework's own limit here."""
    with serving(["noio"]) as servers:
        server = servers["noio"]
        run_wrk(wrk, server.url, "ping", duration=warmup, connections=connections,
                threads=threads, max_requests=safety_cap(warmup))
        cell = Cell("noio", "ping")
        for _ in range(rounds):
            cell.rounds.append(measure(wrk, server, "ping", duration=duration,
                                       connections=connections, threads=threads))
    return cell.summary()


# -- reporting ---------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    """A Markdown table of *result*, with the ratios to ``plain``."""
    lines = [
        "| endpoint | app | req/s (median) | vs plain | p50 ms | p99 ms | p99 vs plain "
        "| non-2xx | server CPU µs/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for endpoint, row in result["cells"].items():
        plain = row.get("plain")
        for app, cell in row.items():
            ratio = f"{cell['rps'] / plain['rps']:.2f}x" if plain and plain["rps"] else "-"
            p99 = f"{cell['p99_ms'] / plain['p99_ms']:.2f}x" if plain and plain["p99_ms"] else "-"
            cpu = cell["cpu_us_per_request"]
            lines.append(
                f"| {ENDPOINTS[endpoint][1]} | {app} | {cell['rps']:.0f} | {ratio} "
                f"| {cell['p50_ms']:.2f} | {cell['p99_ms']:.2f} | {p99} "
                f"| {cell['non2xx'] + cell['errors']} | {cpu:.0f} |"
                if cpu is not None else
                f"| {ENDPOINTS[endpoint][1]} | {app} | {cell['rps']:.0f} | {ratio} "
                f"| {cell['p50_ms']:.2f} | {cell['p99_ms']:.2f} | {p99} "
                f"| {cell['non2xx'] + cell['errors']} | - |"
            )
    ceiling = result.get("ceiling")
    if ceiling:
        lines.append(
            f"| GET /ping (no I/O) | noio | {ceiling['rps']:.0f} | - | {ceiling['p50_ms']:.2f} "
            f"| {ceiling['p99_ms']:.2f} | - | {ceiling['non2xx'] + ceiling['errors']} "
            f"| {ceiling['cpu_us_per_request'] or 0:.0f} |"
        )
    return "\n".join(lines)


def targets(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The HTTP targets: (target, met, figures)."""
    checks: list[tuple[str, bool, str]] = []
    cells = result["cells"]
    for endpoint, row in cells.items():
        scoped, plain = row.get("scoped"), row.get("plain")
        if not scoped or not plain:
            continue
        label = ENDPOINTS[endpoint][1]
        ratio = scoped["rps"] / plain["rps"]
        checks.append((f"{label}: scoped >= 1.05x plain req/s", ratio >= 1.05, f"{ratio:.2f}x"))
        for peer in PEERS:
            other = row.get(peer)
            if other:
                ahead = scoped["rps"] / other["rps"]
                checks.append((f"{label}: scoped ahead of {peer} req/s", ahead > 1.0,
                               f"{ahead:.2f}x"))
        if endpoint in DB_ENDPOINTS:
            p99 = scoped["p99_ms"] / plain["p99_ms"]
            checks.append((f"{label}: scoped p99 <= 0.5x plain", p99 <= 0.5,
                           f"{scoped['p99_ms']:.2f} / {plain['p99_ms']:.2f} ms = {p99:.2f}x"))
        if scoped.get("cpu_us_per_request") and plain.get("cpu_us_per_request"):
            cpu = scoped["cpu_us_per_request"] / plain["cpu_us_per_request"]
            checks.append((f"{label}: scoped server CPU/request <= plain's", cpu <= 1.0,
                           f"{scoped['cpu_us_per_request']:.0f} / "
                           f"{plain['cpu_us_per_request']:.0f} µs = {cpu:.2f}x"))
    row = cells.get("users", {})
    if "scoped" in row and "naive" in row:
        ratio = row["scoped"]["rps"] / row["naive"]["rps"]
        checks.append(("GET /users/{id}: scoped >= 10x naive", ratio >= 10, f"{ratio:.1f}x"))
    return checks


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_http_arguments(parser)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="short rounds to check the set-up (noisy figures)")
    parser.add_argument("--duration", type=float, help="seconds per round (default 15; quick 3)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds (default 5; quick 1)")
    parser.add_argument("--rounds", type=int, help="rounds per endpoint (default 5; quick 2)")
    parser.add_argument("--connections", type=int, default=32,
                        help="concurrent HTTP connections (default 32, > the pool of 10)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--settle", type=float,
                        help="pause before each load, seconds (default 1; quick 0.5)")
    parser.add_argument("--apps", default=",".join(APPS), help="comma-separated apps")
    parser.add_argument("--endpoints", default=",".join(ENDPOINT_ORDER),
                        help="comma-separated: users,combo,cache,items")


def http_settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "duration": args.duration or (3.0 if quick else 15.0),
        "warmup": args.warmup or (1.0 if quick else 5.0),
        "rounds": args.rounds or (2 if quick else 5),
        "connections": args.connections,
        "threads": args.threads,
        "settle": args.settle if args.settle is not None else (0.5 if quick else 1.0),
        "apps": [a for a in args.apps.split(",") if a],
        "endpoints": [e for e in args.endpoints.split(",") if e],
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = run_http(**http_settings(args))
    print(table(result))
    for name, met, figures in targets(result):
        print(f"{'MET ' if met else 'MISS'} {name}: {figures}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
