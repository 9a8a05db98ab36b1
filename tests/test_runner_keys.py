"""The local function host checks keys as the Functions host does, and reads webhooks strictly.

The host's rules: the Event Grid webhook needs the `eventgrid_extension` system key, `/admin/*`
the master key, a function-level route a function key; the master key opens everything, a
function key opens no admin endpoint and no webhook. A missing or wrong key is a bare 401.
"""

import http.client
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import azure.functions as func
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstack.runner import EVENTGRID_SYSTEM_KEY, LocalFunctionHost

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
received: list[str] = []


@app.function_name("events")
@app.event_grid_trigger(arg_name="event")
def events(event: func.EventGridEvent) -> None:
    received.append(event.id)


@app.function_name("hello")
@app.route(route="hello", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def hello(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("{}", mimetype="application/json")


@app.function_name("admin_only")
@app.route(route="admin-only", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
def admin_only(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("{}", mimetype="application/json")


@app.function_name("tick")
@app.timer_trigger(schedule="0 0 0 1 1 *", arg_name="timer")
def tick(timer: func.TimerRequest) -> None:
    pass


FUNCTION, MASTER, EVENTGRID = "function-key-1", "master-key-1", "eventgrid-key-1"
EVENT = {
    "id": "evt-1",
    "topic": "t",
    "subject": "s",
    "eventType": "x",
    "eventTime": "2024-01-01T00:00:00Z",
    "data": {},
    "dataVersion": "1",
}
NOTIFICATION = {"aeg-event-type": "Notification", "Content-Type": "application/json"}
VALIDATION = {"aeg-event-type": "SubscriptionValidation", "Content-Type": "application/json"}
WEBHOOK = "/runtime/webhooks/eventgrid?functionName=events"


@pytest.fixture(scope="module")
def host() -> Iterator[LocalFunctionHost]:
    with LocalFunctionHost(
        app, function_key=FUNCTION, master_key=MASTER, eventgrid_key=EVENTGRID, timer_interval=10.0**9
    ) as running:
        yield running


def request(
    host: LocalFunctionHost,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(host.url.removeprefix("http://"), timeout=30)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def raw_request(host: LocalFunctionHost, data: bytes) -> bytes:
    """Bytes on the wire, so a header can hold what http.client would refuse to send."""
    port = int(host.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_the_subscription_url_carries_the_eventgrid_system_key(host: LocalFunctionHost) -> None:
    assert (
        host.system_keys == {EVENTGRID_SYSTEM_KEY: EVENTGRID}
        and EVENTGRID_SYSTEM_KEY == "eventgrid_extension"
    )
    assert host.eventgrid_webhook_url("events") == f"{host.url}{WEBHOOK}&code={EVENTGRID}"
    assert host.eventgrid_webhook_url("events", with_key=False) == f"{host.url}{WEBHOOK}"


@pytest.mark.parametrize(
    ("where", "key", "opens"),
    [
        ("header", None, False),
        ("header", "", False),
        ("header", "wrong", False),
        ("header", FUNCTION, False),
        ("query", FUNCTION, False),
        ("header", EVENTGRID, True),
        ("query", EVENTGRID, True),
        ("header", MASTER, True),
        ("query", MASTER, True),
    ],
)
def test_the_webhook_needs_the_eventgrid_system_key(
    host: LocalFunctionHost, where: str, key: str | None, opens: bool
) -> None:
    target, headers = WEBHOOK, dict(NOTIFICATION)
    if key is not None and where == "query":
        target += f"&code={key}"
    elif key is not None:
        headers["x-functions-key"] = key
    before = len(received)
    status, body = request(host, "POST", target, json.dumps([EVENT]).encode(), headers)
    if opens:
        assert status == 200
        assert len(received) == before + 1
    else:
        assert (status, body) == (401, b"")
        assert len(received) == before
    # The validation handshake and the CloudEvents OPTIONS handshake are behind the key too.
    options = {"WebHook-Request-Origin": "eventgrid.azure.net", **headers}
    assert (request(host, "OPTIONS", target, headers=options)[0] == 401) is not opens


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/admin/host/status"), ("POST", "/admin/functions/tick"), ("GET", "/admin/x")],
)
@pytest.mark.parametrize("key", [None, "wrong", FUNCTION, EVENTGRID])
def test_admin_endpoints_need_the_master_key(
    host: LocalFunctionHost, method: str, path: str, key: str | None
) -> None:
    body = b"{}" if method == "POST" else None
    headers = {} if key is None else {"x-functions-key": key}
    assert request(host, method, path, body, headers) == (401, b"")
    assert request(host, method, f"{path}?code={key}", body)[0] == 401
    expected = {"/admin/host/status": 200, "/admin/functions/tick": 202, "/admin/x": 404}[path]
    assert request(host, method, path, body, {"x-functions-key": MASTER})[0] == expected
    assert request(host, method, f"{path}?code={MASTER}", body)[0] == expected


def test_routes_take_the_key_their_auth_level_asks_for(host: LocalFunctionHost) -> None:
    def status(path: str, key: str) -> int:
        return request(host, "GET", path, headers={"x-functions-key": key})[0]

    assert [status("/api/hello", k) for k in (FUNCTION, MASTER, EVENTGRID, "x")] == [200, 200, 401, 401]
    assert [status("/api/admin-only", k) for k in (FUNCTION, MASTER, EVENTGRID, "x")] == [401, 200, 401, 401]


@pytest.mark.parametrize("value", ["\u00e9t\u00e9".encode(), b"\xff\xfe\x00k", "キー".encode()])
@pytest.mark.parametrize("path", ["/admin/host/status", WEBHOOK, "/api/hello"])
def test_an_undecodable_key_header_is_a_401_not_a_dropped_connection(
    host: LocalFunctionHost, value: bytes, path: str
) -> None:
    value = value.replace(b"\x00", b"")
    method = "POST" if path == WEBHOOK else "GET"
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n".encode()
    head += b"Content-Length: 2\r\naeg-event-type: Notification\r\n" if method == "POST" else b""
    answer = raw_request(
        host, head + b"x-functions-key: " + value + b"\r\n\r\n" + (b"[]" if method == "POST" else b"")
    )
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:80]
    # and the host still serves the next request
    assert request(host, "GET", "/api/hello", headers={"x-functions-key": FUNCTION})[0] == 200


@pytest.mark.parametrize(
    ("kind", "status"),
    [(None, 400), ("", 400), ("Bogus", 400), ("notification", 200), ("Unsubscribe", 202)],
)
def test_the_webhook_honours_aeg_event_type(host: LocalFunctionHost, kind: str | None, status: int) -> None:
    headers = {"x-functions-key": EVENTGRID, "Content-Type": "application/json"}
    if kind is not None:
        headers["aeg-event-type"] = kind
    before = len(received)
    got, body = request(host, "POST", WEBHOOK, json.dumps([EVENT]).encode(), headers)
    assert got == status
    assert len(received) == before + (1 if status == 200 else 0)
    if status == 400:
        assert json.loads(body)["error"]["code"] == "UnknownEventType"


def validation_event(data: Any) -> list[dict[str, Any]]:
    return [{**EVENT, "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent", "data": data}]


@pytest.mark.parametrize(
    "data",
    ["a string", 42, None, [], {}, {"validationCode": 7}, {"validationCode": ""}, {"validationcode": "x"}],
    ids=["string", "number", "null", "array", "empty", "code-number", "code-empty", "code-miscased"],
)
def test_a_malformed_validation_event_is_a_clear_400(host: LocalFunctionHost, data: Any) -> None:
    headers = {**VALIDATION, "x-functions-key": EVENTGRID}
    status, body = request(host, "POST", WEBHOOK, json.dumps(validation_event(data)).encode(), headers)
    assert status == 400
    error = json.loads(body)["error"]
    assert error["code"] == "InvalidValidation"
    assert "validationCode" in error["message"]
    # a good one still handshakes
    good = json.dumps(validation_event({"validationCode": "abc-123"})).encode()
    assert request(host, "POST", WEBHOOK, good, headers) == (200, b'{"validationResponse": "abc-123"}')


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 1000 + b"]" * 1000,
        b'[{"id": "a", "id": "b", "data": {}}]',
        b'[{"id": "a", "data": {"n": NaN}}]',
        b'[{"id": "a", "data": {"n": 1e999}}]',
        '[{"id": "a"}]'.encode("utf-16"),
    ],
    ids=["deep", "duplicate-keys", "nan", "huge-number", "utf-16"],
)
def test_the_webhook_body_is_read_strictly(host: LocalFunctionHost, body: bytes) -> None:
    before = len(received)
    headers = {**NOTIFICATION, "x-functions-key": EVENTGRID}
    status, answer = request(host, "POST", WEBHOOK, body, headers)
    assert status == 400
    assert json.loads(answer)["error"]["code"] == "InvalidJson"
    assert len(received) == before


def test_twenty_parallel_clients_are_all_served(host: LocalFunctionHost) -> None:
    port = int(host.url.rsplit(":", 1)[1])
    # The kernel's listen backlog (ss shows it as Send-Q of a listening socket); 5 would reset
    # clients under load on machines without SYN retries to paper over it.
    if shutil.which("ss"):
        listing = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
        )
        assert [line.split()[2] for line in listing.stdout.splitlines()] == ["128"]
    else:
        assert host._server is not None and host._server.request_queue_size == 128
    start = threading.Barrier(20)
    results: list[object] = []

    def client() -> None:
        start.wait()
        try:
            # Connect all at once, before any request: the accept queue holds all twenty.
            with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
                sock.sendall(
                    b"GET /admin/host/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    + f"x-functions-key: {MASTER}\r\n\r\n".encode()
                )
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
                results.append(answer.split(b"\r\n", 1)[0])
        except OSError as error:
            results.append(error)

    threads = [threading.Thread(target=client) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [b"HTTP/1.1 200 OK"] * 20


webhook_bodies = st.one_of(
    st.binary(max_size=300),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=10,
    ).map(lambda value: json.dumps(value).encode()),
    st.lists(
        st.fixed_dictionaries(
            {"id": st.text(max_size=10), "eventType": st.text(max_size=10)},
            optional={"data": st.none() | st.text(max_size=10) | st.integers(), "topic": st.integers()},
        ),
        max_size=3,
    ).map(lambda value: json.dumps(value).encode()),
    st.integers(1, 2000).map(lambda n: b"[" * n + b"]" * n),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=webhook_bodies, kind=st.sampled_from(["Notification", "SubscriptionValidation", "Unsubscribe", "x"])
)
def test_any_webhook_body_is_answered_without_a_500(host: LocalFunctionHost, body: bytes, kind: str) -> None:
    headers = {"x-functions-key": EVENTGRID, "aeg-event-type": kind, "Content-Type": "application/json"}
    status, _ = request(host, "POST", WEBHOOK, body, headers)
    assert status in (200, 202, 400)
