"""structlog set-up shared by every process: JSON in production, readable on a terminal.

Ids are bound through contextvars at each message boundary (run_id, task_id, attempt,
worker), so every line a handler logs carries them without passing them around.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO, cast

import structlog

from protocol.errors import ConfigError

__all__ = ("configure_logging", "enabled")

# The level configure_logging last set; None while structlog is configured by someone else (or not at all).
_min_level: int | None = None


def configure_logging(level: str | int = "INFO", *, json: bool | None = None, stream: TextIO | None = None) -> None:
    """Configure structlog once per process; ``json=None`` picks JSON unless ``stream`` is a terminal."""
    out: TextIO = stream or cast(TextIO, _Stderr())
    if json is None:
        json = not out.isatty()
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ConfigError(f"unknown log level {level!r}")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    global _min_level
    _min_level = numeric
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if json else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def enabled(level: int) -> bool:
    """Whether a line at ``level`` (``logging.INFO``...) would be written: hot paths skip building one that would not.

    Filtered calls are cheap in structlog, but a module-level logger is a lazy proxy that binds a new logger
    on every call, which costs more than the work around it on the busiest paths.
    """
    return _min_level is None or level >= _min_level


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written, not when logging was configured.

    Test runners and embedding applications swap ``sys.stderr``; a logger holding the old one
    would write to a closed file.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()
