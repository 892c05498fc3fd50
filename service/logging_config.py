"""The service's log output: one line per record on stderr, as text or as JSON.

``LOG_FORMAT=text`` (the default) writes ``LEVEL logger: message``, followed by a
traceback when the record has one. ``LOG_FORMAT=json`` writes one JSON object per
line with ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message`` and, when
the record carries them, ``resource``, ``route``, ``cause`` and ``outage`` (set
by scoped-resources for every failed acquire or release) and ``traceback``.
uvicorn's own loggers go through the same handler. A start-up that failed with
``StartupFailed`` (which names the resource and the cause) is logged as that one
line, not as the app's whole traceback, unless the level is DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]

#: Attributes of a record that JSON output copies when present.
FIELDS = ("resource", "route", "cause", "outage")
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback is a string member)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single line of JSON."""
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class StartupFailureLine(logging.Filter):
    """uvicorn logs a failed start-up as the app's whole traceback (~40 lines); when the
    app raised ``StartupFailed``, its message says what failed, so it is the record."""

    MARK = "\nscoped_resources.exceptions.StartupFailed: "

    def filter(self, record: logging.LogRecord) -> bool:
        """Shorten a start-up traceback ending in StartupFailed to its message; keep all."""
        text = record.msg
        if isinstance(text, str) and text.startswith("Traceback") and self.MARK in text:
            record.msg = "the app did not start: " + text.rsplit(self.MARK, 1)[1].strip()
            record.args = ()
        return True


def configure(level: str, log_format: LogFormat) -> None:
    """Send every record at *level* or above to stderr in *log_format*."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    if level.upper() != "DEBUG":
        handler.addFilter(StartupFailureLine())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
