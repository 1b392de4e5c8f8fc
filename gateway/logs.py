"""structlog set-up: console output in a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys

import structlog

from gateway.config import LogSettings

__all__ = ["configure_logging"]


def configure_logging(settings: LogSettings) -> None:
    """Route structlog (and the stdlib loggers of our dependencies) to stderr."""
    level = getattr(logging, settings.level.upper())
    use_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # pynetdicom logs every PDU at debug and chats at info; keep it to warnings.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.ERROR if level > logging.DEBUG else level)
