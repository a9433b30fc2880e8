"""structlog set-up: JSON lines when not on a TTY (collected by the node), readable on a TTY.

Every line leaves in one write(2) on the stderr descriptor. dnsd's workers, its forward child
and kpx's workers share that descriptor, and Python's stderr writes a printed line and its
newline in two calls: two processes logging at once then made one line of two JSON objects,
which a node's log collector cannot parse.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Literal, TextIO

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
        logger_factory=LineLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _add_daemon(name: str) -> structlog.typing.Processor:
    def add(
        _logger: object, _method: str, event: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        event.setdefault("daemon", name)
        return event

    return add


class LineLogger:
    """Writes each rendered line with its newline in one os.write (looping only on a partial
    write). A stream without a descriptor (a test's capture) gets the line in one write call.
    A line that cannot be written (a closed or full descriptor) is dropped: logging never takes
    a daemon down."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        try:
            self._fd: int | None = stream.fileno()
            stream.flush()  # whatever Python buffered so far goes out before our lines
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
            self._fd = None
        self._lock = threading.Lock()  # the UDP threads log too; a partial write must finish

    def msg(self, message: str) -> None:
        line = message + "\n"
        with self._lock:
            try:
                if self._fd is None:
                    self._stream.write(line)
                    self._stream.flush()
                    return
                data = memoryview(line.encode("utf-8", "backslashreplace"))
                while data:
                    data = data[os.write(self._fd, data) :]
            except (OSError, ValueError):
                return

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


class LineLoggerFactory:
    """One LineLogger per stream, made on first use (structlog caches the bound loggers)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._logger: LineLogger | None = None

    def __call__(self, *_args: object) -> LineLogger:
        if self._logger is None:
            self._logger = LineLogger(self._stream)
        return self._logger
