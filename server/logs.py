"""Logging: human text or one JSON object per line. Payloads are never logged."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Fields given with `extra=` (request_id, model, ...) become keys of their own.
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Debug is for rnnserve's own lines: gRPC's and asyncio's would log every call.
    root.setLevel(max(logging.INFO, logging.getLevelName(level.upper())))
    logging.getLogger("rnnserve").setLevel(level.upper())
    # TensorFlow's own chatter (retracing warnings, oneDNN notices) is not ours to show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


class Throttle:
    """At most one log line per key per `interval` seconds; counts what it held back, so the next
    line can say so. Under overload every refusal is a non-OK request, and a log line for each
    would cost the event loop as much as the refusal itself."""

    def __init__(self, interval: float = 1.0, max_keys: int = 1024) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[tuple[object, ...], float] = {}
        self._held: dict[tuple[object, ...], int] = {}

    def allow(self, key: tuple[object, ...], now: float) -> tuple[bool, int]:
        """(log this one?, how many like it were held back since the last line)"""
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False, 0
        if last is None and len(self._last) >= self.max_keys:
            self._last.clear()  # keys are (method, model, code): this only bounds odd traffic
            self._held.clear()
        self._last[key] = now
        return True, self._held.pop(key, 0)
