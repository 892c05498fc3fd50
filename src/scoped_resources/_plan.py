"""Plan: the declarations compiled once, before the first scope opens.

Compiling checks the graph (cycles, missing dependencies, scope violations,
misuse) and turns every resource's signature into a recipe, so that acquiring an
instance never inspects a signature or walks the graph again.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, get_args, get_origin

from ._resource import UNSHAREABLE_TYPES, Kind, Level, Resource, unwrapped
from .exceptions import DependencyCycle, MissingDependency, ResourceMisuse, ScopeViolation

_EMPTY = inspect.Parameter.empty


@dataclass(frozen=True, slots=True)
class Recipe:
    """How to call one resource's factory: its dependencies and fixed arguments."""

    deps: tuple[tuple[str, Resource[Any]], ...]
    values: Mapping[str, Any]
    context: tuple[tuple[str, type], ...]
    #: The deadline the core puts on an acquire: ``acquire_timeout``, unless the
    #: factory enforces it itself (a pooled adapter's gate) or there is none.
    timeout: float | None = None


@dataclass(slots=True)
class Plan:
    """The compiled graph of one registry."""

    resources: tuple[Resource[Any], ...]
    #: App resources in an order where each comes after what it needs.
    app_order: tuple[Resource[Any], ...]
    context_types: frozenset[type] = field(default_factory=frozenset)
    #: Whether any resource is held until the response is sent (needs an outer scope).
    has_response_level: bool = False

    def dependents(self, resource: Resource[Any]) -> tuple[Resource[Any], ...]:
        """The resources whose factories take *resource* directly."""
        return tuple(
            res
            for res in self.resources
            if res._compiled is not None and any(dep is resource for _, dep in res._compiled.deps)
        )


def marker_resource(obj: object) -> Resource[Any] | None:
    """The resource a parameter marker (``Use(r)`` or ``r`` itself) names, if any."""
    if isinstance(obj, Resource):
        return obj
    res = getattr(obj, "resource", None)
    return res if isinstance(res, Resource) else None


def compile_plan(
    resources: Iterable[Resource[Any]],
    values: Mapping[type, Any],
    registry: object,
    context_types: Iterable[type] = (),
) -> Plan:
    """Check *resources* and store a recipe on each; raise a PlanError if unsound."""
    members = tuple(resources)
    ctx = frozenset(context_types)
    for res in members:
        res._compiled = _recipe(res, values, registry, ctx)
        _check_shareable(res)
    order = _topological(members)
    return Plan(
        resources=members,
        app_order=tuple(r for r in order if r.level is Level.APP),
        context_types=ctx,
        has_response_level=any(r.level is Level.RESPONSE for r in members),
    )


def recipe_for(
    res: Resource[Any], values: Mapping[type, Any], registry: object, ctx: frozenset[type]
) -> Recipe:
    """Compile one resource's recipe (for a replacement made after the plan)."""
    return _recipe(res, values, registry, ctx)


def _recipe(
    res: Resource[Any], values: Mapping[type, Any], registry: object, ctx: frozenset[type]
) -> Recipe:
    recipe = _call_recipe(res, values, registry, ctx)
    if res.acquire_timeout is None or res._own_deadline:
        return recipe
    return replace(recipe, timeout=res.acquire_timeout)


def _call_recipe(
    res: Resource[Any], values: Mapping[type, Any], registry: object, ctx: frozenset[type]
) -> Recipe:
    if res.kind is Kind.INSTANCE:
        return Recipe((), {}, ())
    target = unwrapped(res.factory)
    call = target.__init__ if inspect.isclass(target) else target
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return Recipe((), {}, ())
    try:
        hints = typing.get_type_hints(call, localns=res.localns, include_extras=True)
    except Exception as exc:
        raise ResourceMisuse(
            res.name,
            f"its parameter annotations cannot be resolved ({exc})",
            "import the names its annotations use at module level",
        ) from exc
    deps: list[tuple[str, Resource[Any]]] = []
    fixed: dict[str, Any] = {}
    context: list[tuple[str, type]] = []
    for pname, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        hint = hints.get(pname, param.annotation)
        dep = _marker_in(hint, param.default)
        if dep is not None:
            if dep.registry is not registry:
                raise MissingDependency(
                    res.name,
                    pname,
                    f"resource {dep.name!r}",
                    "it belongs to another Resources registry; declare both in the same one",
                )
            _check_scope(res, dep)
            deps.append((pname, dep))
            continue
        base = _strip_annotated(hint)
        if isinstance(base, type) and base in values:
            fixed[pname] = values[base]
        elif isinstance(base, type) and base in ctx:
            if res.level is Level.APP and getattr(base, "__scoped_app_context__", False) is False:
                raise ResourceMisuse(
                    res.name,
                    f"it is app-scoped but its parameter {pname!r} asks for the request's "
                    f"{base.__name__}, which does not exist when the app starts",
                    "declare it with @resources.request",
                )
            context.append((pname, base))
        elif param.default is not _EMPTY:
            continue
        else:
            wanted = getattr(base, "__name__", repr(base)) if base is not _EMPTY else "a value"
            raise MissingDependency(
                res.name,
                pname,
                wanted,
                "annotate it as Annotated[T, Use(resource)], give it a default, or "
                "register a value with resources.provide(...)",
            )
    return Recipe(tuple(deps), fixed, tuple(context))


def _marker_in(hint: Any, default: Any) -> Resource[Any] | None:
    if get_origin(hint) is Annotated:
        for meta in reversed(get_args(hint)[1:]):
            found = marker_resource(meta)
            if found is not None:
                return found
    if default is not _EMPTY:
        return marker_resource(default)
    return None


def _strip_annotated(hint: Any) -> Any:
    if get_origin(hint) is Annotated:
        return get_args(hint)[0]
    return hint


def _check_scope(res: Resource[Any], dep: Resource[Any]) -> None:
    if dep.level > res.level:
        scope = "app" if res.level is Level.APP else "request (after_response)"
        dep_scope = "request" if dep.level is Level.REQUEST else "request (after_response)"
        raise ScopeViolation(res.name, scope, dep.name, dep_scope)


def _produced_type(res: Resource[Any]) -> Any:
    target = unwrapped(res.factory)
    if inspect.isclass(target):
        return target
    try:
        hint = typing.get_type_hints(target, localns=res.localns).get("return")
    except Exception:  # noqa: BLE001 - a best-effort check only
        return None
    if hint is None:
        return None
    origin = get_origin(hint)
    if origin is not None and getattr(origin, "__name__", "") in {
        "AsyncIterator",
        "AsyncGenerator",
        "AsyncIterable",
        "AbstractAsyncContextManager",
    }:
        args = get_args(hint)
        return args[0] if args else None
    return hint


def _check_shareable(res: Resource[Any]) -> None:
    if res.level is not Level.APP:
        return
    produced = _produced_type(res)
    qualified = (
        f"{produced.__module__}.{produced.__qualname__}" if isinstance(produced, type) else ""
    )
    if not res.shareable or qualified in UNSHAREABLE_TYPES:
        what = f"a {qualified}" if qualified in UNSHAREABLE_TYPES else "marked not shareable"
        raise ResourceMisuse(
            res.name,
            f"it is app-scoped but {what}, so concurrent requests would race on one instance",
            "declare it with @resources.request, and keep the pool or client it comes "
            "from app-scoped",
        )


def _topological(members: tuple[Resource[Any], ...]) -> list[Resource[Any]]:
    order: list[Resource[Any]] = []
    state: dict[Resource[Any], int] = {}  # 1 visiting, 2 done
    for root in members:
        _visit(root, state, order, [])
    return order


def _visit(
    res: Resource[Any],
    state: dict[Resource[Any], int],
    order: list[Resource[Any]],
    path: list[Resource[Any]],
) -> None:
    mark = state.get(res)
    if mark == 2:
        return
    if mark == 1:
        cycle = [*path[path.index(res) :], res]
        raise DependencyCycle([r.name for r in cycle])
    state[res] = 1
    path.append(res)
    recipe: Recipe = res._compiled
    for _, dep in recipe.deps:
        _visit(dep, state, order, path)
    path.pop()
    state[res] = 2
    order.append(res)
