"""Diagnostic: the ``scoped`` app without its disconnect watcher.

Identical to :mod:`benchmarks.apps.scoped` but with ``cancel_on_disconnect``
off, so that ``--apps scoped,scoped_nowatch,plain`` shows what watching for
disconnects (one task per request) costs. Not one of the default apps; run it in
its own process (uvicorn does), as it changes the ``scoped`` module's registry.
"""

from __future__ import annotations

from .scoped import app, resources

resources.cancel_on_disconnect = False

__all__ = ["app"]
