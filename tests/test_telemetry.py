"""OpenTelemetry from the worker: spans, metrics and correlated logs of real rotations on the local
stack, read back from the SDK's in-memory exporters; and nothing at all without Application
Insights."""

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import azure.monitor.opentelemetry as distro
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from devstack.stack import LocalStack, provision_postgres_secret
from shared import telemetry
from shared.engine import ROLLED_BACK, ROTATED, RotationEngine
from tests.conftest import soon
from tests.test_zz_no_secret_in_logs import secrets_in

ROOT = Path(__file__).resolve().parent.parent


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Captured:
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    logs: Records

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        assert data is not None
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]


@contextmanager
def capturing(logger_name: str = "shared.engine") -> Iterator[Captured]:
    """Rotation telemetry to in-memory exporters, and the records of `logger_name`, meanwhile."""
    spans, reader, logs = InMemorySpanExporter(), InMemoryMetricReader(), Records()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry.use_providers(tracer_provider, meter_provider)
    logger = logging.getLogger(logger_name)
    logger.addHandler(logs)
    try:
        yield Captured(spans, reader, logs)
    finally:
        logger.removeHandler(logs)
        telemetry.use_providers(None, None)
        tracer_provider.shutdown()
        meter_provider.shutdown()


@pytest.fixture
def captured() -> Iterator[Captured]:
    with capturing() as found:
        yield found


def rotation_spans(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == "rotation" and (s.attributes or {}).get(telemetry.SECRET) == name]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    found = [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]
    return sorted(found, key=lambda s: s.start_time or 0)


def everything_said(captured: Captured) -> str:
    """Every span name, attribute, status, event and link; every metric point's attributes; every
    log record's message, arguments and extra fields: as one text to scan for secret values."""
    parts: list[str] = []
    for span in captured.finished():
        parts.append(span.to_json())
        parts += [repr(event.attributes) for event in span.events]
    for name in ("rotation.outcomes", "rotation.step.duration"):
        parts += [repr(point.attributes) for point in captured.points(name)]
    for record in captured.logs.records:
        parts.append(record.getMessage())
        parts.append(repr(vars(record)))
    return "\n".join(parts)


def assert_no_secret_value(stack: LocalStack, captured: Captured) -> None:
    generated: set[str] = {stack.postgres.admin_password}
    for value in stack.vault.values_stored():
        generated |= secrets_in(value)
    generated = {value for value in generated if len(value) >= 8}
    text = everything_said(captured)
    assert [f"a value of {len(value)} characters" for value in generated if value in text] == []


def credential_of(stack: LocalStack, name: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(stack.secret_client().get_secret(name).value or "{}")
    return value


def test_a_rotation_is_one_span_with_a_child_per_step_metrics_and_correlated_logs(
    stack: LocalStack, engine_with: Any, unique: str, captured: Captured
) -> None:
    # Given a managed PostgreSQL secret and an engine reporting to in-memory exporters
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    engine: RotationEngine = engine_with(probe=lambda url, deadline: None)
    old, ids_before = credential_of(stack, unique), {id(r) for r in captured.logs.records}

    # When it is rotated
    outcome = engine.rotate(stack.vault.vault_url, unique, trigger="manual")
    assert outcome.status == ROTATED
    assert credential_of(stack, unique) != old

    # Then there is one rotation span, with the attributes, and the steps as children in order
    spans = captured.finished()
    [root] = rotation_spans(spans, unique)
    assert root.parent is None
    assert dict(root.attributes or {}) == {
        telemetry.SECRET: unique,
        telemetry.VAULT: stack.vault.vault_url,
        telemetry.ROTATOR: "postgres",
        telemetry.ROTATION_ID: outcome.rotation_id,
        telemetry.TRIGGER: "manual",
        telemetry.OUTCOME: ROTATED,
    }
    assert root.status.status_code == StatusCode.UNSET
    steps = children(spans, root)
    assert [s.name for s in steps] == ["claim", "create", "verify", "write", "validate", "finish"]
    for span in steps:
        attributes = span.attributes or {}
        assert attributes[telemetry.STEP] == span.name
        duration = attributes[telemetry.DURATION]
        assert isinstance(duration, float)
        assert duration >= 0
        assert span.end_time is not None and span.start_time is not None
        assert duration <= (span.end_time - span.start_time) / 1e6 + 1
        assert span.context is not None and root.context is not None
        assert span.context.trace_id == root.context.trace_id
    # the steps the ledger timed (finish saves it before its time is known) took what the span says
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    timings = json.loads(state.step_timings)
    assert set(timings) == {"create", "verify", "write", "validate"}
    measured = {s.name: (s.attributes or {})[telemetry.DURATION] for s in steps}
    assert all(abs(timings[name] - measured[name]) < 5 for name in timings), (timings, measured)

    # and the counter and the histogram got their points
    [counted] = [
        p for p in captured.points("rotation.outcomes") if dict(p.attributes or {}).get("outcome") == ROTATED
    ]
    assert isinstance(counted, NumberDataPoint)
    assert dict(counted.attributes or {}) == {"outcome": ROTATED, "rotator": "postgres"}
    assert counted.value == 1
    histogram = {
        str(dict(p.attributes or {})["step"]): p
        for p in captured.points("rotation.step.duration")
        if isinstance(p, HistogramDataPoint)
    }
    assert {"claim", "create", "verify", "write", "validate", "finish"} <= set(histogram)
    assert all(histogram[name].count >= 1 for name in ("claim", "create", "write"))

    # and the log record the rotation made (its outcome) carries the rotation's trace and span
    assert root.context is not None
    span_ids = {format(s.context.span_id, "016x") for s in [root, *steps] if s.context}
    inside = [
        r
        for r in captured.logs.records
        if id(r) not in ids_before and r.getMessage().startswith(f"{unique}: {ROTATED}")
    ]
    assert inside, "the rotation should have logged its outcome"
    for record in inside:
        assert getattr(record, "otelTraceID", None) == format(root.context.trace_id, "032x")
        assert getattr(record, "otelSpanID", None) in span_ids

    # and no secret value appears in any span, metric point or log record
    assert managed.slots[1] == credential_of(stack, unique)["username"]
    assert_no_secret_value(stack, captured)


def test_an_emergency_retires_within_its_rotation_span_and_a_rollback_is_a_step(
    stack: LocalStack, engine_with: Any, unique: str, captured: Captured
) -> None:
    # An emergency rotation retires the previous slot inside the same rotation span
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    engine: RotationEngine = engine_with(probe=lambda url, deadline: None)
    outcome = engine.rotate(stack.vault.vault_url, unique, trigger="manual", emergency=True)
    assert outcome.status == ROTATED
    spans = captured.finished()
    [root] = rotation_spans(spans, unique)
    assert [s.name for s in children(spans, root)] == [
        *("claim", "create", "verify", "write", "validate", "finish"),
        "retire",
    ]

    # A consumer probe that fails rolls back: the rotation's outcome says so, and so does its status
    port = 9
    probed = f"{unique}-probed"
    provision_postgres_secret(
        stack,
        probed,
        prefix=f"{unique}p",
        expires_on=soon(20),
        extra_tags={"rotation-probes": f"http://127.0.0.1:{port}/health"},
    )

    def refuse(url: str, deadline: float) -> None:
        raise ConnectionError("consumer refused the new credential")

    allowed = f"{os.environ['ROTATION_ALLOWED_TARGETS']},127.0.0.1:{port}"
    engine = engine_with({"ROTATION_ALLOWED_TARGETS": allowed}, probe=refuse)
    outcome = engine.rotate(stack.vault.vault_url, probed, trigger="manual")
    assert outcome.status == ROLLED_BACK
    spans = captured.finished()
    [root] = rotation_spans(spans, probed)
    assert (root.attributes or {})[telemetry.OUTCOME] == ROLLED_BACK
    assert root.status.status_code == StatusCode.ERROR
    assert [s.name for s in children(spans, root)] == [
        *("claim", "create", "verify", "write", "validate"),
        "rollback",
    ]
    counted = {
        (dict(p.attributes or {})["outcome"], dict(p.attributes or {})["rotator"]): p.value
        for p in captured.points("rotation.outcomes")
    }
    assert counted == {(ROTATED, "postgres"): 1, (ROLLED_BACK, "postgres"): 1}
    assert_no_secret_value(stack, captured)


def test_a_failed_step_is_an_error_span_with_the_described_error_and_no_exception_event(
    stack: LocalStack, engine_with: Any, unique: str, captured: Captured
) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    secret_like = "s3cr3t-value-in-an-exception-message"

    engine: RotationEngine = engine_with(probe=lambda url, deadline: None)
    registry = engine._rt.rotators
    rotator = registry.get("postgres")
    original = type(rotator).verify

    def failing_verify(self: Any, context: Any, value: str) -> None:
        raise RuntimeError(secret_like)

    type(rotator).verify = failing_verify  # type: ignore[method-assign]
    try:
        outcome = engine.rotate(stack.vault.vault_url, unique, trigger="manual")
    finally:
        type(rotator).verify = original  # type: ignore[method-assign]
    assert outcome.status == "failed"
    spans = captured.finished()
    [root] = rotation_spans(spans, unique)
    steps = children(spans, root)
    assert [s.name for s in steps] == ["claim", "create", "verify"]
    verify = steps[-1]
    assert verify.status.status_code == StatusCode.ERROR
    assert verify.status.description == f"RuntimeError: {secret_like}"  # describe_error's line
    assert all(not s.events for s in spans)  # no exception event, no traceback
    assert root.status.status_code == StatusCode.ERROR
    assert (root.attributes or {})[telemetry.OUTCOME] == "failed"


def test_without_application_insights_nothing_is_configured_or_imported(
    app_settings: dict[str, str],
) -> None:
    # In this process: building the engine (which calls configure) sets no provider and no hook
    assert "APPLICATIONINSIGHTS_CONNECTION_STRING" not in os.environ
    assert telemetry.configure() is False
    assert telemetry._instruments is None
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert type(metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider"

    # And in a fresh worker: the app, the engine's modules and configure() import no OpenTelemetry
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLICATIONINSIGHTS_")}
    script = (
        "import sys, function_app, shared.service, shared.steps\n"
        "from shared import telemetry\n"
        "assert telemetry.configure() is False\n"
        "with telemetry.step('claim'):\n"
        "    pass\n"
        "loaded = [m for m in sys.modules if m.startswith(('opentelemetry', 'azure.monitor'))]\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_with_application_insights_the_distro_is_configured_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(distro, "configure_azure_monitor", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(telemetry, "_configured", False)
    monkeypatch.setattr(telemetry, "_instruments", None)
    environ = {
        "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000-0000-0000-0000-000000000000"
    }

    assert telemetry.configure(environ) is True
    assert telemetry.configure(environ) is True
    assert len(calls) == 1
    assert calls[0]["connection_string"] == environ["APPLICATIONINSIGHTS_CONNECTION_STRING"]
    assert calls[0]["logger_name"] == "shared"
    assert telemetry._instruments is not None


def test_the_function_app_lets_the_worker_stream_opentelemetry_to_application_insights() -> None:
    # host.json turns the host to OpenTelemetry; for Application Insights the Python worker then
    # needs PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true (Microsoft's "Use OpenTelemetry with
    # Azure Functions"; the worker reads it at init and configures the distro). PYTHON_ENABLE_OPENTELEMETRY
    # is the OTLP exporter's setting, and would leave the distro to a second configuration.
    host = json.loads((ROOT / "host.json").read_text())
    assert host["telemetryMode"] == "OpenTelemetry"
    bicep = (ROOT / "infra" / "modules" / "functionapp.bicep").read_text()
    assert re.search(r"^\s+PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY: 'true'$", bicep, re.M)
    assert re.search(r"^\s+APPLICATIONINSIGHTS_CONNECTION_STRING: \w+", bicep, re.M)
    assert not re.search(r"^\s+PYTHON_ENABLE_OPENTELEMETRY:", bicep, re.M)
