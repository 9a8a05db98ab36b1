"""The keys half of the Key Vault emulator: store, REST handlers, rotation policies.

Just enough of the Key Vault keys API for the unmodified ``azure.keyvault.keys.KeyClient`` and
``azure.keyvault.keys.crypto.CryptographyClient``: create (RSA, RSA-HSM, EC, EC-HSM), get by
version, list, list versions, update properties, rotate, get/update the rotation policy,
delete/list deleted/get deleted/recover/purge, and encrypt/decrypt with RSA-OAEP, RSA-OAEP-256
and RSA1_5. Responses carry only the public half of
a key. Every handler runs under the emulator's lock (see ``KeyVaultEmulator._route``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from .server import (
    RECOVERABLE_DAYS,
    RECOVERY_LEVEL,
    EmulatorClock,
    VaultError,
    _bad,
    _optional_int,
    _unix,
    _validate_tags,
)

KEY_NEAR_EXPIRY = "Microsoft.KeyVault.KeyNearExpiry"
KEY_EXPIRED = "Microsoft.KeyVault.KeyExpired"
DEFAULT_NOTIFY_BEFORE_EXPIRY = "P30D"
MIN_EXPIRY = dt.timedelta(days=28)
MIN_TRIGGER = dt.timedelta(days=7)

RSA_SIZES = (2048, 3072, 4096)
RSA_OPS = ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
EC_OPS = ["sign", "verify"]
KNOWN_OPS = frozenset(RSA_OPS) | {"import", "export"}
_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
    "P-256K": ec.SECP256K1,
}
_ISO_DURATION = re.compile(
    r"^P(?:(?P<years>\d+)Y)?(?:(?P<months>\d+)M)?(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+)S)?)?$"
)

Page = Callable[[list[dict[str, Any]], list[str], dict[str, str], str], dict[str, Any]]


def iso_duration(text: Any, what: str) -> dt.timedelta:
    """An ISO 8601 duration as Key Vault takes it (years count 365 days, months 30)."""
    match = _ISO_DURATION.match(text.strip().upper()) if isinstance(text, str) else None
    if match is None or text.strip().upper() in ("P", "PT") or text.strip().upper().endswith("T"):
        raise _bad(f"{what} must be an ISO 8601 duration such as P90D or P1Y, not {str(text)[:40]!r}.")
    parts = {key: int(value) for key, value in match.groupdict().items() if value}
    days = parts.pop("years", 0) * 365 + parts.pop("months", 0) * 30 + parts.pop("days", 0)
    try:
        return dt.timedelta(days=days, **parts)
    except OverflowError:
        raise _bad(f"{what} is out of range.") from None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise _bad(f"{what} must be a base64url string.")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise _bad(f"{what} is not valid base64url.") from None


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")


def _key_not_found(name: str) -> VaultError:
    return VaultError(
        404,
        "KeyNotFound",
        f"A key with (name/id) {name} was not found in this key vault. If you recently deleted "
        "this key you may be able to recover it using the correct recovery command.",
    )


def _deleted_key_not_found(name: str) -> VaultError:
    return VaultError(404, "KeyNotFound", f"Deleted Key not found: {name}")


def _forbidden(message: str) -> VaultError:
    return VaultError(403, "Forbidden", message)


@dataclass
class _KeyVersion:
    version: str
    kty: str
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    key_ops: list[str]
    tags: dict[str, str] | None
    enabled: bool
    nbf: int | None
    exp: int | None
    created: int
    updated: int

    @property
    def size(self) -> int:
        return self.private.key_size

    def jwk(self) -> dict[str, Any]:
        """The public JSON Web Key, as Key Vault returns it (never the private part)."""
        jwk: dict[str, Any] = {"kty": self.kty, "key_ops": list(self.key_ops)}
        if isinstance(self.private, rsa.RSAPrivateKey):
            numbers = self.private.public_key().public_numbers()
            jwk.update(n=_b64(_int_bytes(numbers.n)), e=_b64(_int_bytes(numbers.e)))
        else:
            point = self.private.public_key().public_numbers()
            width = (self.private.curve.key_size + 7) // 8
            curve = next(name for name, kind in _CURVES.items() if isinstance(self.private.curve, kind))
            jwk.update(
                crv=curve, x=_b64(point.x.to_bytes(width, "big")), y=_b64(point.y.to_bytes(width, "big"))
            )
        return jwk


@dataclass
class _Policy:
    lifetime_actions: list[dict[str, Any]]
    expiry_time: str | None
    created: int
    updated: int


@dataclass
class _Key:
    name: str
    versions: list[_KeyVersion] = field(default_factory=list)
    policy: _Policy | None = None
    deleted_date: int | None = None
    scheduled_purge_date: int | None = None

    @property
    def latest(self) -> _KeyVersion:
        return self.versions[-1]

    def find(self, version: str) -> _KeyVersion | None:
        return next((v for v in self.versions if v.version == version.lower()), None)

    def notify_before_expiry(self) -> dt.timedelta:
        """When KeyNearExpiry fires: the policy's Notify action, by default 30 days before expiry."""
        for action in self.policy.lifetime_actions if self.policy else []:
            if action["action"]["type"].lower() == "notify" and "timeBeforeExpiry" in action["trigger"]:
                return iso_duration(action["trigger"]["timeBeforeExpiry"], "timeBeforeExpiry")
        return iso_duration(DEFAULT_NOTIFY_BEFORE_EXPIRY, "timeBeforeExpiry")


class KeyStore:
    """In-memory keys of one vault; the emulator routes ``/keys/...`` requests here."""

    def __init__(self, clock: EmulatorClock, vault_url: Callable[[], str], page: Page) -> None:
        self._clock = clock
        self._vault_url = vault_url
        self._page = page
        self.keys: dict[str, _Key] = {}
        self.deleted: dict[str, _Key] = {}

    # ----- routing -------------------------------------------------------------------------------

    def handle(
        self,
        method: str,
        template: str,
        *,
        segments: list[str],
        query: dict[str, str],
        body: Any,
        path: str,
    ) -> tuple[int, Any]:
        name = segments[1] if len(segments) > 1 else ""
        version = segments[2] if len(segments) > 2 else ""
        handlers: dict[str, dict[str, Callable[[], tuple[int, Any]]]] = {
            "/keys": {"GET": lambda: self._list_keys(query)},
            "/keys/{name}": {
                "GET": lambda: self._get(name, ""),
                # The SDK's update_key_properties(name) sends PATCH /keys/{name}/: the latest version.
                "PATCH": lambda: self._update(name, "", body),
                "DELETE": lambda: self._delete(name),
            },
            "/keys/{name}/create": {"POST": lambda: self._create(name, body)},
            "/keys/{name}/rotate": {"POST": lambda: self._rotate(name)},
            "/keys/{name}/rotationpolicy": {
                "GET": lambda: self._get_policy(name),
                "PUT": lambda: self._put_policy(name, body),
            },
            "/keys/{name}/versions": {"GET": lambda: self._list_versions(name, query)},
            "/keys/{name}/{version}": {
                "GET": lambda: self._get(name, version),
                "PATCH": lambda: self._update(name, version, body),
            },
            "/keys/{name}/{version}/encrypt": {"POST": lambda: self._crypt("encrypt", name, version, body)},
            "/keys/{name}/{version}/decrypt": {"POST": lambda: self._crypt("decrypt", name, version, body)},
            "/deletedkeys": {"GET": lambda: self._list_deleted(query)},
            "/deletedkeys/{name}": {
                "GET": lambda: self._get_deleted(name),
                "DELETE": lambda: self._purge(name),
            },
            "/deletedkeys/{name}/recover": {"POST": lambda: self._recover(name)},
        }
        by_method = handlers.get(template)
        if by_method is None:
            raise VaultError(404, "NotFound", f"The requested resource {path} was not found.")
        handler = by_method.get(method)
        if handler is None:
            raise VaultError(
                405, "MethodNotAllowed", f"The requested method {method} is not allowed on {path}."
            )
        return handler()

    # ----- JSON shapes -------------------------------------------------------------------------

    def _kid(self, key: _Key, version: _KeyVersion | None = None) -> str:
        return f"{self._vault_url()}/keys/{key.name}" + (f"/{version.version}" if version else "")

    @staticmethod
    def _attributes(v: _KeyVersion) -> dict[str, Any]:
        attributes: dict[str, Any] = {"enabled": v.enabled}
        if v.nbf is not None:
            attributes["nbf"] = v.nbf
        if v.exp is not None:
            attributes["exp"] = v.exp
        attributes.update(
            created=v.created,
            updated=v.updated,
            recoveryLevel=RECOVERY_LEVEL,
            recoverableDays=RECOVERABLE_DAYS,
            exportable=False,
        )
        return attributes

    def _bundle(self, key: _Key, v: _KeyVersion) -> dict[str, Any]:
        bundle: dict[str, Any] = {
            "key": {"kid": self._kid(key, v), **v.jwk()},
            "attributes": self._attributes(v),
        }
        if v.tags is not None:
            bundle["tags"] = v.tags
        return bundle

    def _item(self, key: _Key, v: _KeyVersion, *, versioned: bool) -> dict[str, Any]:
        item: dict[str, Any] = {
            "kid": self._kid(key, v if versioned else None),
            "attributes": self._attributes(v),
        }
        if v.tags is not None:
            item["tags"] = v.tags
        return item

    def _deleted_fields(self, key: _Key) -> dict[str, Any]:
        return {
            "recoveryId": f"{self._vault_url()}/deletedkeys/{key.name}",
            "deletedDate": key.deleted_date,
            "scheduledPurgeDate": key.scheduled_purge_date,
        }

    def _policy_body(self, key: _Key) -> dict[str, Any]:
        policy_id = f"{self._kid(key)}/rotationpolicy"
        if key.policy is None:
            # Key Vault answers a key without a policy with its default: notify 30 days before expiry.
            return {
                "id": policy_id,
                "lifetimeActions": [
                    {
                        "trigger": {"timeBeforeExpiry": DEFAULT_NOTIFY_BEFORE_EXPIRY},
                        "action": {"type": "Notify"},
                    }
                ],
                "attributes": {},
            }
        attributes: dict[str, Any] = {"created": key.policy.created, "updated": key.policy.updated}
        if key.policy.expiry_time is not None:
            attributes = {"expiryTime": key.policy.expiry_time, **attributes}
        return {"id": policy_id, "lifetimeActions": key.policy.lifetime_actions, "attributes": attributes}

    # ----- lookups -----------------------------------------------------------------------------

    def _live(self, name: str) -> _Key:
        key = self.keys.get(name.lower())
        if key is None:
            raise _key_not_found(name)
        return key

    def _version(self, name: str, version: str) -> tuple[_Key, _KeyVersion]:
        key = self._live(name)
        found = key.find(version) if version else key.latest
        if found is None:
            raise _key_not_found(name)
        return key, found

    # ----- operations --------------------------------------------------------------------------

    def _generate(
        self, kty: str, size: int | None, curve: str | None
    ) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
        if kty in ("RSA", "RSA-HSM"):
            return rsa.generate_private_key(public_exponent=65537, key_size=size or 2048)
        return ec.generate_private_key(_CURVES[curve or "P-256"]())

    def _create(self, name: str, body: Any) -> tuple[int, Any]:
        if name.lower() in self.deleted:
            raise VaultError(
                409,
                "Conflict",
                f"Key {name} is currently in a deleted but recoverable state, and its name cannot be "
                "reused; in this state, the key can only be recovered or purged.",
                inner_code="ObjectIsDeletedButRecoverable",
            )
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.")
        kty = body.get("kty")
        if kty not in ("RSA", "RSA-HSM", "EC", "EC-HSM"):
            raise _bad(f"Unsupported key type {str(kty)[:20]!r}: use RSA, RSA-HSM, EC or EC-HSM.")
        rsa_key = kty in ("RSA", "RSA-HSM")
        size = body.get("key_size")
        if size is not None and (not rsa_key or size not in RSA_SIZES):
            raise _bad(f"key_size must be one of {RSA_SIZES} for an RSA key.")
        curve = body.get("crv")
        if curve is not None and (rsa_key or curve not in _CURVES):
            raise _bad(f"crv must be one of {', '.join(_CURVES)} for an EC key.")
        exponent = body.get("public_exponent")
        if exponent is not None and exponent != 65537:
            raise _bad("public_exponent must be 65537.")
        key_ops = self._key_ops(body["key_ops"]) if body.get("key_ops") is not None else None
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise _bad("attributes must be an object.")
        enabled = attributes.get("enabled", True)
        if not isinstance(enabled, bool):
            raise _bad("attributes.enabled must be a boolean.")
        now = _unix(self._clock.now())
        version = _KeyVersion(
            version=uuid.uuid4().hex,
            kty=kty,
            private=self._generate(kty, size, curve),
            key_ops=key_ops if key_ops is not None else list(RSA_OPS if rsa_key else EC_OPS),
            tags=_validate_tags(body.get("tags")),
            enabled=enabled,
            nbf=_optional_int(attributes, "nbf"),
            exp=_optional_int(attributes, "exp"),
            created=now,
            updated=now,
        )
        key = self.keys.setdefault(name.lower(), _Key(name))
        key.versions.append(version)
        return 200, self._bundle(key, version)

    @staticmethod
    def _key_ops(value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(op, str) and op in KNOWN_OPS for op in value):
            raise _bad(f"key_ops must be a list of {', '.join(sorted(KNOWN_OPS))}.")
        return list(dict.fromkeys(value))

    def _get(self, name: str, version: str) -> tuple[int, Any]:
        key, found = self._version(name, version)
        return 200, self._bundle(key, found)

    def _update(self, name: str, version: str, body: Any) -> tuple[int, Any]:
        key, found = self._version(name, version)
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.")
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise _bad("attributes must be an object.")
        changes: dict[str, Any] = {}  # validate everything before changing anything
        if "tags" in body:
            changes["tags"] = _validate_tags(body["tags"])
        if body.get("key_ops") is not None:
            changes["key_ops"] = self._key_ops(body["key_ops"])
        if "enabled" in attributes:
            if not isinstance(attributes["enabled"], bool):
                raise _bad("attributes.enabled must be a boolean.")
            changes["enabled"] = attributes["enabled"]
        for field_name in ("nbf", "exp"):
            if field_name in attributes:
                changes[field_name] = _optional_int(attributes, field_name)
        for field_name, value in changes.items():
            setattr(found, field_name, value)
        found.updated = _unix(self._clock.now())
        return 200, self._bundle(key, found)

    def rotate(self, name: str) -> _KeyVersion:
        """A new version like the latest (type, size, curve, operations, tags); the policy sets its expiry."""
        key = self._live(name)
        latest = key.latest
        now = self._clock.now()
        exp = None
        if key.policy is not None and key.policy.expiry_time is not None:
            exp = _unix(now + iso_duration(key.policy.expiry_time, "expiryTime"))
        curve = None
        if isinstance(latest.private, ec.EllipticCurvePrivateKey):
            curve = next(n for n, kind in _CURVES.items() if isinstance(latest.private.curve, kind))
        version = _KeyVersion(
            version=uuid.uuid4().hex,
            kty=latest.kty,
            private=self._generate(latest.kty, latest.size, curve),
            key_ops=list(latest.key_ops),
            tags=dict(latest.tags) if latest.tags is not None else None,
            enabled=True,
            nbf=None,
            exp=exp,
            created=_unix(now),
            updated=_unix(now),
        )
        key.versions.append(version)
        return version

    def _rotate(self, name: str) -> tuple[int, Any]:
        version = self.rotate(name)
        return 200, self._bundle(self._live(name), version)

    def _get_policy(self, name: str) -> tuple[int, Any]:
        return 200, self._policy_body(self._live(name))

    def _put_policy(self, name: str, body: Any) -> tuple[int, Any]:
        key = self._live(name)
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.")
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise _bad("attributes must be an object.")
        expiry_text = attributes.get("expiryTime")
        expiry = None
        if expiry_text is not None:
            expiry = iso_duration(expiry_text, "expiryTime")
            if expiry < MIN_EXPIRY:
                raise _bad("expiryTime must be at least 28 days (P28D).")
        actions = body.get("lifetimeActions") or []
        if not isinstance(actions, list) or len(actions) > 2:
            raise _bad("lifetimeActions must be a list of at most two actions (one Rotate, one Notify).")
        cleaned: list[dict[str, Any]] = []
        for action in actions:
            cleaned.append(self._lifetime_action(action, expiry))
        kinds = [action["action"]["type"] for action in cleaned]
        if len(set(kinds)) != len(kinds):
            raise _bad("lifetimeActions may hold one Rotate and one Notify action.")
        if "Notify" not in kinds:
            # Key Vault keeps a Notify action on every policy: 30 days before expiry unless one is given.
            cleaned.append(
                {"trigger": {"timeBeforeExpiry": DEFAULT_NOTIFY_BEFORE_EXPIRY}, "action": {"type": "Notify"}}
            )
        now = _unix(self._clock.now())
        created = key.policy.created if key.policy else now
        key.policy = _Policy(
            cleaned, expiry_text.strip().upper() if isinstance(expiry_text, str) else None, created, now
        )
        return 200, self._policy_body(key)

    @staticmethod
    def _lifetime_action(action: Any, expiry: dt.timedelta | None) -> dict[str, Any]:
        if not isinstance(action, dict):
            raise _bad("Each lifetime action must be an object.")
        trigger, kind = action.get("trigger"), action.get("action")
        if not isinstance(kind, dict) or str(kind.get("type", "")).lower() not in ("rotate", "notify"):
            raise _bad("action.type must be Rotate or Notify.")
        kind_name = "Rotate" if str(kind["type"]).lower() == "rotate" else "Notify"
        if not isinstance(trigger, dict):
            raise _bad("Each lifetime action needs a trigger.")
        given = {
            k: v for k, v in trigger.items() if k in ("timeAfterCreate", "timeBeforeExpiry") and v is not None
        }
        if len(given) != 1:
            raise _bad("A trigger needs exactly one of timeAfterCreate and timeBeforeExpiry.")
        ((when, text),) = given.items()
        duration = iso_duration(text, when)
        if duration < MIN_TRIGGER:
            raise _bad(f"{when} must be at least 7 days (P7D).")
        if kind_name == "Notify" and when != "timeBeforeExpiry":
            raise _bad("A Notify action is triggered by timeBeforeExpiry.")
        if expiry is not None and duration > expiry - MIN_TRIGGER:
            raise _bad(f"{when} must be at least 7 days shorter than expiryTime.")
        return {"trigger": {when: text.strip().upper()}, "action": {"type": kind_name}}

    def _crypt(self, operation: str, name: str, version: str, body: Any) -> tuple[int, Any]:
        key, found = self._version(name, version)
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.")
        algorithm = body.get("alg")
        value = _unb64(body.get("value"), "value")
        if not found.enabled:
            raise _forbidden(f"Operation {operation} is not allowed on a disabled key.")
        if operation not in found.key_ops:
            raise _forbidden(f"Operation {operation} is not permitted on this key.")
        now = _unix(self._clock.now())
        if operation == "encrypt":  # decrypting with an expired key stays allowed, as in Key Vault
            if found.exp is not None and found.exp <= now:
                raise _forbidden("Operation encrypt is not allowed on an expired key.")
            if found.nbf is not None and found.nbf > now:
                raise _forbidden("Operation encrypt is not allowed on a key that is not yet valid.")
        if not isinstance(found.private, rsa.RSAPrivateKey):
            raise _bad(f"Operation {operation} is not supported with an EC key.")
        paddings: dict[str, padding.AsymmetricPadding] = {
            "RSA-OAEP": padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),  # noqa: S303
            "RSA-OAEP-256": padding.OAEP(
                mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
            ),
            "RSA1_5": padding.PKCS1v15(),
        }
        scheme = paddings.get(str(algorithm))
        if scheme is None:
            raise _bad(f"Unsupported algorithm {str(algorithm)[:20]!r}: use {', '.join(paddings)}.")
        if operation == "encrypt":
            try:
                result = found.private.public_key().encrypt(value, scheme)
            except ValueError:
                raise _bad("The plaintext is too long for this key and algorithm.") from None
        else:
            try:
                result = found.private.decrypt(value, scheme)
            except ValueError:
                raise _bad("The ciphertext could not be decrypted with this key.") from None
        return 200, {"kid": self._kid(key, found), "value": _b64(result)}

    # ----- soft delete -------------------------------------------------------------------------

    def _delete(self, name: str) -> tuple[int, Any]:
        key = self._live(name)
        now = self._clock.now()
        key.deleted_date = _unix(now)
        key.scheduled_purge_date = _unix(now + dt.timedelta(days=RECOVERABLE_DAYS))
        del self.keys[name.lower()]
        self.deleted[name.lower()] = key
        return 200, {**self._deleted_fields(key), **self._bundle(key, key.latest)}

    def _deleted_key(self, name: str) -> _Key:
        key = self.deleted.get(name.lower())
        if key is None:
            raise _deleted_key_not_found(name)
        return key

    def _get_deleted(self, name: str) -> tuple[int, Any]:
        key = self._deleted_key(name)
        return 200, {**self._deleted_fields(key), **self._bundle(key, key.latest)}

    def _purge(self, name: str) -> tuple[int, Any]:
        self._deleted_key(name)
        del self.deleted[name.lower()]
        return 204, None

    def _recover(self, name: str) -> tuple[int, Any]:
        key = self._deleted_key(name)
        del self.deleted[name.lower()]
        key.deleted_date = key.scheduled_purge_date = None
        self.keys[name.lower()] = key
        return 200, self._bundle(key, key.latest)

    def purge_due(self, now: int) -> None:
        """Purge the deleted keys whose scheduled purge date has passed."""
        for name, key in list(self.deleted.items()):
            if key.scheduled_purge_date is not None and key.scheduled_purge_date <= now:
                del self.deleted[name]

    # ----- lists -------------------------------------------------------------------------------

    def _list_deleted(self, query: dict[str, str]) -> tuple[int, Any]:
        ordered = sorted(self.deleted.items())
        items = [{**self._deleted_fields(k), **self._item(k, k.latest, versioned=False)} for _, k in ordered]
        return 200, self._page(items, [name for name, _ in ordered], query, "/deletedkeys")

    def _list_keys(self, query: dict[str, str]) -> tuple[int, Any]:
        ordered = sorted(self.keys.items())
        items = [self._item(k, k.latest, versioned=False) for _, k in ordered]
        return 200, self._page(items, [name for name, _ in ordered], query, "/keys")

    def _list_versions(self, name: str, query: dict[str, str]) -> tuple[int, Any]:
        key = self.keys.get(name.lower())
        if key is None:
            return 200, {"value": [], "nextLink": None}
        order = [f"{i:08d}" for i in range(len(key.versions))]
        items = [self._item(key, v, versioned=True) for v in key.versions]
        return 200, self._page(items, order, query, f"/keys/{key.name}/versions")

    # ----- events ------------------------------------------------------------------------------

    def due(self, now: dt.datetime) -> list[tuple[_Key, _KeyVersion, str]]:
        """(key, version, event type) for every KeyNearExpiry/KeyExpired whose time has come."""
        found: list[tuple[_Key, _KeyVersion, str]] = []
        for key in sorted(self.keys.values(), key=lambda k: k.name.lower()):
            window = key.notify_before_expiry()
            for version in key.versions:
                if not version.enabled or version.exp is None:
                    continue
                exp = dt.datetime.fromtimestamp(version.exp, dt.UTC)
                for event_type, at in ((KEY_NEAR_EXPIRY, exp - window), (KEY_EXPIRED, exp)):
                    if now >= at:
                        found.append((key, version, event_type))
        return found

    def auto_rotate(self, now: dt.datetime) -> list[tuple[_Key, _KeyVersion]]:
        """Rotate the keys whose rotation policy's Rotate action is due (Key Vault's auto-rotation)."""
        rotated: list[tuple[_Key, _KeyVersion]] = []
        for key in sorted(self.keys.values(), key=lambda k: k.name.lower()):
            if key.policy is None:
                continue
            for action in key.policy.lifetime_actions:
                if action["action"]["type"] != "Rotate":
                    continue
                latest, trigger = key.latest, action["trigger"]
                if "timeAfterCreate" in trigger:
                    at = dt.datetime.fromtimestamp(latest.created, dt.UTC) + iso_duration(
                        trigger["timeAfterCreate"], "timeAfterCreate"
                    )
                elif latest.exp is not None:
                    at = dt.datetime.fromtimestamp(latest.exp, dt.UTC) - iso_duration(
                        trigger["timeBeforeExpiry"], "timeBeforeExpiry"
                    )
                else:
                    continue
                if now >= at:
                    rotated.append((key, self.rotate(key.name)))
        return rotated
