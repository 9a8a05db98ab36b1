"""Azure DNS zones on 127.0.0.1: enough of ARM's record sets API for azure-mgmt-dns's TXT records.

One HTTPS server (the stack's CA) for the unmodified ``azure.mgmt.dns.DnsManagementClient``:
``PUT``/``GET``/``DELETE`` of
``/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network/dnsZones/{zone}/TXT/{name}``
(``If-Match``/``If-None-Match`` honoured, real ETags) and ``GET`` of the zone. Like ARM, only
bearer tokens the Key Vault emulator's managed-identity endpoint issued for
``https://management.azure.com`` are accepted (401 with a challenge otherwise), and errors have
ARM's ``{"error": {...}}`` shape. ``devstack/dns_server.py`` answers DNS queries from the records
held here (``txt()``), which is what pebble validates a DNS-01 challenge against.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, urlsplit

from devstack.arm_storage import ARM_AUDIENCES, RESOURCE_GROUP, SUBSCRIPTION_ID
from devstack.served import ServedStandIn
from devstack.tls_server import QuietHandler, TlsHTTPServer

if TYPE_CHECKING:
    from devstack.keyvault import KeyVaultEmulator

log = logging.getLogger("devstack.arm_dns")

_MAX_BODY = 64 * 1024
_MAX_RECORDS = 100
_MAX_TXT_CHARS = 1024
_ZONE_PATH = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)"
    r"/providers/Microsoft\.Network/dnsZones/(?P<zone>[^/]+)"
    r"(?:/(?P<type>[^/]+)/(?P<name>[^/]+))?/?$",
    re.IGNORECASE,
)
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def _valid_name(name: str) -> bool:
    return len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


@dataclass
class _RecordSet:
    ttl: int
    values: list[list[str]]
    metadata: dict[str, str] | None
    etag: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class _Zone:
    subscription: str
    resource_group: str
    name: str
    txt: dict[str, _RecordSet] = field(default_factory=dict)

    @property
    def resource_id(self) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Network/dnszones/{self.name}"
        )

    def fqdn(self, relative: str) -> str:
        return f"{self.name}." if relative == "@" else f"{relative}.{self.name}."


@dataclass
class _Fault:
    status: int
    remaining: int
    method: str | None


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    return status, json.dumps(body).encode(), headers or {}


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    return _json(status, {"error": {"code": code, "message": message}}, headers)


class _Server(TlsHTTPServer):
    def __init__(self, stand_in: ArmDnsStandIn, context: ssl.SSLContext) -> None:
        self.stand_in = stand_in
        super().__init__(_Handler, context)


class _Handler(QuietHandler):
    server_name = "devstack-arm-dns"
    request_log = log

    def _dispatch(self) -> None:
        stand_in = cast(_Server, self.server).stand_in
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            status, body, headers = _error(413, "RequestBodyTooLarge", "The request body is too large.")
            self.close_connection = True
        else:
            raw = self.rfile.read(length) if length > 0 else b""
            try:
                status, body, headers = stand_in._request(
                    self.command, self.path, dict(self.headers.items()), raw
                )
            except Exception:
                log.exception("unexpected error on %s %s", self.command, urlsplit(self.path).path)
                status, body, headers = _error(
                    500, "InternalServerError", "The stand-in failed unexpectedly."
                )
        self.send_response(status)
        if body:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for key, value in {"x-ms-request-id": str(uuid.uuid4()), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(body)


class ArmDnsStandIn(ServedStandIn):
    """DNS zones with TXT record sets behind ARM's record sets API."""

    label = "Azure DNS stand-in"

    def __init__(self, state_dir: Path, emulator: KeyVaultEmulator) -> None:
        super().__init__(state_dir)
        self.emulator = emulator
        self.request_counts: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._zones: dict[str, _Zone] = {}
        self._faults: list[_Fault] = []

    # ----- lifecycle -------------------------------------------------------------------------

    def _serve(self, context: ssl.SSLContext) -> TlsHTTPServer:
        return _Server(self, context)

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # ----- zones and test helpers ------------------------------------------------------------

    def add_zone(
        self, name: str, *, subscription: str = SUBSCRIPTION_ID, resource_group: str = RESOURCE_GROUP
    ) -> str:
        """A new, empty zone; returns its resource id (what a ``rotation-dns-zone`` tag names)."""
        name = name.lower().rstrip(".")
        if not _valid_name(name) or "." not in name:
            raise ValueError(f"not a DNS zone name: {name!r}")
        with self._lock:
            if name in self._zones:
                raise ValueError(f"DNS zone {name} exists")
            zone = self._zones[name] = _Zone(subscription, resource_group, name)
        return zone.resource_id

    def txt(self, fqdn: str) -> list[list[str]] | None:
        """The TXT records at a name (each a list of strings), or None when no zone holds the name."""
        name = fqdn.lower().rstrip(".")
        with self._lock:
            for zone in self._zones.values():
                if name == zone.name or name.endswith(f".{zone.name}"):
                    relative = "@" if name == zone.name else name[: -len(zone.name) - 1]
                    record_set = zone.txt.get(relative)
                    return [list(v) for v in record_set.values] if record_set else []
        return None

    def record_sets(self) -> dict[str, list[list[str]]]:
        """Every TXT record set of every zone, by FQDN."""
        with self._lock:
            return {
                z.fqdn(r): [list(v) for v in s.values] for z in self._zones.values() for r, s in z.txt.items()
            }

    def inject_fault(self, status: int, times: int = 1, *, method: str | None = None) -> None:
        """Answer the next ``times`` record set requests (of ``method``) with ``status``, no effect."""
        with self._lock:
            self._faults.append(_Fault(status, times, method.upper() if method else None))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # ----- requests --------------------------------------------------------------------------

    def _authenticate(self, authorization: str | None) -> tuple[int, bytes, dict[str, str]] | None:
        token = (
            authorization[7:].strip() if authorization and authorization.lower().startswith("bearer ") else ""
        )
        issued = self.emulator.token_info(token) if token else None
        if issued is not None and issued[1] > time.time() and issued[0] in ARM_AUDIENCES:
            return None
        challenge = (
            f'Bearer authorization_uri="https://login.windows.net/{self.emulator.tenant_id}", '
            'error="invalid_token", error_description="The access token is missing, invalid or expired."'
        )
        return _error(
            401,
            "AuthenticationFailed" if not token else "InvalidAuthenticationToken",
            "The access token is missing, invalid, expired or for another audience.",
            {"WWW-Authenticate": challenge},
        )

    def _request(
        self, method: str, target: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, bytes, dict[str, str]]:
        url = urlsplit(target)
        match = _ZONE_PATH.match(url.path)
        if match is None:
            return _error(404, "NotFound", f"No route for {method} {url.path[:200]}.")
        refused = self._authenticate(
            next((v for k, v in headers.items() if k.lower() == "authorization"), None)
        )
        if refused is not None:
            self.request_counts["unauthenticated"] += 1
            return refused
        if not dict(parse_qsl(url.query)).get("api-version"):
            return _error(400, "MissingApiVersionParameter", "The api-version query parameter is required.")
        lowered = {k.lower(): v for k, v in headers.items()}
        with self._lock:
            zone = self._zones.get(match.group("zone").lower())
            if (
                zone is None
                or zone.subscription.lower() != match.group("sub").lower()
                or zone.resource_group.lower() != match.group("rg").lower()
            ):
                return _error(
                    404,
                    "ParentResourceNotFound",
                    f"Can not perform requested operation on nested resource. Parent resource "
                    f"'{match.group('zone')[:64]}' not found.",
                )
            if match.group("type") is None:
                if method != "GET":
                    return _error(405, "MethodNotAllowed", f"{method} is not supported on a zone here.")
                self.request_counts["getZone"] += 1
                return _json(200, self._zone_body(zone))
            if match.group("type").upper() != "TXT":
                return _error(400, "BadRequest", "The DNS stand-in holds TXT record sets only.")
            relative = match.group("name").lower()
            if relative != "@" and not _valid_name(relative):
                return _error(400, "BadRequest", f"The record set name {relative[:80]!r} is invalid.")
            fault = next((f for f in self._faults if f.remaining > 0 and f.method in (None, method)), None)
            if fault is not None:
                fault.remaining -= 1
                self.request_counts["fault"] += 1
                return _error(fault.status, "InjectedFault", "An injected fault.")
            existing = zone.txt.get(relative)
            precondition = self._precondition(existing, lowered)
            if precondition is not None:
                return precondition
            if method == "GET":
                self.request_counts["getRecordSet"] += 1
                if existing is None:
                    return _error(404, "NotFound", f"The resource record '{relative[:80]}' does not exist.")
                return _json(200, self._record_body(zone, relative, existing))
            if method == "DELETE":
                self.request_counts["deleteRecordSet"] += 1
                if existing is None:
                    return 204, b"", {}
                del zone.txt[relative]
                return 200, b"", {}
            if method == "PUT":
                self.request_counts["putRecordSet"] += 1
                parsed = self._parse_record_set(raw)
                if isinstance(parsed, tuple):
                    return parsed
                zone.txt[relative] = parsed
                return _json(201 if existing is None else 200, self._record_body(zone, relative, parsed))
            return _error(405, "MethodNotAllowed", f"{method} is not supported on a record set.")

    @staticmethod
    def _precondition(
        existing: _RecordSet | None, headers: dict[str, str]
    ) -> tuple[int, bytes, dict[str, str]] | None:
        if_match, if_none_match = headers.get("if-match"), headers.get("if-none-match")
        failed = (if_match is not None and (existing is None or if_match not in ("*", existing.etag))) or (
            if_none_match is not None and existing is not None and if_none_match in ("*", existing.etag)
        )
        if failed:
            return _error(412, "PreconditionFailed", "The condition specified using ETag is not satisfied.")
        return None

    @staticmethod
    def _parse_record_set(raw: bytes) -> _RecordSet | tuple[int, bytes, dict[str, str]]:
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return _error(400, "InvalidRequestContent", "The request content is not valid JSON.")
        properties = body.get("properties") if isinstance(body, dict) else None
        if not isinstance(properties, dict):
            return _error(400, "BadRequest", "The record set needs a properties object.")
        ttl = properties.get("TTL", 3600)
        if type(ttl) is not int or not 0 <= ttl <= 2147483647:
            return _error(400, "BadRequest", "TTL must be an integer from 0 to 2147483647.")
        records = properties.get("TXTRecords") or []
        values = []
        if not isinstance(records, list) or len(records) > _MAX_RECORDS:
            return _error(400, "BadRequest", f"TXTRecords must be a list of at most {_MAX_RECORDS} records.")
        for record in records:
            value = record.get("value") if isinstance(record, dict) else None
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, str) and len(v) <= _MAX_TXT_CHARS and v.isascii() for v in value)
            ):
                return _error(400, "BadRequest", "Each TXT record's value must be a list of ASCII strings.")
            values.append(list(value))
        metadata = properties.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
        ):
            return _error(400, "BadRequest", "metadata must be a map of strings.")
        return _RecordSet(ttl, values, metadata)

    @staticmethod
    def _zone_body(zone: _Zone) -> dict[str, Any]:
        return {
            "id": zone.resource_id,
            "name": zone.name,
            "type": "Microsoft.Network/dnszones",
            "location": "global",
            "etag": "00000000-0000-0000-0000-000000000000",
            "properties": {"numberOfRecordSets": len(zone.txt), "zoneType": "Public"},
        }

    @staticmethod
    def _record_body(zone: _Zone, relative: str, record_set: _RecordSet) -> dict[str, Any]:
        properties: dict[str, Any] = {
            "TTL": record_set.ttl,
            "fqdn": zone.fqdn(relative),
            "provisioningState": "Succeeded",
            "TXTRecords": [{"value": list(v)} for v in record_set.values],
        }
        if record_set.metadata is not None:
            properties["metadata"] = record_set.metadata
        return {
            "id": f"{zone.resource_id}/TXT/{relative}",
            "name": relative,
            "type": "Microsoft.Network/dnszones/TXT",
            "etag": record_set.etag,
            "properties": properties,
        }
