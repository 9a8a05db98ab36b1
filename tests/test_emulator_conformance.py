"""The emulator's raw responses have the shape Key Vault's REST API specification gives them.

The shapes below are transcribed from the data-plane definitions of Azure/azure-rest-api-specs,
specification/keyvault/data-plane/Microsoft.KeyVault/stable/7.6/secrets.json and keys.json (the
api-version the app pins), not copied examples: each definition lists every property the spec
allows with its type, so a response carrying a field the spec does not know, a field of the wrong
type, or a misspelt one fails. ``PRESENT`` adds what the spec's examples show in every real
answer of an operation (an id, the attributes Key Vault always sets), so a missing field fails too.

Each operation the emulator implements is sent raw (the SDK would tolerate extra or missing
fields) and its answer checked against its response definition.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devstack.keyvault import KeyVaultEmulator
from tests.test_keyvault_emulator import https_request

Shape = Any  # a type name, an enum (tuple), ("array", Shape), ("map", Shape) or a definition name

_RECOVERY_LEVELS = (
    "Purgeable",
    "Recoverable+Purgeable",
    "Recoverable",
    "Recoverable+ProtectedSubscription",
    "CustomizedRecoverable+Purgeable",
    "CustomizedRecoverable",
    "CustomizedRecoverable+ProtectedSubscription",
)
_SECRET_ATTRIBUTES: dict[str, Shape] = {
    "enabled": "boolean",
    "nbf": "unixtime",
    "exp": "unixtime",
    "created": "unixtime",
    "updated": "unixtime",
    "recoverableDays": "int32",
    "recoveryLevel": _RECOVERY_LEVELS,
}
_SECRET_ITEM: dict[str, Shape] = {
    "id": "string",
    "attributes": "SecretAttributes",
    "tags": ("map", "string"),
    "contentType": "string",
    "managed": "boolean",
}
_DELETED: dict[str, Shape] = {
    "recoveryId": "string",
    "scheduledPurgeDate": "unixtime",
    "deletedDate": "unixtime",
}
_KEY_ITEM: dict[str, Shape] = {
    "kid": "string",
    "attributes": "KeyAttributes",
    "tags": ("map", "string"),
    "managed": "boolean",
}
_KEY_BUNDLE: dict[str, Shape] = {
    "key": "JsonWebKey",
    "attributes": "KeyAttributes",
    "tags": ("map", "string"),
    "managed": "boolean",
    "release_policy": "KeyReleasePolicy",
}
_B64 = "base64url"

DEFINITIONS: dict[str, dict[str, Shape]] = {
    "Error": {"code": "string", "message": "string", "innererror": "Error"},
    "KeyVaultError": {"error": "Error"},
    # secrets.json
    "SecretAttributes": _SECRET_ATTRIBUTES,
    "SecretBundle": {
        "value": "string",
        "id": "string",
        "contentType": "string",
        "attributes": "SecretAttributes",
        "tags": ("map", "string"),
        "kid": "string",
        "managed": "boolean",
    },
    "DeletedSecretBundle": {
        "value": "string",
        "id": "string",
        "contentType": "string",
        "attributes": "SecretAttributes",
        "tags": ("map", "string"),
        "kid": "string",
        "managed": "boolean",
        **_DELETED,
    },
    "SecretItem": _SECRET_ITEM,
    "DeletedSecretItem": {**_SECRET_ITEM, **_DELETED},
    "SecretListResult": {"value": ("array", "SecretItem"), "nextLink": "nextLink"},
    "DeletedSecretListResult": {"value": ("array", "DeletedSecretItem"), "nextLink": "nextLink"},
    "BackupSecretResult": {"value": _B64},
    # keys.json
    "KeyAttributes": {
        **_SECRET_ATTRIBUTES,
        "exportable": "boolean",
        "hsmPlatform": "string",
        "attestation": "KeyAttestation",
    },
    "KeyAttestation": {
        "certificatePemFile": _B64,
        "privateKeyAttestation": _B64,
        "publicKeyAttestation": _B64,
        "version": "string",
    },
    "JsonWebKey": {
        "kid": "string",
        "kty": ("EC", "EC-HSM", "RSA", "RSA-HSM", "oct", "oct-HSM"),
        "key_ops": ("array", "string"),
        **{part: _B64 for part in ("n", "e", "d", "dp", "dq", "qi", "p", "q", "k", "key_hsm", "x", "y")},
        "crv": ("P-256", "P-384", "P-521", "P-256K"),
    },
    "KeyReleasePolicy": {"contentType": "string", "immutable": "boolean", "data": _B64},
    "KeyBundle": _KEY_BUNDLE,
    "DeletedKeyBundle": {**_KEY_BUNDLE, **_DELETED},
    "KeyItem": _KEY_ITEM,
    "DeletedKeyItem": {**_KEY_ITEM, **_DELETED},
    "KeyListResult": {"value": ("array", "KeyItem"), "nextLink": "nextLink"},
    "DeletedKeyListResult": {"value": ("array", "DeletedKeyItem"), "nextLink": "nextLink"},
    "KeyOperationResult": {"kid": "string", "value": _B64, "iv": _B64, "tag": _B64, "aad": _B64},
    "KeyRotationPolicy": {
        "id": "string",
        "lifetimeActions": ("array", "LifetimeActions"),
        "attributes": "KeyRotationPolicyAttributes",
    },
    "KeyRotationPolicyAttributes": {"expiryTime": "string", "created": "unixtime", "updated": "unixtime"},
    "LifetimeActions": {"trigger": "LifetimeActionsTrigger", "action": "LifetimeActionsType"},
    "LifetimeActionsTrigger": {"timeAfterCreate": "string", "timeBeforeExpiry": "string"},
    "LifetimeActionsType": {"type": ("Rotate", "Notify")},
}

# What every real answer of a definition carries (from the spec's examples), by dotted path.
PRESENT: dict[str, tuple[str, ...]] = {
    "SecretBundle": (
        "id",
        "attributes.enabled",
        "attributes.created",
        "attributes.updated",
        "attributes.recoveryLevel",
    ),
    "SecretItem": ("id", "attributes.enabled", "attributes.created", "attributes.updated"),
    "KeyBundle": ("key.kid", "key.kty", "key.key_ops", "attributes.enabled", "attributes.created"),
    "KeyItem": ("kid", "attributes.enabled", "attributes.created", "attributes.updated"),
    "KeyRotationPolicy": ("id", "lifetimeActions", "attributes"),
    "KeyOperationResult": ("kid", "value"),
    "BackupSecretResult": ("value",),
    "KeyVaultError": ("error.code", "error.message"),
}
for _deleted, _live in (
    ("DeletedSecretBundle", "SecretBundle"),
    ("DeletedSecretItem", "SecretItem"),
    ("DeletedKeyBundle", "KeyBundle"),
    ("DeletedKeyItem", "KeyItem"),
):
    PRESENT[_deleted] = (*PRESENT[_live], "recoveryId", "deletedDate", "scheduledPurgeDate")

_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")


def violations(value: Any, shape: Shape, where: str = "$") -> list[str]:
    """Every way ``value`` departs from ``shape`` (empty when it conforms)."""
    if isinstance(shape, tuple) and shape and shape[0] in ("array", "map"):
        kind, inner = shape
        if kind == "array":
            if not isinstance(value, list):
                return [f"{where}: expected an array, got {type(value).__name__}"]
            return [v for i, item in enumerate(value) for v in violations(item, inner, f"{where}[{i}]")]
        if not isinstance(value, dict):
            return [f"{where}: expected a map, got {type(value).__name__}"]
        return [v for k, item in value.items() for v in violations(item, inner, f"{where}.{k}")]
    if isinstance(shape, tuple):
        return [] if value in shape else [f"{where}: {value!r} is not one of {shape}"]
    if shape in DEFINITIONS:
        if not isinstance(value, dict):
            return [f"{where}: expected a {shape} object, got {type(value).__name__}"]
        found = [f"{where}.{k}: not a property of {shape}" for k in value if k not in DEFINITIONS[shape]]
        for key, item in value.items():
            if key in DEFINITIONS[shape]:
                found += violations(item, DEFINITIONS[shape][key], f"{where}.{key}")
        for path in PRESENT.get(shape, ()):
            node: Any = value
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                found.append(f"{where}.{path}: missing (every real {shape} has it)")
        return found
    checks = {
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "unixtime": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "int32": lambda v: isinstance(v, int) and not isinstance(v, bool) and -(2**31) <= v < 2**31,
        "base64url": lambda v: isinstance(v, str) and _B64URL.match(v) is not None,
        # Key Vault answers the last page with "nextLink": null.
        "nextLink": lambda v: v is None or isinstance(v, str),
    }
    if shape not in checks:
        raise AssertionError(f"unknown shape {shape!r} at {where}")
    return [] if checks[shape](value) else [f"{where}: {value!r} is not a {shape}"]


# ----- the schema check itself can fail ----------------------------------------------------------


def test_the_shape_check_catches_renamed_missing_and_mistyped_fields() -> None:
    good: dict[str, Any] = {
        "id": "https://v/secrets/a/1",
        "attributes": {"enabled": True, "created": 1, "updated": 1, "recoveryLevel": "Recoverable+Purgeable"},
    }
    assert violations(good, "SecretBundle") == []
    renamed = {**good, "contenttype": "text/plain"}
    mistyped = {**good, "attributes": {**good["attributes"], "created": "2024-01-01"}}
    missing = {"id": good["id"]}
    bad_level = {**good, "attributes": {**good["attributes"], "recoveryLevel": "Soft"}}
    for bad in (renamed, mistyped, missing, bad_level):
        assert violations(bad, "SecretBundle"), bad


# ----- the emulator against the spec -------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyVaultEmulator]:
    with KeyVaultEmulator(tmp_path_factory.mktemp("keyvault-conformance")) as kv:
        yield kv


class Vault:
    def __init__(self, emulator: KeyVaultEmulator) -> None:
        self.emulator = emulator
        self.token, _ = emulator.issue_token("https://vault.azure.net")

    def send(self, method: str, path: str, body: Any = None, *, query: str = "") -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        status, _, answer = https_request(
            self.emulator, method, f"{path}?api-version=7.6{query}", body, headers
        )
        return status, answer


def check(answer: tuple[int, Any], status: int, definition: str | None) -> Any:
    got_status, body = answer
    assert got_status == status, body
    if definition is None:
        assert body is None
    else:
        assert violations(body, definition) == [], definition
    return body


def test_secrets_operations_answer_the_specified_shapes(emulator: KeyVaultEmulator) -> None:
    vault = Vault(emulator)
    name = f"conf-{uuid.uuid4().hex[:8]}"
    body = {"value": "v1", "contentType": "text/plain", "tags": {"a": "b"}, "attributes": {"exp": 2000000000}}
    first = check(vault.send("PUT", f"/secrets/{name}", body), 200, "SecretBundle")
    version = first["id"].rsplit("/", 1)[1]
    check(vault.send("PUT", f"/secrets/{name}", {"value": "v2"}), 200, "SecretBundle")
    check(vault.send("GET", f"/secrets/{name}/{version}"), 200, "SecretBundle")
    check(vault.send("GET", f"/secrets/{name}/"), 200, "SecretBundle")
    check(vault.send("PATCH", f"/secrets/{name}/{version}", {"tags": {"c": "d"}}), 200, "SecretBundle")
    check(vault.send("GET", "/secrets", query="&maxresults=1"), 200, "SecretListResult")
    check(vault.send("GET", f"/secrets/{name}/versions"), 200, "SecretListResult")
    backup = check(vault.send("POST", f"/secrets/{name}/backup"), 200, "BackupSecretResult")
    check(vault.send("DELETE", f"/secrets/{name}"), 200, "DeletedSecretBundle")
    check(vault.send("GET", f"/deletedsecrets/{name}"), 200, "DeletedSecretBundle")
    check(vault.send("GET", "/deletedsecrets"), 200, "DeletedSecretListResult")
    check(vault.send("POST", f"/deletedsecrets/{name}/recover"), 200, "SecretBundle")
    check(vault.send("DELETE", f"/secrets/{name}"), 200, "DeletedSecretBundle")
    check(vault.send("DELETE", f"/deletedsecrets/{name}"), 204, None)
    check(vault.send("POST", "/secrets/restore", {"value": backup["value"]}), 200, "SecretBundle")
    check(vault.send("GET", f"/secrets/{name}/{'0' * 32}"), 404, "KeyVaultError")
    check(vault.send("PUT", "/secrets/bad_name", {"value": "v"}), 400, "KeyVaultError")


def test_keys_operations_answer_the_specified_shapes(emulator: KeyVaultEmulator) -> None:
    vault = Vault(emulator)
    name = f"conf-{uuid.uuid4().hex[:8]}"
    created = check(
        vault.send("POST", f"/keys/{name}/create", {"kty": "RSA", "tags": {"a": "b"}}), 200, "KeyBundle"
    )
    version = created["key"]["kid"].rsplit("/", 1)[1]
    check(vault.send("POST", f"/keys/{name}-ec/create", {"kty": "EC", "crv": "P-256"}), 200, "KeyBundle")
    check(vault.send("GET", f"/keys/{name}/{version}"), 200, "KeyBundle")
    check(vault.send("GET", f"/keys/{name}/"), 200, "KeyBundle")
    check(vault.send("PATCH", f"/keys/{name}/{version}", {"tags": {"c": "d"}}), 200, "KeyBundle")
    check(vault.send("PATCH", f"/keys/{name}/", {"attributes": {"enabled": True}}), 200, "KeyBundle")
    check(vault.send("GET", "/keys", query="&maxresults=1"), 200, "KeyListResult")
    check(vault.send("GET", f"/keys/{name}/versions"), 200, "KeyListResult")
    check(vault.send("GET", f"/keys/{name}/rotationpolicy"), 200, "KeyRotationPolicy")
    policy = {
        "lifetimeActions": [{"trigger": {"timeAfterCreate": "P90D"}, "action": {"type": "Rotate"}}],
        "attributes": {"expiryTime": "P1Y"},
    }
    check(vault.send("PUT", f"/keys/{name}/rotationpolicy", policy), 200, "KeyRotationPolicy")
    check(vault.send("POST", f"/keys/{name}/rotate"), 200, "KeyBundle")
    plain = base64.urlsafe_b64encode(b"conformance").rstrip(b"=").decode()
    sealed = check(
        vault.send("POST", f"/keys/{name}/{version}/encrypt", {"alg": "RSA-OAEP-256", "value": plain}),
        200,
        "KeyOperationResult",
    )
    check(
        vault.send(
            "POST", f"/keys/{name}/{version}/decrypt", {"alg": "RSA-OAEP-256", "value": sealed["value"]}
        ),
        200,
        "KeyOperationResult",
    )
    check(vault.send("DELETE", f"/keys/{name}"), 200, "DeletedKeyBundle")
    check(vault.send("GET", f"/deletedkeys/{name}"), 200, "DeletedKeyBundle")
    check(vault.send("GET", "/deletedkeys"), 200, "DeletedKeyListResult")
    check(vault.send("POST", f"/deletedkeys/{name}/recover"), 200, "KeyBundle")
    check(vault.send("DELETE", f"/keys/{name}"), 200, "DeletedKeyBundle")
    check(vault.send("DELETE", f"/deletedkeys/{name}"), 204, None)
    check(vault.send("GET", f"/keys/{name}"), 404, "KeyVaultError")
    check(vault.send("POST", f"/keys/{name}/create", {"kty": "oct"}), 400, "KeyVaultError")
