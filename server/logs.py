"""Logging set-up: plain text or one JSON object a line (`--log-format json`), and the one line
written for every finished request."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

REQUEST_LOGGER = "sloth_serve.requests"


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", ...fields given as `extra={"fields": {...}}`}."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            body.update(fields)
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log_finished_request(fields: dict[str, Any]) -> None:
    """One line per finished request: id, model, token counts, TTFT, end-to-end time, finish reason."""
    logger = logging.getLogger(REQUEST_LOGGER)
    if not logger.isEnabledFor(logging.INFO):
        return
    text = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
    logger.info("finished %s", text, extra={"fields": fields})
