"""Log lines that say which process wrote them (front-end, worker-N); text or JSON."""

from __future__ import annotations

import json
import logging
import multiprocessing
import sys
import time


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(),
                           "process": multiprocessing.current_process().name, "logger": record.name,
                           "msg": record.getMessage()})


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s [%(processName)s] %(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger("ringserve")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
