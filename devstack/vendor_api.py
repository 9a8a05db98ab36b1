"""A vendor API with key management, over HTTPS on 127.0.0.1, for the API-key rotator.

Like many SaaS vendors, an account has one admin key that may issue, list and revoke
API keys, and at most `max_keys` issued keys live at a time (409 beyond). Every key,
admin or issued, may call the "who am I" endpoint. Two wire shapes, so the rotator's
configurable contract is exercised with more than one vendor:

* ``default``: ``Authorization: Bearer <key>``; ``POST /keys {"name"}`` -> 201
  ``{"id","name","key","created"}``; ``GET /keys`` -> ``{"items":[{"id","name","created","last_used"}]}``;
  ``DELETE /keys/{id}`` -> 204 / 404; ``GET /whoami`` -> ``{"key_id","name"}``.
* ``alt``: ``X-API-Key: <key>``; ``POST /v2/api-keys {"label"}`` -> 201
  ``{"data":{"keyId","label","secret","createdAt"}}``; ``GET /v2/api-keys`` ->
  ``{"data":[{"keyId","label","createdAt","usage":{"lastUsedAt"}}]}``; ``DELETE /v2/api-keys/{id}``;
  ``GET /v2/me``.

A key's last use (ISO 8601, null before the first) is when it last called the who-am-I
endpoint, as vendors that report it do (the rotator's drain check reads it).

``GET /health[/...]`` answers 200 without a key (a stand-in for a consumer's health
probe; `inject_fault(503, path_prefix="/health/x")` makes one fail). Lists never carry
secrets. `add_account()` gives each test its own admin key and key limit on one server.
Keys are never logged. The server certificate comes from
``devstack.keyvault.certs.ensure_certs(state_dir)``: given the Key Vault emulator's
directory, both stand-ins share one CA.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import secrets
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import unquote, urlsplit

from devstack.served import ServedStandIn
from devstack.tls_server import QuietHandler, TlsHTTPServer

log = logging.getLogger("devstack.vendor_api")

Shape = Literal["default", "alt"]
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class _Wire:
    header: str
    prefix: str
    collection: str
    me: str
    id: str
    name: str
    secret: str
    created: str
    last_used: str
    list_field: str
    wrap_item: bool


_SHAPES: dict[str, _Wire] = {
    "default": _Wire(
        "Authorization",
        "Bearer ",
        "/keys",
        "/whoami",
        "id",
        "name",
        "key",
        "created",
        "last_used",
        "items",
        False,
    ),
    "alt": _Wire(
        "X-API-Key",
        "",
        "/v2/api-keys",
        "/v2/me",
        "keyId",
        "label",
        "secret",
        "createdAt",
        "usage.lastUsedAt",
        "data",
        True,
    ),
}


@dataclass
class _Key:
    id: str
    name: str
    secret: str
    created: str
    active_at: float
    last_used: str | None = None


@dataclass
class _Account:
    admin_key: str
    keys: dict[str, _Key] = field(default_factory=dict)


@dataclass
class _Fault:
    status: int
    remaining: int
    method: str | None
    path_prefix: str | None
    code: str = "injected_fault"


class _Server(TlsHTTPServer):
    def __init__(self, api: VendorApi, context: ssl.SSLContext) -> None:
        self.api = api
        super().__init__(_Handler, context)


class _Handler(QuietHandler):
    server_name = "devstack-vendor-api"
    request_log = log

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._send(413, {"error": {"code": "too_large"}})
            self.close_connection = True
            return
        raw = self.rfile.read(length) if length > 0 else b""
        api = cast(_Server, self.server).api
        try:
            status, body = api._request(self.command, urlsplit(self.path).path, self.headers, raw)
        except Exception:
            log.exception("unexpected error on %s %s", self.command, urlsplit(self.path).path)
            status, body = 500, {"error": {"code": "internal"}}
        self._send(status, body)

    def _send(self, status: int, body: Any) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)


def _error(status: int, code: str) -> tuple[int, Any]:
    return status, {"error": {"code": code}}


class VendorApi(ServedStandIn):
    """An in-memory vendor with key management, served over HTTPS on a random loopback port."""

    label = "vendor API"

    def __init__(
        self,
        state_dir: Path,
        *,
        shape: Shape = "default",
        max_keys: int = 2,
        activation_delay: float = 0.0,
    ) -> None:
        if shape not in _SHAPES:
            raise ValueError(f"unknown shape {shape!r}")
        super().__init__(state_dir)
        self.shape: Shape = shape
        self.max_keys = max_keys
        # Eventual consistency: a new key authenticates only this many seconds after creation.
        self.activation_delay = activation_delay
        self.requests: list[tuple[str, str, int]] = []
        self._wire = _SHAPES[shape]
        self._lock = threading.RLock()
        self._issued: set[str] = set()  # every key and admin key ever made, for leak scans
        self._accounts: dict[str, _Account] = {}
        self._faults: list[_Fault] = []
        self._admin_key = self.add_account()

    # ----- lifecycle -------------------------------------------------------------------------

    def _serve(self, context: ssl.SSLContext) -> TlsHTTPServer:
        return _Server(self, context)

    def _started(self) -> None:
        log.info("vendor API (%s shape) at %s", self.shape, self.base_url)

    # ----- addresses, accounts and test helpers ----------------------------------------------

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def admin_key(self) -> str:
        return self._admin_key

    @property
    def auth_header(self) -> str:
        """The header tag value that describes this shape, for `rotation-api-auth-header`."""
        return f"{self._wire.header}: {self._wire.prefix}{{key}}"

    def add_account(self) -> str:
        """A new account with its own admin key and its own limit of live keys."""
        admin_key = f"adm_{secrets.token_urlsafe(24)}"
        with self._lock:
            self._accounts[admin_key] = _Account(admin_key)
            self._issued.add(admin_key)
        return admin_key

    def issued_keys(self) -> set[str]:
        """Every admin key and key this stand-in ever made, revoked ones included."""
        with self._lock:
            return set(self._issued)

    def issue(self, admin_key: str, name: str) -> tuple[str, str]:
        """Create a key directly (provisioning in tests): returns (id, key)."""
        with self._lock:
            status, body = self._create(self._accounts[admin_key], name)
        if status != 201:
            raise RuntimeError(f"cannot issue a key: HTTP {status}")
        item = body["data"] if self._wire.wrap_item else body
        return str(item[self._wire.id]), str(item[self._wire.secret])

    def keys(self, admin_key: str | None = None) -> list[tuple[str, str]]:
        """(id, name) of every live issued key of an account."""
        with self._lock:
            account = self._accounts[admin_key or self._admin_key]
            return [(key.id, key.name) for key in account.keys.values()]

    def authenticates(self, key: str) -> bool:
        """Call the who-am-I endpoint over HTTPS with `key`, as a consumer would."""
        request = urllib.request.Request(  # noqa: S310 - our own https URL
            self.base_url + self._wire.me, headers={self._wire.header: self._wire.prefix + key}
        )
        context = ssl.create_default_context(cafile=str(self.ca_path))
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:  # noqa: S310
                return 200 <= int(response.status) < 300
        except urllib.error.HTTPError as error:
            if error.code in (401, 403):
                return False
            raise

    def inject_fault(
        self,
        status: int,
        times: int = 1,
        *,
        method: str | None = None,
        path_prefix: str | None = None,
        code: str = "injected_fault",
    ) -> None:
        """Answer the next `times` matching requests with `status` (and no effect).

        `code` is the error code sent; `{key}` in it becomes the key the request presented,
        as a careless vendor might echo it."""
        with self._lock:
            self._faults.append(_Fault(status, times, method, path_prefix, code))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # ----- the API ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, headers: Any, raw: bytes) -> tuple[int, Any]:
        with self._lock:
            status, body = self._handle(method, path, headers, raw)
            self.requests.append((method, path, status))
            return status, body

    def _handle(self, method: str, path: str, headers: Any, raw: bytes) -> tuple[int, Any]:
        for fault in self._faults:
            if (
                fault.remaining > 0
                and (fault.method is None or fault.method == method)
                and (fault.path_prefix is None or path.startswith(fault.path_prefix))
            ):
                fault.remaining -= 1
                return _error(fault.status, fault.code.replace("{key}", self._presented_key(headers) or ""))
        wire = self._wire
        if method == "GET" and (path == "/health" or path.startswith("/health/")):
            return 200, {"status": "ok"}  # unauthenticated: a consumer probe can point here
        presented = self._presented_key(headers)
        if presented is None:
            return _error(401, "unauthorized")
        account = self._accounts.get(presented)
        if path == wire.me and method == "GET":
            if account is not None:
                return 200, self._wrap({wire.id: "admin", wire.name: "admin"})
            key = self._live_key(presented)
            if key is None:
                return _error(401, "unauthorized")
            key.last_used = dt.datetime.now(dt.UTC).isoformat()
            return 200, self._wrap({wire.id: key.id, wire.name: key.name})
        if account is None:
            return _error(403 if self._live_key(presented) else 401, "forbidden")
        if path == wire.collection:
            if method == "GET":
                items = [self._listed(k) for k in account.keys.values()]
                return 200, {wire.list_field: items}
            if method == "POST":
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    return _error(400, "invalid_json")
                name = body.get(wire.name) if isinstance(body, dict) else None
                if not isinstance(name, str) or not _NAME.match(name):
                    return _error(400, "invalid_name")
                return self._create(account, name)
            return _error(405, "method_not_allowed")
        if path.startswith(wire.collection + "/"):
            key_id = unquote(path[len(wire.collection) + 1 :])
            if method != "DELETE":
                return _error(405, "method_not_allowed")
            if account.keys.pop(key_id, None) is None:
                return _error(404, "not_found")
            return 204, None
        return _error(404, "no_such_route")

    def _create(self, account: _Account, name: str) -> tuple[int, Any]:
        if len(account.keys) >= self.max_keys:
            return _error(409, "key_limit_reached")
        wire = self._wire
        created = dt.datetime.now(dt.UTC).isoformat()
        key = _Key(
            id=f"k_{secrets.token_hex(8)}",
            name=name,
            secret=f"vk_{secrets.token_urlsafe(32)}",
            created=created,
            active_at=time.monotonic() + self.activation_delay,
        )
        account.keys[key.id] = key
        self._issued.add(key.secret)
        return 201, self._wrap(
            {wire.id: key.id, wire.name: name, wire.secret: key.secret, wire.created: created}
        )

    def _listed(self, key: _Key) -> dict[str, Any]:
        wire = self._wire
        item: dict[str, Any] = {wire.id: key.id, wire.name: key.name, wire.created: key.created}
        outer, _, inner = wire.last_used.rpartition(".")
        (item.setdefault(outer, {}) if outer else item)[inner] = key.last_used
        return item

    def _wrap(self, item: dict[str, str]) -> dict[str, Any]:
        return {"data": item} if self._wire.wrap_item else item

    def _presented_key(self, headers: Any) -> str | None:
        value = headers.get(self._wire.header)
        if not isinstance(value, str) or not value.startswith(self._wire.prefix):
            return None
        return value[len(self._wire.prefix) :].strip() or None

    def _live_key(self, presented: str) -> _Key | None:
        now = time.monotonic()
        for account in self._accounts.values():
            for key in account.keys.values():
                if secrets.compare_digest(key.secret, presented) and key.active_at <= now:
                    return key
        return None
