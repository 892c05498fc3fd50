"""Testing helpers for resource-backed apps (a pytest plugin comes with them)."""

from ._proxy import TcpProxy

__all__ = ["TcpProxy"]
