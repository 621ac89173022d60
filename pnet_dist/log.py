"""Logging set-up: one format for every process, rank-prefixed once torch.distributed is up."""
from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    root = logging.getLogger("pnet_dist")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT.format(rank=os.environ.get("RANK", "0")),
                                               datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("PNET_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logger
