"""The benchmark apps; each is importable as ``benchmarks.apps.<name>:app``.

``scoped`` (this library with its adapters), ``plain`` (idiomatic hand-written
FastAPI), ``naive`` (a new connection and client per request, the tutorial's
style) and ``noio`` (one endpoint doing no I/O: the framework's own ceiling).
They share one contract: the SQL, the payloads and the status codes in
:mod:`benchmarks.apps._common`.
"""
