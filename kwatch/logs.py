"""structlog set-up: JSON lines when not on a TTY (collected by the node), readable on a TTY.

Every line leaves in one write(2) on stderr (`LineLogger`). dnsd's workers, its forward child
and kpx's workers share that descriptor, and structlog's PrintLogger (print) wrote a line and
its newline in two calls: two processes logging at once then made one line of two JSON
objects, which a node's log collector cannot parse.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Literal

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto", level: str = "info", daemon: str = ""
) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if daemon:
        processors.append(_add_daemon(daemon))
    processors += [structlog.processors.format_exc_info, renderer]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=_one_logger(LineLogger(sys.stderr)),
        cache_logger_on_first_use=True,
    )


def _add_daemon(name: str) -> structlog.typing.Processor:
    def add(
        _logger: object, _method: str, event: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        event.setdefault("daemon", name)
        return event

    return add


class LineLogger(structlog.WriteLogger):
    """structlog's WriteLogger (each line with its newline in one write call, under a lock)
    that drops a line it cannot write (a closed or broken stream): logging never takes a daemon
    down."""

    def msg(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().msg(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


def _one_logger(logger: LineLogger) -> Callable[..., LineLogger]:
    def factory(*_args: object) -> LineLogger:
        return logger

    return factory
