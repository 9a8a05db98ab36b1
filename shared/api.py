"""The operator HTTP API, independent of the Functions types so it reads (and tests) plainly.

Each handler takes the request's parts and returns an `ApiResult` (status and
JSON body); function_app.py turns that into an HttpResponse. Errors have one
machine-readable shape: `{"error": {"code": ..., "message": ...}}`. No
handler ever returns a secret value.
"""

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from shared import engine as outcomes
from shared.config import SECRET_NAME, validate_secret_name
from shared.durations import parse_duration
from shared.engine import Outcome, RotationEngine, utc_now
from shared.errors import ConfigError, InvalidInput
from shared.jsonsafe import loads_strict, parse_int
from shared.ledger import FAILED, IDLE, OVERLAP, ROTATING, as_dict
from shared.settings import Settings, normalize_vault_url

if TYPE_CHECKING:
    from shared.certificates import CertificateRenewal
    from shared.keys import KeyRotationService

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
MAX_BODY_DEPTH = 8  # the deepest body is an object of lists (adopt's slots)
MAX_TOKEN_CHARS = 512
MAX_OFFSET = 10**9
MAX_PAGE_SIZE = 200
MAX_HISTORY = 100
STATES = (IDLE, ROTATING, OVERLAP, FAILED)
_ROTATE_FIELDS = {"reason": str, "emergency": bool, "dry_run": bool, "override_window": bool}
_ADOPT_FIELDS = (
    "rotator",
    "target",
    "slots",
    "current_slot",
    "validity",
    "overlap",
    "probes",
    "window",
    "admin_secret",
    "admin_user",
    "pg_group",
)

_STATUS_FOR_OUTCOME = {
    outcomes.ROTATED: 200,
    outcomes.DRY_RUN_PASSED: 200,
    outcomes.ADOPTED: 200,
    outcomes.BOUND: 200,
    outcomes.REFUSED: 403,
    outcomes.IN_PROGRESS: 409,
    outcomes.DEFERRED: 409,
    outcomes.OUTSIDE_WINDOW: 409,
    outcomes.ALREADY_MANAGED: 409,
    outcomes.NOT_FOUND: 404,
    outcomes.NOT_MANAGED: 422,
    outcomes.MISCONFIGURED: 422,
    outcomes.INVALID: 400,
    outcomes.DROPPED: 400,
    outcomes.ROTATION_FAILED: 502,
    outcomes.ROLLED_BACK: 502,
}
_HINTS = {
    outcomes.DEFERRED: "the previous credential is still in its overlap; an emergency rotation ends it now",
    outcomes.OUTSIDE_WINDOW: "send override_window: true to rotate outside the window",
    outcomes.ROTATION_FAILED: "consumers still hold the previous, working credential",
    outcomes.ROLLED_BACK: "the previous credential is current again; the new one was revoked",
    outcomes.REFUSED: "nothing was changed upstream or in Key Vault",
}


@dataclass(frozen=True)
class ApiResult:
    status: int
    body: dict[str, Any]


class BadRequest(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error(status: int, code: str, message: str) -> ApiResult:
    return ApiResult(status, {"error": {"code": code, "message": message}})


def _json_body(body: bytes, allow_empty: bool = True) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(413, "body_too_large", f"request body larger than {MAX_BODY_BYTES} bytes")
    if not body.strip():
        if allow_empty:
            return {}
        raise BadRequest(400, "invalid_body", "a JSON object body is required")
    try:
        decoded = loads_strict(body, max_depth=MAX_BODY_DEPTH, max_bytes=MAX_BODY_BYTES)
    except InvalidInput as problem:
        raise BadRequest(400, "invalid_body", f"request body: {problem}") from None
    if not isinstance(decoded, dict):
        raise BadRequest(400, "invalid_body", "request body must be a JSON object")
    return decoded


def _name(name: str) -> str:
    try:
        return validate_secret_name(name)
    except ConfigError as problem:
        raise BadRequest(400, "invalid_name", str(problem)) from None


def _vault(engine: RotationEngine, params: Mapping[str, str]) -> str:
    return _served_vault(engine.settings, params)


def _served_vault(settings: Settings, params: Mapping[str, str]) -> str:
    allowed = sorted(settings.allowed_vaults)
    requested = params.get("vault")
    if requested is not None:
        try:
            vault = normalize_vault_url(requested)
        except ConfigError as problem:
            raise BadRequest(400, "invalid_vault", str(problem)) from None
        if vault not in allowed:
            raise BadRequest(
                404, "vault_not_served", "this app does not serve that vault (ROTATION_ALLOWED_VAULTS)"
            )
        return vault
    if len(allowed) != 1:
        raise BadRequest(400, "vault_required", "this app serves several vaults: add ?vault=<name or URL>")
    return allowed[0]


def _header(headers: Mapping[str, str], name: str) -> str:
    value = next((v for k, v in headers.items() if k.lower() == name), "")
    return "".join(c for c in str(value) if c.isprintable()).strip()[:100]


def requested_by(headers: Mapping[str, str], settings: Settings) -> str:
    """Who called, for the audit trail: the App Service authentication principal, else the function key.

    App Service strips client-sent X-MS-CLIENT-PRINCIPAL* headers only when its authentication
    is enabled; without it anyone holding the function key could name any principal, so the
    headers count only when ROTATION_TRUST_APP_SERVICE_AUTH says authentication is on.
    """
    if not settings.trust_app_service_auth:
        return "http:function-key"
    principal_id = _header(headers, "x-ms-client-principal-id")
    name = _header(headers, "x-ms-client-principal-name")
    if not principal_id and not name:
        return "http:function-key"
    provider = _header(headers, "x-ms-client-principal-idp") or "unknown"
    who = f"{name} ({principal_id})" if name and principal_id else name or principal_id
    return f"http:{provider[:20]}:{who}"


def internal_error() -> ApiResult:
    """The answer when the service itself is at fault: a clean 500 that says nothing more."""
    return error(500, "internal", "the service failed to handle this request; it has been logged")


def _from_outcome(outcome: Outcome, extra: dict[str, Any] | None = None) -> ApiResult:
    status = _STATUS_FOR_OUTCOME.get(outcome.status)
    if status is None:
        # An engine outcome this API was not taught: a bug here, not the caller's fault. The log
        # line names the status and the secret only (an outcome's message is not for callers).
        logger.error(
            "secret %s: engine outcome %r has no HTTP mapping: answered 500",
            str(outcome.secret)[:127],
            str(outcome.status)[:40],
        )
        return internal_error()
    if status >= 400:
        hint = _HINTS.get(outcome.status) if not outcome.new_version else None  # the message says it
        message = outcome.message + (f" ({hint})" if hint else "")
        result = error(status, outcome.status, message)
        if outcome.rotation_id:
            result.body["rotation_id"] = outcome.rotation_id
        return result
    body = {"status": outcome.status, "secret": outcome.secret, "message": outcome.message}
    if outcome.rotation_id:
        body["rotation_id"] = outcome.rotation_id
    if outcome.new_version:
        body["new_version"] = outcome.new_version
    return ApiResult(status, {**body, **(extra or {})})


def _guard(handler: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> ApiResult:
        try:
            result: ApiResult = handler(*args, **kwargs)
        except BadRequest as problem:
            return error(problem.status, problem.code, problem.message)
        return result

    wrapped.__doc__ = handler.__doc__
    return wrapped


@_guard
def rotate(
    engine: RotationEngine, name: str, params: Mapping[str, str], body: bytes, caller: str
) -> ApiResult:
    """POST /secrets/{name}/rotate"""
    secret = _name(name)
    vault = _vault(engine, params)
    options = _json_body(body)
    unknown = sorted(set(options) - set(_ROTATE_FIELDS))
    if unknown:
        raise BadRequest(400, "invalid_body", f"unknown field(s): {', '.join(unknown)[:200]}")
    for field, kind in _ROTATE_FIELDS.items():
        if field in options and not isinstance(options[field], kind):
            raise BadRequest(400, "invalid_body", f"{field} must be a {kind.__name__}")
    reason = str(options.get("reason", ""))
    if len(reason) > 500:
        raise BadRequest(400, "invalid_body", "reason is longer than 500 characters")
    if options.get("emergency") and options.get("dry_run"):
        raise BadRequest(400, "invalid_body", "emergency and dry_run exclude each other")
    outcome = engine.rotate(
        vault,
        secret,
        trigger="manual:emergency" if options.get("emergency") else "manual",
        requested_by=caller,
        reason=reason,
        emergency=bool(options.get("emergency")),
        dry_run=bool(options.get("dry_run")),
        override_window=bool(options.get("override_window")),
    )
    record = None
    if outcome.rotation_id:
        record = next(
            (
                as_dict(item)
                for item in engine.ledger.history(vault, secret, 5)
                if item.rotation_id == outcome.rotation_id
            ),
            None,
        )
    return _from_outcome(outcome, {"rotation": record} if record else None)


@_guard
def adopt(
    engine: RotationEngine, name: str, params: Mapping[str, str], body: bytes, caller: str
) -> ApiResult:
    """POST /secrets/{name}/adopt"""
    secret = _name(name)
    vault = _vault(engine, params)
    fields = _json_body(body, allow_empty=False)
    unknown = sorted(set(fields) - set(_ADOPT_FIELDS))
    if unknown:
        raise BadRequest(400, "invalid_body", f"unknown field(s): {', '.join(unknown)[:200]}")
    tags: dict[str, str] = {}
    for field, raw in fields.items():
        value = raw
        if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            value = ("," if field == "slots" else " ").join(raw)
        if not isinstance(value, str) or len(value) > 256:
            raise BadRequest(400, "invalid_body", f"{field} must be a string of at most 256 characters")
        tags[f"rotation-{field.replace('_', '-')}"] = value
    outcome = engine.adopt(vault, secret, tags, requested_by=caller)
    return _from_outcome(outcome)


@_guard
def bind(engine: RotationEngine, name: str, params: Mapping[str, str], body: bytes, caller: str) -> ApiResult:
    """POST /secrets/{name}/bind: pin the secret's current tags as its upstream identity."""
    secret = _name(name)
    vault = _vault(engine, params)
    if _json_body(body):
        raise BadRequest(400, "invalid_body", "bind takes no body: it binds the tags the secret has now")
    return _from_outcome(engine.bind(vault, secret, requested_by=caller))


@_guard
def status(engine: RotationEngine, name: str, params: Mapping[str, str]) -> ApiResult:
    """GET /secrets/{name}/rotation"""
    secret = _name(name)
    vault = _vault(engine, params)
    limit = _query_int(params, "history", 10, 0, MAX_HISTORY)
    try:
        return ApiResult(200, engine.status(vault, secret, limit))
    except ResourceNotFoundError:
        return error(404, "not_found", "no such secret in the vault")


def _page_token(offset: int, snapshot: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset, "snapshot": snapshot}).encode()).decode()


def _continuation(token: str) -> tuple[int, str]:
    invalid = BadRequest(400, "invalid_query", "invalid continuation token")
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise invalid
    try:
        fields = loads_strict(
            base64.urlsafe_b64decode(token.encode("ascii")), max_depth=1, max_bytes=MAX_TOKEN_CHARS
        )
    except (InvalidInput, ValueError):  # binascii.Error and UnicodeEncodeError are ValueErrors
        raise invalid from None
    if not isinstance(fields, dict) or set(fields) - {"offset", "snapshot"}:
        raise invalid
    offset, snapshot = fields.get("offset"), fields.get("snapshot", "")
    # bool is an int to Python: refuse it explicitly
    if type(offset) is not int or not 0 <= offset <= MAX_OFFSET:
        raise invalid
    if not isinstance(snapshot, str) or len(snapshot) > 64:
        raise invalid
    return offset, snapshot


def _query_int(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    if name not in params:
        return default
    try:
        return parse_int(params[name], low=low, high=high, what=name)
    except InvalidInput as problem:
        raise BadRequest(400, "invalid_query", str(problem)) from None


class _Snapshots:
    """The listing a first page was cut from, kept briefly for the pages that follow, so a walk
    through 10,000 secrets reads the ledger (or, when its inventory is stale, lists the vault)
    once, not once per page. A page served by another worker, or after the snapshot expired,
    reads again: still correct, just dearer."""

    LIFETIME_SECONDS = 120.0
    KEPT = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, tuple[float, list[dict[str, Any]], datetime]] = {}

    def rows(
        self, engine: RotationEngine, snapshot: str, *, refresh: bool
    ) -> tuple[str, list[dict[str, Any]], datetime]:
        now = time.monotonic()
        with self._lock:
            self._rows = {k: v for k, v in self._rows.items() if now - v[0] < self.LIFETIME_SECONDS}
            if snapshot in self._rows:
                _, rows, as_of = self._rows[snapshot]
                return snapshot, rows, as_of
        rows, as_of = engine.managed_secrets(refresh=refresh)
        snapshot = uuid.uuid4().hex[:16]
        with self._lock:
            while len(self._rows) >= self.KEPT:
                del self._rows[min(self._rows, key=lambda k: self._rows[k][0])]
            self._rows[snapshot] = (now, rows, as_of)
        return snapshot, rows, as_of


_snapshots = _Snapshots()


@_guard
def list_rotations(engine: RotationEngine, params: Mapping[str, str]) -> ApiResult:
    """GET /rotations"""
    state = params.get("state")
    if state is not None and state not in STATES:
        raise BadRequest(400, "invalid_query", f"state must be one of {', '.join(STATES)}")
    horizon = None
    if "due_within" in params:
        try:
            horizon = utc_now() + parse_duration(params["due_within"])
        except ConfigError as problem:
            raise BadRequest(400, "invalid_query", f"due_within: {problem}") from None
    page_size = _query_int(params, "page_size", 50, 1, MAX_PAGE_SIZE)
    offset, snapshot = _continuation(params["continuation"]) if "continuation" in params else (0, "")
    vault = _vault(engine, params) if "vault" in params else None

    refresh = params.get("refresh", "false").lower()
    if refresh not in ("true", "false"):
        raise BadRequest(400, "invalid_query", "refresh must be true or false")
    snapshot, rows, as_of = _snapshots.rows(engine, snapshot, refresh=refresh == "true")
    if vault:
        rows = [row for row in rows if row["vault"] == vault]
    if state:
        rows = [row for row in rows if row["state"] == state]
    if horizon:
        rows = [
            row for row in rows if row["expires_on"] and datetime.fromisoformat(row["expires_on"]) <= horizon
        ]
    page = rows[offset : offset + page_size]
    body: dict[str, Any] = {"value": page, "count": len(rows), "as_of": as_of.isoformat()}
    if offset + page_size < len(rows):
        body["continuation"] = _page_token(offset + page_size, snapshot)
    return ApiResult(200, body)


@_guard
def set_key_rotation_policy(
    keys: "KeyRotationService", name: str, params: Mapping[str, str], body: bytes, caller: str
) -> ApiResult:
    """PUT /keys/{name}/rotation-policy"""
    from shared.keys import PolicyRequest, policy_as_dict  # noqa: PLC0415 - key routes only

    if not isinstance(name, str) or not SECRET_NAME.match(name):
        raise BadRequest(400, "invalid_name", "invalid key name: 1-127 characters of letters, digits and '-'")
    key = name
    vault = _served_vault(keys.settings, params)
    try:
        request = PolicyRequest.from_fields(_json_body(body, allow_empty=False))
    except ConfigError as problem:
        raise BadRequest(400, "invalid_body", str(problem)) from None
    try:
        policy = keys.set_rotation_policy(vault, key, request, requested_by=caller)
    except ResourceNotFoundError:
        return error(404, "not_found", "no such key in the vault")
    except ConfigError as problem:
        return error(400, "invalid_policy", str(problem))
    except HttpResponseError as problem:
        code = getattr(problem.error, "code", None) or "unknown"
        if problem.status_code == 400:
            return error(400, "invalid_policy", f"Key Vault refused the policy ({code})")
        return error(502, "upstream_error", f"Key Vault answered {problem.status_code} ({code})")
    return ApiResult(200, {"key": key, "vault": vault, "policy": policy_as_dict(policy)})


@_guard
def entra_expiring(engine: RotationEngine, params: Mapping[str, str]) -> ApiResult:
    """GET /entra/expiring: client secrets of the applications the app's identity owns that end
    within `within` (default: the sweep's lead time) and are not a slot of a managed secret."""
    from rotators.entra_app import expiring_unrotated, marker  # noqa: PLC0415 - only for this report
    from shared.errors import RotationError  # noqa: PLC0415

    try:
        within = parse_duration(params["within"]) if "within" in params else engine.settings.sweep_lead_time
    except ConfigError as problem:
        raise BadRequest(400, "invalid_query", f"within: {problem}") from None
    rotated: dict[str, set[str]] = {}
    for state in engine.ledger.states():
        bound = json.loads(state.binding) if state.binding else {}
        app = str(bound.get("rotation-entra-app", "")).lower()
        if bound.get("rotator") == "entra-app" and app:
            slots = str(bound.get("slots", "")).split(",")
            rotated.setdefault(app, set()).update(marker(state.name, slot) for slot in slots)
    try:
        rows = expiring_unrotated(engine.settings, engine.credential, within, rotated)
    except RotationError as problem:
        return error(502, "upstream_error", str(problem))
    return ApiResult(200, {"value": rows, "count": len(rows), "within": str(within)})


def _posture_body(engine: RotationEngine, reading: Any, history: int) -> dict[str, Any]:
    policy = engine.settings.posture_policy
    body: dict[str, Any] = reading.as_dict()
    for check in body["checks"]:
        check["policy"] = policy.get(check["row"], "warn")
    if history:
        body["history"] = [
            {"checked_on": record.checked_on.isoformat(), "changes": json.loads(record.changes or "[]")}
            for record in engine.ledger.posture_history(reading.vault_url, history)
        ]
    return body


@_guard
def vault_posture(engine: RotationEngine, params: Mapping[str, str]) -> ApiResult:
    """GET /posture: each served vault's hardening checklist as last recorded (read now if
    older than ROTATION_POSTURE_INTERVAL, or with refresh=true); one vault, with its history of
    changes (the last 10, or `history`), with ?vault=."""
    refresh = params.get("refresh", "false").lower()
    if refresh not in ("true", "false"):
        raise BadRequest(400, "invalid_query", "refresh must be true or false")
    history = _query_int(params, "history", 10 if "vault" in params else 0, 0, MAX_HISTORY)
    if "vault" in params:
        reading = engine.vault_posture(_vault(engine, params), refresh=refresh == "true")
        return ApiResult(200, _posture_body(engine, reading, history))
    vaults = sorted(engine.settings.allowed_vaults)
    readings = [engine.vault_posture(url, refresh=refresh == "true") for url in vaults]
    return ApiResult(200, {"value": [_posture_body(engine, reading, history) for reading in readings]})


# ----- certificates (shared/certificates.py) -----------------------------------------------------


@_guard
def renew_certificate(
    renewal: "CertificateRenewal", name: str, params: Mapping[str, str], body: bytes, caller: str
) -> ApiResult:
    """POST /certificates/{name}/renew: renew an opted-in certificate from its ACME CA now."""
    certificate = _name(name)
    vault = _served_vault(renewal.rt.settings, params)
    if _json_body(body):
        raise BadRequest(400, "invalid_body", "renew takes no body")
    return _from_outcome(renewal.renew(vault, certificate, trigger="manual", requested_by=caller))


@_guard
def bind_certificate(
    renewal: "CertificateRenewal", name: str, params: Mapping[str, str], body: bytes, caller: str
) -> ApiResult:
    """POST /certificates/{name}/bind: pin the certificate's ACME directory, DNS zone and names."""
    certificate = _name(name)
    vault = _served_vault(renewal.rt.settings, params)
    if _json_body(body):
        raise BadRequest(400, "invalid_body", "bind takes no body: it binds the tags the certificate has now")
    return _from_outcome(renewal.bind(vault, certificate, requested_by=caller))


@_guard
def certificate_status(renewal: "CertificateRenewal", name: str, params: Mapping[str, str]) -> ApiResult:
    """GET /certificates/{name}/renewal"""
    certificate = _name(name)
    vault = _served_vault(renewal.rt.settings, params)
    limit = _query_int(params, "history", 10, 0, MAX_HISTORY)
    try:
        return ApiResult(200, renewal.status(vault, certificate, limit))
    except ResourceNotFoundError:
        return error(404, "not_found", "no such certificate in the vault")


@_guard
def list_certificates(renewal: "CertificateRenewal", params: Mapping[str, str]) -> ApiResult:
    """GET /certificates: opted-in certificates with expiry and renewal state."""
    vault = _served_vault(renewal.rt.settings, params)
    return ApiResult(200, {"value": renewal.listing(vault)})
