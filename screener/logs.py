"""Log set-up for every process of the node (the service, its receive processes, the CLI).

Log lines carry UIDs, AE titles, addresses and hashed patient IDs only: nothing in the package
logs a dataset's names or free text (see screener.safe_text).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging"]


def configure_logging(level: int = logging.INFO) -> None:
    """JSON lines when stdout is a pipe or file (a journal, a collector); readable on a terminal.

    Log lines carry UIDs and hashed patient IDs only: nothing here logs a dataset's names.
    """
    renderer: Any = structlog.dev.ConsoleRenderer() if sys.stdout.isatty() else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.format_exc_info,
                    renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    # pynetdicom and the receive module log through the standard library: same stream, same shape.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=renderer, foreign_pre_chain=[structlog.processors.add_log_level,
                                               structlog.processors.TimeStamper(fmt="iso", utc=True)]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pynetdicom", "apscheduler", "highdicom"):  # per-association, per-run and per-SR chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
