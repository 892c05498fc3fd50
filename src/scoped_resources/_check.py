"""Checking an app's resource graph without opening anything.

The same compilation the lifespan runs at start-up (every resource's recipe, the
app-scope sharing rule, the cycle search, the route checks), but each problem is
collected instead of raised, so one run lists all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from . import AppScope
from ._plan import Recipe, _check_shareable, _recipe
from ._registry import Resources
from ._resource import Resource
from .exceptions import DependencyCycle, MissingDependency, PlanError, ScopeViolation


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason the graph would not start: its kind, both ends, and the message."""

    kind: str
    registry: str
    resource: str
    #: The other end of the bad edge (a dependency, a parameter or a route), if any.
    other: str | None
    message: str

    def line(self) -> str:
        """The problem as one line of text."""
        return f"{self.kind}: {self.message}"


def registries_of(app: Any, module: object | None = None) -> list[Resources]:
    """Every registry *app* uses: its lifespan's, its routes', and *module*'s globals."""
    found: dict[int, Resources] = {}

    def add(obj: object) -> None:
        if isinstance(obj, Resources):
            found.setdefault(id(obj), obj)

    for registry in _lifespan_registries(app):
        add(registry)
    state = getattr(app, "state", None)
    add(getattr(state, "resources", None))
    for _, route in routes_of(app):
        for resource in route_resources(route):
            add(resource.registry)
    if module is not None:
        for value in vars(module).values():
            add(value)
    return list(found.values())


def routes_of(app: Any) -> list[tuple[str, Any]]:
    """``(prefix, route)`` for each API and websocket route of *app*.

    Mounted sub-apps and included routers are walked too (FastAPI may keep an
    included router as a wrapper around the original, with its prefix).
    """
    from fastapi.routing import APIRoute, APIWebSocketRoute
    from starlette.routing import Mount

    found: list[tuple[str, Any]] = []

    def walk(router: Any, prefix: str, depth: int) -> None:
        for route in getattr(router, "routes", ()):
            if isinstance(route, APIRoute | APIWebSocketRoute):
                found.append((prefix, route))
            elif isinstance(route, Mount) and depth < 20:
                walk(route.app, prefix + route.path, depth + 1)
            elif hasattr(route, "original_router") and depth < 20:
                context = getattr(route, "include_context", None)
                walk(route.original_router, prefix + getattr(context, "prefix", ""), depth + 1)

    walk(getattr(app, "router", app), "", 0)
    return found


def route_label(route: Any, prefix: str = "") -> str:
    """``GET /users/{uid}``, or ``WS /path`` for a websocket."""
    methods = sorted(getattr(route, "methods", None) or ())
    path = prefix + getattr(route, "path", "?")
    return f"{','.join(methods)} {path}" if methods else f"WS {path}"


def route_resources(route: Any) -> list[Resource[Any]]:
    """The resources *route* asks for directly (through its dependencies, in order)."""
    seen: dict[Resource[Any], None] = {}

    def walk(dependant: Any) -> None:
        for sub in dependant.dependencies:
            res = getattr(sub.call, "__scoped_resource__", None)
            if isinstance(res, Resource):
                seen.setdefault(res, None)
            walk(sub)

    walk(route.dependant)
    return list(seen)


def recipes(registry: Resources) -> dict[Resource[Any], Recipe | PlanError]:
    """Each resource's recipe as start-up compiles it, or the error compiling it raised."""
    ctx = _startup_context()
    out: dict[Resource[Any], Recipe | PlanError] = {}
    for res in registry.resources:
        try:
            out[res] = _recipe(res, registry._values, registry, ctx)
        except PlanError as err:
            out[res] = err
    return out


def check(app: Any, registries: Iterable[Resources]) -> list[Problem]:
    """Every problem start-up would find in *app* with *registries*; empty when sound."""
    problems: list[Problem] = []
    for registry in registries:
        compiled = recipes(registry)
        for res, recipe in compiled.items():
            if isinstance(recipe, PlanError):
                problems.append(_problem(registry, res.name, recipe))
            try:
                _check_shareable(res)
            except PlanError as err:
                problems.append(_problem(registry, res.name, err))
        for cycle in _cycles(compiled):
            message = str(DependencyCycle([r.name for r in cycle]))
            problems.append(Problem("cycle", registry.name, cycle[0].name, cycle[-2].name, message))
        for prefix, route in routes_of(app):
            problems.extend(_route_problems(route, prefix, registry))
    for prefix, route in routes_of(app):
        label = route_label(route, prefix)
        for res in route_resources(route):
            if not _lifespan_opens(app, res.registry):
                owner = getattr(res.registry, "name", "?")
                problems.append(
                    Problem(
                        "foreign",
                        owner,
                        res.name,
                        label,
                        f"route {label!r} asks for resource {res.name!r} of registry "
                        f"{owner!r}, which this app's lifespan does not open; declare it in "
                        "the app's registry, or open its registry in the lifespan",
                    )
                )
    return problems


def _startup_context() -> frozenset[type]:
    from fastapi import Request

    return frozenset({Request, AppScope})


def _route_problems(route: Any, prefix: str, registry: Resources) -> Iterator[Problem]:
    from .fastapi import _check_dependant

    try:
        _check_dependant(route.dependant, route, registry)
    except PlanError as err:
        label = route_label(route, prefix)
        found = _problem(registry, getattr(err, "resource", "?"), err, other=label)
        # The core names the route by its own path; add the full one (method, prefix).
        yield Problem(found.kind, found.registry, found.resource, label, f"{err} [{label}]")


def _lifespan_opens(app: Any, registry: object) -> bool:
    return any(found is registry for found in _lifespan_registries(app))


def _lifespan_registries(app: Any) -> list[Resources]:
    """The registries *app*'s lifespan opens, through the wrappers frameworks add."""
    found: list[Resources] = []
    seen: set[int] = set()
    todo: list[object] = [getattr(getattr(app, "router", app), "lifespan_context", None)]
    while todo and len(seen) < 200:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Resources):
            found.append(obj)
            continue
        todo.append(getattr(obj, "__self__", None))
        todo.append(getattr(obj, "__wrapped__", None))
        todo.append(getattr(obj, "func", None))  # functools.partial
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                todo.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
    return found


def _problem(
    registry: Resources, resource: str, err: PlanError, other: str | None = None
) -> Problem:
    if isinstance(err, MissingDependency):
        kind = "foreign" if "another Resources registry" in str(err) else "missing"
        other = f"{err.parameter} ({err.wanted})"
    elif isinstance(err, ScopeViolation):
        kind, other = "scope", err.dependency
    elif "sync function" in str(err):
        kind = "sync-async"
    elif "concurrent requests would race" in str(err):
        kind = "unshareable"
    else:
        kind = "misuse"
    return Problem(kind, registry.name, resource, other, str(err))


def _cycles(compiled: dict[Resource[Any], Recipe | PlanError]) -> list[list[Resource[Any]]]:
    """Each distinct cycle once, as a closed path (first == last)."""
    state: dict[Resource[Any], int] = {}
    found: list[list[Resource[Any]]] = []
    seen_sets: set[frozenset[Resource[Any]]] = set()

    def visit(res: Resource[Any], path: list[Resource[Any]]) -> None:
        mark = state.get(res)
        if mark == 2:
            return
        if mark == 1:
            cycle = [*path[path.index(res) :], res]
            key = frozenset(cycle)
            if key not in seen_sets:
                seen_sets.add(key)
                found.append(cycle)
            return
        state[res] = 1
        path.append(res)
        recipe = compiled.get(res)
        if isinstance(recipe, Recipe):
            for _, dep in recipe.deps:
                visit(dep, path)
        path.pop()
        state[res] = 2

    for root in compiled:
        visit(root, [])
    return found
