"""OpenTelemetry spans for the request's journey (docs/requirements.md §10), optional and free when off.

    gateway.route                 the whole request, parent: the client's W3C traceparent
      gateway.auth.validate       stages 6–8
      gateway.transport.send      REQUEST sent → RESPONSE received; its traceparent is the
                                  one the service gets in the REQUEST frame

`make_tracer(settings)` returns None when tracing is off; every call site checks that one
attribute, so the request path pays nothing else. Spans are started with explicit parents
(no contextvars): the journey hops between callbacks, not nested calls.
"""
from __future__ import annotations


# How long the exit waits for spans still queued to be sent (Tracing.shutdown).
SHUTDOWN_TIMEOUT = 2.0


class Tracing:
    def __init__(self, tracer, propagator, provider=None):
        from opentelemetry import trace
        self._tracer = tracer
        self._propagator = propagator
        self._set_in_context = trace.set_span_in_context
        self._status_error = trace.StatusCode.ERROR
        self.provider = provider

    def start_route(self, req):
        traceparent = req.header(b"traceparent")
        parent = None
        if traceparent is not None:
            carrier = {"traceparent": traceparent.decode("latin-1")}
            state = req.header(b"tracestate")
            if state is not None:
                carrier["tracestate"] = state.decode("latin-1")
            parent = self._propagator.extract(carrier)
        span = self._tracer.start_span("gateway.route", context=parent, attributes={
            "http.request.method": req.method, "stellagw.correlation_id": req.correlation_id})
        req.span = span
        return span

    def child(self, parent, name: str, **attributes):
        return self._tracer.start_span(name, context=self._set_in_context(parent),
                                       attributes=attributes or None)

    def traceparent(self, span) -> list[tuple[bytes, bytes]]:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._set_in_context(span))
        return [(k.encode(), v.encode("latin-1")) for k, v in carrier.items()]

    def end_route(self, req, status: int) -> None:
        span = req.span
        req.span = None
        span.set_attribute("http.response.status_code", status)
        if req.route:
            span.set_attribute("http.route", req.route)
        if req.service:
            span.set_attribute("stellagw.service", req.service)
        if status >= 500:
            span.set_status(self._status_error)
        span.end()

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Send what is queued, waiting at most `timeout` seconds. The SDK waits up to 30 s
        for its exporter thread, on the worker's loop at the end of a drain: with the
        collector down or blackholed (or the console exporter's stdout not read) every
        SIGTERM took 32 s — past Kubernetes' default grace period, so the worker was
        killed before its last log lines and counts. Past the timeout the spans are
        dropped; the thread is a daemon and ends with the process."""
        if self.provider is None:
            return
        import threading
        thread = threading.Thread(target=self.provider.shutdown, name="stellagw-otel-shutdown",
                                  daemon=True)
        thread.start()
        thread.join(timeout)


# What each piece needs, as (module to import, the distribution that provides it). The
# `otel` extra installs all of them; a gateway started without one would die at its first
# worker with a traceback, so configuration loading asks `unavailable()` first.
_SDK = (("opentelemetry.sdk.trace", "opentelemetry-sdk"),
        ("opentelemetry.trace.propagation.tracecontext", "opentelemetry-api"))
_EXPORTERS = {
    "otlp": ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
             "opentelemetry-exporter-otlp-proto-http"),
    "console": ("opentelemetry.sdk.trace.export", "opentelemetry-sdk"),
}


def _importable(module: str) -> str | None:
    """None when `module` imports, else why not (one line)."""
    import importlib
    try:
        importlib.import_module(module)
    except Exception as exc:   # a broken install (protobuf mismatch ...) is as fatal as none
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def unavailable(exporter: str) -> tuple[str, str] | None:
    """(key under gateway.tracing, reason) when tracing with `exporter` cannot start in this
    environment, else None. Imports for real: a module that is present but fails to import
    would fail the same way at start."""
    for module, dist in _SDK:
        error = _importable(module)
        if error is not None:
            return ("enabled", f"tracing needs {dist}, which cannot be imported ({error}): "
                               f"pip install 'stellagw[otel]'")
    need = _EXPORTERS.get(exporter)
    if need is not None:
        module, dist = need
        error = _importable(module)
        if error is not None:
            return ("exporter", f"{exporter} needs {dist}, which cannot be imported ({error}): "
                                f"pip install 'stellagw[otel]', or choose another exporter")
    return None


def make_tracer(settings, exporter=None) -> Tracing | None:
    """Tracing for these settings, or None when off. `exporter` (tests) overrides config.
    Configuration loading has checked `unavailable()`, so the imports here succeed."""
    cfg = settings.gateway.tracing
    if not cfg.enabled:
        return None
    problem = unavailable("none" if exporter is not None else cfg.exporter)
    if problem is not None:
        raise RuntimeError(f"gateway.tracing.{problem[0]}: {problem[1]}")
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif cfg.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif cfg.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        kwargs = {"endpoint": cfg.otlp_endpoint} if cfg.otlp_endpoint else {}
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(**kwargs)))
    tracer = provider.get_tracer("stellagw")
    quiet_client_input_warnings()
    return Tracing(tracer, TraceContextTextMapPropagator(), provider)


# The loggers OpenTelemetry warns through when a client's traceparent or tracestate does not
# parse: one warning a request, the member that failed quoted in it, written by Python's
# last-resort handler straight to stderr — beside the JSON log, past its escaping and
# clipping, and on the loop. A client wrote a NEL and a JSON record of its own choosing
# into the gateway's output that way (an adversarial probe). A header that does not parse
# is dropped all the same (the W3C rule); only the warning goes.
CLIENT_INPUT_LOGGERS = ("opentelemetry.trace.span", "opentelemetry.trace.propagation.tracecontext")


def quiet_client_input_warnings() -> None:
    import logging
    for name in CLIENT_INPUT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
