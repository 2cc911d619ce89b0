"""Opt-in OpenTelemetry spans, propagated across the bus in ``Envelope.trace`` (W3C ``traceparent``).

Tracing is on for a component when it is given a ``Tracing`` built from a tracer provider, or when
``Tracing.detect()`` finds one: ``ORCH_TRACING=1``, or a global tracer provider the application set
(``trace.set_tracer_provider`` or ``opentelemetry-instrument``). Otherwise every method is a cheap
no-op, nothing is imported from ``opentelemetry`` (which need not be installed) and envelopes carry
no trace. Nothing leaves the machine unless the configured provider has an exporter.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import structlog

__all__ = ("Tracing",)

log = structlog.get_logger(__name__)

AttributeValue = str | int | float | bool
NO_SPAN = contextlib.nullcontext()  # what span() gives when tracing is off; shared, it holds nothing
_TRUTHY = ("1", "true", "yes", "on")


class Tracing:
    """Spans for one component; ``Tracing.off()`` (the default) does nothing at all.

    Args:
        provider: an OpenTelemetry ``TracerProvider``; None means the global one.
    """

    __slots__ = ("_propagator", "_tracer", "enabled")

    def __init__(self, provider: Any | None = None) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.enabled = True
        self._tracer: Any = trace.get_tracer("orchestrator", tracer_provider=provider)
        self._propagator: Any = TraceContextTextMapPropagator()

    @classmethod
    def off(cls) -> Tracing:
        """The disabled instance: no spans, no trace context, no imports."""
        return _OFF

    @classmethod
    def detect(cls) -> Tracing:
        """On when ``ORCH_TRACING`` is set or the application configured a global tracer provider."""
        if os.environ.get("ORCH_TRACING", "").lower() in _TRUTHY:
            try:
                return cls()
            except ImportError:
                log.warning("tracing_unavailable", reason="ORCH_TRACING is set but opentelemetry-api is not "
                                                          "installed (pip install 'orchestrator[tracing]')")
                return _OFF
        trace_module = sys.modules.get("opentelemetry.trace")
        if trace_module is None:  # nobody imported OpenTelemetry, so nobody configured it
            return _OFF
        provider = trace_module.get_tracer_provider()
        if isinstance(provider, trace_module.ProxyTracerProvider | trace_module.NoOpTracerProvider):
            return _OFF
        return cls()

    def start(self, name: str, *, parent: Mapping[str, str] | None = None, kind: str = "internal",
              attributes: Mapping[str, AttributeValue] | None = None) -> Any:
        """A started span (not made current) that the caller ends; None when off."""
        if not self.enabled:
            return None
        return self._tracer.start_span(name, context=self._extract(parent), kind=_kind(kind),
                                       attributes=dict(attributes or {}))

    @contextlib.contextmanager
    def _current(self, name: str, parent: Mapping[str, str] | None, kind: str,
                 attributes: Mapping[str, AttributeValue] | None) -> Iterator[Any]:
        with self._tracer.start_as_current_span(name, context=self._extract(parent), kind=_kind(kind),
                                                attributes=dict(attributes or {})) as span:
            yield span

    def span(self, name: str, *, parent: Mapping[str, str] | None = None, kind: str = "internal",
             attributes: Mapping[str, AttributeValue] | None = None) -> contextlib.AbstractContextManager[Any]:
        """``with tracing.span(...) as span:`` a current span (child of ``parent``'s trace context, if any).

        Yields None when off.
        """
        if not self.enabled:
            return NO_SPAN
        return self._current(name, parent, kind, attributes)

    def inject(self, span: Any = None) -> dict[str, str]:
        """W3C trace context (``traceparent``) of ``span``, or of the current span; empty when off."""
        if not self.enabled:
            return {}
        from opentelemetry import trace

        carrier: dict[str, str] = {}
        context = trace.set_span_in_context(span) if span is not None else None
        self._propagator.inject(carrier, context=context)
        return carrier

    def _extract(self, parent: Mapping[str, str] | None) -> Any:
        return self._propagator.extract(dict(parent)) if parent else None


def end(span: Any, *, error: str = "", attributes: Mapping[str, AttributeValue] | None = None) -> None:
    """End a span from ``Tracing.start`` (None is ignored), marking it an error when ``error`` is given."""
    if span is None:
        return
    if attributes:
        span.set_attributes(dict(attributes))
    if error:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def _kind(kind: str) -> Any:
    from opentelemetry.trace import SpanKind

    return SpanKind[kind.upper()]


_OFF = object.__new__(Tracing)
_OFF.enabled = False


def configure() -> bool:
    """Set up the OpenTelemetry SDK from the environment (``--trace``), unless a tracer provider is set already.

    The exporter follows ``OTEL_TRACES_EXPORTER``: ``otlp`` (the default; needs
    ``opentelemetry-exporter-otlp``, sends to ``OTEL_EXPORTER_OTLP_ENDPOINT``), ``console`` or ``none``.
    Returns whether tracing is on afterwards. Raises ConfigError when the packages it needs are missing.
    """
    from protocol.errors import ConfigError

    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError as exc:
        raise ConfigError("--trace needs the OpenTelemetry SDK: pip install 'orchestrator[tracing]'") from exc
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return True  # the application (or opentelemetry-instrument) configured one: use it as it is
    choice = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip().lower()
    exporter: SpanExporter | None
    if choice == "console":
        exporter = ConsoleSpanExporter()
    elif choice == "none":
        exporter = None
    elif choice == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]  # an optional package, often absent
                OTLPSpanExporter,
            )
        except ImportError as exc:
            raise ConfigError("OTLP export needs opentelemetry-exporter-otlp-proto-http (pip install "
                              "'orchestrator[tracing]' opentelemetry-exporter-otlp), or set "
                              "OTEL_TRACES_EXPORTER=console") from exc
        exporter = OTLPSpanExporter()
    else:
        raise ConfigError(f"OTEL_TRACES_EXPORTER={choice!r} is not supported here; use otlp, console or none")
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                       "orchestrator")}))
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing_configured", exporter=choice)
    return True
