"""A secret's consumers: the apps that read it through Key Vault references.

A rotation is done when its consumers use the new version, not when Key Vault holds it. They
are declared in the secret's `rotation-consumers` tag (bound and allow-listed like every other
target) and are of three kinds:

* `web`: App Service and Function Apps with Key Vault references in app settings. App Service
  re-reads a reference every 24 hours; `POST {site}/config/configreferences/appsettings/refresh`
  makes it re-read now, and `GET {site}/config/configreferences/appsettings` says which version
  each reference resolved (`activeVersion`, status `Resolved`).
* `containerapp`: Container Apps with `keyVaultUrl` secrets. An unversioned reference is
  re-read within 30 minutes and the revisions using it in environment variables restart;
  restarting the active revisions makes them read it now. A replica created after the version
  was written holds it.
* `appgw`: Application Gateway listeners. The gateway polls Key Vault every 4 hours and cannot
  be made to refresh: it only sets the shortest safe overlap.

The engine calls `preflight` before creating anything (each consumer must reference this secret
without pinning a version), `move` after writing the new version (force each consumer and wait
until it holds the version, within ROTATION_CONSUMER_TIMEOUT), and `positions` before retiring
the old credential (nothing may still hold the old version).
"""

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from azure.core.credentials import TokenCredential
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.core.rest import HttpRequest

from shared.durations import format_duration
from shared.errors import ConfigError, UpstreamError
from shared.jsonsafe import at_most
from shared.settings import Settings

logger = logging.getLogger("shared.consumers")

TAG_CONSUMERS = "rotation-consumers"
MAX_CONSUMERS = 5
MAX_LISTED = 100  # app settings with Key Vault references, or revisions, of one consumer
# Documented in the App Service docs; not in azure-mgmt-web, so sent through the client's pipeline.
WEB_REFRESH_API_VERSION = "2022-03-01"

WEB, CONTAINER_APP, APP_GATEWAY = "web", "containerapp", "appgw"
_PROVIDERS = {
    WEB: "Microsoft.Web/sites",
    CONTAINER_APP: "Microsoft.App/containerApps",
    APP_GATEWAY: "Microsoft.Network/applicationGateways",
}
# How long each kind may keep an old version when nothing forces it to read again.
NATURAL_REFRESH = {
    WEB: timedelta(hours=24),
    CONTAINER_APP: timedelta(minutes=30),
    APP_GATEWAY: timedelta(hours=4),
}
_WHY = {
    WEB: "App Service re-reads Key Vault references every 24 hours",
    CONTAINER_APP: "Container Apps re-read Key Vault secrets within 30 minutes",
    APP_GATEWAY: "Application Gateway polls Key Vault every 4 hours and cannot be made to refresh",
}
FORCEABLE = frozenset({WEB, CONTAINER_APP})

# Where a consumer stands, as status reports it.
MOVED, WAITING, UNKNOWN = "moved", "waiting", "unknown"


@dataclass(frozen=True)
class ConsumerRef:
    kind: str
    subscription: str
    resource_group: str
    name: str

    @property
    def resource_id(self) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/{_PROVIDERS[self.kind]}/{self.name}"
        )

    def __str__(self) -> str:
        return f"{self.kind}:{self.resource_group}/{self.name}"


@dataclass(frozen=True)
class Wanted:
    """The credential consumers should hold: `version`, written at `written_on`, or `same_as`,
    a version with the same value (a rollback restores the previous value as a new version),
    which was current until `stale_from`."""

    version: str
    written_on: datetime
    same_as: str = ""
    stale_from: datetime | None = None


@dataclass
class Position:
    """One consumer's position: the version it holds (when it can tell) and since when."""

    consumer: str
    kind: str
    state: str
    version: str = ""
    refreshed_on: str = ""
    detail: str = ""


def _segment_ok(text: str, limit: int) -> bool:
    return 0 < len(text) <= limit and text.isascii() and all(c.isalnum() or c in "-_.()" for c in text)


def parse_consumer(text: str, settings: Settings) -> ConsumerRef:
    """A full ARM resource id, or `kind:resourceGroup/name` in ROTATION_CONSUMER_SUBSCRIPTION
    (Key Vault tag values hold 256 characters: two full ids barely fit)."""
    raw = text.strip()
    if raw.lower().startswith("/subscriptions/"):
        parts = raw.strip("/").split("/")
        provider = "/".join(parts[5:7]).lower() if len(parts) == 8 else ""
        kinds = {p.lower(): k for k, p in _PROVIDERS.items()}
        if provider not in kinds or [parts[2].lower(), parts[4].lower()] != ["resourcegroups", "providers"]:
            raise ConfigError(
                f"tag {TAG_CONSUMERS}: {raw[:120]!r} is not a Web App, Container App or App Gateway id"
            )
        kind, subscription, group, name = kinds[provider], parts[1], parts[3], parts[7]
    else:
        kind, sep, rest = raw.partition(":")
        group, slash, name = rest.partition("/")
        if not sep or not slash or kind not in _PROVIDERS:
            raise ConfigError(
                f"tag {TAG_CONSUMERS}: {raw[:80]!r} is neither a resource id nor kind:group/name "
                f"(kinds: {', '.join(_PROVIDERS)})"
            )
        subscription = settings.consumer_subscription
        if not subscription:
            raise ConfigError(
                f"tag {TAG_CONSUMERS}: {raw[:80]!r} names no subscription: set "
                "ROTATION_CONSUMER_SUBSCRIPTION or give the full resource id"
            )
    if not (_segment_ok(subscription, 64) and _segment_ok(group, 90) and _segment_ok(name, 64)):
        raise ConfigError(f"tag {TAG_CONSUMERS}: invalid subscription, group or name in {raw[:120]!r}")
    ref = ConsumerRef(kind, subscription.lower(), group, name)
    if not settings.consumer_allowed(ref.resource_id):
        raise ConfigError(f"consumer {ref} is not in ROTATION_ALLOWED_CONSUMERS")
    return ref


def parse_consumers(text: str | None, settings: Settings) -> tuple[ConsumerRef, ...]:
    items = [item for item in (text or "").replace(",", " ").split() if item]
    if len(items) > MAX_CONSUMERS:
        raise ConfigError(f"tag {TAG_CONSUMERS}: at most {MAX_CONSUMERS} consumers")
    refs = tuple(parse_consumer(item, settings) for item in items)
    if len({ref.resource_id.lower() for ref in refs}) != len(refs):
        raise ConfigError(f"tag {TAG_CONSUMERS} names a consumer twice")
    return refs


def check_overlap(consumers: Sequence[ConsumerRef], overlap: timedelta, *, forced: bool) -> None:
    """Refuse an overlap shorter than the slowest consumer that nothing makes read again."""
    slow = [ref for ref in consumers if not (forced and ref.kind in FORCEABLE)]
    if not slow:
        return
    slowest = max(slow, key=lambda ref: NATURAL_REFRESH[ref.kind])
    needed = NATURAL_REFRESH[slowest.kind]
    if overlap < needed:
        hours = needed.total_seconds() / 3600
        raise ConfigError(
            f"overlap {format_duration(overlap)} is shorter than consumer {slowest}'s refresh interval "
            f"({hours:g} h: {_WHY[slowest.kind]}): set rotation-overlap to at least "
            f"{format_duration(needed)}"
        )


class ConsumersNotMoved(UpstreamError):
    """A consumer did not pick the new version up within its deadline."""

    code = "consumers_not_moved"


def _vault_matches(secret_uri: str, vault_url: str, secret_name: str) -> tuple[bool, str]:
    """Whether a Key Vault secret URI names this secret, and the version it pins ('' if none)."""
    parts = urlsplit(secret_uri.strip())
    segments = [s for s in parts.path.split("/") if s]
    if parts.netloc.lower() != urlsplit(vault_url).netloc.lower() or len(segments) not in (2, 3):
        return False, ""
    if segments[0].lower() != "secrets" or segments[1].lower() != secret_name.lower():
        return False, ""
    return True, segments[2] if len(segments) == 3 else ""


def _reference_uri(reference: str) -> str:
    """The SecretUri of `@Microsoft.KeyVault(SecretUri=...)`, or a VaultName/SecretName form as one."""
    inner = reference.strip().removeprefix("@Microsoft.KeyVault(").removesuffix(")")
    fields = dict(
        (key.strip().lower(), value.strip()) for key, _, value in (p.partition("=") for p in inner.split(";"))
    )
    if "secreturi" in fields:
        return fields["secreturi"]
    if "vaultname" in fields and "secretname" in fields:
        version = f"/{fields['secretversion']}" if fields.get("secretversion") else ""
        return f"https://{fields['vaultname']}.vault.azure.net/secrets/{fields['secretname']}{version}"
    return ""


class Consumers:
    """Moves a secret's consumers to a new version, through the Azure management SDKs."""

    def __init__(
        self,
        settings: Settings,
        credential: TokenCredential,
        clock: Callable[[], datetime],
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings, self.credential, self.clock, self.sleep = settings, credential, clock, sleep

    # ----------------------------------------------------------------- the three calls

    def preflight(self, consumers: Sequence[ConsumerRef], vault_url: str, secret_name: str) -> None:
        """Each consumer references this secret, unpinned. Changes nothing."""
        for ref in consumers:
            if ref.kind == WEB:
                self._web_references(ref, vault_url, secret_name)
            elif ref.kind == CONTAINER_APP:
                self._app_secret_names(ref, vault_url, secret_name)

    def move(
        self, consumers: Sequence[ConsumerRef], vault_url: str, secret_name: str, wanted: Wanted
    ) -> list[Position]:
        """Make each consumer that does not hold the wanted credential read it now, and wait
        until every one does (forcing again the references, which cost nothing to refresh)."""
        positions = self.positions(consumers, vault_url, secret_name, wanted)
        if not self.settings.consumer_refresh:
            return positions
        deadline = time.monotonic() + self.settings.consumer_timeout.total_seconds()
        refs = {str(ref): ref for ref in consumers}
        forced: set[str] = set()
        while True:
            waiting = [p for p in positions if p.state == WAITING and p.kind in FORCEABLE]
            if not waiting:
                return positions
            if forced and time.monotonic() >= deadline:
                names = ", ".join(f"{p.consumer} ({p.detail})" for p in waiting)
                raise ConsumersNotMoved(
                    f"consumers did not pick up version {wanted.version} within "
                    f"{self.settings.consumer_timeout}: {names}"
                )
            for position in waiting:
                if position.kind == WEB or position.consumer not in forced:
                    self._force(refs[position.consumer], vault_url, secret_name)
                    forced.add(position.consumer)
            self.sleep(self.settings.consumer_poll.total_seconds())
            positions = self.positions(consumers, vault_url, secret_name, wanted)

    def positions(
        self, consumers: Sequence[ConsumerRef], vault_url: str, secret_name: str, wanted: Wanted
    ) -> list[Position]:
        """Where each consumer stands relative to the wanted credential. Reads only."""
        now = self.clock()
        positions = []
        for ref in consumers:
            if ref.kind == WEB:
                positions.append(self._web_position(ref, vault_url, secret_name, wanted))
            elif ref.kind == CONTAINER_APP:
                positions.append(self._app_position(ref, vault_url, secret_name, wanted, now))
            else:
                due = wanted.written_on + NATURAL_REFRESH[ref.kind]
                state = MOVED if now >= due else WAITING
                detail = (
                    "" if state == MOVED else f"polls Key Vault itself; holds it by {due:%Y-%m-%dT%H:%MZ}"
                )
                positions.append(Position(str(ref), ref.kind, state, detail=detail))
        return positions

    # ----------------------------------------------------------------- App Service

    @contextmanager
    def _web(self, ref: ConsumerRef) -> Iterator[Any]:
        from azure.mgmt.web import WebSiteManagementClient  # noqa: PLC0415 - loads only for web consumers

        with self._translated(ref):
            client = WebSiteManagementClient(self.credential, ref.subscription, **self._client_options())
            try:
                yield client
            finally:
                client.close()

    def _web_references(self, ref: ConsumerRef, vault_url: str, secret_name: str) -> list[Any]:
        with self._web(ref) as client:
            pages = client.web_apps.get_app_settings_key_vault_references(ref.resource_group, ref.name)
            items = _bounded(pages, ref, "Key Vault references")
        ours = []
        for item in items:
            props = item.properties
            if props is None:
                continue
            uri = _reference_uri(props.reference or "")
            matches, pinned = _vault_matches(uri, vault_url, secret_name) if uri else (False, "")
            if not matches:
                continue
            if pinned or props.secret_version:
                raise ConfigError(
                    f"consumer {ref}: app setting {_shown(item.name)} pins version "
                    f"{_shown(pinned or props.secret_version)} "
                    "of the secret, so it never moves to a new one: reference the secret without a version"
                )
            ours.append(item)
        if not ours:
            raise ConfigError(
                f"consumer {ref} has no app setting referencing secret {secret_name} of this vault"
            )
        return ours

    def _web_position(self, ref: ConsumerRef, vault_url: str, secret_name: str, wanted: Wanted) -> Position:
        good = {v.lower() for v in (wanted.version, wanted.same_as) if v}
        behind, held = [], set()
        for item in self._web_references(ref, vault_url, secret_name):
            status = str(getattr(item.properties.status, "value", item.properties.status) or "Pending")
            version = item.properties.active_version or ""
            held.add(version)
            # A failed refresh keeps serving what it had: only the version it holds counts.
            if version.lower() not in good:
                behind.append(f"{_shown(item.name)}: {_shown(status)} at {_shown(version) or 'no version'}")
        shown = held.pop() if len(held) == 1 else ""
        state = WAITING if behind else MOVED
        return Position(str(ref), WEB, state, version=_shown(shown, 64), detail="; ".join(behind)[:300])

    # ----------------------------------------------------------------- Container Apps

    @contextmanager
    def _apps(self, ref: ConsumerRef) -> Iterator[Any]:
        from azure.mgmt.appcontainers import ContainerAppsAPIClient  # noqa: PLC0415

        with self._translated(ref):
            client = ContainerAppsAPIClient(self.credential, ref.subscription, **self._client_options())
            try:
                yield client
            finally:
                client.close()

    def _app_secret_names(self, ref: ConsumerRef, vault_url: str, secret_name: str) -> list[str]:
        with self._apps(ref) as client:
            app = client.container_apps.get(ref.resource_group, ref.name)
        secrets = (app.configuration.secrets if app.configuration else None) or []
        ours = []
        for secret in secrets:
            matches, pinned = _vault_matches(secret.key_vault_url or "", vault_url, secret_name)
            if not matches:
                continue
            if pinned:
                raise ConfigError(
                    f"consumer {ref}: secret {_shown(secret.name)} pins version {_shown(pinned)}, so it "
                    "never moves to a new one: reference the secret without a version"
                )
            ours.append(secret.name or "")
        if not ours:
            raise ConfigError(f"consumer {ref} has no secret referencing secret {secret_name} of this vault")
        return ours

    def _active_revisions(self, client: Any, ref: ConsumerRef) -> list[Any]:
        revisions = client.container_apps_revisions.list_revisions(ref.resource_group, ref.name)
        return [rev for rev in _bounded(revisions, ref, "revisions") if rev.active]

    def _app_position(
        self, ref: ConsumerRef, vault_url: str, secret_name: str, wanted: Wanted, now: datetime
    ) -> Position:
        """A replica holds the version current when it started: good if it started after the
        wanted version was written, or before `wanted.stale_from` (when the same credential was
        current); running replicas only."""
        self._app_secret_names(ref, vault_url, secret_name)
        behind: list[str] = []
        newest_start = ""
        with self._apps(ref) as client:
            for revision in self._active_revisions(client, ref):
                replicas = client.container_apps_revision_replicas.list_replicas(
                    ref.resource_group, ref.name, revision.name
                ).value
                for replica in replicas or []:
                    created = replica.created_time
                    running = str(getattr(replica.running_state, "value", replica.running_state)) == "Running"
                    if created is not None and created.isoformat() > newest_start:
                        newest_start = created.isoformat()
                    fresh = created is not None and (
                        created >= wanted.written_on
                        or (wanted.stale_from is not None and created < wanted.stale_from)
                    )
                    if not (fresh and running):
                        state = "running" if running else "not running"
                        where = f"{_shown(revision.name)}/{_shown(replica.name)}"
                        behind.append(f"{where}: {state}, started {created or '?'}")
        if behind and now >= wanted.written_on + NATURAL_REFRESH[CONTAINER_APP]:
            behind = []  # re-read by the platform itself by now
        state = WAITING if behind else MOVED
        return Position(
            str(ref), CONTAINER_APP, state, refreshed_on=newest_start, detail="; ".join(behind)[:300]
        )

    # ----------------------------------------------------------------- forcing

    def _force(self, ref: ConsumerRef, vault_url: str, secret_name: str) -> None:
        if ref.kind == WEB:
            with self._web(ref) as client:
                request = HttpRequest(
                    "POST",
                    f"{self.settings.arm_endpoint}{ref.resource_id}/config/configreferences/appsettings/refresh",
                    params={"api-version": WEB_REFRESH_API_VERSION},
                )
                response = client.send_request(request)  # the SDK's own pipeline: auth, retries
                if response.status_code >= 400:
                    raise UpstreamError(
                        f"consumer {ref}: refreshing its Key Vault references: HTTP {response.status_code}"
                    )
            logger.info("consumer %s: Key Vault references refreshed", ref)
        elif ref.kind == CONTAINER_APP:
            with self._apps(ref) as client:
                for revision in self._active_revisions(client, ref):
                    client.container_apps_revisions.restart_revision(
                        ref.resource_group, ref.name, revision.name
                    )
                    logger.info("consumer %s: revision %s restarted", ref, revision.name)

    # ----------------------------------------------------------------- plumbing

    def _client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"base_url": self.settings.arm_endpoint}
        if self.settings.upstream_ca_bundle:
            options["connection_verify"] = self.settings.upstream_ca_bundle
        return options

    @contextmanager
    def _translated(self, ref: ConsumerRef) -> Iterator[None]:
        """ARM's answers as the operator needs them: what to grant, or what is missing."""
        try:
            yield
        except ResourceNotFoundError:
            raise ConfigError(f"consumer {ref} does not exist ({ref.resource_id})") from None
        except HttpResponseError as error:
            code = getattr(error.error, "code", None) or ""
            if error.status_code == 403:
                role = "Website Contributor" if ref.kind == WEB else "Container Apps Contributor"
                raise UpstreamError(
                    f"consumer {ref}: the service may not manage it ({code or 'HTTP 403'}): grant "
                    f"its identity {role} on {ref.resource_id}"
                ) from None
            raise UpstreamError(f"consumer {ref}: HTTP {error.status_code} {code}".strip()) from None


def _shown(text: object, limit: int = 80) -> str:
    """An upstream name as it may appear in a message: printable ASCII, bounded (ARM answers are input)."""
    return "".join(c if " " <= c <= "~" else "?" for c in str(text or ""))[:limit]


def _bounded(items: Iterable[Any], ref: ConsumerRef, what: str) -> list[Any]:
    """At most MAX_LISTED items of an ARM listing: an answer that pages on past that is refused."""
    listed = at_most(items, MAX_LISTED)
    if listed is None:
        raise UpstreamError(f"consumer {ref} lists more than {MAX_LISTED} {what}: not followed further")
    return listed


def positions_json(positions: Sequence[Position]) -> str:
    return json.dumps([asdict(p) for p in positions], sort_keys=True)
