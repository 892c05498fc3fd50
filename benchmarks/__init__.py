"""Benchmarks of scoped-resources against hand-written FastAPI.

Run everything with ``python -m benchmarks`` (``--quick`` for a short check);
see ``benchmarks/README.md``.
"""
