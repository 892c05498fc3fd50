"""``scoped-resources``: check an app's resource graph, or print it.

``scoped-resources check MODULE:APP`` compiles every plan as start-up does and
prints one line per problem (exit 1), or nothing but a summary (exit 0); it
imports the app and opens no resource. ``scoped-resources graph MODULE:APP``
prints the graph as Mermaid, or DOT with ``--dot``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ._check import check, registries_of
from ._graph import dot, mermaid
from ._registry import Resources


class _UsageError(Exception):
    pass


def load(target: str) -> tuple[Any, Any]:
    """Import ``MODULE:ATTR`` (``ATTR`` defaults to ``app``); return the app and its module."""
    module_name, _, attr = target.partition(":")
    if not module_name:
        raise _UsageError(f"{target!r} is not MODULE:APP (for example 'service.app:app')")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _UsageError(f"cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any error of the app's own import
        # The app's own import failed: say so in one line, with the error's type.
        raise _UsageError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in (attr or "app").split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _UsageError(
                f"module {module_name!r} has no attribute {attr or 'app'!r}"
            ) from None
    return obj, module


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 sound, 1 problems, 2 usage)."""
    parser = argparse.ArgumentParser(
        prog="scoped-resources", description="Check or draw an app's resource graph."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check_cmd = commands.add_parser("check", help="report every problem start-up would find")
    check_cmd.add_argument("target", metavar="MODULE:APP")
    check_cmd.add_argument("--json", action="store_true", help="print a JSON report")
    graph_cmd = commands.add_parser("graph", help="print the graph (Mermaid; DOT with --dot)")
    graph_cmd.add_argument("target", metavar="MODULE:APP")
    graph_cmd.add_argument("--dot", action="store_true", help="Graphviz DOT instead of Mermaid")
    args = parser.parse_args(argv)
    try:
        app, module = load(args.target)
    except _UsageError as exc:
        print(f"scoped-resources: {exc}", file=sys.stderr)
        return 2
    registries = registries_of(app, module if isinstance(app, Resources) else None)
    if isinstance(app, Resources):
        registries = [app]
    if not registries:
        print(f"scoped-resources: {args.target} uses no Resources registry", file=sys.stderr)
        return 2
    if args.command == "graph":
        sys.stdout.write((dot if args.dot else mermaid)(app, registries))
        return 0
    problems = check(app, registries)
    if args.json:
        report = {
            "target": args.target,
            "ok": not problems,
            "registries": [r.name for r in registries],
            "resources": sum(len(r.resources) for r in registries),
            "problems": [asdict(p) for p in problems],
        }
        print(json.dumps(report, indent=2))
    else:
        for problem in problems:
            print(problem.line())
        count = sum(len(r.resources) for r in registries)
        verdict = f"{len(problems)} problem(s)" if problems else "ok"
        print(f"{args.target}: {count} resources checked, {verdict}", file=sys.stderr)
    return 1 if problems else 0
