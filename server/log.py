"""Structured logs: one JSON object per line, carrying the request id of the request being served.

The request id lives in a context variable, set once where a request enters (the servicer) and inherited by every
task it spawns, so any log line written while serving it names it without threading the id through calls. An id a
caller sends is checked first (`server/request_ids.py`: bounded length, a plain charset), so a log line never
carries a caller's control or bidi characters in that field. Fields
beyond the message go in `extra={"fields": {...}}` (or through `event`). The module is `log`, not `logging`, so
it can never shadow the standard library for a script run from inside `server/`.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

request_id_var: ContextVar[str] = ContextVar("request_id", default="")

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def new_request_id() -> str:
    return secrets.token_hex(8)


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", "request_id"?, ...fields, "exception"?}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


_HANDLER_NAME = "safeguard-json"


def configure(level: str = "info", stream: TextIO | None = None) -> logging.Handler:
    """Send every log record (the root logger's) to `stream` as JSON lines; calling it again replaces the handler,
    which is returned so a caller can remove it."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level, logging.INFO))
    return handler


def event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log `message` with structured fields, skipping the formatting work when the level is off."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"fields": fields})
