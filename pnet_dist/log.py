"""Logging set-up: one format for every process, each line labelled with the process's rank."""
from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s [rank%(rank)s] %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    """Reads RANK when a record is emitted, not when the handler is made: under Ray Train the
    module is imported (and the handler created) before Ray sets RANK in the worker."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = os.environ.get("RANK", "0")
        return True


def get_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    root = logging.getLogger("pnet_dist")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("PNET_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logger
