"""Structured logs, the same for every daemon and command line.

``setup_logging(level, stream)`` writes one JSON object per line when ``stream`` (stderr by
default) is not a terminal, and readable text when it is::

    {"time": "2026-12-04T07:35:15.123Z", "level": "INFO", "logger": "island.daemon",
     "message": "island0: chose aggregator leaf0 at 127.0.0.1:5001", "island": "island0",
     "model_id": "global", "version": 3, "step": 120}

    2026-12-04 07:35:15,123 INFO island.daemon: island0: chose aggregator leaf0 at ... \
        island=island0 model_id=global version=3 step=120

A line's fields come from its context, then from ``extra=`` on the call (which wins):

- ``bind(**fields)`` / ``log_context(**fields)`` set fields in a ``contextvars`` context: an
  island sets its name, model id, step and version once in its training thread, and every
  line of that thread carries them, as do the coroutines it hands its ``LoopThread`` (a
  coroutine submitted from another thread runs in a copy of the submitter's context) and
  the servers they start. Several islands in one process keep their own fields.
- A field's value may be a callable without arguments, read when the line is written (the
  island's current step); one that raises or returns None is left out.

``read_log(text)`` reads either format back into dicts (``time`` as epoch seconds), so tools
that look for a line in a daemon's log work on both. Concurrency: none of its own; logging's
handler lock serializes writes.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import datetime
import json
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, TextIO

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "json", "text")
TEXT_TIME = "%Y-%m-%d %H:%M:%S,%f"  # logging's default asctime, with milliseconds

_fields: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "archipelago_log_fields", default=MappingProxyType({})
)
# attributes every LogRecord has: anything else on a record came from ``extra=``
_RECORD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
_HEAD = ("time", "level", "logger", "message")
# the standard names, whatever a library renamed them to (hivemind calls WARNING "WARN")
_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARNING",
                logging.ERROR: "ERROR", logging.CRITICAL: "CRITICAL"}  # fmt: skip


def bind(**fields: Any) -> None:
    """Add ``fields`` to every later line logged in this context (thread or task)."""
    _fields.set({**_fields.get(), **fields})


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """``fields`` on every line logged in this context until the block ends."""
    token = _fields.set({**_fields.get(), **fields})
    try:
        yield
    finally:
        _fields.reset(token)


def _value(v: Any) -> Any:
    if callable(v):
        try:
            return v()
        except Exception:  # a field must never break a log line
            return None
    return v


def line_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The context's fields, then the record's ``extra=`` ones; None values left out."""
    out = {k: _value(v) for k, v in _fields.get().items()}
    out.update((k, v) for k, v in vars(record).items() if k not in _RECORD_ATTRS)
    return {k: v for k, v in out.items() if v is not None and k not in _HEAD}


def level_name(record: logging.LogRecord) -> str:
    return _LEVEL_NAMES.get(record.levelno, record.levelname)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, fields, and
    ``exc`` with the traceback where there is one."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        doc: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": level_name(record),
            "logger": record.name,
            "message": record.getMessage(),
            **line_fields(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE key=value ...``, then the traceback on its own lines."""

    def format(self, record: logging.LogRecord) -> str:
        text = (
            f"{self.formatTime(record)} {level_name(record)} {record.name}: {record.getMessage()}"
        )
        fields = line_fields(record)
        if fields:
            text += "  " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def choose_format(fmt: str, stream: TextIO) -> str:
    """``auto``: text on a terminal, JSON otherwise."""
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def setup_logging(level: str | int = "info", stream: TextIO | None = None, fmt: str = "auto"):
    """Route the root logger to ``stream`` (default stderr) in ``fmt`` (``auto``, ``json`` or
    ``text``) at ``level``; returns the handler. Replaces a handler an earlier call installed and
    leaves others (a test runner's) alone."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        JsonFormatter() if choose_format(fmt, stream) == "json" else TextFormatter()
    )
    handler._archipelago = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_archipelago", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


def add_log_arguments(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--log-format`` on a command's parser."""
    parser.add_argument("--log-level", default="info", choices=LEVELS)
    parser.add_argument(
        "--log-format", default="auto", choices=FORMATS,
        help="json: one object per line; text: readable; auto (default): text on a terminal",
    )  # fmt: skip


def setup_from_args(args: argparse.Namespace, stream: TextIO | None = None):
    return setup_logging(args.log_level, stream, getattr(args, "log_format", "auto"))


# --------------------------------------------------------------------------- reading back


def parse_line(line: str) -> dict[str, Any] | None:
    """A log line of either format as a dict (``time`` in epoch seconds, ``level``,
    ``logger``, ``message`` and fields); None for a line that is neither (a traceback)."""
    line = line.rstrip("\n")
    if line.startswith("{"):
        try:
            doc = json.loads(line)
        except ValueError:
            return None
        if not isinstance(doc, dict) or "message" not in doc:
            return None
        with contextlib.suppress(TypeError, ValueError):
            stamp = datetime.datetime.fromisoformat(doc["time"].replace("Z", "+00:00"))
            doc["time"] = stamp.timestamp()
        return doc
    return _parse_text(line)


def _parse_text(line: str) -> dict[str, Any] | None:
    parts = line.split(" ", 4)
    if len(parts) < 5 or not parts[3].endswith(":"):
        return None
    try:
        stamp = datetime.datetime.strptime(f"{parts[0]} {parts[1]}", TEXT_TIME).timestamp()
    except ValueError:
        return None
    return {"time": stamp, "level": parts[2], "logger": parts[3][:-1], "message": parts[4]}


def read_log(text: str, where: Callable[[dict[str, Any]], bool] | None = None) -> list[dict]:
    """Every line of a log in either format that ``where`` accepts (all by default)."""
    out = []
    for line in text.splitlines():
        doc = parse_line(line)
        if doc is not None and (where is None or where(doc)):
            out.append(doc)
    return out
