"""Certificate renewal end to end: the unmodified CertificateClient against the emulator, pebble as
the ACME CA validating DNS-01 against the stack's DNS server, which answers from the Azure DNS
stand-in that the service wrote to through azure-mgmt-dns."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import TableServiceClient
from azure.keyvault.certificates import (
    CertificateClient,
    CertificateContentType,
    CertificatePolicy,
    KeyType,
    KeyVaultCertificate,
)
from azure.keyvault.keys import KeyClient
from azure.keyvault.secrets import SecretClient
from azure.mgmt.dns import DnsManagementClient
from azure.mgmt.dns.models import RecordSet, TxtRecord
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.verification import PolicyBuilder, Store

from devstack.arm_dns import ArmDnsStandIn
from devstack.dns_server import DnsServer
from devstack.pebble import Pebble, find_pebble
from devstack.stack import LocalStack
from rotators import RotatorRegistry
from shared import cli
from shared.acme import ACME_ROTATOR, TAG_ACME_DIRECTORY, TAG_DNS_ZONE
from shared.certificates import RENEWAL_POINTS, CertificateRenewal, use_renewal
from shared.config import TAG_ROTATOR
from shared.ledger import Ledger
from shared.runtime import Runtime
from shared.settings import Settings
from tests.crashes import SimulatedCrash, TestClock
from tests.hosting import call_http, deliver_event

ZONE = "certs.test"
SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
ZONE_ID = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/devstack/providers/Microsoft.Network/dnszones/{ZONE}"


@dataclass
class Dns:
    """The DNS server's answers, which a test may falsify (as a hijacked or stale zone would)."""

    stand_in: ArmDnsStandIn
    falsify: bool = False
    queries: list[str] = field(default_factory=list)

    def lookup(self, name: str) -> list[list[str]] | None:
        self.queries.append(name)
        found = self.stand_in.txt(name)
        return [["not-the-token"]] if self.falsify and found else found


@dataclass
class Acme:
    stack: LocalStack
    arm_dns: ArmDnsStandIn
    dns: Dns
    pebble: Pebble


@pytest.fixture(scope="module")
def acme(stack: LocalStack) -> Iterator[Acme]:
    if find_pebble() is None:
        pytest.skip(
            "pebble (the ACME test server) is not installed: run scripts/setup, or apt-get install pebble"
        )
    with ArmDnsStandIn(stack.vault.state_dir, stack.vault) as arm_dns:
        arm_dns.add_zone(ZONE)
        dns = Dns(arm_dns)
        with DnsServer(dns.lookup) as server, Pebble(stack.vault.state_dir, server.address) as pebble:
            yield Acme(stack, arm_dns, dns, pebble)


@dataclass
class World:
    acme: Acme
    renewal: CertificateRenewal
    certs: CertificateClient
    clock: TestClock
    notes: list[dict[str, Any]]
    crash_at: set[str]
    provisioned: list[str] = field(default_factory=list)

    @property
    def vault_url(self) -> str:
        return self.acme.stack.vault.vault_url

    def renew(self, name: str, **kwargs: Any) -> Any:
        kwargs.setdefault("trigger", "event:CertificateNearExpiry")
        kwargs.setdefault("requested_by", "eventgrid:test")
        return self.renewal.renew(self.vault_url, name, **kwargs)


@pytest.fixture
def world(acme: Acme) -> Iterator[World]:
    vault = acme.stack.vault
    ca = str(vault.ca_path)
    settings = Settings.from_env(
        {
            "ROTATION_ALLOWED_VAULTS": vault.vault_url,
            "ROTATION_ALLOWED_TARGETS": f"127.0.0.1:{acme.pebble.directory_url.split(':')[2].split('/')[0]}",
            "ROTATION_ALLOWED_NETWORKS": "127.0.0.0/8",
            "ROTATION_UPSTREAM_CA_BUNDLE": ca,
            "KEYVAULT_CA_BUNDLE": ca,
        }
    )
    tables = TableServiceClient.from_connection_string(acme.stack.azurite.connection_string)
    ledger = Ledger.from_service(tables, f"cert{uuid.uuid4().hex[:8]}")
    ledger.ensure_tables()
    clock = TestClock()
    crash_at: set[str] = set()
    notes: list[dict[str, Any]] = []

    def checkpoint(point: str) -> None:
        if point in crash_at:
            crash_at.discard(point)
            raise SimulatedCrash(point)

    options: dict[str, Any] = {"verify_challenge_resource": False, "connection_verify": ca}
    rt = Runtime(
        secret_client=lambda url: SecretClient(url, vault.credential(), **options),
        ledger=ledger,
        rotators=RotatorRegistry(),
        settings=settings,
        credential=vault.credential(),
        clock=clock.now,
        probe=lambda _url, _deadline: None,
        checkpoint=checkpoint,
        notify=notes.append,
    )
    certs = CertificateClient(vault.vault_url, vault.credential(), **options)
    renewal = CertificateRenewal(
        rt,
        lambda url: CertificateClient(url, vault.credential(), **options),
        lambda subscription: DnsManagementClient(
            vault.credential(), subscription, base_url=acme.arm_dns.endpoint, connection_verify=ca
        ),
    )
    acme.dns.falsify = False
    made = World(acme, renewal, certs, clock, notes, crash_at)
    yield made
    acme.dns.falsify = False
    acme.arm_dns.clear_faults()
    # The vault outlives this module: untagged, these certificates are nobody's business later
    # (other tests' sweeps and published events would otherwise find them opted in).
    for name in made.provisioned:
        certs.update_certificate_properties(name, tags={})


def acme_tags(acme: Acme, **changes: str) -> dict[str, str]:
    return {
        TAG_ROTATOR: ACME_ROTATOR,
        TAG_ACME_DIRECTORY: acme.pebble.directory_url,
        TAG_DNS_ZONE: ZONE_ID,
        **changes,
    }


def provision(
    world: World, tags: dict[str, str] | None = None, names: list[str] | None = None
) -> tuple[str, str]:
    """A certificate as its owner made it (self-signed first, RSA 3072, PEM), tagged and bound."""
    name = f"cert-{uuid.uuid4().hex[:10]}"
    dns_names = names or [f"app-{name}.{ZONE}"]
    policy = CertificatePolicy(
        issuer_name="Self",
        subject=f"CN={dns_names[0]}",
        san_dns_names=dns_names,
        key_type=KeyType.rsa,
        key_size=3072,
        content_type=CertificateContentType.pem,
        validity_in_months=3,
    )
    first = world.certs.begin_create_certificate(name, policy, tags=tags or acme_tags(world.acme)).result()
    world.provisioned.append(name)
    assert isinstance(first, KeyVaultCertificate) and first.properties and first.properties.version
    return name, first.properties.version


def versions(world: World, name: str) -> list[str]:
    return [p.version or "" for p in world.certs.list_properties_of_certificate_versions(name)]


def current(world: World, name: str) -> str:
    cert = world.certs.get_certificate(name)
    assert cert.properties is not None
    return cert.properties.version or ""


def no_pending(world: World, name: str) -> bool:
    try:
        operation = world.certs.get_certificate_operation(name)
    except ResourceNotFoundError:
        return True
    return operation.status != "inProgress"


def challenge_records(world: World) -> dict[str, list[list[str]]]:
    return {k: v for k, v in world.acme.arm_dns.record_sets().items() if k.startswith("_acme-challenge.")}


def test_an_event_gives_a_new_version_that_chains_to_pebbles_root_with_the_policys_key(world: World) -> None:
    name, first = provision(world)
    assert world.renewal.bind(world.vault_url, name, "operator@test").status == "bound"
    event = world.acme.stack.vault.certificates.event_for(name)
    world.acme.dns.queries.clear()

    outcome = world.renew(name, expected_version=event["data"]["Version"])

    assert outcome.status == "rotated", outcome.message
    new = current(world, name)
    assert new == outcome.new_version != first and versions(world, name) == [first, new]
    secret = SecretClient(
        world.vault_url,
        world.acme.stack.vault.credential(),
        verify_challenge_resource=False,
        connection_verify=str(world.acme.stack.vault.ca_path),
    ).get_secret(name)
    assert secret.properties.version == new and secret.properties.content_type == "application/x-pem-file"
    pem = (secret.value or "").encode()
    leaf, *intermediates = x509.load_pem_x509_certificates(pem)
    root = x509.load_pem_x509_certificate(world.acme.pebble.root_pem())
    dns_name = f"app-{name}.{ZONE}"
    verifier = PolicyBuilder().store(Store([root])).build_server_verifier(x509.DNSName(dns_name))
    chain = verifier.verify(leaf, intermediates)
    assert chain[-1] == root
    private = serialization.load_pem_private_key(pem, None)
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 3072
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert private.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki)
    key = KeyClient(
        world.vault_url,
        world.acme.stack.vault.credential(),
        verify_challenge_resource=False,
        connection_verify=str(world.acme.stack.vault.ca_path),
    ).get_key(name)
    assert key.properties.version == new and key.key_type == "RSA"
    # pebble really asked for the record, and the record is gone again.
    assert f"_acme-challenge.{dns_name}." in world.acme.dns.queries
    assert challenge_records(world) == {}
    # The previous version is still there, valid until it expires.
    assert world.certs.get_certificate_version(name, first).properties.enabled  # type: ignore[union-attr]
    # The same event again is stale: one event, one new version.
    assert world.renew(name, expected_version=event["data"]["Version"]).status == "stale"
    assert versions(world, name) == [first, new]
    history = world.renewal.rt.ledger.rotations(world.vault_url, name)
    assert [h.outcome for h in history] == ["rotated"]


@pytest.mark.parametrize("point", [*RENEWAL_POINTS, "after:create-call"])
def test_a_crash_at_every_step_resumes_to_one_new_version(world: World, point: str) -> None:
    name, first = provision(world)
    world.renewal.bind(world.vault_url, name, "operator@test")
    world.crash_at.add(point)
    with pytest.raises(SimulatedCrash):
        world.renew(name, expected_version=first)
    # Within the lease a second run backs off; after it, the sweep or a retried event resumes.
    if point != "after:cleanup":
        assert world.renew(name, expected_version=first).status == "in_progress"
    world.clock.advance(timedelta(minutes=11))
    outcome = world.renew(name, expected_version=first, trigger="sweep", requested_by="timer")
    assert outcome.status == "rotated", outcome.message
    assert len(versions(world, name)) == 2 and versions(world, name)[0] == first
    assert current(world, name) == outcome.new_version != first
    assert no_pending(world, name) and challenge_records(world) == {}


def dns(world: World) -> DnsManagementClient:
    return DnsManagementClient(
        world.acme.stack.vault.credential(),
        SUBSCRIPTION,
        base_url=world.acme.arm_dns.endpoint,
        connection_verify=str(world.acme.stack.vault.ca_path),
    )


def test_a_challenge_record_set_shared_with_someone_else_keeps_their_value(world: World) -> None:
    # `app` and `*.app` (or another tool) validate at the same name: only our own value comes and goes.
    name, first = provision(world)
    world.renewal.bind(world.vault_url, name, "operator@test")
    relative = f"_acme-challenge.app-{name}"
    theirs = RecordSet(ttl=60, txt_records=[TxtRecord(value=["someone-elses-token"])])
    dns(world).record_sets.create_or_update("devstack", ZONE, relative, "TXT", theirs)
    fqdn = f"{relative}.{ZONE}"

    world.crash_at.add("after:txt")
    with pytest.raises(SimulatedCrash):
        world.renew(name, expected_version=first)
    during = world.acme.arm_dns.txt(fqdn) or []
    assert ["someone-elses-token"] in during and len(during) == 2

    world.clock.advance(timedelta(minutes=11))
    assert (
        world.renew(name, expected_version=first, trigger="sweep", requested_by="timer").status == "rotated"
    )
    assert world.acme.arm_dns.txt(fqdn) == [["someone-elses-token"]]
    dns(world).record_sets.delete("devstack", ZONE, relative, "TXT")


def test_a_record_set_changed_between_read_and_write_is_read_again(world: World) -> None:
    name, first = provision(world)
    world.renewal.bind(world.vault_url, name, "operator@test")
    world.acme.arm_dns.inject_fault(412, times=1, method="PUT")
    assert world.renew(name, expected_version=first).status == "rotated"
    assert challenge_records(world) == {}

    other, other_first = provision(world)
    world.renewal.bind(world.vault_url, other, "operator@test")
    world.acme.arm_dns.inject_fault(412, times=99, method="PUT")
    outcome = world.renew(other, expected_version=other_first)
    assert outcome.status == "failed" and "kept changing" in outcome.message, outcome.message
    assert versions(world, other) == [other_first] and no_pending(world, other)


def test_a_failing_challenge_leaves_the_current_version_and_is_reported(world: World) -> None:
    name, first = provision(world)
    world.renewal.bind(world.vault_url, name, "operator@test")
    world.acme.dns.falsify = True  # pebble reads a TXT value that is not the key authorization

    outcome = world.renew(name, expected_version=first)

    assert outcome.status == "failed" and "ACME" in outcome.message, outcome.message
    assert versions(world, name) == [first] and current(world, name) == first
    assert no_pending(world, name) and challenge_records(world) == {}
    assert [n["status"] for n in world.notes] == ["failed"]
    row = world.renewal.rt.ledger.get(world.vault_url, name)
    assert row is not None and row.last_outcome == "failed" and row.state == "failed"
    # Once the zone answers right again, the next attempt renews.
    world.acme.dns.falsify = False
    assert world.renew(name, expected_version=first).status == "rotated"


def test_a_refused_dns_write_or_a_broken_directory_leaves_the_current_version(world: World) -> None:
    name, first = provision(world)
    world.renewal.bind(world.vault_url, name, "operator@test")
    world.acme.arm_dns.inject_fault(403, method="PUT")
    outcome = world.renew(name, expected_version=first)
    assert outcome.status == "failed" and "Azure refused" in outcome.message, outcome.message
    assert versions(world, name) == [first] and no_pending(world, name)

    broken = acme_tags(world.acme, **{TAG_ACME_DIRECTORY: world.acme.pebble.directory_url + "-missing"})
    other, other_first = provision(world, tags=broken)
    world.renewal.bind(world.vault_url, other, "operator@test")
    outcome = world.renew(other, expected_version=other_first)
    assert outcome.status == "failed", outcome.message
    assert versions(world, other) == [other_first] and no_pending(world, other)
    assert [n["status"] for n in world.notes] == ["failed", "failed"]


HOSTILE: list[tuple[str, Callable[[Acme], dict[str, str]], list[str] | None]] = [
    ("unknown rotation tag", lambda a: acme_tags(a, **{"rotation-slots": "a,b"}), None),
    ("plain http directory", lambda a: acme_tags(a, **{TAG_ACME_DIRECTORY: "http://127.0.0.1:1/dir"}), None),
    (
        "directory off the allow-list",
        lambda a: acme_tags(a, **{TAG_ACME_DIRECTORY: "https://127.0.0.1:1/dir"}),
        None,
    ),
    ("metadata address", lambda a: acme_tags(a, **{TAG_ACME_DIRECTORY: "https://169.254.169.254/dir"}), None),
    ("zone not an ARM id", lambda a: acme_tags(a, **{TAG_DNS_ZONE: "certs.test"}), None),
    ("names outside the zone", acme_tags, ["www.victim.example"]),
]


@pytest.mark.parametrize(("case", "tags", "names"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_tags_are_refused_and_nothing_changes(
    world: World, case: str, tags: Callable[[Acme], dict[str, str]], names: list[str] | None
) -> None:
    name, first = provision(world, tags=tags(world.acme), names=names)
    assert world.renewal.bind(world.vault_url, name, "operator@test").status == "misconfigured"
    outcome = world.renew(name, expected_version=first)
    assert outcome.status in ("refused", "misconfigured"), outcome.message
    assert versions(world, name) == [first] and no_pending(world, name) and challenge_records(world) == {}


def test_unbound_or_retargeted_certificates_are_refused(world: World) -> None:
    name, first = provision(world)
    outcome = world.renew(name, expected_version=first)
    assert outcome.status == "refused" and "never bound" in outcome.message
    world.renewal.bind(world.vault_url, name, "operator@test")
    # The tag writer points the bound certificate at another zone: refused until an operator binds.
    elsewhere = ZONE_ID.replace("resourceGroups/devstack", "resourceGroups/other-team")
    world.certs.update_certificate_properties(
        name, first, tags=acme_tags(world.acme, **{TAG_DNS_ZONE: elsewhere})
    )
    outcome = world.renew(name, expected_version=first)
    assert outcome.status == "refused" and "bind it again" in outcome.message
    assert versions(world, name) == [first] and no_pending(world, name)
    assert [n["status"] for n in world.notes] == ["refused", "refused"]
    # Reported once per version and tags: a repeat is a log line, and the sweep leaves it alone.
    assert world.renew(name, expected_version=first).status == "refused"
    world.clock.advance(timedelta(days=70))
    assert name not in [o.secret for o in world.renewal.sweep()]
    # (The sweep also meets the other tests' certificates in this vault: only this one counts.)
    assert len([n for n in world.notes if n["secret"] == name]) == 2 and versions(world, name) == [first]


@pytest.fixture
def installed(world: World, app_settings: dict[str, str]) -> Iterator[World]:
    """The function app's triggers, HTTP routes and CLI use this world's renewal service."""
    use_renewal(world.renewal)
    yield world
    use_renewal(None)


def test_the_function_app_renews_on_an_event_on_a_route_and_from_the_cli(
    installed: World, capsys: pytest.CaptureFixture[str]
) -> None:
    world = installed
    name, first = provision(world)
    bound = call_http("bind_certificate", "POST", f"certificates/{name}/bind", route_params={"name": name})
    assert bound.status_code == 200, bound.get_body()
    deliver_event([world.acme.stack.vault.certificates.event_for(name)])
    second = current(world, name)
    assert versions(world, name) == [first, second]

    renewed = call_http(
        "renew_certificate", "POST", f"certificates/{name}/renew", route_params={"name": name}
    )
    assert renewed.status_code == 200 and json.loads(renewed.get_body())["status"] == "rotated"
    third = current(world, name)
    assert cli.run(["renew-certificate", name]) == 0
    assert "rotated" in capsys.readouterr().out
    assert len(versions(world, name)) == 4 and versions(world, name)[:3] == [first, second, third]

    status = call_http(
        "certificate_renewal_status", "GET", f"certificates/{name}/renewal", route_params={"name": name}
    )
    body = json.loads(status.get_body())
    assert status.status_code == 200 and body["current_version"] == current(world, name)
    assert [h["outcome"] for h in body["history"]] == ["rotated"] * 3
    listed = json.loads(call_http("list_certificates", "GET", "certificates").get_body())["value"]
    assert {"certificate": name, "state": "idle", "last_outcome": "rotated"}.items() <= next(
        item for item in listed if item["certificate"] == name
    ).items()
    capsys.readouterr()
    assert cli.run(["certificate-status", name]) == 0
    shown = capsys.readouterr().out
    assert f"current_version  {current(world, name)}" in shown and shown.count("rotated") >= 3
    assert cli.run(["certificates"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(name))
    assert row.split()[1:2] == ["idle"] and "rotated" in row
    assert cli.run(["certificate-status", "no-such-cert"]) == 2
    assert "404 not_found" in capsys.readouterr().err
    unknown = call_http(
        "renew_certificate", "POST", "certificates/nope/renew", route_params={"name": "no_pe"}
    )
    assert unknown.status_code == 400


def test_the_sweep_renews_a_certificate_whose_event_never_came(world: World) -> None:
    name, first = provision(world)
    world.renewal.bind(world.vault_url, name, "operator@test")
    assert name not in [o.secret for o in world.renewal.sweep()]  # not due yet
    world.clock.advance(timedelta(days=70))  # 3 months of validity: within the 28-day lead
    outcomes = {o.secret: o.status for o in world.renewal.sweep()}
    assert outcomes[name] == "rotated", outcomes
    assert len(versions(world, name)) == 2 and versions(world, name)[0] == first
