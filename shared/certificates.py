"""Key Vault certificate renewal from an ACME CA (RFC 8555), with DNS-01 through Azure DNS.

Key Vault renews a certificate itself only when it is self-signed or issued by DigiCert or
GlobalSign; for any other CA it publishes `CertificateNearExpiry`. For an opted-in certificate
this service then:

1. **create**: a new pending version with the certificate's own policy and issuer `Unknown`
   (Key Vault makes the key pair: the private key never leaves the vault), and reads its CSR;
2. **order**: an ACME order for that CSR (the `acme` library; the account key is a Key Vault
   secret, registered once);
3. **challenge**: for each authorization, the DNS-01 TXT record through azure-mgmt-dns, then the
   answer; the CA checks the record;
4. **merge**: the issued chain into the pending version, which becomes current;
5. **cleanup**: the TXT records removed.

The previous version stays valid until it expires: no slots, as with keys.

**Opt-in and reach.** Tags on the certificate: `rotation-rotator=acme`,
`rotation-acme-directory=<https URL>` and `rotation-dns-zone=<ARM id of the zone>`; any other
`rotation-*` tag is refused. The directory's host must be on the vault's target allow-list and
resolve to an allowed address; every ACME request goes to that host only, over the pinned
adapter. The names come from the certificate's policy and must lie in the zone. Tags are not
authority: an operator binds the certificate (`bind`), which pins directory, zone and names in
the ledger; a certificate tagged but never bound, or whose tags or names changed since, is
refused until an operator binds again.

**Crash safety.** The ledger row (the secrets' generic row, state `renewing`, never `rotating`,
so the secrets' sweep leaves it alone) records the pending operation's request id, the order URL
and the TXT names *before* each upstream change, under a lease. A resumed renewal finds its pending
version and its order; a pending version it does not know (a crash between create and the
record, or someone else's) is cancelled and deleted. A failed order or challenge removes the TXT
records, cancels the pending version, leaves the current version untouched and is reported.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import requests
from acme import challenges, errors, messages
from acme.client import ClientNetwork, ClientV2
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.keyvault.certificates import (
    CertificateClient,
    CertificateOperation,
    CertificatePolicy,
    CertificateProperties,
    KeyVaultCertificate,
    WellKnownIssuerNames,
)
from azure.keyvault.secrets import SecretClient, SecretProperties
from azure.mgmt.dns import DnsManagementClient
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from josepy.jwk import JWKRSA
from requests import Response

from shared.acme import (
    ACME_ROTATOR,
    AcmeConfig,
    DnsContended,
    OneHostAdapter,
    RenewalFailed,
    TxtRecords,
    is_acme_managed,
    parse_acme_config,
)
from shared.binding import refusal_key, report_once
from shared.config import TAG_ROTATOR
from shared.errors import ConfigError, Refused, TargetNotAllowed
from shared.events import VaultEvent
from shared.ledger import FAILED, IDLE, ConcurrentUpdate, SecretState, as_dict, history_key
from shared.outcomes import (
    BOUND,
    DROPPED,
    IN_PROGRESS,
    INVALID,
    MISCONFIGURED,
    NOT_FOUND,
    NOT_MANAGED,
    REFUSED,
    ROTATED,
    ROTATION_FAILED,
    Outcome,
    describe_error,
    logged,
)
from shared.retry import call_with_retry, is_transient
from shared.runtime import Runtime

logger = logging.getLogger(__name__)

RENEWING = "renewing"
STALE = "stale"
RENEWAL_POINTS = (
    "after:claim",
    "after:create",
    "after:order",
    "after:txt",
    "after:answer",
    "after:finalize",
    "after:merge",
    "after:cleanup",
)
_ORDER_DEADLINE = dt.timedelta(seconds=90)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class _Progress:
    """The in-flight identifiers, as JSON in the row's `pending_credential` (none is a secret)."""

    request_id: str = ""
    order: str = ""
    txt: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()  # our DNS-01 values: public (they are published in DNS), not secrets

    @classmethod
    def of(cls, state: SecretState) -> _Progress:
        raw = json.loads(state.pending_credential or "{}")
        return cls(
            raw.get("request_id", ""),
            raw.get("order", ""),
            tuple(raw.get("txt", ())),
            tuple(raw.get("tokens", ())),
        )

    def store(self, state: SecretState) -> None:
        fields: dict[str, Any] = {"request_id": self.request_id, "order": self.order}
        fields |= {"txt": list(self.txt), "tokens": list(self.tokens)}
        state.pending_credential = json.dumps(fields, sort_keys=True)


class CertificateRenewal:
    """Renews opted-in certificates; shares the ledger, clock, checkpoints and notifier of `rt`."""

    def __init__(
        self,
        rt: Runtime,
        certificate_client: Callable[[str], CertificateClient],
        dns_client: Callable[[str], DnsManagementClient],
    ) -> None:
        self.rt = rt
        self.certificate_client = certificate_client
        self.dns_client = dns_client
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    # ----- entry points ------------------------------------------------------------------------

    def renew(
        self,
        vault_url: str,
        name: str,
        *,
        trigger: str,
        requested_by: str,
        expected_version: str | None = None,
    ) -> Outcome:
        """Renew now (HTTP, CLI), on an event (`expected_version`: the event's), or from the sweep."""
        if not self.rt.settings.vault_allowed(vault_url):
            return logged(Outcome(DROPPED, name, f"vault {vault_url} is not in ROTATION_ALLOWED_VAULTS"))
        with self._lock_for(vault_url, name):
            try:
                return self._renew(vault_url, name, trigger, requested_by, expected_version)
            except ResourceNotFoundError:
                return logged(Outcome(NOT_FOUND, name, "no such certificate in the vault"))
            except HttpResponseError as error:  # Key Vault or the ledger refused before the claim
                message = f"could not start the renewal: {describe_error(error)}"
                return logged(Outcome(ROTATION_FAILED, name, message, retryable=is_transient(error)))

    def bind(self, vault_url: str, name: str, requested_by: str) -> Outcome:
        """An operator pins the certificate's CA, zone and names (audited in history)."""
        client = self.certificate_client(vault_url)
        try:
            current = call_with_retry(lambda: client.get_certificate(name), what="read certificate")
            policy = call_with_retry(
                lambda: client.get_certificate_policy(name), what="read certificate policy"
            )
        except ResourceNotFoundError:
            return logged(Outcome(NOT_FOUND, name, "no such certificate in the vault"))
        tags = (current.properties.tags if current.properties else None) or {}
        if not is_acme_managed(tags):
            return logged(
                Outcome(NOT_MANAGED, name, f"certificate is not tagged {TAG_ROTATOR}={ACME_ROTATOR}")
            )
        try:
            config = parse_acme_config(tags, policy.san_dns_names, self.rt.settings, vault_url)
        except ConfigError as error:
            return logged(Outcome(MISCONFIGURED, name, str(error)))
        state = self.rt.ledger.get(vault_url, name) or SecretState(vault_url=vault_url, name=name)
        now = self.rt.clock()
        state.binding, state.bound_by, state.bound_on = config.binding(), requested_by, now
        bind_id = uuid.uuid4().hex
        bind_state = SecretState(
            vault_url=vault_url, name=name, rotation_id=bind_id, trigger="bind", requested_by=requested_by
        )
        bind_state.started_on, bind_state.history_key = now, history_key(now, bind_id)
        try:
            self.rt.ledger.save(state)
        except ConcurrentUpdate:
            return logged(
                Outcome(IN_PROGRESS, name, "the certificate's ledger row changed meanwhile; bind again")
            )
        self.rt.write_history(bind_state, outcome=BOUND, ended_on=now)
        return logged(
            Outcome(BOUND, name, f"bound by {requested_by}: {config.directory}, zone {config.zone}")
        )

    def handle_event(self, event: VaultEvent) -> Outcome:
        """CertificateNearExpiry / CertificateExpired: renew if the event is about the current version."""
        if not event.is_certificate:
            return logged(Outcome(INVALID, event.name, "not a certificate event"))
        return self.renew(
            event.vault_url,
            event.name,
            trigger=f"event:{event.event_type.rsplit('.', 1)[-1]}",
            requested_by=f"eventgrid:{event.event_id}",
            expected_version=event.version,
        )

    def sweep(self) -> list[Outcome]:
        """Resume renewals that stopped half way, renew opted-in certificates near expiry whose
        event never came (CertificateNearExpiry fires once, 30 days before expiry)."""
        outcomes = []
        now = self.rt.clock()
        states = {
            (s.vault_url, s.name): s
            for s in self.rt.ledger.states()
            if self.rt.settings.vault_allowed(s.vault_url)
        }
        work = {key for key, s in states.items() if s.state == RENEWING and not _leased(s, now)}
        for vault_url in sorted(self.rt.settings.allowed_vaults):
            try:
                due = self.due(vault_url, self.rt.settings.sweep_lead_time)
            except HttpResponseError as error:  # no certificates/list on this vault, throttled...
                logger.warning("certificates of %s not listed: %s", vault_url, describe_error(error))
                continue
            for props in due:
                name = (props.name or "").lower()
                known = states.get((vault_url, name))
                if known is not None and known.refused and self._still_refused(vault_url, name, known):
                    continue  # reported: an operator acts
                last = known.last_attempt_on if known is not None and known.state == FAILED else None
                if last is not None and last + self.rt.settings.retry_after_failure > now:
                    continue
                work.add((vault_url, name))
        for vault_url, name in sorted(work):
            try:
                outcomes.append(self.renew(vault_url, name, trigger="sweep", requested_by="timer"))
            except Exception as error:  # one certificate's failure must not stop the sweep
                logger.error("certificate %s: sweep failed: %s", name, describe_error(error))
                outcomes.append(Outcome(ROTATION_FAILED, name, describe_error(error), retryable=True))
        return outcomes

    def _still_refused(self, vault_url: str, name: str, state: SecretState) -> bool:
        """The refusal recorded is about the current version and tags (a listing names no version)."""
        current = self.certificate_client(vault_url).get_certificate(name).properties
        version, tags = (current.version or "", current.tags) if current else ("", None)
        return state.refused.startswith(refusal_key(version, tags))

    def status(self, vault_url: str, name: str, history: int = 10) -> dict[str, Any]:
        """The certificate's current version and expiry, its renewal row and recent history."""
        client = self.certificate_client(vault_url)
        current = call_with_retry(lambda: client.get_certificate(name), what="read certificate")
        props = current.properties
        state = self.rt.ledger.get(vault_url, name)
        return {
            "certificate": name,
            "vault": vault_url,
            "managed": is_acme_managed(props.tags if props else None),
            "current_version": props.version if props else None,
            "expires_on": props.expires_on.isoformat() if props and props.expires_on else None,
            "state": as_dict(state) if state else None,
            "history": [as_dict(h) for h in self.rt.ledger.rotations(vault_url, name, history)],
        }

    def listing(self, vault_url: str) -> list[dict[str, Any]]:
        """Every opted-in certificate of a vault with its expiry and renewal state."""
        client = self.certificate_client(vault_url)
        states = {s.name: s for s in self.rt.ledger.states(vault_url)}
        items = []
        for props in client.list_properties_of_certificates():
            if not props.name or not is_acme_managed(props.tags):
                continue
            state = states.get(props.name.lower())
            items.append(
                {
                    "certificate": props.name,
                    "vault": vault_url,
                    "expires_on": props.expires_on.isoformat() if props.expires_on else None,
                    "enabled": props.enabled,
                    "state": state.state if state else "unbound",
                    "last_outcome": state.last_outcome if state else "",
                    "last_rotated_on": state.last_rotated_on.isoformat()
                    if state and state.last_rotated_on
                    else None,
                }
            )
        return items

    def due(self, vault_url: str, horizon: dt.timedelta) -> list[CertificateProperties]:
        """Opted-in certificates of a vault whose current version expires within `horizon`
        (for the sweep: the event may never have come)."""
        client = self.certificate_client(vault_url)
        limit = self.rt.clock() + horizon
        due = []
        for props in client.list_properties_of_certificates():
            expiring = props.expires_on is not None and props.expires_on <= limit
            if props.name and props.enabled and is_acme_managed(props.tags) and expiring:
                due.append(props)
        return due

    # ----- the renewal -------------------------------------------------------------------------

    def _renew(
        self, vault_url: str, name: str, trigger: str, requested_by: str, expected_version: str | None
    ) -> Outcome:
        client = self.certificate_client(vault_url)
        current = call_with_retry(lambda: client.get_certificate(name), what="read certificate")
        props = current.properties
        version = ((props.version if props else "") or "").lower()
        tags = dict((props.tags if props else None) or {})
        state = self.rt.ledger.get(vault_url, name) or SecretState(vault_url=vault_url, name=name)
        resuming = state.state == RENEWING
        if expected_version and expected_version.lower() != version and not resuming:
            return logged(Outcome(STALE, name, f"event for version {expected_version}, current is {version}"))
        if not is_acme_managed(tags):
            return logged(
                Outcome(NOT_MANAGED, name, f"certificate is not tagged {TAG_ROTATOR}={ACME_ROTATOR}")
            )
        policy = call_with_retry(lambda: client.get_certificate_policy(name), what="read certificate policy")
        try:
            config = parse_acme_config(tags, policy.san_dns_names, self.rt.settings, vault_url)
            if not state.binding:
                raise Refused(
                    f"tagged but never bound: an operator must bind it (POST /api/certificates/{name}/bind)"
                )
            if state.binding != config.binding():
                raise Refused(
                    f"tags or names changed since the binding: an operator must bind it again "
                    f"(POST /api/certificates/{name}/bind)"
                )
        except (ConfigError, Refused) as error:
            status = REFUSED if isinstance(error, Refused | TargetNotAllowed) else MISCONFIGURED
            # Reported once per version and tags, as for secrets; the sweep skips it until they change.
            message = f"{error}; version {version} is still current"
            return report_once(self.rt, state, cast(SecretProperties, props), status, message)
        now = self.rt.clock()
        if resuming and _leased(state, now):
            return logged(Outcome(IN_PROGRESS, name, "a renewal of this certificate is already in progress"))
        if not resuming:
            rotation_id = uuid.uuid4().hex
            state.state, state.step, state.rotation_id = RENEWING, "create", rotation_id
            state.trigger, state.requested_by, state.started_on = trigger, requested_by, now
            state.from_version, state.new_version, state.pending_credential = version, "", ""
            state.history_key, state.attempts, state.last_error = history_key(now, rotation_id), 0, ""
        state.attempts += 1
        state.last_attempt_on = now
        state.lease_until = now + self.rt.settings.lease
        try:
            self.rt.ledger.save(state)
        except ConcurrentUpdate:
            return logged(Outcome(IN_PROGRESS, name, "a renewal of this certificate is already in progress"))
        self.rt.checkpoint("after:claim")
        try:
            new_version = self._run(client, state, config, policy)
        except DnsContended as error:
            return self._fail(client, state, config, str(error))
        except (RenewalFailed, errors.Error, messages.Error) as error:
            return self._fail(client, state, config, f"the ACME CA refused: {describe_error(error)}")
        except TargetNotAllowed as error:
            return self._fail(client, state, config, str(error))
        except HttpResponseError as error:
            if error.status_code is not None and 400 <= error.status_code < 500 and error.status_code != 429:
                return self._fail(client, state, config, f"Azure refused: {describe_error(error)}")
            return self._retry_later(state, describe_error(error))
        except (requests.RequestException, OSError) as error:
            return self._retry_later(state, describe_error(error))
        return self._finish(state, new_version)

    def _run(
        self, client: CertificateClient, state: SecretState, config: AcmeConfig, policy: CertificatePolicy
    ) -> str:
        progress = _Progress.of(state)
        operation = self._pending_operation(client, state.name)
        if (
            operation is not None
            and operation.status == "completed"
            and operation.request_id == progress.request_id
        ):
            # Merged before a crash: the new version is current already; only the cleanup is left.
            return self._cleanup(client, state, config, progress)
        if (
            operation is None
            or operation.request_id != progress.request_id
            or operation.status != "inProgress"
        ):
            operation = self._create(client, state, policy, operation, progress)
        acme = self._acme(state.vault_url, config)
        order = self._order(acme, state, operation, progress)
        if order.body.status == messages.STATUS_VALID and order.body.certificate:
            # Issued before a crash: fetch what was issued rather than finalize again.
            fullchain = self._post_as_get(acme, order.body.certificate).text
        else:
            self._challenge(acme, state, config, order, progress)
            fullchain = acme.poll_and_finalize(order, dt.datetime.now() + _ORDER_DEADLINE).fullchain_pem
        self.rt.checkpoint("after:finalize")
        chain = [
            c.public_bytes(serialization.Encoding.DER)
            for c in x509.load_pem_x509_certificates(fullchain.encode())
        ]
        call_with_retry(
            lambda: self._merge_once(client, state.name, chain, progress), what="merge certificate"
        )
        self.rt.checkpoint("after:merge")
        return self._cleanup(client, state, config, progress)

    def _pending_operation(self, client: CertificateClient, name: str) -> CertificateOperation | None:
        try:
            return call_with_retry(
                lambda: client.get_certificate_operation(name), what="read pending certificate"
            )
        except ResourceNotFoundError:
            return None

    def _create(
        self,
        client: CertificateClient,
        state: SecretState,
        policy: CertificatePolicy,
        found: CertificateOperation | None,
        progress: _Progress,
    ) -> CertificateOperation:
        if found is not None and found.status == "inProgress":
            # Not ours (we lost its id in a crash, or someone else started one): it goes.
            logger.warning(
                "%s: cancelling an abandoned pending version (request %s)", state.name, found.request_id
            )
            call_with_retry(lambda: client.cancel_certificate_operation(state.name), what="cancel pending")
        if found is not None:
            call_with_retry(lambda: client.delete_certificate_operation(state.name), what="delete pending")
        tags = self._current_tags(client, state.name)
        poller = client.begin_create_certificate(state.name, _with_unknown_issuer(policy), tags=tags)
        operation = poller.result()
        if not isinstance(operation, CertificateOperation) or not operation.csr:
            raise RenewalFailed("Key Vault did not leave a pending version with a CSR")
        self.rt.checkpoint("after:create-call")
        progress.request_id, progress.order, progress.txt = operation.request_id or "", "", ()
        state.step = "order"
        self._save(state, progress)
        self.rt.checkpoint("after:create")
        return operation

    @staticmethod
    def _current_tags(client: CertificateClient, name: str) -> dict[str, str]:
        current = client.get_certificate(name)
        return dict((current.properties.tags if current.properties else None) or {})

    def _acme(self, vault_url: str, config: AcmeConfig) -> ClientV2:
        key = self._account_key(vault_url, config)
        verify = self.rt.settings.upstream_ca_bundle or True
        net = ClientNetwork(key, user_agent="secret-rotation", verify_ssl=cast(bool, verify), timeout=30)
        net.session.mount("https://", OneHostAdapter(self.rt.settings, config.host, config.port))
        net.session.mount("http://", OneHostAdapter(self.rt.settings, config.host, config.port))
        acme = ClientV2(ClientV2.get_directory(config.directory, net), net)
        try:
            acme.new_account(messages.NewRegistration.from_data(terms_of_service_agreed=True))
        except errors.ConflictError as existing:
            # The key is registered already (a renewal before this one): use that account.
            net.account = messages.RegistrationResource(uri=existing.location, body=messages.Registration())
        return acme

    def _account_key(self, vault_url: str, config: AcmeConfig) -> JWKRSA:
        """The ACME account key of this vault and directory, a Key Vault secret (made once)."""
        secrets = self.rt.secret_client(vault_url)
        name = account_secret_name(config.directory)
        try:
            stored = call_with_retry(lambda: secrets.get_secret(name), what="read ACME account key")
            return JWKRSA.json_loads(stored.value or "")
        except ResourceNotFoundError:
            pass
        key = JWKRSA(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
        self._store_account_key(secrets, name, key, config)
        return key

    @staticmethod
    def _store_account_key(secrets: SecretClient, name: str, key: JWKRSA, config: AcmeConfig) -> None:
        secrets.set_secret(
            name,
            key.json_dumps(),
            content_type="application/jose+json",
            tags={"acme-directory": config.directory[:256]},
        )

    def _order(
        self, acme: ClientV2, state: SecretState, operation: CertificateOperation, progress: _Progress
    ) -> messages.OrderResource:
        csr_pem = x509.load_der_x509_csr(bytes(operation.csr or b"")).public_bytes(serialization.Encoding.PEM)
        if progress.order:
            return self._resume_order(acme, progress.order, csr_pem)
        order = acme.new_order(csr_pem)
        progress.order = order.uri or ""
        state.step = "challenge"
        self._save(state, progress)
        self.rt.checkpoint("after:order")
        return order

    @staticmethod
    def _post_as_get(acme: ClientV2, url: str) -> Response:
        return acme.net.post(url, None, new_nonce_url=acme.directory["newNonce"])

    def _resume_order(self, acme: ClientV2, uri: str, csr_pem: bytes) -> messages.OrderResource:
        body = messages.Order.from_json(self._post_as_get(acme, uri).json())
        authorizations = []
        for url in body.authorizations:
            answer = self._post_as_get(acme, url)
            authorizations.append(
                messages.AuthorizationResource(body=messages.Authorization.from_json(answer.json()), uri=url)
            )
        return messages.OrderResource(body=body, uri=uri, authorizations=authorizations, csr_pem=csr_pem)

    def _challenge(
        self,
        acme: ClientV2,
        state: SecretState,
        config: AcmeConfig,
        order: messages.OrderResource,
        progress: _Progress,
    ) -> None:
        if order.body.status == messages.STATUS_INVALID:
            raise RenewalFailed("the order is invalid")
        answers: list[messages.ChallengeBody] = []
        values: dict[str, list[str]] = {}
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue
            if authz.body.status != messages.STATUS_PENDING:
                raise RenewalFailed(f"authorization for {authz.body.identifier.value} is {authz.body.status}")
            challenge = next(
                (c for c in authz.body.challenges if isinstance(c.chall, challenges.DNS01)), None
            )
            if challenge is None:
                raise RenewalFailed(f"the CA offers no dns-01 challenge for {authz.body.identifier.value}")
            domain = str(authz.body.identifier.value).lower()
            if domain not in config.dns_names:
                raise RenewalFailed(f"the CA asks about {domain[:80]}, which the certificate does not name")
            chall = cast(challenges.DNS01, challenge.chall)
            values.setdefault(config.relative_name(domain), []).append(chall.validation(acme.net.key))
            if challenge.status == messages.STATUS_PENDING:
                answers.append(challenge)
        progress.txt = tuple(sorted(set(progress.txt) | set(values)))
        progress.tokens = tuple(sorted(set(progress.tokens).union(*values.values())))
        self._save(state, progress)  # recorded before the records exist: a crash cleans them up
        dns = TxtRecords(self.dns_client(config.subscription), config.resource_group, config.zone)
        for relative, tokens in values.items():
            dns.add(relative, tokens)
        self.rt.checkpoint("after:txt")
        for challenge in answers:
            acme.answer_challenge(challenge, cast(challenges.DNS01, challenge.chall).response(acme.net.key))
        state.step = "finalize"
        self._save(state, progress)
        self.rt.checkpoint("after:answer")

    @staticmethod
    def _merge_once(client: CertificateClient, name: str, chain: list[bytes], progress: _Progress) -> None:
        # A retry after a lost answer finds the operation completed: merged once.
        operation = client.get_certificate_operation(name)
        if operation.request_id == progress.request_id and operation.status == "completed":
            return
        client.merge_certificate(name, chain)

    def _cleanup(
        self, client: CertificateClient, state: SecretState, config: AcmeConfig, progress: _Progress
    ) -> str:
        self._remove_txt(state, config, progress)
        current = call_with_retry(lambda: client.get_certificate(state.name), what="read certificate")
        self.rt.checkpoint("after:cleanup")
        return ((current.properties.version if current.properties else "") or "").lower()

    def _remove_txt(self, state: SecretState, config: AcmeConfig, progress: _Progress) -> None:
        if not progress.txt:
            return
        dns = TxtRecords(self.dns_client(config.subscription), config.resource_group, config.zone)
        for relative in progress.txt:
            dns.remove(relative, set(progress.tokens))
        progress.txt = progress.tokens = ()
        self._save(state, progress)

    # ----- endings -----------------------------------------------------------------------------

    def _finish(self, state: SecretState, new_version: str) -> Outcome:
        now = self.rt.clock()
        state.state, state.step, state.lease_until = IDLE, "", None
        state.new_version = state.current_version = new_version
        state.pending_credential, state.last_outcome, state.last_error = "", ROTATED, ""
        state.last_rotated_on = now
        self._save(state, None)
        self.rt.write_history(state, outcome=ROTATED, ended_on=now)
        message = (
            f"{state.trigger}: version {state.from_version} -> {new_version}; the previous one stays valid"
        )
        return logged(Outcome(ROTATED, state.name, message, state.rotation_id, new_version))

    def _fail(
        self, client: CertificateClient, state: SecretState, config: AcmeConfig, reason: str
    ) -> Outcome:
        progress = _Progress.of(state)
        try:
            self._remove_txt(state, config, progress)
            operation = self._pending_operation(client, state.name)
            if operation is not None and operation.status == "inProgress":
                client.cancel_certificate_operation(state.name)
                client.delete_certificate_operation(state.name)
        except (HttpResponseError, RenewalFailed) as error:
            reason += f" (cleanup incomplete: {describe_error(error)})"
        now = self.rt.clock()
        state.state, state.step, state.lease_until = FAILED, "", None
        state.pending_credential = ""
        if progress.txt:  # the TXT records cleanup could not remove stay named on the row
            _Progress(txt=progress.txt, tokens=progress.tokens).store(state)
        state.last_outcome, state.last_error = ROTATION_FAILED, reason[:500]
        self.rt.save_quietly(state)
        self.rt.write_history(state, outcome=ROTATION_FAILED, ended_on=now, error=reason)
        outcome = Outcome(
            ROTATION_FAILED,
            state.name,
            f"{reason}; version {state.from_version} is still current",
            state.rotation_id,
        )
        return self.rt.tell(logged(outcome), state)

    def _retry_later(self, state: SecretState, reason: str) -> Outcome:
        """Unreachable or throttled: the row stays `renewing`; the next attempt after the lease resumes it."""
        state.last_error = reason[:500]
        self.rt.save_quietly(state)
        message = f"{reason}; the renewal resumes on the next attempt"
        return logged(Outcome(ROTATION_FAILED, state.name, message, state.rotation_id, retryable=True))

    def _save(self, state: SecretState, progress: _Progress | None) -> None:
        if progress is not None:
            progress.store(state)
        self.rt.ledger.save(state)

    def _lock_for(self, vault_url: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((vault_url, name.lower()), threading.Lock())


def _leased(state: SecretState, now: dt.datetime) -> bool:
    return state.lease_until is not None and state.lease_until > now


def _with_unknown_issuer(policy: CertificatePolicy) -> CertificatePolicy:
    """The certificate's own policy, issued by `Unknown` (this service, through merge)."""
    return CertificatePolicy(
        issuer_name=WellKnownIssuerNames.unknown,
        subject=policy.subject,
        san_dns_names=policy.san_dns_names,
        exportable=policy.exportable,
        key_type=policy.key_type,
        key_size=policy.key_size,
        reuse_key=policy.reuse_key,
        key_curve_name=policy.key_curve_name,
        enhanced_key_usage=policy.enhanced_key_usage,
        key_usage=policy.key_usage,
        content_type=policy.content_type,
        validity_in_months=policy.validity_in_months,
        lifetime_actions=policy.lifetime_actions,
    )


def account_secret_name(directory: str) -> str:
    """The secret holding the ACME account key for a directory (the name is the service's, not a tag's)."""
    return f"rotation-acme-account-{hashlib.sha256(directory.encode()).hexdigest()[:16]}"


def certificate_summary(cert: KeyVaultCertificate) -> dict[str, Any]:
    props = cert.properties
    return {
        "name": cert.name,
        "version": props.version if props else None,
        "expires_on": props.expires_on.isoformat() if props and props.expires_on else None,
        "managed": is_acme_managed(props.tags if props else None),
    }


_renewal: CertificateRenewal | None = None
_installed: CertificateRenewal | None = None
_built_for: object = None
_renewal_lock = threading.Lock()


def build_renewal(rt: Runtime, settings: Any) -> CertificateRenewal:
    """Real clients: Key Vault certificates with the secrets' options, Azure DNS on the ARM endpoint
    (`dns_arm_endpoint` overrides it, for a local stand-in)."""
    from shared.service import vault_client_options  # noqa: PLC0415 - service builds the engine first

    arm = settings.dns_arm_endpoint or settings.arm_endpoint
    dns_options: dict[str, Any] = {"retry_total": 0}
    if settings.upstream_ca_bundle:
        dns_options["connection_verify"] = settings.upstream_ca_bundle

    def certificate_client(vault_url: str) -> CertificateClient:
        options = {k: v for k, v in vault_client_options(settings, vault_url).items() if k != "api_version"}
        return CertificateClient(vault_url, rt.credential, **options)

    def dns_client(subscription: str) -> DnsManagementClient:
        return DnsManagementClient(rt.credential, subscription, base_url=arm, **dns_options)

    return CertificateRenewal(rt, lru_cache(maxsize=32)(certificate_client), dns_client)


def renewal() -> CertificateRenewal:
    """The process-wide certificate renewal, on the secret engine's runtime (ledger, clock,
    notifier): rebuilt whenever the engine is."""
    global _renewal, _built_for  # noqa: PLW0603 - one per worker process, created lazily
    from shared import service  # noqa: PLC0415

    with _renewal_lock:
        if _installed is not None:
            return _installed
        engine = service.engine()
        if _renewal is None or _built_for is not engine:
            _renewal = build_renewal(engine._rt, engine.settings)  # one runtime for both
            _built_for = engine
        return _renewal


def use_renewal(replacement: CertificateRenewal | None) -> None:
    """Install a renewal service (tests), or remove it so the next call follows the engine."""
    global _installed  # noqa: PLW0603
    with _renewal_lock:
        _installed = replacement
