"""structlog set-up: console output in a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys

import structlog

from gateway.config import LogSettings

__all__ = ["configure_logging"]


def configure_logging(settings: LogSettings) -> None:
    """Route structlog (and the stdlib loggers of our dependencies) to `[log] stream`."""
    level = getattr(logging, settings.level.upper())
    stream = sys.stdout if settings.stream == "stdout" else sys.stderr
    use_json = settings.format == "json" or (settings.format == "auto" and not stream.isatty())
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
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    # The stdlib loggers of our dependencies (pynetdicom's) go to the same stream in the same
    # format: one JSON object per line when JSON, with the logger's name.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *processors],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    # pynetdicom logs every PDU at debug and chats at info; keep it to errors.
    logging.getLogger("pynetdicom").setLevel(logging.ERROR if level > logging.DEBUG else level)
