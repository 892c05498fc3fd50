"""Where the time goes: an app driven in-process through ASGI, with real I/O, no HTTP.

``python -m benchmarks.hotpath --endpoint users [--apps scoped,plain] [--pyinstrument]``
(``scoped-nowatch`` is the scoped app with ``cancel_on_disconnect=False``).
Sends *requests* requests to each app, *concurrency* at a time, by calling the
ASGI app directly (lifespan included), on uvloop. It prints the CPU time per
request of each app (the process's CPU time: the server-side cost without
the HTTP parser, the network or the load generator), interleaved over
*repeats*; with ``--pyinstrument`` it profiles the first app's run and prints
the call tree (``pip install pyinstrument``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import random
import statistics
import time
from collections.abc import MutableMapping, Sequence
from contextlib import AsyncExitStack
from typing import Any

import uvloop

Message = MutableMapping[str, Any]


def _request(endpoint: str, i: int) -> tuple[str, str, bytes, bytes]:
    """(method, path, query, body) of request *i* to *endpoint*."""
    if endpoint == "users":
        return "GET", f"/users/{random.randint(1, 10_000)}", b"", b""
    if endpoint == "combo":
        return "GET", "/combo", b"", b""
    if endpoint == "cache":
        return "POST", f"/cache/k{random.randint(1, 1000)}", f"value=v{i}".encode(), b""
    if endpoint == "items":
        return "POST", "/items", b"", json.dumps({"name": f"item {i}"}).encode()
    raise ValueError(endpoint)


class InProcess:
    """An app with its lifespan open, called through ASGI."""

    def __init__(self, name: str) -> None:
        self.name = name
        module = importlib.import_module(f"benchmarks.apps.{name.partition('-')[0]}")
        self.app: Any = module.app
        if name == "scoped-nowatch":
            # Diagnostic: the scoped app without its disconnect watcher (one task per
            # request). Import it after "scoped": both share one module.
            module = importlib.reload(module)
            module.resources.cancel_on_disconnect = False
            self.app = module.app
        self.state: dict[str, Any] = {}
        self.failures = 0

    async def __aenter__(self) -> InProcess:
        self._lifespan = self.app.router.lifespan_context(self.app)
        state = await self._lifespan.__aenter__()
        if state:
            self.state.update(state)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._lifespan.__aexit__(None, None, None)

    async def call(self, endpoint: str, i: int) -> None:
        method, path, query, body = _request(endpoint, i)
        headers = [(b"host", b"bench")]
        if body:
            headers += [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": method, "scheme": "http", "path": path,
            "raw_path": path.encode(), "root_path": "", "query_string": query,
            "headers": headers, "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80), "state": self.state.copy(),
        }

        # Like a server: the body once, then nothing until the response is complete
        # (then a disconnect), so that a task waiting for a disconnect waits.
        done = asyncio.Event()
        sent_body = False

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 300:
                self.failures += 1
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        await self.app(scope, receive, send)

    async def load(self, endpoint: str, requests: int, concurrency: int) -> float:
        """Send *requests* requests; return the process CPU µs per request."""
        counter = 0

        async def worker() -> None:
            nonlocal counter
            while counter < requests:
                counter += 1
                await self.call(endpoint, counter)

        cpu = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return (time.process_time() - cpu) / requests * 1e6


async def _run(
    apps: Sequence[str], endpoint: str, *, requests: int, concurrency: int, repeats: int,
    profile: bool,
) -> dict[str, Any]:
    samples: dict[str, list[float]] = {app: [] for app in apps}
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(InProcess(app)) for app in apps]
        for client in clients:
            await client.load(endpoint, max(requests // 5, 100), concurrency)  # warm up
        for _ in range(repeats):
            for client in clients:
                samples[client.name].append(await client.load(endpoint, requests, concurrency))
        if profile:
            from pyinstrument import Profiler

            profiler = Profiler(async_mode="disabled", interval=0.0002)
            profiler.start()
            await clients[0].load(endpoint, requests, concurrency)
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False, show_all=False))
        failures = {c.name: c.failures for c in clients}
    return {app: {"cpu_us_median": statistics.median(v), "cpu_us": v,
                  "failures": failures[app]} for app, v in samples.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", default="scoped,plain")
    parser.add_argument("--endpoint", default="users", choices=("users", "combo", "cache",
                                                                "items"))
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pyinstrument", action="store_true")
    args = parser.parse_args(argv)
    from .schema import setup

    asyncio.run(setup(reset=True))
    result = uvloop.run(_run(args.apps.split(","), args.endpoint, requests=args.requests,
                             concurrency=args.concurrency, repeats=args.repeats,
                             profile=args.pyinstrument))
    base = result.get("plain", {}).get("cpu_us_median")
    for app, r in result.items():
        extra = f"  ({r['cpu_us_median'] / base:.2f}x plain)" if base else ""
        print(f"{args.endpoint:<6} {app:<7} CPU {r['cpu_us_median']:7.1f} µs/request"
              f"{extra}  failures {r['failures']}  samples "
              + " ".join(f"{v:.0f}" for v in r["cpu_us"]))
    asyncio.run(setup(reset=True))


if __name__ == "__main__":
    main()
