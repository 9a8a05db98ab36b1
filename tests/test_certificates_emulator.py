"""The Key Vault emulator's certificates API, through the unmodified Certificate-, Secret- and KeyClient."""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.keyvault.certificates import (
    CertificateClient,
    CertificateContentType,
    CertificateOperation,
    CertificatePolicy,
    CertificateProperties,
    KeyCurveName,
    KeyType,
    KeyVaultCertificate,
)
from azure.keyvault.keys import KeyClient
from azure.keyvault.secrets import SecretClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from devstack.keyvault import KeyVaultEmulator
from devstack.keyvault.certificates import CERTIFICATE_EXPIRED, CERTIFICATE_NEAR_EXPIRY
from tests.test_keyvault_emulator_keys import call


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyVaultEmulator]:
    with KeyVaultEmulator(tmp_path_factory.mktemp("keyvault-certificates")) as kv:
        yield kv


@pytest.fixture(autouse=True)
def _reset_clock(emulator: KeyVaultEmulator) -> Iterator[None]:
    yield
    emulator.clock.set_offset(dt.timedelta(0))


def options(emulator: KeyVaultEmulator) -> dict[str, Any]:
    return {"verify_challenge_resource": False, "connection_verify": str(emulator.ca_path), "retry_total": 0}


@pytest.fixture
def certs(emulator: KeyVaultEmulator) -> CertificateClient:
    return CertificateClient(emulator.vault_url, emulator.credential(), **options(emulator))


@pytest.fixture
def secrets(emulator: KeyVaultEmulator) -> SecretClient:
    return SecretClient(emulator.vault_url, emulator.credential(), **options(emulator))


@pytest.fixture
def keys(emulator: KeyVaultEmulator) -> KeyClient:
    return KeyClient(emulator.vault_url, emulator.credential(), **options(emulator))


def name() -> str:
    return f"c-{uuid.uuid4().hex[:12]}"


def created(
    certs: CertificateClient, cert_name: str, policy: CertificatePolicy, **kwargs: Any
) -> KeyVaultCertificate:
    result = certs.begin_create_certificate(cert_name, policy, **kwargs).result()
    assert isinstance(result, KeyVaultCertificate), result
    return result


def pending(
    certs: CertificateClient, cert_name: str, policy: CertificatePolicy, **kwargs: Any
) -> CertificateOperation:
    result = certs.begin_create_certificate(cert_name, policy, **kwargs).result()
    assert isinstance(result, CertificateOperation), result
    return result


def props(cert: KeyVaultCertificate) -> CertificateProperties:
    assert cert.properties is not None
    return cert.properties


def version(cert: KeyVaultCertificate) -> str:
    assert props(cert).version
    return str(props(cert).version)


def cer(cert: KeyVaultCertificate | CertificateOperation) -> bytes:
    value = cert.cer if isinstance(cert, KeyVaultCertificate) else cert.csr
    assert value
    return bytes(value)


def manual_policy(**kwargs: Any) -> CertificatePolicy:
    defaults: dict[str, Any] = {"issuer_name": "Unknown", "subject": "CN=app.example.test"}
    defaults.update(kwargs)
    return CertificatePolicy(san_dns_names=["app.example.test"], **defaults)


def ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def sign(
    csr_der: bytes, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], days: int = 90
) -> x509.Certificate:
    """What a CA does with the CSR: a leaf for the CSR's key, subject and SANs."""
    csr = x509.load_der_x509_csr(csr_der)
    assert csr.is_signature_valid
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(issuer[1].subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    for extension in csr.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    return builder.sign(issuer[0], hashes.SHA256())


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def test_self_signed_certificate_is_issued_at_once_with_its_secret_and_key(
    certs: CertificateClient, secrets: SecretClient, keys: KeyClient
) -> None:
    cert_name = name()
    policy = CertificatePolicy(
        issuer_name="Self",
        subject="CN=self.example.test",
        key_type=KeyType.rsa,
        key_size=3072,
        content_type=CertificateContentType.pkcs12,
        validity_in_months=6,
    )
    issued = created(certs, cert_name, policy, tags={"team": "a"})
    leaf = x509.load_der_x509_certificate(cer(issued))
    assert leaf.subject.rfc4514_string() == "CN=self.example.test"
    assert props(issued).tags == {"team": "a"}
    assert props(issued).expires_on == leaf.not_valid_after_utc
    assert props(issued).x509_thumbprint == leaf.fingerprint(hashes.SHA1())  # noqa: S303

    secret = secrets.get_secret(cert_name)
    assert secret.properties.content_type == "application/x-pkcs12"
    assert secret.properties.version == version(issued)
    private, pfx_leaf, _ = pkcs12.load_key_and_certificates(base64.b64decode(secret.value or ""), None)
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 3072
    assert pfx_leaf is not None and der(pfx_leaf) == cer(issued)

    key = keys.get_key(cert_name)
    assert key.properties.version == version(issued)
    assert key.key_type == "RSA" and getattr(key.key, "d", None) is None  # the public half only

    fetched = certs.get_certificate_policy(cert_name)
    assert fetched.key_size == 3072 and fetched.issuer_name == "Self" and fetched.validity_in_months == 6


def test_manual_issuer_gives_a_pending_csr_that_a_merge_completes(
    certs: CertificateClient, secrets: SecretClient
) -> None:
    cert_name = name()
    first = created(certs, cert_name, CertificatePolicy.get_default())
    policy = manual_policy(
        key_type=KeyType.ec, key_curve_name=KeyCurveName.p_384, content_type="application/x-pem-file"
    )
    operation = pending(certs, cert_name, policy, tags={"v": "2"})
    assert operation.status == "inProgress"
    csr = x509.load_der_x509_csr(cer(operation))
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey)
    assert csr.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["app.example.test"]
    # Until the merge the current version is the previous one.
    assert version(certs.get_certificate(cert_name)) == version(first)
    assert cer(certs.get_certificate_operation(cert_name)) == cer(operation)
    with pytest.raises(HttpResponseError) as conflict:
        certs.begin_create_certificate(cert_name, policy)
    assert conflict.value.status_code == 409

    authority = ca()
    leaf = sign(cer(operation), authority)
    merged = certs.merge_certificate(cert_name, [der(leaf), der(authority[1])])
    assert cer(merged) == der(leaf) and props(merged).tags == {"v": "2"}
    assert version(certs.get_certificate(cert_name)) == version(merged) != version(first)
    versions = [p.version for p in certs.list_properties_of_certificate_versions(cert_name)]
    assert versions == [version(first), version(merged)]
    assert cer(certs.get_certificate_version(cert_name, version(first))) == cer(first)
    assert certs.get_certificate_operation(cert_name).status == "completed"

    secret = secrets.get_secret(cert_name)
    assert secret.properties.content_type == "application/x-pem-file"
    value = (secret.value or "").encode()
    private = serialization.load_pem_private_key(value, None)
    assert spki(private.public_key()) == spki(leaf.public_key())
    chain = x509.load_pem_x509_certificates(value)
    assert [der(c) for c in chain] == [der(leaf), der(authority[1])]
    assert [p.name for p in certs.list_properties_of_certificates()].count(cert_name) == 1


def test_merge_refuses_a_certificate_for_another_key_and_garbage(
    emulator: KeyVaultEmulator, certs: CertificateClient
) -> None:
    cert_name = name()
    pending(certs, cert_name, manual_policy())
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app.example.test")]))
        .sign(stranger_key, hashes.SHA256())
    )
    wrong = sign(csr.public_bytes(serialization.Encoding.DER), ca())
    with pytest.raises(HttpResponseError) as mismatch:
        certs.merge_certificate(cert_name, [der(wrong)])
    assert mismatch.value.status_code == 400 and "doesn't match" in str(mismatch.value)
    status, answer = call(emulator, "POST", f"/certificates/{cert_name}/pending/merge", {"x5c": ["%%"]})
    assert status == 400 and answer["error"]["code"] == "BadParameter"
    assert certs.get_certificate_operation(cert_name).status == "inProgress"
    with pytest.raises(ResourceNotFoundError):
        certs.get_certificate(cert_name)


def test_cancel_and_delete_the_pending_operation(certs: CertificateClient) -> None:
    cert_name = name()
    first = created(certs, cert_name, CertificatePolicy.get_default())
    pending(certs, cert_name, manual_policy())
    cancelled = certs.cancel_certificate_operation(cert_name)
    assert cancelled.cancellation_requested and cancelled.status == "cancelled"
    with pytest.raises(HttpResponseError):
        certs.merge_certificate(cert_name, [cer(first)])
    deleted = certs.delete_certificate_operation(cert_name)
    assert deleted.status == "cancelled"
    with pytest.raises(ResourceNotFoundError):
        certs.get_certificate_operation(cert_name)
    assert version(certs.get_certificate(cert_name)) == version(first)
    # A cancelled operation no longer blocks a new one.
    assert pending(certs, cert_name, manual_policy()).status == "inProgress"


@pytest.mark.parametrize(
    "policy",
    [
        {"key_props": {"kty": "RSA", "key_size": 1024}, "x509_props": {"subject": "CN=a"}},
        {"key_props": {"kty": "EC", "crv": "P-999"}, "x509_props": {"subject": "CN=a"}},
        {"key_props": {"kty": "oct"}, "x509_props": {"subject": "CN=a"}},
        {"x509_props": {"subject": "CN=a", "validity_months": 0}},
        {"x509_props": {"subject": "XX=a"}},
        {"x509_props": {"subject": "CN=a", "sans": {"dns_names": ["bad name"]}}},
        {"secret_props": {"contentType": "text/plain"}, "x509_props": {"subject": "CN=a"}},
        {"issuer": {"name": "DigiCert"}, "x509_props": {"subject": "CN=a"}},
        {
            "x509_props": {"subject": "CN=a"},
            "lifetime_actions": [{"trigger": {}, "action": {"action_type": "X"}}],
        },
        {"x509_props": {}},
        "not an object",
    ],
)
def test_hostile_policies_are_refused_with_400(emulator: KeyVaultEmulator, policy: Any) -> None:
    cert_name = name()
    status, answer = call(emulator, "POST", f"/certificates/{cert_name}/create", {"policy": policy})
    assert status == 400 and answer["error"]["code"] == "BadParameter", answer
    assert call(emulator, "GET", f"/certificates/{cert_name}/pending")[0] == 404


def test_near_expiry_and_expired_events_for_the_current_version(
    emulator: KeyVaultEmulator, certs: CertificateClient
) -> None:
    cert_name = name()
    policy = CertificatePolicy(issuer_name="Self", subject="CN=ev.example.test", validity_in_months=2)
    issued = created(certs, cert_name, policy)
    expires = props(issued).expires_on
    assert expires is not None

    def published() -> list[dict[str, Any]]:
        # The certificate's secret and key have their own SecretNearExpiry / KeyNearExpiry.
        events = emulator.publish_due_events()
        return [e for e in events if e["subject"] == cert_name and e["data"]["ObjectType"] == "Certificate"]

    assert published() == []
    emulator.clock.set_offset(expires - dt.timedelta(days=29) - dt.datetime.now(dt.UTC))
    (near,) = published()
    assert near["eventType"] == CERTIFICATE_NEAR_EXPIRY
    assert near["data"]["ObjectType"] == "Certificate" and near["data"]["Version"] == version(issued)
    assert near["data"]["Id"] == f"{emulator.vault_url}/certificates/{cert_name}/{version(issued)}"
    assert published() == []  # once
    emulator.clock.set_offset(expires + dt.timedelta(seconds=1) - dt.datetime.now(dt.UTC))
    assert [e["eventType"] for e in published()] == [CERTIFICATE_EXPIRED]
    assert emulator.certificates.event_for(cert_name)["eventType"] == CERTIFICATE_NEAR_EXPIRY
