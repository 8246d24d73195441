"""Logging: quiet by default in library use, configured once by entry points.

Every fincluster module logs through :func:`get_logger`. Until someone configures structlog (the CLI
and the demo call :func:`configure_logging`; an SDK user may call it too, or ``structlog.configure``),
those loggers print only WARNING and above, to stderr — an analyst's script shows no INFO lines from
the library, as with transformers. Importing fincluster configures nothing: structlog's own default
(everything, to stdout) is never used by fincluster's loggers, and no global state is touched.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from fincluster.settings import LoggingSettings

#: The level fincluster's loggers print from while nobody has configured structlog.
LIBRARY_DEFAULT_LEVEL = logging.WARNING


class _Stderr:
    """Whatever ``sys.stderr`` is at the time of writing (tests and users may redirect it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_QUIET = structlog.wrap_logger(
    structlog.PrintLogger(_Stderr()),  # type: ignore[arg-type]
    processors=[
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        structlog.dev.ConsoleRenderer(colors=False),
    ],
    wrapper_class=structlog.make_filtering_bound_logger(LIBRARY_DEFAULT_LEVEL),
    cache_logger_on_first_use=True,
)


class LibraryLogger:
    """A structlog logger that defers to the application's structlog configuration once there is one,
    and until then prints WARNING and above to stderr."""

    def __init__(self, name: str) -> None:
        self._configured = structlog.get_logger(name)

    def _target(self) -> Any:
        return self._configured if structlog.is_configured() else _QUIET

    def debug(self, event: str, **fields: Any) -> None:
        self._target().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._target().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._target().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._target().error(event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._target().exception(event, **fields)


def get_logger(name: str) -> LibraryLogger:
    """The logger of module ``name`` (``log = get_logger(__name__)``)."""
    return LibraryLogger(name)


def configure_logging(settings: LoggingSettings) -> None:
    """Configure structlog for an application (entry points; SDK users who want fincluster's logs)."""
    from fincluster.settings import LogFormat

    level = logging.getLevelNamesMapping().get(settings.level.upper(), logging.INFO)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if settings.format is LogFormat.JSON
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
