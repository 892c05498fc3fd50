"""A live page of the app's resources, opt-in: ``app.include_router(resource_page(resources))``.

It shows, per resource, the owners open (app scope), the leases in use, the
acquires waiting, the acquire wait p50/p99 over the most recent acquires, the
acquire and release failures, and readiness (each ping); then the leases held
now, oldest first, with the route holding them and their age (slow ones
flagged), and the most recent release failures.

``GET {path}`` is an HTML page with every number rendered by the server; a small
script served by the package refreshes it by polling ``GET {path}/data.json``
(no build step, no CDN; without JavaScript the page reloads itself). The page is
protected: with *token*, every data request must carry it (``Authorization:
Bearer <token>``, or ``?token=<token>`` for a browser), compared in constant time,
else 401; with *loopback_only*, a client that is not on a loopback address gets
403. At least one of the two is required.

The page observes the registry from when it is made: make it before the app
starts. Nothing is recorded for a registry without a page. It never shows a
resource's arguments; error texts and routes pass through ``redact`` so a DSN's
password cannot appear.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import re
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from importlib import resources as package_files
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ._failures import current_route
from ._observe import Observer
from ._resource import Level
from .adapters._common import redact
from .fastapi import _Readiness

if TYPE_CHECKING:
    from . import AppScope
    from ._registry import Resources
    from ._resource import Resource

__all__ = ["resource_page"]

#: Acquire times kept per resource for the percentiles (the most recent ones).
WAIT_SAMPLES = 512
#: Release failures kept (the most recent ones).
RECENT_FAILURES = 20
#: Held leases listed (the oldest ones).
LISTED_LEASES = 50

_SCOPE_LABEL = {
    Level.APP: "app",
    Level.RESPONSE: "request (after response)",
    Level.REQUEST: "request",
}
_GATE_KEYS = ("name", "capacity", "in_use", "waiting", "hold_estimate_ms", "shed", "timed_out")
_ROUTE_IN = re.compile(r"\((?P<route>[^()]*)\)$")
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


class _Stats:
    __slots__ = (
        "acquire_failures",
        "acquire_timeouts",
        "acquires",
        "release_failures",
        "releases",
        "terminations",
        "waiters",
        "waits",
    )

    def __init__(self) -> None:
        self.waiters = 0
        self.acquires = 0
        self.acquire_failures = 0
        self.acquire_timeouts = 0
        self.releases = 0
        self.release_failures = 0
        self.terminations = 0
        self.waits: deque[float] = deque(maxlen=WAIT_SAMPLES)


class PageObserver(Observer):
    """Counts acquires and releases per resource, in bounded memory."""

    def __init__(self) -> None:
        self.stats: dict[str, _Stats] = {}
        self.failures: deque[dict[str, Any]] = deque(maxlen=RECENT_FAILURES)

    def _of(self, resource: Resource[object]) -> _Stats:
        stats = self.stats.get(resource.name)
        if stats is None:
            stats = self.stats[resource.name] = _Stats()
        return stats

    def acquire_started(self, resource: Resource[object]) -> None:
        self._of(resource).waiters += 1

    def acquired(self, resource: Resource[object], seconds: float) -> None:
        stats = self._of(resource)
        stats.waiters -= 1
        stats.acquires += 1
        stats.waits.append(seconds)

    def acquire_failed(self, resource: Resource[object], seconds: float, busy: bool) -> None:
        stats = self._of(resource)
        stats.waiters -= 1
        stats.acquire_failures += 1
        stats.waits.append(seconds)
        if busy:
            stats.acquire_timeouts += 1

    def released(self, resource: Resource[object], seconds: float, outcome: str) -> None:
        stats = self._of(resource)
        stats.releases += 1
        if outcome != "ok":
            stats.release_failures += 1
            self.failures.appendleft(
                {
                    "resource": resource.name,
                    "outcome": outcome,
                    "route": redact(current_route.get() or "-"),
                    "seconds": round(seconds, 4),
                    "at": datetime.now(UTC).isoformat(timespec="seconds"),
                }
            )

    def terminated(self, resource: Resource[object]) -> None:
        self._of(resource).terminations += 1


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def snapshot(
    resources: Resources,
    observer: PageObserver,
    app_scope: AppScope | None,
    readiness: dict[str, str],
    slow_after: float,
    *,
    gates: Sequence[Any] = (),
) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data."""
    now = time.monotonic()
    owners: dict[str, int] = {}
    in_use: dict[str, int] = {}
    leases: list[dict[str, Any]] = []
    if app_scope is not None:
        for lease in app_scope.leases:
            if lease.state_name == "held":
                owners[lease.resource.name] = owners.get(lease.resource.name, 0) + 1
        for scope in app_scope.open_scopes:
            described = scope.describe()
            found = _ROUTE_IN.search(described)
            route = found["route"] if found else described
            for lease in scope.leases:
                if lease.state_name != "held":
                    continue
                name = lease.resource.name
                in_use[name] = in_use.get(name, 0) + 1
                age = now - lease.acquired_at
                leases.append(
                    {
                        "resource": name,
                        "route": redact(route),
                        "age_s": round(age, 3),
                        "slow": age >= slow_after,
                    }
                )
    leases.sort(key=lambda item: -item["age_s"])
    rows = []
    for res in resources.resources:
        stats = observer.stats.get(res.name) or _Stats()
        ordered = sorted(stats.waits)
        rows.append(
            {
                "name": res.name,
                "scope": _SCOPE_LABEL[res.level],
                "owners_open": owners.get(res.name, 0),
                "leases_in_use": in_use.get(res.name, 0),
                "waiters": max(stats.waiters, 0),
                "acquires": stats.acquires,
                "acquire_failures": stats.acquire_failures,
                "acquire_timeouts": stats.acquire_timeouts,
                "wait_p50_ms": _ms(_percentile(ordered, 0.5)),
                "wait_p99_ms": _ms(_percentile(ordered, 0.99)),
                "wait_samples": len(ordered),
                "releases": stats.releases,
                "release_failures": stats.release_failures,
                "terminations": stats.terminations,
                "readiness": readiness.get(res.name),
            }
        )
    if app_scope is None:
        status = "starting"
    elif app_scope.draining:
        status = "draining"
    else:
        status = "open"
    return {
        "registry": resources.name,
        "status": status,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "open_scopes": len(app_scope.open_scopes) if app_scope is not None else 0,
        "slow_after_s": slow_after,
        "ready": status == "open" and all(v == "ok" for v in readiness.values()),
        "resources": rows,
        "leases": leases[:LISTED_LEASES],
        "leases_total": len(leases),
        "release_failures": list(observer.failures),
        "gates": [_gate_row(gate.stats()) for gate in gates],
    }


def _gate_row(stats: Any) -> dict[str, Any]:
    estimate = getattr(stats, "hold_estimate", None)
    return {
        "name": str(getattr(stats, "name", "?")),
        "capacity": getattr(stats, "capacity", None),
        "in_use": getattr(stats, "in_use", None),
        "waiting": getattr(stats, "waiting", None),
        "hold_estimate_ms": _ms(estimate) if isinstance(estimate, float | int) else None,
        "shed": getattr(stats, "shed", None),
        "timed_out": getattr(stats, "timed_out", None),
    }


def resource_page(
    resources: Resources,
    *,
    token: str | None = None,
    loopback_only: bool = True,
    path: str = "/resources",
    slow_after: float | None = None,
    ping_timeout: float = 2.0,
    cache_ttl: float = 1.0,
    refresh_seconds: float = 2.0,
    gates: Sequence[Any] = (),
) -> APIRouter:
    """The live resource page for *resources*, as a router to include in the app.

    *token* (when given) must come with every request; *loopback_only* refuses
    clients outside 127.0.0.0/8 and ::1. *slow_after* (default: the registry's
    ``leak_after``, else 10 s) is the age from which a held lease is flagged slow.
    Readiness pings are cached for *cache_ttl* seconds. *gates* are admission
    gates of pooled adapters (``pg.gate``, anything with a ``stats()``): each is
    shown with its capacity, slots in use, queue, hold estimate and refusals.
    """
    if token is None and not loopback_only:
        raise ValueError(
            "resource_page needs a token or loopback_only=True: it must not be open to anyone"
        )
    if token is not None and not token:
        raise ValueError("resource_page: the token is empty; pass a secret or None")
    observer = PageObserver()
    resources.observers.append(observer)
    readiness = _Readiness(ping_timeout, cache_ttl)
    slow = slow_after if slow_after is not None else (resources.leak_after or 10.0)
    expected = token.encode() if token is not None else None
    key = resources.state_key
    base = path.rstrip("/")
    router = APIRouter(include_in_schema=False)

    def guard(request: Request, *, data: bool) -> None:
        if loopback_only and not _loopback(request):
            raise HTTPException(403, "the resource page answers only loopback clients")
        if data and expected is not None:
            given = _given_token(request)
            if given is None or not hmac.compare_digest(given.encode(), expected):
                raise HTTPException(
                    401,
                    "the resource page needs its token (Authorization: Bearer ...)",
                    headers={"WWW-Authenticate": "Bearer"},
                )

    async def current(request: Request) -> dict[str, Any]:
        state = request.scope.get("state")
        app_scope: AppScope | None = state.get(key) if state else None
        checks: dict[str, str] = {}
        if app_scope is not None and not app_scope.draining:
            pinged = await readiness.check(app_scope)
            checks = {name: redact(text) for name, text in pinged.items()}
        return snapshot(resources, observer, app_scope, checks, slow, gates=gates)

    @router.get(base or "/")
    async def page(request: Request) -> Response:
        guard(request, data=True)
        data = await current(request)
        return HTMLResponse(_render(data, base, refresh_seconds), headers=_HEADERS)

    @router.get(f"{base}/data.json")
    async def data(request: Request) -> Response:
        guard(request, data=True)
        return JSONResponse(await current(request), headers=_HEADERS)

    for asset, media in (("page.js", "text/javascript"), ("page.css", "text/css")):
        router.add_api_route(f"{base}/{asset}", _asset(asset, media, guard), methods=["GET"])
    return router


def _asset(
    name: str, media: str, guard: Callable[..., None]
) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    body = package_files.files(__package__).joinpath("_page", name).read_bytes()

    async def serve(request: Request) -> Response:
        guard(request, data=False)  # the assets hold no data: no token needed
        return Response(body, media_type=media, headers=_HEADERS)

    serve.__name__ = f"resource_page_{name.replace('.', '_')}"
    return serve


def _given_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return request.query_params.get("token")


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client is not None else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _render(data: dict[str, Any], base: str, refresh: float) -> str:
    e = html.escape
    columns = (
        ("name", "resource"),
        ("scope", "scope"),
        ("owners_open", "owners open"),
        ("leases_in_use", "leases in use"),
        ("waiters", "waiters"),
        ("wait_p50_ms", "wait p50 ms"),
        ("wait_p99_ms", "wait p99 ms"),
        ("acquires", "acquires"),
        ("acquire_failures", "acquire failures"),
        ("release_failures", "release failures"),
        ("readiness", "readiness"),
    )
    head = "".join(f"<th>{e(title)}</th>" for _, title in columns)
    body = "".join(
        "<tr>" + "".join(f'<td data-key="{k}">{e(_fmt(row[k]))}</td>' for k, _ in columns) + "</tr>"
        for row in data["resources"]
    )
    leases = (
        "".join(
            f'<tr class="{"slow" if lease["slow"] else ""}"><td>{e(lease["resource"])}</td>'
            f"<td>{e(lease['route'])}</td><td>{lease['age_s']:.3f}</td>"
            f"<td>{'slow' if lease['slow'] else ''}</td></tr>"
            for lease in data["leases"]
        )
        or '<tr><td colspan="4">none</td></tr>'
    )
    failures = (
        "".join(
            f"<tr><td>{e(f['at'])}</td><td>{e(f['resource'])}</td><td>{e(f['outcome'])}</td>"
            f"<td>{e(f['route'])}</td><td>{f['seconds']:g}</td></tr>"
            for f in data["release_failures"]
        )
        or '<tr><td colspan="5">none</td></tr>'
    )
    gates = (
        "".join(
            "<tr>" + "".join(f"<td>{e(_fmt(g[k]))}</td>" for k in _GATE_KEYS) + "</tr>"
            for g in data["gates"]
        )
        or '<tr><td colspan="7">none</td></tr>'
    )
    ready = "ready" if data["ready"] else "not ready"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>resources: {e(data["registry"])}</title>
<link rel="stylesheet" href="{e(base)}/page.css">
<noscript><meta http-equiv="refresh" content="{max(refresh, 1):g}"></noscript>
</head>
<body data-refresh="{refresh:g}" data-source="{e(base)}/data.json">
<header>
<h1>Resources of <span id="registry">{e(data["registry"])}</span></h1>
<p><span id="status" class="badge">{e(data["status"])}</span>
<span id="ready" class="badge {"ok" if data["ready"] else "bad"}">{ready}</span>
open scopes: <span id="open-scopes">{data["open_scopes"]}</span> ·
held leases: <span id="leases-total">{data["leases_total"]}</span> ·
at <span id="generated-at">{e(data["generated_at"])}</span></p>
</header>
<main>
<table id="resources"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Leases held now (slow after {data["slow_after_s"]:g} s)</h2>
<table id="leases"><thead><tr><th>resource</th><th>route</th><th>age s</th><th></th></tr></thead>
<tbody>{leases}</tbody></table>
<h2>Pool admission gates</h2>
<table id="gates"><thead><tr><th>gate</th><th>capacity</th><th>in use</th><th>waiting</th>
<th>hold estimate ms</th><th>refused at once</th><th>timed out</th></tr></thead>
<tbody>{gates}</tbody></table>
<h2>Recent release failures</h2>
<table id="failures"><thead><tr><th>at</th><th>resource</th><th>outcome</th><th>route</th>
<th>seconds</th></tr></thead><tbody>{failures}</tbody></table>
</main>
<script src="{e(base)}/page.js"></script>
</body>
</html>
"""
