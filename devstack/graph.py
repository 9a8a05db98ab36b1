"""Microsoft Graph (applications and their password credentials) and the Entra token endpoint,
over HTTPS on 127.0.0.1 with the stack's CA, for the Entra application secret rotator.

One server plays both hosts (`graph.microsoft.com` and `login.microsoftonline.com`); the
paths tell them apart:

* Graph, as the Function App's identity (a bearer token from the Key Vault emulator's
  managed-identity endpoint, audience `https://graph.microsoft.com`):
  ``GET /v1.0/applications/{id}``, ``GET /v1.0/applications(appId='{appId}')``,
  ``GET /v1.0/applications/{id}/owners``, ``POST /v1.0/applications/{id}/addPassword``
  (the `secretText` is in this answer only), ``POST /v1.0/applications/{id}/removePassword``
  (204), ``GET /v1.0/servicePrincipals/{id}/ownedObjects/microsoft.graph.application``.
  The caller must hold `Application.ReadWrite.OwnedBy` (`grant_permission`) and own the
  application: else 403 ``Authorization_RequestDenied``. Errors have Graph's shape
  ``{"error": {"code", "message", "innerError": {"date", "request-id", "client-request-id"}}}``.
* An app management policy: `max_password_lifetime` refuses a longer `endDateTime`
  (400 ``CredentialInvalidLifetimeAsPerAppPolicy``), `passwords_allowed = False` refuses
  any password (400 ``CredentialTypeNotAllowedAsPerAppPolicy``); `max_passwords` per
  application (400 ``TooManyPasswordCredentials`` here: a stand-in's code, see the README).
* Entra: ``GET /{tenant}/v2.0/.well-known/openid-configuration``, ``GET
  /common/discovery/instance`` and ``POST /{tenant}/oauth2/v2.0/token`` (client_credentials).
  A new password authenticates only `propagation_delay` seconds after it was added; a wrong
  one gets 401 ``invalid_client`` with ``AADSTS7000215``, an unknown client ``AADSTS700016``,
  an expired one ``AADSTS7000222``.

Secrets are never logged. `issued_secrets()` lists every one made, for leak scans.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import re
import secrets
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from devstack.served import ServedStandIn
from devstack.tls_server import QuietHandler, TlsHTTPServer

if TYPE_CHECKING:
    from devstack.keyvault import KeyVaultEmulator

log = logging.getLogger("devstack.graph")

GRAPH_RESOURCE = "https://graph.microsoft.com"
PERMISSION = "Application.ReadWrite.OwnedBy"
_MAX_BODY = 64 * 1024
_APP = re.compile(r"^/v1\.0/applications/(?P<id>[^/()]+)(?P<rest>/[A-Za-z.]+)?$")
_APP_BY_APP_ID = re.compile(r"^/v1\.0/applications\(appId='(?P<app_id>[^']+)'\)(?P<rest>/[A-Za-z.]+)?$")
_OWNED = re.compile(
    r"^/v1\.0/servicePrincipals/(?P<id>[^/]+)/ownedObjects(?:/microsoft\.graph\.application)?$"
)
_TOKEN = re.compile(r"^/(?P<tenant>[^/]+)/oauth2/v2\.0/token$")
_OPENID = re.compile(r"^/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration$")

Response = tuple[int, Any]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Password:
    key_id: str
    display_name: str
    secret: str
    start: dt.datetime
    end: dt.datetime
    active_at: float

    def resource(self, *, with_secret: bool = False) -> dict[str, Any]:
        return {
            "customKeyIdentifier": None,
            "displayName": self.display_name,
            "endDateTime": _iso(self.end),
            "hint": self.secret[:3],
            "keyId": self.key_id,
            "secretText": self.secret if with_secret else None,
            "startDateTime": _iso(self.start),
        }


@dataclass
class Application:
    id: str
    app_id: str
    display_name: str
    owners: set[str] = field(default_factory=set)
    passwords: list[Password] = field(default_factory=list)

    def resource(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "appId": self.app_id,
            "displayName": self.display_name,
            "passwordCredentials": [p.resource() for p in self.passwords],
            "keyCredentials": [],
        }


@dataclass
class _Fault:
    status: int
    remaining: int
    method: str | None
    path_contains: str | None


def graph_error(status: int, code: str, message: str) -> Response:
    inner = {"date": _iso(_now()), "request-id": str(uuid.uuid4()), "client-request-id": str(uuid.uuid4())}
    return status, {"error": {"code": code, "message": message, "innerError": inner}}


def _aadsts(status: int, error: str, number: int, description: str) -> Response:
    trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    return status, {
        "error": error,
        "error_description": f"AADSTS{number}: {description} Trace ID: {trace} Correlation ID: {correlation}",
        "error_codes": [number],
        "timestamp": _now().strftime("%Y-%m-%d %H:%M:%SZ"),
        "trace_id": trace,
        "correlation_id": correlation,
    }


class _Server(TlsHTTPServer):
    def __init__(self, graph: GraphStandIn, context: ssl.SSLContext) -> None:
        self.graph = graph
        super().__init__(_Handler, context)


class _Handler(QuietHandler):
    server_name = "devstack-graph"
    request_log = log

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._send(*graph_error(413, "Request_EntityTooLarge", "The request is too large."))
            self.close_connection = True
            return
        raw = self.rfile.read(length) if length > 0 else b""
        graph = cast(_Server, self.server).graph
        parts = urlsplit(self.path)
        try:
            status, body = graph.handle(self.command, unquote(parts.path), parts.query, self.headers, raw)
        except Exception:
            log.exception("unexpected error on %s %s", self.command, parts.path)
            status, body = graph_error(500, "InternalServerError", "Internal error.")
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


class GraphStandIn(ServedStandIn):
    """In-memory applications of one tenant, Graph's API over them, and Entra's token endpoint."""

    label = "Graph stand-in"

    def __init__(self, state_dir: Path, emulator: KeyVaultEmulator) -> None:
        super().__init__(state_dir)
        self.emulator = emulator
        self.tenant_id = emulator.tenant_id
        # The app management policy and limits (change them in a test, then put them back).
        self.max_password_lifetime: dt.timedelta | None = None
        self.passwords_allowed = True
        self.max_passwords = 5
        # Eventual consistency: a new password authenticates only this many seconds later.
        self.propagation_delay = 0.0
        # After the next addPassword, fail this many application reads with 500 (a crash-like gap).
        self.fail_reads_after_add = 0
        self._failing_reads = 0
        self.requests: list[tuple[str, str, int]] = []
        self._lock = threading.RLock()
        self._apps: dict[str, Application] = {}
        self._granted: set[str] = {emulator.identity_client_id}
        self._issued: set[str] = set()
        self._faults: list[_Fault] = []

    # ----- lifecycle -------------------------------------------------------------------------

    def _serve(self, context: ssl.SSLContext) -> TlsHTTPServer:
        return _Server(self, context)

    def _started(self) -> None:
        log.info("Graph and Entra stand-in at %s", self.base_url)

    # ----- addresses and test helpers --------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Graph's endpoint and the authority host: both this server."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def caller_id(self) -> str:
        """The object id of the Function App's identity (the emulator's managed identity)."""
        return self.emulator.identity_client_id

    def add_application(self, display_name: str, *, owned: bool = True) -> Application:
        app = Application(str(uuid.uuid4()), str(uuid.uuid4()), display_name)
        if owned:
            app.owners.add(self.caller_id)
        app.owners.add(str(uuid.uuid4()))  # a human owner, as apps usually have
        with self._lock:
            self._apps[app.id] = app
        return app

    def add_password(
        self, app_id: str, display_name: str, *, days: int = 90, active: bool = True
    ) -> tuple[str, str]:
        """A password made directly (an operator in the portal): returns (keyId, secretText)."""
        with self._lock:
            app = self._apps[app_id]
            password = self._new_password(display_name, _now() + dt.timedelta(days=days))
            if active:
                password.active_at = 0.0
            app.passwords.append(password)
            return password.key_id, password.secret

    def passwords(self, app_id: str) -> list[tuple[str, str]]:
        """(keyId, displayName) of each password credential of an application."""
        with self._lock:
            return [(p.key_id, p.display_name) for p in self._apps[app_id].passwords]

    def set_owned(self, app_id: str, owned: bool) -> None:
        with self._lock:
            owners = self._apps[app_id].owners
            if owned:
                owners.add(self.caller_id)
            else:
                owners.discard(self.caller_id)

    def grant_permission(self, granted: bool = True) -> None:
        with self._lock:
            if granted:
                self._granted.add(self.caller_id)
            else:
                self._granted.discard(self.caller_id)

    def issued_secrets(self) -> set[str]:
        with self._lock:
            return set(self._issued)

    def inject_fault(
        self, status: int, times: int = 1, *, method: str | None = None, path_contains: str | None = None
    ) -> None:
        """Answer the next `times` matching requests with `status` (and no effect)."""
        with self._lock:
            self._faults.append(_Fault(status, times, method, path_contains))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset_policy(self) -> None:
        self.max_password_lifetime, self.passwords_allowed, self.max_passwords = None, True, 5
        self.propagation_delay, self.fail_reads_after_add, self._failing_reads = 0.0, 0, 0

    def authenticates(self, app_id: str, secret: str) -> bool:
        """Ask the token endpoint for a token with `secret`, over HTTPS, as a consumer would."""
        with self._lock:
            client_id = self._apps[app_id].app_id
        form = urllib.parse.urlencode(
            {
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": secret,
                "scope": f"{GRAPH_RESOURCE}/.default",
            }
        ).encode()
        request = urllib.request.Request(  # noqa: S310 - our own https URL
            f"{self.base_url}/{self.tenant_id}/oauth2/v2.0/token", data=form, method="POST"
        )
        context = ssl.create_default_context(cafile=str(self.ca_path))
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:  # noqa: S310
                return 200 <= int(response.status) < 300
        except urllib.error.HTTPError as error:
            if error.code in (400, 401):
                return False
            raise

    # ----- the API ---------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: str, headers: Any, raw: bytes) -> Response:
        with self._lock:
            status, body = self._handle(method, path, query, headers, raw)
            self.requests.append((method, path, status))
            return status, body

    def _handle(self, method: str, path: str, query: str, headers: Any, raw: bytes) -> Response:
        for fault in self._faults:
            if (
                fault.remaining > 0
                and (fault.method is None or fault.method == method)
                and (fault.path_contains is None or fault.path_contains in path)
            ):
                fault.remaining -= 1
                return graph_error(fault.status, "injected_fault", "Injected fault.")
        if method == "GET" and path == "/common/discovery/instance":
            return self._instance_discovery(query)
        match = _OPENID.match(path)
        if match and method == "GET":
            return self._openid(match["tenant"])
        match = _TOKEN.match(path)
        if match and method == "POST":
            return self._token(match["tenant"], raw)
        if not path.startswith("/v1.0/"):
            return graph_error(400, "BadRequest", "Invalid version.")
        caller = self._caller(headers.get("Authorization"))
        if isinstance(caller, tuple):
            return caller
        match = _OWNED.match(path)
        if match and method == "GET":
            return self._owned(caller, match["id"])
        match = _APP.match(path)
        app = self._apps.get(match["id"]) if match else None
        if match is None:
            match = _APP_BY_APP_ID.match(path)
            app = next((a for a in self._apps.values() if match and a.app_id == match["app_id"]), None)
        if match is None:
            return graph_error(400, "BadRequest", f"Resource not found for the segment '{path[:80]}'.")
        if app is None:
            return graph_error(
                404,
                "Request_ResourceNotFound",
                "Resource does not exist or one of its queried reference-property objects are not present.",
            )
        if caller not in self._granted or caller not in app.owners:
            return graph_error(
                403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation."
            )
        rest = match["rest"] or ""
        if method == "GET" and self._failing_reads > 0:
            self._failing_reads -= 1
            return graph_error(500, "InternalServerError", "Injected failure after addPassword.")
        if method == "GET" and rest == "":
            return 200, {
                "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#applications/$entity"
            } | app.resource()
        if method == "GET" and rest == "/owners":
            owners = [
                {"@odata.type": "#microsoft.graph.servicePrincipal", "id": owner}
                for owner in sorted(app.owners)
            ]
            return 200, {"value": owners}
        if method == "POST" and rest == "/addPassword":
            return self._add_password(app, raw)
        if method == "POST" and rest == "/removePassword":
            return self._remove_password(app, raw)
        return graph_error(
            405, "Request_BadRequest", "Specified HTTP method is not allowed for the request target."
        )

    def _caller(self, authorization: str | None) -> str | Response:
        if not authorization or not authorization.lower().startswith("bearer "):
            return graph_error(401, "InvalidAuthenticationToken", "Access token is empty.")
        token = authorization[len("bearer ") :].strip()
        issued = self.emulator.token_info(token)
        if issued is None or issued[1] <= time.time():
            return graph_error(
                401, "InvalidAuthenticationToken", "Access token validation failure. Invalid audience."
            )
        if issued[0] != GRAPH_RESOURCE:
            return graph_error(
                401, "InvalidAuthenticationToken", "Access token validation failure. Invalid audience."
            )
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(claims["oid"])

    def _owned(self, caller: str, principal: str) -> Response:
        if principal != caller:
            return graph_error(
                403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation."
            )
        owned = [
            {"@odata.type": "#microsoft.graph.application"} | app.resource()
            for app in self._apps.values()
            if caller in app.owners
        ]
        return 200, {"value": owned}

    def _add_password(self, app: Application, raw: bytes) -> Response:
        try:
            body = json.loads(raw or b"{}")
            wanted = body.get("passwordCredential") or {}
            display_name = wanted.get("displayName") or ""
            end_text = wanted.get("endDateTime")
            end = dt.datetime.fromisoformat(end_text) if end_text else _now() + dt.timedelta(days=730)
        except (ValueError, AttributeError, TypeError):
            return graph_error(400, "Request_BadRequest", "Invalid request body.")
        if not isinstance(display_name, str) or len(display_name) > 256:
            return graph_error(
                400, "Request_BadRequest", "Invalid value specified for property 'displayName'."
            )
        if end.tzinfo is None:
            end = end.replace(tzinfo=dt.UTC)
        if not self.passwords_allowed:
            return graph_error(
                400,
                "CredentialTypeNotAllowedAsPerAppPolicy",
                "Password addition is not allowed as per assigned policy.",
            )
        if self.max_password_lifetime is not None and end - _now() > self.max_password_lifetime:
            return graph_error(
                400,
                "CredentialInvalidLifetimeAsPerAppPolicy",
                "Credential lifetime exceeds the max value allowed as per assigned policy.",
            )
        if len(app.passwords) >= self.max_passwords:
            return graph_error(
                400,
                "TooManyPasswordCredentials",
                "The application has reached its limit of password credentials.",
            )
        password = self._new_password(display_name, end)
        app.passwords.append(password)
        self._failing_reads, self.fail_reads_after_add = self.fail_reads_after_add, 0
        context = "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.passwordCredential"
        return 200, {"@odata.context": context} | password.resource(with_secret=True)

    def _remove_password(self, app: Application, raw: bytes) -> Response:
        try:
            key_id = json.loads(raw or b"{}").get("keyId")
        except (ValueError, AttributeError):
            return graph_error(400, "Request_BadRequest", "Invalid request body.")
        kept = [p for p in app.passwords if p.key_id != key_id]
        if len(kept) == len(app.passwords):
            return graph_error(
                404, "Request_ResourceNotFound", f"No password credential found with keyId {key_id}."
            )
        app.passwords = kept
        return 204, None

    def _new_password(self, display_name: str, end: dt.datetime) -> Password:
        secret = secrets.token_urlsafe(30).replace("-", "~")[:40]
        self._issued.add(secret)
        return Password(
            str(uuid.uuid4()), display_name, secret, _now(), end, time.monotonic() + self.propagation_delay
        )

    # ----- Entra -----------------------------------------------------------------------------

    def _instance_discovery(self, query: str) -> Response:
        endpoint = f"{self.base_url}/{self.tenant_id}/v2.0/.well-known/openid-configuration"
        host = f"127.0.0.1:{self.port}"
        metadata = [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}]
        del query
        return 200, {"tenant_discovery_endpoint": endpoint, "api-version": "1.1", "metadata": metadata}

    def _openid(self, tenant: str) -> Response:
        if tenant not in (self.tenant_id, "organizations", "common"):
            return _aadsts(400, "invalid_tenant", 90002, f"Tenant '{tenant[:60]}' not found.")
        base = f"{self.base_url}/{self.tenant_id}"
        return 200, {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "issuer": f"{base}/v2.0",
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "tenant_region_scope": "EU",
        }

    def _token(self, tenant: str, raw: bytes) -> Response:
        form = {key: values[0] for key, values in parse_qs(raw.decode("utf-8", "replace")).items()}
        if tenant != self.tenant_id:
            return _aadsts(400, "invalid_tenant", 90002, f"Tenant '{tenant[:60]}' not found.")
        if form.get("grant_type") != "client_credentials":
            return _aadsts(
                400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type."
            )
        scope = form.get("scope", "")
        if not scope.endswith("/.default"):
            return _aadsts(400, "invalid_scope", 1002012, "The provided value for scope is not valid.")
        client_id = form.get("client_id", "")
        app = next((a for a in self._apps.values() if a.app_id == client_id), None)
        if app is None:
            return _aadsts(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id[:60]}' was not found in the directory.",
            )
        presented = form.get("client_secret", "")
        now = time.monotonic()
        match = next((p for p in app.passwords if secrets.compare_digest(p.secret, presented)), None)
        if match is not None and match.end <= _now():
            return _aadsts(
                401,
                "invalid_client",
                7000222,
                f"The provided client secret keys for app '{client_id}' are expired.",
            )
        if match is None or match.active_at > now:
            return _aadsts(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client "
                f"secret value, not the client secret ID, for a secret added to app '{client_id}'.",
            )
        issued_at = int(time.time())
        claims = {
            "aud": scope.removesuffix("/.default"),
            "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "tid": self.tenant_id,
            "appid": client_id,
            "azp": client_id,
            "oid": app.id,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": issued_at + 3599,
        }

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        token = f"{header}.{b64(json.dumps(claims).encode())}.{secrets.token_urlsafe(16)}"
        return 200, {
            "token_type": "Bearer",
            "expires_in": 3599,
            "ext_expires_in": 3599,
            "access_token": token,
        }
