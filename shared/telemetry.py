"""OpenTelemetry for rotations: one `rotation` span per rotation, a child span per step, a counter
of outcomes, a histogram of step durations, and log records tagged with the span they were
emitted in. A Key Vault key's rotation (shared/keys.py) is one `key_rotation` span, counted too.

Nothing here costs anything until `configure()` finds `APPLICATIONINSIGHTS_CONNECTION_STRING`:
until then no OpenTelemetry module is imported and the hooks run their step as they are. Then the
Azure Monitor distro (a large import) sets the global providers, and the tracer and meter come
from the OpenTelemetry API (`trace.get_tracer`, `metrics.get_meter`).

What goes on a span, a metric point or a log record's extra fields is limited to names, ids,
step names, durations, outcome statuses and `describe_error` strings, which never carry a secret
value. Spans never record exceptions (their messages and tracebacks could carry anything).
"""

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import wraps
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

from shared.ledger import SecretState
from shared.outcomes import ROLLED_BACK, ROTATION_FAILED, Outcome, describe_error

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider

CONNECTION_STRING = "APPLICATIONINSIGHTS_CONNECTION_STRING"
SCOPE = "secret-rotation"
# Records of these loggers (and their children) are exported by the distro, with their span.
LOGGER_NAME = "shared"

# Span attribute names.
SECRET = "rotation.secret.name"
VAULT = "rotation.vault.url"
ROTATOR = "rotation.rotator"
ROTATION_ID = "rotation.id"
TRIGGER = "rotation.trigger"
OUTCOME = "rotation.outcome"
STEP = "rotation.step"
KEY = "rotation.key.name"
DURATION = "rotation.step.duration_ms"

_lock = threading.RLock()
_configured = False
P = ParamSpec("P")


class _KeyEvent(Protocol):
    @property
    def event_id(self) -> str: ...
    @property
    def event_type(self) -> str: ...
    @property
    def vault_url(self) -> str: ...
    @property
    def name(self) -> str: ...


class _KeyOutcome(Protocol):
    @property
    def status(self) -> str: ...


EventT = TypeVar("EventT", bound=_KeyEvent)
OutcomeT = TypeVar("OutcomeT", bound=_KeyOutcome)
KeyHandler = Callable[[Any, EventT], OutcomeT]


class _Rotation:
    """The rotation span in progress, and the rotator it turned out to use."""

    def __init__(self, span: "Span") -> None:
        self.span = span
        self.rotator = ""


_current: ContextVar[_Rotation | None] = ContextVar("rotation", default=None)


class _Instruments:
    def __init__(
        self, tracer_provider: "TracerProvider | None" = None, meter_provider: "MeterProvider | None" = None
    ) -> None:
        from opentelemetry import metrics, trace  # noqa: PLC0415 - only once telemetry is on

        self.tracer = trace.get_tracer(SCOPE, tracer_provider=tracer_provider)
        meter = metrics.get_meter(SCOPE, meter_provider=meter_provider)
        self.rotations = meter.create_counter(
            "rotation.outcomes", unit="{rotation}", description="Rotations by outcome and rotator"
        )
        self.step_duration = meter.create_histogram(
            "rotation.step.duration", unit="ms", description="Duration of each rotation step"
        )


# None until configure() or use_providers(): the hooks then cost a function call each.
_instruments: _Instruments | None = None


def configure(environ: Mapping[str, str] | None = None) -> bool:
    """Export through Azure Monitor when Application Insights is configured; once per process.

    Returns whether telemetry is configured. Without the connection string nothing is imported
    or installed. A worker whose host already set a tracer provider (the Functions Python
    worker does with PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY) keeps it."""
    global _configured, _instruments  # noqa: PLW0603 - one configuration per worker process
    env = os.environ if environ is None else environ
    if not env.get(CONNECTION_STRING):
        return _configured
    with _lock:
        if _configured:
            return True
        from opentelemetry import trace  # noqa: PLC0415 - lazy, as below

        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            from azure.monitor.opentelemetry import configure_azure_monitor  # noqa: PLC0415 - lazy

            configure_azure_monitor(
                connection_string=env[CONNECTION_STRING],
                logger_name=LOGGER_NAME,
                # Libraries the app does not use; Azure SDK and HTTP client spans stay on.
                instrumentation_options={
                    name: {"enabled": False} for name in ("django", "fastapi", "flask", "psycopg2")
                },
            )
        _instruments = _Instruments()  # the global providers
        correlate_logs()
        _configured = True
        return True


def use_providers(tracer_provider: "TracerProvider | None", meter_provider: "MeterProvider | None") -> None:
    """Send rotation telemetry to these providers (tests); None, None: off again (or the global
    providers, once configure() has set them)."""
    global _instruments  # noqa: PLW0603
    if tracer_provider is None and meter_provider is None:
        _instruments = _Instruments() if _configured else None
        return
    _instruments = _Instruments(tracer_provider, meter_provider)
    correlate_logs()


_correlating = False


def correlate_logs() -> None:
    """Every log record made inside a span gets `otelTraceID`, `otelSpanID` and `otelTraceSampled`
    (the names the OpenTelemetry logging instrumentation uses), for formatters and handlers."""
    global _correlating  # noqa: PLW0603
    from opentelemetry import trace  # noqa: PLC0415

    with _lock:
        if _correlating:
            return
        factory = logging.getLogRecordFactory()

        def record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = factory(*args, **kwargs)
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                record.otelTraceID = format(context.trace_id, "032x")
                record.otelSpanID = format(context.span_id, "016x")
                record.otelTraceSampled = context.trace_flags.sampled
            return record

        logging.setLogRecordFactory(record_factory)
        _correlating = True


def rotation(
    function: Callable[Concatenate[Any, SecretState, P], Outcome],
) -> Callable[Concatenate[Any, SecretState, P], Outcome]:
    """Run `function(rt, state, ...)` in a `rotation` span and count its outcome.

    Inside a rotation already (an emergency rotation retires at once), it runs in that span."""

    @wraps(function)
    def traced(rt: Any, state: SecretState, /, *args: P.args, **kwargs: P.kwargs) -> Outcome:
        instruments = _instruments
        if instruments is None or _current.get() is not None:
            return function(rt, state, *args, **kwargs)
        from opentelemetry.trace import StatusCode  # noqa: PLC0415 - loaded already

        with instruments.tracer.start_as_current_span(
            "rotation", record_exception=False, set_status_on_exception=False
        ) as span:
            current = _Rotation(span)
            token = _current.set(current)
            outcome: Outcome | None = None
            try:
                outcome = function(rt, state, *args, **kwargs)
                return outcome
            except BaseException as error:
                span.set_status(StatusCode.ERROR, describe_error(error))
                raise
            finally:
                _current.reset(token)
                status = outcome.status if outcome else "error"
                rotator = current.rotator or "unknown"
                span.set_attributes(
                    {
                        SECRET: state.name,
                        VAULT: state.vault_url,
                        ROTATION_ID: state.rotation_id,
                        TRIGGER: state.trigger,
                        ROTATOR: rotator,
                        OUTCOME: status,
                    }
                )
                if outcome and outcome.status in (ROTATION_FAILED, ROLLED_BACK):
                    span.set_status(StatusCode.ERROR, outcome.status)
                instruments.rotations.add(1, {"outcome": status, "rotator": rotator})

    return traced


def annotate_rotator(rotator: str) -> None:
    """Name the rotator on the rotation in progress (a no-op outside one)."""
    current = _current.get()
    if current is not None:
        current.rotator = rotator


@contextmanager
def step(name: str) -> Iterator[None]:
    """A child span of the rotation for one step, and its duration on the histogram."""
    instruments = _instruments
    if instruments is None:
        yield
        return
    from opentelemetry.trace import StatusCode  # noqa: PLC0415 - loaded already

    with instruments.tracer.start_as_current_span(
        name, attributes={STEP: name}, record_exception=False, set_status_on_exception=False
    ) as span:
        started = time.perf_counter()
        try:
            yield
        except BaseException as error:
            span.set_status(StatusCode.ERROR, describe_error(error))
            raise
        finally:
            milliseconds = (time.perf_counter() - started) * 1000
            span.set_attribute(DURATION, round(milliseconds, 3))
            instruments.step_duration.record(milliseconds, {"step": name})


def key_rotation(
    rotator: str, errors: tuple[str, ...]
) -> Callable[[KeyHandler[EventT, OutcomeT]], KeyHandler[EventT, OutcomeT]]:
    """Run `handle_event(self, event)` of a key in a `key_rotation` span and count its outcome.

    The attributes are the rotation span's, with the key's name: a key rotation has no ledger
    row, so its rotation id is the id of the event that asked for it (a redelivery repeats it).
    Outcomes in `errors` set the span's status to ERROR."""

    def decorate(function: KeyHandler[EventT, OutcomeT]) -> KeyHandler[EventT, OutcomeT]:
        @wraps(function)
        def traced(service: Any, event: EventT, /) -> OutcomeT:
            instruments = _instruments
            if instruments is None:
                return function(service, event)
            from opentelemetry.trace import StatusCode  # noqa: PLC0415 - loaded already

            with instruments.tracer.start_as_current_span(
                "key_rotation", record_exception=False, set_status_on_exception=False
            ) as span:
                outcome: OutcomeT | None = None
                try:
                    outcome = function(service, event)
                    return outcome
                except BaseException as error:
                    span.set_status(StatusCode.ERROR, describe_error(error))
                    raise
                finally:
                    status = outcome.status if outcome is not None else "error"
                    span.set_attributes(
                        {
                            KEY: event.name,
                            VAULT: event.vault_url,
                            ROTATION_ID: event.event_id,
                            TRIGGER: event.event_type.rsplit(".", 1)[-1],
                            ROTATOR: rotator,
                            OUTCOME: status,
                        }
                    )
                    if status in errors:
                        span.set_status(StatusCode.ERROR, status)
                    instruments.rotations.add(1, {"outcome": status, "rotator": rotator})

        return traced

    return decorate
