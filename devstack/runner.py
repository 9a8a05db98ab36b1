"""A small local stand-in for the Azure Functions host (Core Tools cannot be installed here).

It hosts an `azure.functions.FunctionApp` the way the host does, with the host's URL shapes:

* ``POST /runtime/webhooks/eventgrid?functionName=NAME&code=KEY``: the Event Grid webhook
  (``aeg-event-type`` SubscriptionValidation, Notification or Unsubscribe; Event Grid and
  CloudEvents deliveries, one invocation per event). It needs the ``eventgrid_extension``
  system key (or the master key), as ``code`` or ``x-functions-key``;
* ``/api/<route>``: HTTP triggers; a route whose auth level is ``function`` needs a function
  key (or the master key), ``admin`` the master key, ``anonymous`` none;
* ``GET /admin/host/status`` and ``POST /admin/functions/NAME`` (run a timer function now):
  the master key only, as on the host (a function key does not open the admin API);
* timer triggers on their NCRONTAB schedule (or every ``timer_interval`` seconds).

A missing or wrong key is a 401 with no body, whatever the header holds (non-ASCII included).
Every response status goes to the functions in ``RESPONSE_HOOKS`` (the tests record them).

Production runs on the real Functions host; this is for the demo, the tests and local runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import azure.functions as func
from azure.functions.decorators.core import Trigger
from azure.functions.decorators.function_app import Function
from azure.functions.eventgrid import EventGridEventInConverter
from azure.functions.meta import Datum
from azure.functions.timer import TimerRequest
from croniter import croniter

from shared.errors import InvalidInput
from shared.jsonsafe import loads_strict

log = logging.getLogger("devstack.runner")

EVENTGRID, TIMER, HTTP = "eventGridTrigger", "timerTrigger", "httpTrigger"
MAX_BODY = 1024 * 1024  # bytes; larger deliveries get 413, which Event Grid does not retry
MAX_BODY_DEPTH = 32  # an Event Grid delivery needs 3 levels (array, event, data)
PAST_DUE_SLACK = 1.0  # seconds late before a timer invocation counts as past due
LISTEN_BACKLOG = 128  # socketserver's default of 5 resets connections under 20 parallel clients
# The host's key names: `_master` (the admin API and everything else) and one system key per
# extension; the Event Grid extension's is `eventgrid_extension`.
MASTER_KEY_NAME = "_master"
EVENTGRID_SYSTEM_KEY = "eventgrid_extension"
# Called with (method, path without query, status) for every response the host sends.
RESPONSE_HOOKS: list[Callable[[str, str, int], None]] = []
_index_lock = threading.Lock()
_indexed: dict[int, tuple[func.FunctionApp, list[Function]]] = {}


def index(app: func.FunctionApp) -> list[Function]:
    """`app.get_functions()`, once per app object (a second call raises a duplicate-name error)."""
    with _index_lock:
        if id(app) not in _indexed:
            _indexed[id(app)] = (app, app.get_functions())
        return _indexed[id(app)][1]


def _route_pattern(route: str) -> re.Pattern[str]:
    """`secrets/{name}/rotate` -> a regex with one named group per route parameter."""
    parts = re.split(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", route.strip("/"))
    pattern = "".join(
        re.escape(part) if index % 2 == 0 else f"(?P<{part}>[^/]+)" for index, part in enumerate(parts)
    )
    return re.compile(f"^/api/{pattern}/?$")


def _key_matches(given: str, expected: str) -> bool:
    """Constant-time comparison that refuses, rather than raises on, a non-ASCII header value.

    http.server decodes header bytes as ISO-8859-1, and `secrets.compare_digest` raises
    TypeError on non-ASCII str: compare UTF-8 bytes instead.
    """
    return bool(given) and secrets.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


class _Server(ThreadingHTTPServer):
    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True


def _error_line(error: BaseException) -> str:
    text = " ".join(str(error).split())[:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class LocalFunctionHost:
    def __init__(
        self,
        app: func.FunctionApp | None = None,
        *,
        port: int = 0,
        timer_interval: float | None = None,
        function_key: str | None = None,
        master_key: str | None = None,
        eventgrid_key: str | None = None,
    ) -> None:
        if app is None:
            from function_app import app as default_app  # noqa: PLC0415 - imported as the host does

            app = default_app
        self.functions: dict[str, Function] = {str(f.get_function_name()): f for f in index(app)}
        self.triggers: dict[str, Trigger] = {}
        for name, function in self.functions.items():
            trigger = function.get_trigger()
            if trigger is None:
                raise ValueError(f"function {name} has no trigger")
            self.triggers[name] = trigger
        self.port, self.timer_interval = port, timer_interval
        self.function_key = function_key or secrets.token_urlsafe(32)
        self.master_key = master_key or secrets.token_urlsafe(32)
        self.system_keys = {EVENTGRID_SYSTEM_KEY: eventgrid_key or secrets.token_urlsafe(32)}
        if len({self.function_key, self.master_key, *self.system_keys.values()}) != 2 + len(self.system_keys):
            raise ValueError("the function key, the master key and the system keys must all differ")
        self.routes = [
            (name, _route_pattern(str(getattr(self.triggers[name], "route", "") or name)))
            for name in self.names(HTTP)
        ]
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._running = {name: threading.Lock() for name in self.names(TIMER)}
        self.schedules = {name: self._schedule(name) for name in self.names(TIMER)}

    def _schedule(self, name: str) -> str:
        """The timer's NCRONTAB schedule (6 fields, seconds first); `%NAME%` reads an app setting."""
        schedule = str(getattr(self.triggers[name], "schedule", ""))
        if len(schedule) > 2 and schedule[0] == schedule[-1] == "%":
            schedule = os.environ.get(schedule[1:-1], "")
        if not croniter.is_valid(schedule, second_at_beginning=True) or len(schedule.split()) != 6:
            raise ValueError(f"timer {name}: {schedule!r} is not a 6-field NCRONTAB schedule")
        return schedule

    def names(self, trigger_type: str) -> list[str]:
        return [name for name, trigger in self.triggers.items() if trigger.type == trigger_type]

    # ----- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LocalFunctionHost:
        if self._server is not None:
            raise RuntimeError("the host is already running")
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.host = self  # type: ignore[attr-defined]
        self._spawn("runner-http", self._server.serve_forever, 0.05)
        for name in self.names(TIMER):
            self._spawn(f"runner-timer-{name}", self._timer_loop, name)
        log.info("function host at %s: %s", self.url, ", ".join(self.functions))
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()
        self._server = None

    def __enter__(self) -> LocalFunctionHost:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the host is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def eventgrid_webhook_url(self, function_name: str, *, with_key: bool = True) -> str:
        """The URL an Event Grid subscription is given: with the `eventgrid_extension` key as `code`."""
        url = f"{self.url}/runtime/webhooks/eventgrid?functionName={quote(function_name)}"
        return f"{url}&code={quote(self.system_keys[EVENTGRID_SYSTEM_KEY])}" if with_key else url

    # ----- invocations -------------------------------------------------------------------------

    def invoke(self, name: str, value: Any) -> None:
        """Call the user function with `value` under the trigger's argument name."""
        self.functions[name].get_user_function()(**{self.triggers[name].name: value})

    def run_timer(self, name: str, past_due: bool = False) -> bool:
        """Run a timer function now unless it is still running; False if this tick was skipped."""
        if not self._running[name].acquire(blocking=False):
            log.warning("timer %s is still running: tick skipped", name)
            return False
        try:
            self.invoke(name, TimerRequest(past_due=past_due))
        except Exception as error:
            log.error("timer function %s failed: %s", name, _error_line(error))
        finally:
            self._running[name].release()
        return True

    def next_run(self, name: str, after: float) -> float:
        if self.timer_interval is not None:
            return after + self.timer_interval
        cron = croniter(self.schedules[name], datetime.fromtimestamp(after, UTC), second_at_beginning=True)
        return float(cron.get_next(float))

    def _timer_loop(self, name: str) -> None:
        due = self.next_run(name, time.time())
        while not self._stopping.wait(max(0.0, due - time.time())):
            self.run_timer(name, past_due=time.time() - due > PAST_DUE_SLACK)
            due = self.next_run(name, time.time())  # ticks that fell during the run are skipped


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "LocalFunctionHost"

    @property
    def host(self) -> LocalFunctionHost:
        return self.server.host  # type: ignore[attr-defined, no-any-return]

    def log_message(self, format: str, *args: Any) -> None:
        # The request line may carry a key as `code=`: log the path only.
        log.debug("%s %s %s", self.address_string(), self.command, urlsplit(self.path or "").path[:200])

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        path = urlsplit(self.path or "").path
        for hook in list(RESPONSE_HOOKS):
            hook(str(self.command), path, code)

    def _given_key(self, params: dict[str, str] | None = None) -> str:
        if params is None:
            query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
            params = {key: values[0] for key, values in query.items()}
        return self.headers.get("x-functions-key") or params.get("code", "")

    def _authorized(self, level: str, params: dict[str, str] | None = None) -> bool:
        """The host's key check for an auth level; False after answering 401 (no body)."""
        given = self._given_key(params)
        accepted = [self.host.master_key]
        if level == "anonymous":
            return True
        if level == "function":
            accepted.append(self.host.function_key)
        elif level.startswith("system:"):
            accepted.append(self.host.system_keys[level.removeprefix("system:")])
        # Every key is compared, so the time taken says nothing about which one was close.
        if not any([_key_matches(given, key) for key in accepted]):
            self._discard_body()
            self._send(401)
            return False
        return True

    def _discard_body(self) -> None:
        """Read an unwanted body so the connection stays usable; close it when that is unsafe.

        Closing with unread bytes in the socket would reset it before the client reads the answer.
        """
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if 0 <= length <= MAX_BODY:
            self.rfile.read(length)
        else:
            self.close_connection = True

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, {"error": {"code": code, "message": message}})

    def _read_json(self) -> Any:
        """The JSON body, or None after answering 4xx (the connection is closed then)."""
        self.close_connection = True  # until the body has been read in full
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(411, "LengthRequired", "a Content-Length header is required")
            return None
        if length < 0 or length > MAX_BODY:
            self._error(413, "PayloadTooLarge", f"the body is over {MAX_BODY} bytes")
            return None
        raw = self.rfile.read(length)
        self.close_connection = False
        try:
            body = loads_strict(raw, max_depth=MAX_BODY_DEPTH, max_bytes=MAX_BODY)
        except InvalidInput as problem:
            self._error(400, "InvalidJson", f"the body is not JSON the host accepts: {problem}")
            return None
        if not isinstance(body, dict | list) or (
            isinstance(body, list) and not all(isinstance(item, dict) for item in body)
        ):
            self._error(400, "InvalidPayload", "expected an event object or an array of event objects")
            return None
        return body

    def _http(self, method: str) -> bool:
        """Serve an HTTP trigger; False when no route matches the path."""
        parts = urlsplit(self.path)
        found = next(
            ((name, match) for name, pattern in self.host.routes if (match := pattern.match(parts.path))),
            None,
        )
        if found is None:
            return False
        name, match = found
        trigger = self.host.triggers[name]
        methods = [str(getattr(m, "value", m)).upper() for m in (getattr(trigger, "methods", None) or [])]
        if methods and method not in methods:
            self._send(
                405,
                {"error": {"code": "MethodNotAllowed", "message": f"{method} is not allowed here"}},
                {"Allow": ", ".join(methods)},
            )
            return True
        params = {key: values[0] for key, values in parse_qs(parts.query, keep_blank_values=True).items()}
        level = str(getattr(getattr(trigger, "auth_level", None), "value", "function")).lower()
        if not self._authorized(level, params):
            return True
        self.close_connection = True
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self._error(413, "PayloadTooLarge", f"the body is over {MAX_BODY} bytes")
            return True
        body = self.rfile.read(length) if length else b""
        self.close_connection = False
        request = func.HttpRequest(
            method=method,
            url=f"{self.host.url}{self.path}",
            headers=dict(self.headers.items()),
            params=params,
            route_params={key: unquote(value) for key, value in match.groupdict().items()},
            body=body,
        )
        try:
            response = self.host.functions[name].get_user_function()(**{trigger.name: request})
        except Exception as error:
            log.error("function %s failed: %s", name, _error_line(error))
            self._send(500)
            return True
        payload = response.get_body()
        self.send_response(response.status_code)
        for key, value in response.headers.items():
            if key.lower() not in ("content-length", "content-type"):
                self.send_header(key, value)
        self.send_header("Content-Type", response.mimetype or "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        return True

    def do_GET(self) -> None:
        if self._http("GET"):
            return
        path = urlsplit(self.path).path
        if path.startswith("/admin/") and not self._authorized("admin"):
            return
        if path == "/admin/host/status":
            self._send(200, {"state": "Running", "functions": list(self.host.functions)})
        else:
            self._error(404, "NotFound", "no such endpoint")

    def do_OPTIONS(self) -> None:
        if self._http("OPTIONS"):
            return
        origin = self.headers.get("WebHook-Request-Origin")
        path = urlsplit(self.path).path
        if path == "/runtime/webhooks/eventgrid" and not self._authorized(f"system:{EVENTGRID_SYSTEM_KEY}"):
            return
        if path == "/runtime/webhooks/eventgrid" and origin:
            self._send(200, headers={"WebHook-Allowed-Origin": origin, "WebHook-Allowed-Rate": "*"})
        else:
            self._error(404, "NotFound", "no such endpoint")

    def _other_method(self) -> None:
        if not self._http(self.command):
            self._error(404, "NotFound", "no such endpoint")

    def __getattr__(self, name: str) -> Any:
        # http.server looks up do_<METHOD>; any method not defined here is routed (and refused) alike.
        if name.startswith("do_"):
            return self._other_method
        raise AttributeError(name)

    def do_POST(self) -> None:
        if self._http("POST"):
            return
        parts = urlsplit(self.path)
        if parts.path == "/runtime/webhooks/eventgrid":
            if self._authorized(f"system:{EVENTGRID_SYSTEM_KEY}"):
                names = parse_qs(parts.query).get("functionName", [""])
                self._eventgrid(names[0])
        elif parts.path.startswith("/admin/"):
            if not self._authorized("admin"):
                return
            if parts.path.startswith("/admin/functions/"):
                self._admin_invoke(parts.path.removeprefix("/admin/functions/"))
            else:
                self._error(404, "NotFound", "no such endpoint")
        else:
            self._error(404, "NotFound", "no such endpoint")

    def _admin_invoke(self, name: str) -> None:
        if name not in self.host.names(TIMER):
            self._error(404, "FunctionNotFound", f"no timer function named {name[:64]!r}")
        elif self._read_json() is not None:
            self.host._spawn(f"runner-admin-{name}", self.host.run_timer, name)
            self._send(202)

    def _eventgrid(self, name: str) -> None:
        if name not in self.host.names(EVENTGRID):
            self._error(404, "FunctionNotFound", f"no Event Grid function named {name[:64]!r}")
            return
        payload = self._read_json()
        if payload is None:
            return
        items = payload if isinstance(payload, list) else [payload]
        # As the Event Grid extension does: the header decides, compared case-insensitively.
        kind = (self.headers.get("aeg-event-type") or "").strip().lower()
        if kind == "subscriptionvalidation":
            self._validate_subscription(items)
            return
        if kind == "unsubscribe":
            self._send(202)
            return
        if kind != "notification":
            self._error(
                400,
                "UnknownEventType",
                "the aeg-event-type header must be SubscriptionValidation, Notification or Unsubscribe",
            )
            return
        try:
            events = [
                EventGridEventInConverter.decode(Datum(json.dumps(item), "json"), trigger_metadata={})
                for item in items
            ]
        except Exception as error:
            self._error(400, "InvalidEvent", f"the event cannot be decoded: {type(error).__name__}")
            return
        for event in events:
            try:
                self.host.invoke(name, event)
            except Exception as error:
                log.error("function %s failed: %s", name, _error_line(error))
                self._error(500, "FunctionFailed", f"function {name} failed")  # Event Grid redelivers
                return
        self._send(200)

    def _validate_subscription(self, items: list[Any]) -> None:
        """Answer Event Grid's validation handshake: echo data.validationCode of the first event."""
        data = items[0].get("data") if items else None
        code = data.get("validationCode") if isinstance(data, dict) else None
        if not isinstance(code, str) or not code.strip() or len(code) > 256:
            self._error(
                400,
                "InvalidValidation",
                "a subscription validation event needs data to be an object with a validationCode string",
            )
            return
        self._send(200, {"validationResponse": code})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Host function_app locally (settings from the environment).")
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--timer-interval", type=float, default=None, help="seconds; overrides schedules")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Keys from the environment (the names devstack.serve writes), else fresh ones shown once here.
    given = {name: os.environ.get(name) or None for name in ("FUNCTION_KEY", "FUNCTIONS_MASTER_KEY")}
    host = LocalFunctionHost(
        port=args.port,
        timer_interval=args.timer_interval,
        function_key=given["FUNCTION_KEY"],
        master_key=given["FUNCTIONS_MASTER_KEY"],
    ).start()
    if not given["FUNCTION_KEY"]:
        print(f"function key (x-functions-key): {host.function_key}", flush=True)
    if not given["FUNCTIONS_MASTER_KEY"]:
        print(f"master key (for /admin/*): {host.master_key}", flush=True)
    for name in host.names(EVENTGRID):
        print(
            f"{name} webhook (for an Event Grid subscription): {host.eventgrid_webhook_url(name)}", flush=True
        )
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    try:
        stopping.wait()
    finally:
        host.stop()


if __name__ == "__main__":
    main()
