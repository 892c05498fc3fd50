"""The declared graph as text: Mermaid (the default) or Graphviz DOT.

Resources are grouped by scope; an arrow goes from a resource to each resource
it needs, and from each route to the resources it asks for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from ._check import recipes, route_label, route_resources, routes_of
from ._plan import Recipe
from ._registry import Resources
from ._resource import Level, Resource

_SCOPES = (
    (Level.APP, "app", "app scope"),
    (Level.RESPONSE, "response", "request scope (after response)"),
    (Level.REQUEST, "request", "request scope"),
)


class _Graph:
    def __init__(self, app: Any, registries: Iterable[Resources]) -> None:
        self.registries = list(registries)
        self.ids: dict[Resource[Any], str] = {}
        self.edges: list[tuple[str, str]] = []
        self.routes: list[tuple[str, str]] = []
        for r_index, registry in enumerate(self.registries):
            prefix = "" if len(self.registries) == 1 else f"r{r_index}_"
            for res in registry.resources:
                self.ids[res] = prefix + _ident(res.name)
        for registry in self.registries:
            for res, recipe in recipes(registry).items():
                if isinstance(recipe, Recipe):
                    for _, dep in recipe.deps:
                        if dep in self.ids:
                            self.edges.append((self.ids[res], self.ids[dep]))
        for index, (prefix, route) in enumerate(routes_of(app)):
            used = [r for r in route_resources(route) if r in self.ids]
            if not used:
                continue
            rid = f"route{index}"
            self.routes.append((rid, route_label(route, prefix)))
            self.edges.extend((rid, self.ids[r]) for r in used)

    def scoped(self, registry: Resources) -> list[tuple[str, str, list[Resource[Any]]]]:
        groups = []
        for level, key, title in _SCOPES:
            members = [r for r in registry.resources if r.level is level]
            if members:
                groups.append((key, title, members))
        return groups


def mermaid(app: Any, registries: Iterable[Resources]) -> str:
    """The graph of *app*'s resources as a Mermaid flowchart."""
    g = _Graph(app, registries)
    lines = ["flowchart LR"]
    for r_index, registry in enumerate(g.registries):
        for key, title, members in g.scoped(registry):
            label = title if len(g.registries) == 1 else f"{registry.name}: {title}"
            lines.append(f'  subgraph s{r_index}_{key}["{_mm(label)}"]')
            lines.extend(f'    {g.ids[r]}["{_mm(r.name)}"]' for r in members)
            lines.append("  end")
    if g.routes:
        lines.append('  subgraph routes["routes"]')
        lines.extend(f'    {rid}(["{_mm(label)}"])' for rid, label in g.routes)
        lines.append("  end")
    lines.extend(f"  {a} --> {b}" for a, b in g.edges)
    return "\n".join(lines) + "\n"


def dot(app: Any, registries: Iterable[Resources]) -> str:
    """The graph of *app*'s resources in Graphviz DOT."""
    g = _Graph(app, registries)
    lines = [
        "digraph resources {",
        "  rankdir=LR;",
        '  graph [fontname="Helvetica"];',
        '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname="Helvetica"];',
    ]
    for r_index, registry in enumerate(g.registries):
        for key, title, members in g.scoped(registry):
            label = title if len(g.registries) == 1 else f"{registry.name}: {title}"
            lines.append(f"  subgraph cluster_{r_index}_{key} {{")
            lines.append(f"    label={_dq(label)};")
            lines.extend(f"    {g.ids[r]} [label={_dq(r.name)}];" for r in members)
            lines.append("  }")
    if g.routes:
        lines.append("  subgraph cluster_routes {")
        lines.append('    label="routes";')
        lines.extend(
            f'    {rid} [label={_dq(label)}, shape=oval, fillcolor="#fdf3e1"];'
            for rid, label in g.routes
        )
        lines.append("  }")
    lines.extend(f"  {a} -> {b};" for a, b in g.edges)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _ident(name: str) -> str:
    return "res_" + re.sub(r"\W", "_", name)


def _mm(text: str) -> str:
    return text.replace('"', "#quot;")


def _dq(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
