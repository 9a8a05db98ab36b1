"""The certificates half of the Key Vault emulator: policies, pending operations, merge, events.

Just enough of the Key Vault certificates API for the unmodified
``azure.keyvault.certificates.CertificateClient``: create with a policy (issuer ``Self``: issued at
once; ``Unknown``: a pending operation with a CSR, completed by merge), the pending operation
(get, cancel, delete), merge, get by version, list, list versions, update properties, get/update
the policy. The key pair is generated here and never leaves the vault except through the
certificate's secret (``GET /secrets/{name}``: PEM or base64 PKCS#12 per the policy's content
type), as Key Vault does; the certificate's key is readable at ``/keys/{name}`` (public half).
Every handler runs under the emulator's lock (see ``KeyVaultEmulator._route``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .keys import _CURVES, EC_OPS, RSA_OPS, RSA_SIZES, _Key, _KeyVersion
from .server import (
    RECOVERABLE_DAYS,
    RECOVERY_LEVEL,
    VaultError,
    _bad,
    _optional_int,
    _Secret,
    _unix,
    _validate_tags,
    _Version,
    build_event,
)

if TYPE_CHECKING:
    from .server import KeyVaultEmulator

CERTIFICATE_NEAR_EXPIRY = "Microsoft.KeyVault.CertificateNearExpiry"
CERTIFICATE_EXPIRED = "Microsoft.KeyVault.CertificateExpired"
# Event Grid's CertificateNearExpiry fires 30 days before the current version expires.
NEAR_EXPIRY_WINDOW = dt.timedelta(days=30)
PKCS12 = "application/x-pkcs12"
PEM = "application/x-pem-file"
_ISSUERS = ("Self", "Unknown")
_NAME_ATTRIBUTES = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "L": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "S": NameOID.STATE_OR_PROVINCE_NAME,
    "C": NameOID.COUNTRY_NAME,
    "E": NameOID.EMAIL_ADDRESS,
}
_KEY_USAGES = (
    "digitalSignature",
    "nonRepudiation",
    "keyEncipherment",
    "dataEncipherment",
    "keyAgreement",
    "keyCertSign",
    "cRLSign",
    "encipherOnly",
    "decipherOnly",
)
_ACTIONS = ("EmailContacts", "AutoRenew")
_MAX_SANS = 100

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _cert_not_found(name: str) -> VaultError:
    return VaultError(
        404,
        "CertificateNotFound",
        f"A certificate with (name/id) {name} was not found in this key vault. If you recently "
        "deleted this certificate you may be able to recover it using the correct recovery command.",
    )


def _pending_not_found(name: str) -> VaultError:
    return VaultError(404, "PendingCertificateNotFound", f"Pending certificate not found: {name}")


@dataclass
class _Policy:
    """A validated certificate policy, kept as the JSON Key Vault answers (``key_props`` ...)."""

    kty: str
    key_size: int | None
    curve: str | None
    reuse_key: bool
    exportable: bool
    content_type: str
    subject: str
    dns_names: list[str]
    ekus: list[str]
    key_usage: list[str]
    validity_months: int
    lifetime_actions: list[dict[str, Any]]
    issuer: str
    created: int
    updated: int

    def body(self, policy_id: str) -> dict[str, Any]:
        key_props: dict[str, Any] = {
            "exportable": self.exportable,
            "kty": self.kty,
            "reuse_key": self.reuse_key,
        }
        if self.key_size is not None:
            key_props["key_size"] = self.key_size
        if self.curve is not None:
            key_props["crv"] = self.curve
        x509_props: dict[str, Any] = {
            "subject": self.subject,
            "ekus": list(self.ekus),
            "key_usage": list(self.key_usage),
            "validity_months": self.validity_months,
        }
        if self.dns_names:
            x509_props["sans"] = {"dns_names": list(self.dns_names)}
        return {
            "id": policy_id,
            "key_props": key_props,
            "secret_props": {"contentType": self.content_type},
            "x509_props": x509_props,
            "lifetime_actions": [dict(a) for a in self.lifetime_actions],
            "issuer": {"name": self.issuer},
            "attributes": {"enabled": True, "created": self.created, "updated": self.updated},
        }


@dataclass
class _CertVersion:
    version: str
    chain: list[x509.Certificate]  # the leaf first
    tags: dict[str, str] | None
    enabled: bool
    created: int
    updated: int

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def der(self) -> bytes:
        return self.leaf.public_bytes(serialization.Encoding.DER)

    @property
    def nbf(self) -> int:
        return _unix(self.leaf.not_valid_before_utc)

    @property
    def exp(self) -> int:
        return _unix(self.leaf.not_valid_after_utc)


@dataclass
class _Pending:
    version: str
    private: PrivateKey
    csr: x509.CertificateSigningRequest
    issuer: str
    request_id: str
    tags: dict[str, str] | None
    enabled: bool
    status: str = "inProgress"
    cancellation_requested: bool = False
    target: str | None = None


@dataclass
class _Certificate:
    name: str
    policy: _Policy
    versions: list[_CertVersion] = field(default_factory=list)
    pending: _Pending | None = None

    @property
    def latest(self) -> _CertVersion | None:
        return self.versions[-1] if self.versions else None

    def find(self, version: str) -> _CertVersion | None:
        return next((v for v in self.versions if v.version == version.lower()), None)


def _parse_subject(subject: Any) -> x509.Name:
    if not isinstance(subject, str) or not subject.strip() or len(subject) > 1024:
        raise _bad("x509_props.subject must be a distinguished name such as CN=example.com.")
    attributes = []
    for part in subject.split(","):
        key, sep, value = part.strip().partition("=")
        oid = _NAME_ATTRIBUTES.get(key.strip().upper())
        value = value.strip()
        if not sep or oid is None or not value or any(c in value for c in '=+"\\<>;#\n\r\0'):
            raise _bad(f"x509_props.subject is not a valid distinguished name: {subject[:80]!r}.")
        attributes.append(x509.NameAttribute(oid, value))
    return x509.Name(attributes)


def _dns_names(sans: Any) -> list[str]:
    if sans is None:
        return []
    if not isinstance(sans, dict):
        raise _bad("x509_props.sans must be an object.")
    names = sans.get("dns_names") or []
    unsupported = [k for k, v in sans.items() if k != "dns_names" and v]
    if unsupported:
        raise _bad(
            f"The emulator supports only dns_names subject alternative names, not {unsupported[0][:20]}."
        )
    if not isinstance(names, list) or len(names) > _MAX_SANS:
        raise _bad(f"x509_props.sans.dns_names must be a list of at most {_MAX_SANS} names.")
    for name in names:
        if (
            not isinstance(name, str)
            or not name
            or len(name) > 253
            or not all(
                label and len(label) <= 63 and all(c.isalnum() or c in "-*" for c in label)
                for label in name.split(".")
            )
        ):
            raise _bad(f"x509_props.sans.dns_names holds an invalid DNS name: {str(name)[:80]!r}.")
    return [n.lower() for n in names]


def _lifetime_actions(actions: Any) -> list[dict[str, Any]]:
    if actions is None:
        return [{"trigger": {"lifetime_percentage": 80}, "action": {"action_type": "EmailContacts"}}]
    if not isinstance(actions, list) or len(actions) > 2:
        raise _bad("lifetime_actions must be a list of at most two actions.")
    parsed = []
    for action in actions:
        trigger = action.get("trigger") if isinstance(action, dict) else None
        kind = action.get("action") if isinstance(action, dict) else None
        if not isinstance(trigger, dict) or not isinstance(kind, dict):
            raise _bad("Each lifetime action needs a trigger and an action.")
        action_type = kind.get("action_type")
        if action_type not in _ACTIONS:
            raise _bad(f"action_type must be one of {', '.join(_ACTIONS)}.")
        percentage, days = trigger.get("lifetime_percentage"), trigger.get("days_before_expiry")
        if (percentage is None) == (days is None):
            raise _bad("A trigger takes exactly one of lifetime_percentage and days_before_expiry.")
        if percentage is not None and (type(percentage) is not int or not 1 <= percentage <= 99):
            raise _bad("lifetime_percentage must be an integer from 1 to 99.")
        if days is not None and (type(days) is not int or not 1 <= days <= 36500):
            raise _bad("days_before_expiry must be a positive integer.")
        key, value = (
            ("lifetime_percentage", percentage) if percentage is not None else ("days_before_expiry", days)
        )
        parsed.append({"trigger": {key: value}, "action": {"action_type": action_type}})
    return parsed


def _string_list(value: Any, what: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    if not isinstance(value, list) or len(value) > 20 or not all(isinstance(v, str) and v for v in value):
        raise _bad(f"{what} must be a list of strings.")
    if allowed is not None and any(v not in allowed for v in value):
        raise _bad(f"{what} may hold only {', '.join(allowed)}.")
    return list(dict.fromkeys(value))


def parse_policy(body: Any, now: int, previous: _Policy | None = None) -> _Policy:
    """Validate a policy body (create or PATCH); a PATCH keeps what ``previous`` had for absent parts."""
    if not isinstance(body, dict):
        raise _bad("The certificate policy must be a JSON object.")
    key_props = body.get("key_props") or {}
    secret_props = body.get("secret_props") or {}
    x509_props = body.get("x509_props") or {}
    issuer = body.get("issuer") or {}
    if not all(isinstance(p, dict) for p in (key_props, secret_props, x509_props, issuer)):
        raise _bad("key_props, secret_props, x509_props and issuer must be objects.")
    kty = key_props.get("kty", previous.kty if previous else "RSA")
    if kty not in ("RSA", "RSA-HSM", "EC", "EC-HSM"):
        raise _bad(f"Unsupported key type {str(kty)[:20]!r}: use RSA, RSA-HSM, EC or EC-HSM.")
    rsa_key = kty in ("RSA", "RSA-HSM")
    same_kind = previous is not None and previous.kty.startswith(kty[:2])
    size = key_props.get("key_size", previous.key_size if same_kind and previous else None)
    curve = key_props.get("crv", previous.curve if same_kind and previous else None)
    if rsa_key:
        size = 2048 if size is None else size
        if size not in RSA_SIZES or curve is not None:
            raise _bad(f"key_size must be one of {RSA_SIZES} for an RSA key, and crv is not allowed.")
    else:
        curve = "P-256" if curve is None else curve
        if curve not in _CURVES or size is not None:
            raise _bad(f"crv must be one of {', '.join(_CURVES)} for an EC key, and key_size is not allowed.")
    flags = {}
    for flag in ("reuse_key", "exportable"):
        flags[flag] = key_props.get(flag, getattr(previous, flag) if previous else False)
        if not isinstance(flags[flag], bool):
            raise _bad(f"key_props.{flag} must be a boolean.")
    content_type = secret_props.get("contentType", previous.content_type if previous else PKCS12)
    if content_type not in (PKCS12, PEM):
        raise _bad(f"secret_props.contentType must be {PKCS12} or {PEM}.")
    subject = x509_props.get("subject", previous.subject if previous else None)
    _parse_subject(subject)  # refuses anything but a string
    dns_names = (
        _dns_names(x509_props["sans"])
        if "sans" in x509_props
        else list(previous.dns_names)
        if previous
        else []
    )
    ekus = x509_props.get("ekus")
    ekus = (
        _string_list(ekus, "x509_props.ekus")
        if ekus is not None
        else list(previous.ekus)
        if previous
        else [ExtendedKeyUsageOID.SERVER_AUTH.dotted_string, ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string]
    )
    for eku in ekus:
        try:
            x509.ObjectIdentifier(eku)
        except ValueError:
            raise _bad(f"x509_props.ekus holds an invalid object identifier: {eku[:40]!r}.") from None
    usage = x509_props.get("key_usage")
    key_usage = (
        _string_list(usage, "x509_props.key_usage", _KEY_USAGES)
        if usage is not None
        else list(previous.key_usage)
        if previous
        else ["digitalSignature", "keyEncipherment"]
    )
    months = x509_props.get("validity_months", previous.validity_months if previous else 12)
    if type(months) is not int or not 1 <= months <= 1200:
        raise _bad("x509_props.validity_months must be an integer from 1 to 1200.")
    issuer_name = issuer.get("name", previous.issuer if previous else "Unknown")
    if not isinstance(issuer_name, str) or issuer_name.lower() not in ("self", "unknown"):
        # The emulator has no issuer objects (DigiCert, GlobalSign): only Self and Unknown.
        raise _bad(f"The issuer {str(issuer_name)[:40]!r} is not known to this vault: use Self or Unknown.")
    actions = (
        _lifetime_actions(body["lifetime_actions"])
        if "lifetime_actions" in body
        else previous.lifetime_actions
        if previous
        else _lifetime_actions(None)
    )
    return _Policy(
        kty=kty,
        key_size=size if rsa_key else None,
        curve=None if rsa_key else curve,
        reuse_key=flags["reuse_key"],
        exportable=flags["exportable"],
        content_type=content_type,
        subject=cast(str, subject),
        dns_names=dns_names,
        ekus=ekus,
        key_usage=key_usage,
        validity_months=months,
        lifetime_actions=actions,
        issuer="Self" if issuer_name.lower() == "self" else "Unknown",
        created=previous.created if previous else now,
        updated=now,
    )


def _generate(policy: _Policy) -> PrivateKey:
    if policy.kty in ("RSA", "RSA-HSM"):
        return rsa.generate_private_key(public_exponent=65537, key_size=policy.key_size or 2048)
    return ec.generate_private_key(_CURVES[policy.curve or "P-256"]())


def _extensions(policy: _Policy) -> list[tuple[x509.ExtensionType, bool]]:
    usage = set(policy.key_usage)
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (
            x509.KeyUsage(
                digital_signature="digitalSignature" in usage,
                content_commitment="nonRepudiation" in usage,
                key_encipherment="keyEncipherment" in usage,
                data_encipherment="dataEncipherment" in usage,
                key_agreement="keyAgreement" in usage,
                key_cert_sign="keyCertSign" in usage,
                crl_sign="cRLSign" in usage,
                encipher_only="encipherOnly" in usage and "keyAgreement" in usage,
                decipher_only="decipherOnly" in usage and "keyAgreement" in usage,
            ),
            True,
        )
    ]
    if policy.ekus:
        extensions.append((x509.ExtendedKeyUsage([x509.ObjectIdentifier(e) for e in policy.ekus]), False))
    if policy.dns_names:
        extensions.append((x509.SubjectAlternativeName([x509.DNSName(n) for n in policy.dns_names]), False))
    return extensions


def _csr(policy: _Policy, private: PrivateKey) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(_parse_subject(policy.subject))
    for extension, critical in _extensions(policy):
        builder = builder.add_extension(extension, critical)
    return builder.sign(private, hashes.SHA256())


def _self_signed(policy: _Policy, private: PrivateKey, now: dt.datetime) -> x509.Certificate:
    name = _parse_subject(policy.subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30 * policy.validity_months))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    for extension, critical in _extensions(policy):
        builder = builder.add_extension(extension, critical)
    return builder.sign(private, hashes.SHA256())


def _same_key(a: Any, b: Any) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(a.public_bytes(*spki) == b.public_bytes(*spki))


class CertificateStore:
    """In-memory certificates of one vault; the emulator routes ``/certificates/...`` here."""

    def __init__(self, emulator: KeyVaultEmulator) -> None:
        self._emulator = emulator
        self.certificates: dict[str, _Certificate] = {}

    @property
    def _vault_url(self) -> str:
        return self._emulator.vault_url

    def _now(self) -> dt.datetime:
        return self._emulator.clock.now()

    # ----- routing -------------------------------------------------------------------------------

    def handle(
        self, method: str, *, segments: list[str], query: dict[str, str], body: Any, path: str
    ) -> tuple[int, Any]:
        name = segments[1] if len(segments) > 1 else ""
        rest = [s.lower() for s in segments[2:]]
        if name:
            self._emulator._check_name(name, "Certificate")
        routes: dict[tuple[str, ...], dict[str, Callable[[], tuple[int, Any]]]] = {
            (): (
                {"GET": lambda: self._list(query)}
                if not name
                else {"GET": lambda: self._get(name, ""), "PATCH": lambda: self._update(name, "", body)}
            ),
            ("create",): {"POST": lambda: self._create(name, body)},
            ("versions",): {"GET": lambda: self._list_versions(name, query)},
            ("policy",): {
                "GET": lambda: self._get_policy(name),
                "PATCH": lambda: self._update_policy(name, body),
            },
            ("pending",): {
                "GET": lambda: self._get_pending(name, query),
                "PATCH": lambda: self._cancel_pending(name, body),
                "DELETE": lambda: self._delete_pending(name),
            },
            ("pending", "merge"): {"POST": lambda: self._merge(name, body)},
        }
        if len(rest) == 1 and rest[0] not in ("create", "versions", "policy", "pending"):
            version = segments[2]
            by_method = {
                "GET": lambda: self._get(name, version),
                "PATCH": lambda: self._update(name, version, body),
            }
        elif len(segments) == 1 or name:
            by_method = routes.get(tuple(rest), {})
        else:
            by_method = {}
        if not by_method:
            raise VaultError(404, "NotFound", f"The requested resource {path} was not found.")
        handler = by_method.get(method)
        if handler is None:
            raise VaultError(
                405, "MethodNotAllowed", f"The requested method {method} is not allowed on {path}."
            )
        return handler()

    # ----- JSON shapes -------------------------------------------------------------------------

    def _id(self, cert: _Certificate, suffix: str = "") -> str:
        return f"{self._vault_url}/certificates/{cert.name}" + (f"/{suffix}" if suffix else "")

    @staticmethod
    def _attributes(v: _CertVersion) -> dict[str, Any]:
        return {
            "enabled": v.enabled,
            "nbf": v.nbf,
            "exp": v.exp,
            "created": v.created,
            "updated": v.updated,
            "recoveryLevel": RECOVERY_LEVEL,
            "recoverableDays": RECOVERABLE_DAYS,
        }

    def _bundle(self, cert: _Certificate, v: _CertVersion) -> dict[str, Any]:
        bundle: dict[str, Any] = {
            "id": self._id(cert, v.version),
            "kid": f"{self._vault_url}/keys/{cert.name}/{v.version}",
            "sid": f"{self._vault_url}/secrets/{cert.name}/{v.version}",
            "x5t": _b64url(hashlib.sha1(v.der).digest()),  # noqa: S324 - x5t is SHA-1 by definition
            "cer": _b64(v.der),
            "attributes": self._attributes(v),
            "policy": cert.policy.body(self._id(cert, "policy")),
        }
        if v.tags is not None:
            bundle["tags"] = v.tags
        return bundle

    def _item(self, cert: _Certificate, v: _CertVersion, *, versioned: bool) -> dict[str, Any]:
        item: dict[str, Any] = {
            "id": self._id(cert, v.version if versioned else ""),
            "attributes": self._attributes(v),
            "x5t": _b64url(hashlib.sha1(v.der).digest()),  # noqa: S324
        }
        if v.tags is not None:
            item["tags"] = v.tags
        return item

    def _operation(self, cert: _Certificate, pending: _Pending) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self._id(cert, "pending"),
            "issuer": {"name": pending.issuer},
            "csr": _b64(pending.csr.public_bytes(serialization.Encoding.DER)),
            "cancellation_requested": pending.cancellation_requested,
            "status": pending.status,
            "request_id": pending.request_id,
        }
        if pending.status == "inProgress":
            body["status_details"] = (
                "Pending certificate created. Please Perform Merge to complete the request."
                if pending.issuer == "Unknown"
                else "Pending certificate created. Certificate request is in progress."
            )
        if pending.target is not None:
            body["target"] = pending.target
        return body

    # ----- lookups -----------------------------------------------------------------------------

    def _live(self, name: str) -> _Certificate:
        cert = self.certificates.get(name.lower())
        if cert is None:
            raise _cert_not_found(name)
        return cert

    def _version(self, name: str, version: str) -> tuple[_Certificate, _CertVersion]:
        cert = self._live(name)
        found = cert.find(version) if version else cert.latest
        if found is None:
            raise _cert_not_found(name)
        return cert, found

    def _pending(self, name: str) -> tuple[_Certificate, _Pending]:
        cert = self.certificates.get(name.lower())
        if cert is None or cert.pending is None:
            raise _pending_not_found(name)
        return cert, cert.pending

    # ----- operations --------------------------------------------------------------------------

    def _create(self, name: str, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.")
        if name.lower() in self._emulator._deleted:
            raise VaultError(
                409, "Conflict", f"Certificate {name} is currently in a deleted but recoverable state."
            )
        cert = self.certificates.get(name.lower())
        if cert is not None and cert.pending is not None and cert.pending.status == "inProgress":
            raise VaultError(
                409,
                "Conflict",
                "A new key vault certificate can not be created or imported while a pending key vault "
                "certificate's status is inProgress.",
            )
        now = self._now()
        if body.get("policy") is None and cert is None:
            raise _bad("The certificate policy is required to create a new certificate.")
        policy = parse_policy(body["policy"], _unix(now)) if body.get("policy") is not None else cert.policy  # type: ignore[union-attr]
        tags = _validate_tags(body.get("tags"))
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict) or not isinstance(attributes.get("enabled", True), bool):
            raise _bad("attributes must be an object whose enabled is a boolean.")
        # nbf/exp come from the issued certificate; validate them but do not keep them.
        _optional_int(attributes, "nbf")
        _optional_int(attributes, "exp")
        if cert is None:
            cert = self.certificates[name.lower()] = _Certificate(name, policy)
        else:
            cert.policy = policy
        private = _generate(policy)
        pending = _Pending(
            version=uuid.uuid4().hex,
            private=private,
            csr=_csr(policy, private),
            issuer=policy.issuer,
            request_id=uuid.uuid4().hex,
            tags=tags,
            enabled=attributes.get("enabled", True),
        )
        cert.pending = pending
        if policy.issuer != "Self":
            return 202, self._operation(cert, pending)
        accepted = self._operation(cert, pending)
        self._issue(cert, pending, [_self_signed(policy, private, now)], tags)
        # Key Vault answers a self-signed create as accepted and in progress, completed by the
        # next poll; the client's poller relies on that (it never polls an operation born finished).
        return 202, accepted

    def _issue(
        self,
        cert: _Certificate,
        pending: _Pending,
        chain: list[x509.Certificate],
        tags: dict[str, str] | None,
    ) -> _CertVersion:
        """Make the pending version current: the certificate, its secret and its key, one version id."""
        stamp = _unix(self._now())
        version = _CertVersion(pending.version, chain, tags, pending.enabled, stamp, stamp)
        cert.versions.append(version)
        pending.status = "completed"
        pending.target = self._id(cert)
        value = self._secret_value(cert.policy.content_type, pending.private, chain)
        secret = self._emulator._secrets.setdefault(cert.name.lower(), _Secret(cert.name))
        secret.versions.append(
            _Version(
                version=version.version,
                value=value,
                content_type=cert.policy.content_type,
                tags=None,
                enabled=version.enabled,
                nbf=version.nbf,
                exp=version.exp,
                created=stamp,
                updated=stamp,
            )
        )
        self._emulator._values_stored.add(value)
        rsa_key = cert.policy.kty in ("RSA", "RSA-HSM")
        key = self._emulator._keys.keys.setdefault(cert.name.lower(), _Key(cert.name))
        key.versions.append(
            _KeyVersion(
                version=version.version,
                kty=cert.policy.kty,
                private=pending.private,
                key_ops=list(RSA_OPS if rsa_key else EC_OPS),
                tags=None,
                enabled=version.enabled,
                nbf=version.nbf,
                exp=version.exp,
                created=stamp,
                updated=stamp,
            )
        )
        return version

    @staticmethod
    def _secret_value(content_type: str, private: PrivateKey, chain: list[x509.Certificate]) -> str:
        if content_type == PEM:
            key_pem = private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            certs = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
            return (key_pem + certs).decode()
        pfx = pkcs12.serialize_key_and_certificates(
            None, private, chain[0], chain[1:] or None, serialization.NoEncryption()
        )
        return _b64(pfx)

    def _merge(self, name: str, body: Any) -> tuple[int, Any]:
        cert, pending = self._pending(name)
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.")
        if pending.status != "inProgress":
            raise VaultError(
                403,
                "Forbidden",
                f"Merge is not allowed on a pending certificate whose status is {pending.status}.",
            )
        if pending.issuer != "Unknown":
            raise VaultError(
                403,
                "Forbidden",
                f"Merge is forbidden on pending object created with issuer : {pending.issuer}.",
            )
        x5c = body.get("x5c")
        if not isinstance(x5c, list) or not x5c or len(x5c) > 10:
            raise _bad("x5c must be a non-empty list of base64 DER certificates.")
        chain = []
        for entry in x5c:
            try:
                chain.append(x509.load_der_x509_certificate(base64.b64decode(entry, validate=True)))
            except (TypeError, ValueError, binascii.Error):
                raise _bad("x5c holds an entry that is not a base64 DER X.509 certificate.") from None
        if not _same_key(chain[0].public_key(), pending.private.public_key()):
            raise _bad("Public key from x509 certificate and key of this instance doesn't match")
        tags = _validate_tags(body["tags"]) if body.get("tags") is not None else pending.tags
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict) or not isinstance(
            attributes.get("enabled", pending.enabled), bool
        ):
            raise _bad("attributes must be an object whose enabled is a boolean.")
        pending.enabled = attributes.get("enabled", pending.enabled)
        version = self._issue(cert, pending, chain, tags)
        return 201, self._bundle(cert, version)

    def _get(self, name: str, version: str) -> tuple[int, Any]:
        cert, found = self._version(name, version)
        return 200, self._bundle(cert, found)

    def _update(self, name: str, version: str, body: Any) -> tuple[int, Any]:
        cert, found = self._version(name, version)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.")
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict) or not isinstance(attributes.get("enabled", found.enabled), bool):
            raise _bad("attributes must be an object whose enabled is a boolean.")
        tags = _validate_tags(body["tags"]) if "tags" in body else found.tags
        policy = parse_policy(body["policy"], _unix(self._now()), cert.policy) if body.get("policy") else None
        found.tags = tags
        found.enabled = attributes.get("enabled", found.enabled)
        found.updated = _unix(self._now())
        if policy is not None:
            cert.policy = policy
        return 200, self._bundle(cert, found)

    def _get_policy(self, name: str) -> tuple[int, Any]:
        cert = self._live(name)
        return 200, cert.policy.body(self._id(cert, "policy"))

    def _update_policy(self, name: str, body: Any) -> tuple[int, Any]:
        cert = self._live(name)
        cert.policy = parse_policy(body, _unix(self._now()), cert.policy)
        return 200, cert.policy.body(self._id(cert, "policy"))

    def _get_pending(self, name: str, query: dict[str, str]) -> tuple[int, Any]:
        cert, pending = self._pending(name)
        if query.get("request_id") and query["request_id"] != pending.request_id:
            raise _pending_not_found(name)
        return 200, self._operation(cert, pending)

    def _cancel_pending(self, name: str, body: Any) -> tuple[int, Any]:
        cert, pending = self._pending(name)
        if not isinstance(body, dict) or not isinstance(body.get("cancellation_requested"), bool):
            raise _bad("cancellation_requested is required and must be a boolean.")
        if pending.status != "inProgress":
            raise _bad(f"The pending certificate's status is {pending.status}: it cannot be cancelled.")
        if body["cancellation_requested"]:
            pending.cancellation_requested = True
            pending.status = "cancelled"
        return 200, self._operation(cert, pending)

    def _delete_pending(self, name: str) -> tuple[int, Any]:
        cert, pending = self._pending(name)
        cert.pending = None
        if not cert.versions:
            # A certificate that never had a version is gone with its only operation.
            del self.certificates[name.lower()]
        return 200, self._operation(cert, pending)

    def _list(self, query: dict[str, str]) -> tuple[int, Any]:
        ordered = sorted((k, c) for k, c in self.certificates.items() if c.latest is not None)
        items = [self._item(c, cast(_CertVersion, c.latest), versioned=False) for _, c in ordered]
        return 200, self._emulator._page(items, [k for k, _ in ordered], query, "/certificates")

    def _list_versions(self, name: str, query: dict[str, str]) -> tuple[int, Any]:
        cert = self.certificates.get(name.lower())
        if cert is None:
            return 200, {"value": [], "nextLink": None}
        keys = [f"{i:08d}" for i in range(len(cert.versions))]
        items = [self._item(cert, v, versioned=True) for v in cert.versions]
        return 200, self._emulator._page(items, keys, query, f"/certificates/{cert.name}/versions")

    # ----- events ------------------------------------------------------------------------------

    def event_for(
        self, name: str, version: str | None = None, event_type: str = CERTIFICATE_NEAR_EXPIRY
    ) -> dict[str, Any]:
        """The event Key Vault would publish for a certificate version (default: the current one)."""
        cert = self.certificates.get(name.lower())
        found = None if cert is None else (cert.find(version) if version else cert.latest)
        if cert is None or found is None:
            raise KeyError(f"no certificate version {name}/{version or ''}")
        return self._event(cert, found, event_type, self._now())

    def _event(
        self, cert: _Certificate, v: _CertVersion, event_type: str, now: dt.datetime
    ) -> dict[str, Any]:
        return build_event(
            event_type=event_type,
            vault_name=self._emulator.vault_name,
            vault_url=self._vault_url,
            secret_name=cert.name,
            version=v.version,
            nbf=v.nbf,
            exp=v.exp,
            event_time=now,
            object_type=cast(Any, "Certificate"),
        )

    def due_events(self, now: dt.datetime, emitted: set[tuple[str, str, str]]) -> list[dict[str, Any]]:
        """CertificateNearExpiry / CertificateExpired of each certificate's current version, once each."""
        due = []
        for key, cert in sorted(self.certificates.items()):
            current = cert.latest
            if current is None or not current.enabled:
                continue
            exp = dt.datetime.fromtimestamp(current.exp, dt.UTC)
            for event_type, at in (
                (CERTIFICATE_NEAR_EXPIRY, exp - NEAR_EXPIRY_WINDOW),
                (CERTIFICATE_EXPIRED, exp),
            ):
                mark = (f"certificate:{key}", current.version, event_type)
                if now >= at and mark not in emitted:
                    emitted.add(mark)
                    due.append(self._event(cert, current, event_type, now))
        return due
