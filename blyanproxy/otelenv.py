"""Whether the ``OTEL_*`` variables ask for tracing, and then the tracer.

``blyanproxy.tracing`` (and with it OpenTelemetry) is imported only when
they do and the ``blyanproxy[otel]`` extra is installed; otherwise the proxy
runs without a tracer and imports nothing of OpenTelemetry.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping

from twisted.internet.interfaces import IReactorTime

from blyanproxy.forward import RequestWatcher
from blyanproxy.logs import logger

log = logger("tracing")


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables ask for spans: an exporter other than ``none`` or an OTLP endpoint
    is named, and ``OTEL_SDK_DISABLED`` is not true."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {name.strip() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")} - {""}
    if exporters:
        return exporters != {"none"}
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def request_tracer(environ: Mapping[str, str], reactor: IReactorTime) -> RequestWatcher | None:
    """The OpenTelemetry tracer (``blyanproxy.tracing``) when ``environ`` asks for one and the
    ``blyanproxy[otel]`` extra is installed; nothing of OpenTelemetry is imported otherwise."""
    if not tracing_requested(environ):
        return None
    try:
        installed = importlib.util.find_spec("opentelemetry.sdk") is not None
    except ModuleNotFoundError:  # not even the API package
        installed = False
    if not installed:
        log.warn("OTEL_* variables ask for tracing, but blyanproxy[otel] is not installed: no spans are recorded")
        return None
    from blyanproxy import tracing

    return tracing.request_tracer(environ, reactor)
