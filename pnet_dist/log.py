"""Logging set-up: one format for every process, each line labelled with the process's rank, and
the one helper that takes credentials out of URIs (`redact_uris`) before anything is printed.

Credentials never belong in a URI (config validation and pnet_dist.storage refuse one that carries
them), but a line that quotes a URI the user typed must not repeat a key or secret even then: every
line of our loggers, and every one-line error of pnet_dist.cli, goes through `redact_uris`.
"""
from __future__ import annotations

import logging
import os
import re
import sys

_FORMAT = "%(asctime)s %(levelname)s [rank%(rank)s] %(name)s: %(message)s"


# scheme://USERINFO@ -- USERINFO up to the first '@' (secrets may contain '/'); see _is_userinfo.
_URI_AUTHORITY = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s@'\"]*)@")


def _is_userinfo(text: str) -> bool:
    """Text between '://' and '@' is user info when it has no '/' (the URI grammar) or a ':' --
    'KEY:SECRET' where the secret holds a '/' (AWS secret keys may) -- rather than a path to a key
    that contains '@'."""
    return "/" not in text or ":" in text


def has_userinfo(uri: str) -> bool:
    """True if the URI carries user info (e.g. s3://KEY:SECRET@bucket/prefix)."""
    return any(_is_userinfo(m.group("userinfo")) for m in _URI_AUTHORITY.finditer(uri))


def redact_uris(text: str) -> str:
    """Text with the user info of every URI in it replaced by '***' (s3://***@bucket/prefix)."""
    return _URI_AUTHORITY.sub(
        lambda m: f"{m.group('scheme')}***@" if _is_userinfo(m.group("userinfo")) else m.group(0), text)


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_uris(super().format(record))  # message, arguments and traceback alike


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
        handler.setFormatter(_RedactingFormatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("PNET_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logger
