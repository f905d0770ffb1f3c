"""Request ids: what a caller may send as `request_id`, and what happens to one already in use.

A request id names a request in logs, audit records and traces, so it is short, printable ASCII a log line can
hold as it is: at most MAX_LENGTH characters of letters, digits and `. _ : -` (a UUID, a W3C trace id, "job-7:42"
fit); anything else is INVALID_ARGUMENT. An empty id gets a fresh random one.

Duplicates, deliberately: an id that is in flight in this front end, for the same tenant, is refused with
ALREADY_EXISTS, so two requests running at once never share one name in the logs. An id whose request has
finished may be used again (a retry of a failed call keeps its id, as tracing wants); the audit log then holds
one record per attempt under the same id. Ids are not remembered past their request, so the state this keeps is
bounded by the requests running at the time.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from server import log as slog
from server.errors import AlreadyExists, InvalidArgument
from server.identity import current_identity

MAX_LENGTH = 128
CHARSET = "letters, digits, '.', '_', ':' and '-'"
_PATTERN = re.compile(r"[A-Za-z0-9._:-]+")


def check_request_id(given: str, field: str = "request_id") -> None:
    """Raise INVALID_ARGUMENT unless `given` is a well-formed request id (or empty). A batch item's id follows the
    same rule (`field` names it), as it becomes part of the item's request id, "<request_id>/<item_id>"."""
    if len(given) > MAX_LENGTH:
        raise InvalidArgument(f"{field} is {len(given)} characters; at most {MAX_LENGTH} ({CHARSET})")
    if given and not _PATTERN.fullmatch(given):
        bad = next(c for c in given if not _PATTERN.fullmatch(c))
        raise InvalidArgument(f"{field} has the character {bad!r}; it must be made of {CHARSET}")


class RequestIds:
    """The request ids in flight in one front end, by tenant."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: set[tuple[str, str]] = set()

    @contextmanager
    def claim(self, given: str) -> Iterator[str]:
        """Hold a request id for the duration of the block: the caller's (checked, refused when in flight) or a
        new one; it is set as the logging context's request id and yielded."""
        check_request_id(given)
        if not given:
            request_id = slog.new_request_id()
            slog.request_id_var.set(request_id)
            yield request_id
            return
        key = (current_identity.get().tenant, given)
        with self._lock:
            if key in self._in_flight:
                raise AlreadyExists(f"request_id {given!r} is already in use by a request still running; use a "
                                    "new id for each concurrent request (a finished request's id may be reused)")
            self._in_flight.add(key)
        slog.request_id_var.set(given)
        try:
            yield given
        finally:
            with self._lock:
                self._in_flight.discard(key)

    def __len__(self) -> int:
        return len(self._in_flight)
