"""The stand-ins behind certificate renewal: Azure DNS (azure-mgmt-dns), the stack's DNS server, pebble."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
import requests
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.mgmt.dns import DnsManagementClient
from azure.mgmt.dns.models import RecordSet, TxtRecord
from cryptography import x509

from devstack.arm_dns import ArmDnsStandIn
from devstack.dns_server import DnsServer
from devstack.keyvault import KeyVaultEmulator
from devstack.pebble import Pebble, find_pebble

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyVaultEmulator]:
    with KeyVaultEmulator(tmp_path_factory.mktemp("certificates-devstack")) as kv:
        yield kv


@pytest.fixture(scope="module")
def arm_dns(emulator: KeyVaultEmulator) -> Iterator[ArmDnsStandIn]:
    with ArmDnsStandIn(emulator.state_dir, emulator) as stand_in:
        stand_in.add_zone("example.test")
        yield stand_in


@pytest.fixture(scope="module")
def dns_server(arm_dns: ArmDnsStandIn) -> Iterator[DnsServer]:
    with DnsServer(arm_dns.txt) as server:
        yield server


def client(emulator: KeyVaultEmulator, arm_dns: ArmDnsStandIn) -> DnsManagementClient:
    return DnsManagementClient(
        emulator.credential(),
        SUBSCRIPTION,
        base_url=arm_dns.endpoint,
        connection_verify=str(emulator.ca_path),
        retry_total=0,
    )


def ask(server: DnsServer, name: str, rdtype: str = "TXT") -> dns.message.Message:
    host, port = server.address.split(":")
    return dns.query.udp(dns.message.make_query(name, rdtype), host, port=int(port), timeout=5)


def test_txt_records_through_azure_mgmt_dns_are_answered_by_the_dns_server(
    emulator: KeyVaultEmulator, arm_dns: ArmDnsStandIn, dns_server: DnsServer
) -> None:
    dns_client = client(emulator, arm_dns)
    record = RecordSet(ttl=60, txt_records=[TxtRecord(value=["token-one"]), TxtRecord(value=["token-two"])])
    created = dns_client.record_sets.create_or_update(
        "devstack", "example.test", "_acme-challenge.app", "TXT", record
    )
    assert created.fqdn == "_acme-challenge.app.example.test." and created.etag
    fetched = dns_client.record_sets.get("devstack", "example.test", "_acme-challenge.app", "TXT")
    assert [r.value for r in fetched.txt_records or []] == [["token-one"], ["token-two"]]
    # A stale ETag is refused, as ARM does.
    with pytest.raises(HttpResponseError) as stale:
        dns_client.record_sets.create_or_update(
            "devstack", "example.test", "_acme-challenge.app", "TXT", record, if_match="not-the-etag"
        )
    assert stale.value.status_code == 412

    answer = ask(dns_server, "_acme-challenge.app.example.test.")
    assert answer.rcode() == dns.rcode.NOERROR
    texts = sorted(b"".join(r.strings).decode() for rrset in answer.answer for r in rrset)
    assert texts == ["token-one", "token-two"]

    dns_client.record_sets.delete("devstack", "example.test", "_acme-challenge.app", "TXT")
    with pytest.raises(ResourceNotFoundError):
        dns_client.record_sets.get("devstack", "example.test", "_acme-challenge.app", "TXT")
    assert ask(dns_server, "_acme-challenge.app.example.test.").rcode() == dns.rcode.NXDOMAIN
    assert ask(dns_server, "elsewhere.invalid.").rcode() == dns.rcode.REFUSED
    assert arm_dns.record_sets() == {}


def test_the_dns_stand_in_refuses_strangers_and_hostile_bodies(
    emulator: KeyVaultEmulator, arm_dns: ArmDnsStandIn, dns_server: DnsServer
) -> None:
    zone_path = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/devstack/providers/Microsoft.Network/dnsZones"
    url = f"{arm_dns.endpoint}{zone_path}/example.test/TXT/x?api-version=2018-05-01"
    anonymous = requests.put(
        url, json={"properties": {"TXTRecords": [{"value": ["v"]}]}}, verify=str(emulator.ca_path), timeout=10
    )
    assert anonymous.status_code == 401 and "WWW-Authenticate" in anonymous.headers
    token, _ = emulator.issue_token("https://vault.azure.net")  # a token for another audience
    headers = {"Authorization": f"Bearer {token}"}
    assert requests.get(url, headers=headers, verify=str(emulator.ca_path), timeout=10).status_code == 401
    token, _ = emulator.issue_token("https://management.azure.com")
    headers = {"Authorization": f"Bearer {token}"}
    for body in ({"properties": {"TXTRecords": [{"value": [1]}]}}, {"properties": {"TTL": -1}}, ["x"]):
        answer = requests.put(url, json=body, headers=headers, verify=str(emulator.ca_path), timeout=10)
        assert answer.status_code == 400 and answer.json()["error"]["code"], body
    other_zone = f"{arm_dns.endpoint}{zone_path}/other.test/TXT/x?api-version=2018-05-01"
    assert (
        requests.get(other_zone, headers=headers, verify=str(emulator.ca_path), timeout=10).status_code == 404
    )
    assert arm_dns.record_sets() == {}
    # Garbage on the DNS port is dropped; the server keeps answering.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        host, port = dns_server.address.split(":")
        sock.sendto(b"\x00garbage", (host, int(port)))
    assert ask(dns_server, "nothing.example.test.").rcode() == dns.rcode.NXDOMAIN


@pytest.fixture(scope="module")
def pebble(emulator: KeyVaultEmulator, dns_server: DnsServer) -> Iterator[Pebble]:
    if find_pebble() is None:
        pytest.skip(
            "pebble (the ACME test server) is not installed: run scripts/setup, or apt-get install pebble"
        )
    with Pebble(Path(emulator.state_dir), dns_server.address) as server:
        yield server


def test_pebble_serves_its_directory_over_tls_from_the_stack_ca_and_its_own_root(pebble: Pebble) -> None:
    directory = requests.get(pebble.directory_url, verify=str(pebble.ca_path), timeout=10).json()
    assert {"newAccount", "newNonce", "newOrder"} <= set(directory)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(pebble.directory_url, timeout=10)  # the system roots do not know it
    root = x509.load_pem_x509_certificate(pebble.root_pem())
    assert root.issuer == root.subject
    assert "Pebble Root CA" in root.subject.rfc4514_string()
