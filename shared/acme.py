"""What the ACME renewal (shared/certificates.py) reads and writes outside Key Vault: a
certificate's opt-in tags, checked; the adapter that keeps the ACME client on the directory's host;
and the DNS-01 TXT record sets in Azure DNS."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.mgmt.dns import DnsManagementClient
from azure.mgmt.dns.models import RecordSet, TxtRecord
from requests import PreparedRequest, Response

from shared.config import TAG_ROTATOR
from shared.errors import ConfigError, TargetNotAllowed
from shared.reach import PinnedAdapter
from shared.retry import call_with_retry

ACME_ROTATOR = "acme"
TAG_ACME_DIRECTORY = "rotation-acme-directory"
TAG_DNS_ZONE = "rotation-dns-zone"
KNOWN_TAGS = frozenset({TAG_ROTATOR, TAG_ACME_DIRECTORY, TAG_DNS_ZONE})
_ZONE_ID = re.compile(
    r"^/subscriptions/(?P<sub>[0-9a-fA-F-]{36})/resourceGroups/(?P<rg>[-\w._()]{1,90})"
    r"/providers/Microsoft\.Network/dns[zZ]ones/(?P<zone>[a-z0-9.-]{1,253})$",
    re.IGNORECASE,
)
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_TXT_TTL = 60


def _dns_name(name: str) -> bool:
    labels = name.split(".")
    return len(name) <= 253 and len(labels) >= 2 and all(_LABEL.match(label) for label in labels)


@dataclass(frozen=True)
class AcmeConfig:
    """What an opted-in certificate's tags and policy say, checked."""

    directory: str
    host: str
    port: int
    subscription: str
    resource_group: str
    zone: str
    dns_names: tuple[str, ...]

    def binding(self) -> str:
        """What an operator's bind pins: the CA, the zone and the names."""
        return json.dumps(
            {
                "rotator": ACME_ROTATOR,
                "directory": self.directory,
                "zone": f"{self.subscription}/{self.resource_group}/{self.zone}",
                "names": ",".join(self.dns_names),
            },
            sort_keys=True,
        )

    def relative_name(self, domain: str) -> str:
        """The record set name of `_acme-challenge.<domain>` in the zone."""
        fqdn = f"_acme-challenge.{domain.removeprefix('*.')}"
        return fqdn[: -len(self.zone) - 1]


def is_acme_managed(tags: dict[str, str] | None) -> bool:
    return (tags or {}).get(TAG_ROTATOR, "").strip() == ACME_ROTATOR


def parse_acme_config(
    tags: dict[str, str] | None, dns_names: list[str] | None, settings: Any, vault_url: str
) -> AcmeConfig:
    """Strict: every `rotation-*` tag known, an https directory on the vault's allow-list, a zone
    given as its ARM id, and every name of the policy inside that zone. Raises ConfigError."""
    tags = tags or {}
    unknown = sorted(k for k in tags if k.lower().startswith("rotation-") and k not in KNOWN_TAGS)
    if unknown:
        raise ConfigError(f"unknown rotation tag(s) on a certificate: {', '.join(unknown)[:200]}")
    directory = (tags.get(TAG_ACME_DIRECTORY) or "").strip()
    parts = urlsplit(directory)
    if (
        parts.scheme != "https"
        or not parts.hostname
        or parts.username
        or parts.password
        or parts.fragment
        or len(directory) > 512
        or not directory.isascii()
        or any(c.isspace() for c in directory)
    ):
        raise ConfigError(f"tag {TAG_ACME_DIRECTORY} must be the https URL of an ACME directory")
    port = parts.port or 443
    if not settings.target_allowed(parts.hostname, port, vault_url):
        raise TargetNotAllowed(
            f"ACME directory host {parts.hostname}:{port} is not in the vault's allowed targets"
        )
    match = _ZONE_ID.match((tags.get(TAG_DNS_ZONE) or "").strip())
    zone = match.group("zone").lower().rstrip(".") if match else ""
    if match is None or not _dns_name(zone):
        raise ConfigError(
            f"tag {TAG_DNS_ZONE} must be a DNS zone's ARM id: "
            "/subscriptions/<id>/resourceGroups/<group>/providers/Microsoft.Network/dnszones/<zone>"
        )
    names = [n.lower().rstrip(".") for n in dns_names or []]
    if not names or len(names) > 100:
        raise ConfigError("the certificate's policy must name 1 to 100 DNS names (subject alternative names)")
    for name in names:
        base = name.removeprefix("*.")
        if not _dns_name(base) or not (base == zone or base.endswith(f".{zone}")):
            raise ConfigError(f"DNS name {name[:80]!r} of the policy is not in zone {zone}")
    return AcmeConfig(
        directory=directory,
        host=parts.hostname.lower(),
        port=port,
        subscription=match.group("sub").lower(),
        resource_group=match.group("rg"),
        zone=zone,
        dns_names=tuple(sorted(set(names))),
    )


class OneHostAdapter(PinnedAdapter):
    """The pinned adapter, for the directory's host only: an ACME server's answers name the URLs
    the client goes to next, and none of them may take it anywhere else."""

    def __init__(self, settings: Any, host: str, port: int) -> None:
        self._host, self._port = host, port
        super().__init__(settings)

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        parts = urlsplit(request.url or "")
        if (
            parts.scheme != "https"
            or (parts.hostname or "").lower() != self._host
            or (parts.port or 443) != self._port
        ):
            raise TargetNotAllowed(f"the ACME server sent the client to {parts.hostname}, off its own host")
        return super().send(request, *args, **kwargs)


class RenewalFailed(Exception):
    """The CA refused the order or a challenge: nothing was issued."""


class DnsContended(RenewalFailed):
    """A TXT record set changed under every one of our read-modify-write attempts."""


class TxtRecords:
    """The DNS-01 TXT record sets of one zone, changed by read-modify-write on the record set's
    ETag: two certificates naming the same host (`app` and `*.app`) share `_acme-challenge.app`,
    and a renewal adds and removes only its own values, never the other's."""

    _ATTEMPTS = 5

    def __init__(self, dns: DnsManagementClient, resource_group: str, zone: str) -> None:
        self.dns, self.resource_group, self.zone = dns, resource_group, zone

    def add(self, relative: str, tokens: list[str]) -> None:
        def change(values: list[str]) -> list[str]:
            return values + [t for t in tokens if t not in values]

        self._change(relative, change, what="write DNS-01 TXT record")

    def remove(self, relative: str, tokens: set[str]) -> None:
        # No recorded values (a row from before they were kept): the whole record set was ours.
        def change(values: list[str]) -> list[str]:
            return [v for v in values if tokens and v not in tokens]

        self._change(relative, change, what="remove DNS-01 TXT record")

    def _change(self, relative: str, change: Callable[[list[str]], list[str]], what: str) -> None:
        for _ in range(self._ATTEMPTS):
            current = self._read(relative)
            values = [v for r in (current.txt_records if current else None) or [] for v in r.value or []]
            wanted = change(values)
            if current is not None and wanted == values:
                return
            try:
                if wanted:
                    record = RecordSet(ttl=_TXT_TTL, txt_records=[TxtRecord(value=[v]) for v in wanted])
                    call_with_retry(
                        partial(
                            self.dns.record_sets.create_or_update,
                            self.resource_group,
                            self.zone,
                            relative,
                            "TXT",
                            record,
                            **({"if_match": current.etag} if current else {"if_none_match": "*"}),
                        ),
                        what=what,
                    )
                elif current is not None:
                    call_with_retry(
                        partial(
                            self.dns.record_sets.delete,
                            self.resource_group,
                            self.zone,
                            relative,
                            "TXT",
                            if_match=current.etag,
                        ),
                        what=what,
                    )
                return
            except HttpResponseError as error:
                if error.status_code != 412:
                    raise
                # Someone changed the record set between our read and write: read it again.
        raise DnsContended(
            f"the TXT record set {relative[:80]} kept changing under {what};"
            f" gave up after {self._ATTEMPTS} tries"
        )

    def _read(self, relative: str) -> RecordSet | None:
        try:
            return call_with_retry(
                partial(self.dns.record_sets.get, self.resource_group, self.zone, relative, "TXT"),
                what="read DNS-01 TXT record",
            )
        except ResourceNotFoundError:
            return None
