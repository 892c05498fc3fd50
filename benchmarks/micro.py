"""The micro benchmark: the library's per-request cost without I/O.

``python -m benchmarks.micro [--quick]``. One request = open a request scope,
resolve N resources (1, 3, 10; each depends on an app-scoped resource), close
the scope. Compared, per N:

* ``scoped``: ``app_scope.child()`` + ``await scope.get(r)`` for each resource;
* ``exitstack``: the same by hand, a ``contextlib.AsyncExitStack`` entering one
  ``@asynccontextmanager`` generator per resource (the target: <= 1.5x this for
  one resource, <= 1.3x for more);
* through FastAPI, calling the ASGI app directly (no network, no server):
  ``fastapi-yield`` (a ``yield`` dependency per resource), ``fastapi-scoped``
  (``Use(resource)`` per resource) and ``fastapi-bare`` (the same route with no
  dependency: the framework's own cost, to subtract).

Timing: ``time.perf_counter`` around loops of requests on uvloop; each variant
is timed in *repeats* interleaved rounds and the median is reported, in
microseconds per request.

Deliberately without ``from __future__ import annotations``: the resources'
annotations are objects made in functions, not names a module can resolve.
"""

import argparse
import asyncio
import inspect
import json
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import uvloop
from fastapi import Depends, FastAPI, Request

from scoped_resources import AppScope, Resource, Resources, Use

SIZES = (1, 3, 10)
Message = MutableMapping[str, Any]


class Config:
    """The app-scoped value every request resource depends on."""

    def __init__(self) -> None:
        self.value = 1


# -- the library, directly -----------------------------------------------------------


def scoped_registry(n: int, **options: Any) -> tuple[Resources, list[Resource[int]]]:
    resources = Resources(f"micro{n}", **options)

    @resources.app
    async def config() -> AsyncIterator[Config]:
        yield Config()

    made: list[Resource[int]] = []
    for i in range(n):

        async def value(cfg: Annotated[Config, Use(config)]) -> AsyncIterator[int]:
            yield cfg.value

        made.append(resources.request(name=f"r{i}")(value))
    return resources, made


def scoped_request(app_scope: AppScope, made: list[Resource[int]]) -> Callable[[], Awaitable[None]]:
    async def one() -> None:
        async with app_scope.child() as scope:
            for res in made:
                await scope.get(res)

    return one


# -- by hand ---------------------------------------------------------------------------


@asynccontextmanager
async def hand_value(cfg: Config) -> AsyncIterator[int]:
    yield cfg.value


def exitstack_request(cfg: Config, n: int) -> Callable[[], Awaitable[None]]:
    factories = [hand_value] * n

    async def one() -> None:
        async with AsyncExitStack() as stack:
            for factory in factories:
                await stack.enter_async_context(factory(cfg))

    return one


# -- through FastAPI's ASGI app ----------------------------------------------------------


def _endpoint(params: list[inspect.Parameter]) -> Callable[..., Awaitable[dict[str, int]]]:
    async def endpoint(**kwargs: int) -> dict[str, int]:
        return {"n": len(kwargs)}

    endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return endpoint


def fastapi_yield_app(n: int) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.config = Config()
        yield

    app = FastAPI(lifespan=lifespan)

    async def get_config(request: Request) -> Config:
        config: Config = request.app.state.config
        return config

    async def value(cfg: Annotated[Config, Depends(get_config)]) -> AsyncIterator[int]:
        yield cfg.value

    params = []
    for i in range(n):
        # A distinct function per resource, as a real app has: FastAPI caches by callable.
        dep = _copy_function(value, f"value{i}")
        params.append(inspect.Parameter(f"r{i}", inspect.Parameter.KEYWORD_ONLY,
                                        annotation=Annotated[int, Depends(dep)]))
    app.get("/r")(_endpoint(params))
    return app


def fastapi_scoped_app(n: int, **options: Any) -> FastAPI:
    resources, made = scoped_registry(n, **options)
    app = FastAPI(lifespan=resources.lifespan)
    params = [
        inspect.Parameter(f"r{i}", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[int, Use(res)])
        for i, res in enumerate(made)
    ]
    app.get("/r")(_endpoint(params))
    return app


def fastapi_bare_app() -> FastAPI:
    app = FastAPI()
    app.get("/r")(_endpoint([]))
    return app


def _copy_function(f: Callable[..., Any], name: str) -> Callable[..., Any]:
    import types

    assert isinstance(f, types.FunctionType)
    copy = types.FunctionType(f.__code__, f.__globals__, name, f.__defaults__, f.__closure__)
    copy.__annotations__ = dict(f.__annotations__)
    copy.__qualname__ = name
    return copy


class AsgiClient:
    """Calls an ASGI app directly with a minimal HTTP scope: no network, no server."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self.status = 0
        self._lifespan: Any = None

    async def __aenter__(self) -> "AsgiClient":
        self._lifespan = self.app.router.lifespan_context(self.app)
        state = await self._lifespan.__aenter__()
        if state:
            self.state.update(state)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._lifespan.__aexit__(None, None, None)


    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/r",
            "raw_path": b"/r",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"bench")],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
            "state": self.state.copy(),
        }

    def request(self) -> Callable[[], Awaitable[None]]:
        app, make_scope = self.app, self.scope

        async def one() -> None:
            # Like a server: the (empty) body once, then nothing until the response is
            # complete (then a disconnect), so that a task waiting for one waits.
            done = asyncio.Event()
            sent_body = False

            async def receive() -> Message:
                nonlocal sent_body
                if not sent_body:
                    sent_body = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                await done.wait()
                return {"type": "http.disconnect"}

            async def send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    self.status = message["status"]
                elif message["type"] == "http.response.body" and not message.get("more_body"):
                    done.set()

            await app(make_scope(), receive, send)

        return one


# -- timing ------------------------------------------------------------------------------


async def _time(one: Callable[[], Awaitable[None]], loops: int) -> float:
    # Each timing runs in a task of its own, as a server runs requests: not inside
    # the task (and the task group) that holds the app scope open.
    return await asyncio.ensure_future(_loop(one, loops))


async def _loop(one: Callable[[], Awaitable[None]], loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        await one()
    return (time.perf_counter() - start) / loops * 1e6


async def _run(
    sizes: Sequence[int], loops: int, repeats: int, *, diagnose: bool
) -> dict[str, dict[str, float]]:
    variants: dict[str, Callable[[], Awaitable[None]]] = {}
    async with AsyncExitStack() as stack:
        bare = await stack.enter_async_context(AsgiClient(fastapi_bare_app()))
        variants["fastapi-bare"] = bare.request()
        for n in sizes:
            resources, made = scoped_registry(n)
            app_scope = await stack.enter_async_context(resources.open())
            variants[f"scoped/{n}"] = scoped_request(app_scope, made)
            variants[f"exitstack/{n}"] = exitstack_request(Config(), n)
            yielding = await stack.enter_async_context(AsgiClient(fastapi_yield_app(n)))
            variants[f"fastapi-yield/{n}"] = yielding.request()
            scoped = await stack.enter_async_context(AsgiClient(fastapi_scoped_app(n)))
            variants[f"fastapi-scoped/{n}"] = scoped.request()
            if diagnose:
                # What the deadlines (cancel scopes) and the disconnect watcher cost.
                resources, made = scoped_registry(n, acquire_timeout=None,
                                                  release_timeout=None)
                app_scope = await stack.enter_async_context(resources.open())
                variants[f"scoped-no-deadlines/{n}"] = scoped_request(app_scope, made)
                unwatched = await stack.enter_async_context(
                    AsgiClient(fastapi_scoped_app(n, cancel_on_disconnect=False)))
                variants[f"fastapi-scoped-no-watch/{n}"] = unwatched.request()
        for name, one in variants.items():  # warm up, and check that each request works
            await _time(one, max(loops // 10, 10))
            client = next((c for c in (locals().get("yielding"), locals().get("scoped"))
                           if c is not None and c.status not in (0, 200)), None)
            if client is not None:
                raise RuntimeError(f"{name}: HTTP {client.status}")
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, one in variants.items():
                samples[name].append(await _time(one, loops))
    return {
        name: {"median_us": statistics.median(v), "min_us": min(v), "max_us": max(v)}
        for name, v in samples.items()
    }


def bound(n: int) -> float:
    """The target for *n* resources: scoped / AsyncExitStack at most this."""
    return 1.5 if n == 1 else 1.3


def run_micro(
    *, sizes: Sequence[int] = SIZES, loops: int = 2000, repeats: int = 7, diagnose: bool = True
) -> dict[str, Any]:
    """Run the micro benchmark on uvloop; per-request microseconds per variant.

    With *diagnose*, also the library without deadlines (no cancel scopes) and
    without the disconnect watcher, to show what each costs.
    """
    timings = uvloop.run(_run(sizes, loops, repeats, diagnose=diagnose))
    ratios: dict[str, dict[str, float]] = {}
    bare = timings["fastapi-bare"]["median_us"]
    for n in sizes:
        scoped = timings[f"scoped/{n}"]["median_us"]
        stack = timings[f"exitstack/{n}"]["median_us"]
        fy = timings[f"fastapi-yield/{n}"]["median_us"]
        fs = timings[f"fastapi-scoped/{n}"]["median_us"]
        ratios[str(n)] = {
            "scoped_vs_exitstack": scoped / stack,
            "fastapi_scoped_vs_fastapi_yield": fs / fy,
            "fastapi_scoped_minus_bare_us": fs - bare,
            "fastapi_yield_minus_bare_us": fy - bare,
        }
    return {"settings": {"loops": loops, "repeats": repeats, "sizes": list(sizes)},
            "timings": timings, "ratios": ratios}


def table(result: dict[str, Any]) -> str:
    t = result["timings"]
    lines = [
        "| resources | scoped µs | AsyncExitStack µs | scoped / ExitStack "
        "| FastAPI + yield deps µs | FastAPI + Use µs | Use / yield |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in result["settings"]["sizes"]:
        r = result["ratios"][str(n)]
        lines.append(
            f"| {n} | {t[f'scoped/{n}']['median_us']:.1f} | {t[f'exitstack/{n}']['median_us']:.1f} "
            f"| {r['scoped_vs_exitstack']:.2f}x | {t[f'fastapi-yield/{n}']['median_us']:.1f} "
            f"| {t[f'fastapi-scoped/{n}']['median_us']:.1f} "
            f"| {r['fastapi_scoped_vs_fastapi_yield']:.2f}x |"
        )
    lines.append(f"\nFastAPI route with no dependency (ASGI, no network): "
                 f"{t['fastapi-bare']['median_us']:.1f} µs per request.")
    if any(k.startswith("scoped-no-deadlines/") for k in t):
        lines += [
            "",
            "Diagnostics (µs per request): the library with `acquire_timeout=None, "
            "release_timeout=None` (no cancel scopes), and through FastAPI with "
            "`cancel_on_disconnect=False` (no watcher task).",
            "",
            "| resources | scoped | scoped, no deadlines | FastAPI + Use "
            "| FastAPI + Use, no watcher |",
            "|---:|---:|---:|---:|---:|",
        ]
        for n in result["settings"]["sizes"]:
            lines.append(
                f"| {n} | {t[f'scoped/{n}']['median_us']:.1f} "
                f"| {t[f'scoped-no-deadlines/{n}']['median_us']:.1f} "
                f"| {t[f'fastapi-scoped/{n}']['median_us']:.1f} "
                f"| {t[f'fastapi-scoped-no-watch/{n}']['median_us']:.1f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer loops and repeats")
    parser.add_argument("--loops", type=int, help="requests per timing (default 2000)")
    parser.add_argument("--repeats", type=int, help="timings per variant (default 7)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    result = run_micro(
        loops=args.loops or (500 if args.quick else 2000),
        repeats=args.repeats or (3 if args.quick else 7),
    )
    print(table(result))
    for n, r in result["ratios"].items():
        ratio = r["scoped_vs_exitstack"]
        print(f"{'MET ' if ratio <= bound(int(n)) else 'MISS'} {n} resource(s): scoped <= "
              f"{bound(int(n))}x "
              f"AsyncExitStack: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
