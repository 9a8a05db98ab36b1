"""Apps that consume Key Vault secrets, on the ARM stand-in's endpoint: Web Apps with Key Vault
references in app settings, and Container Apps with `keyVaultUrl` secrets.

They behave as the real services are documented to:

* a **Web App** reference resolves the version that was current at its last refresh; it
  refreshes on ``POST .../config/configreferences/appsettings/refresh`` or 24 hours after the
  last one. ``GET .../config/configreferences/appsettings`` lists each reference with its
  ``status`` and ``activeVersion``, as azure-mgmt-web reads them;
* a **Container App** replica holds the value current when it started. ``POST
  .../revisions/{name}/restart`` replaces a revision's replicas: the new ones are ``NotRunning``
  for ``restart_seconds``, then ``Running`` with the newest version (the old ones serve until
  then). 30 minutes after a new version appears the platform restarts them by itself.

Values are read from the Key Vault emulator over HTTPS with a managed identity's token, as the
platforms do. `value_of` is how a test or the chaos run's consumer reads what an app holds (its
environment variable); it is never served over HTTP.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from azure.core.exceptions import AzureError
from azure.keyvault.secrets import SecretClient

if TYPE_CHECKING:
    from devstack.arm_storage import ArmStorageStandIn
    from devstack.keyvault import KeyVaultEmulator

log = logging.getLogger("devstack.arm_consumers")

WEB_REFRESH = dt.timedelta(hours=24)
APP_REFRESH = dt.timedelta(minutes=30)
_PREFIX = r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
_WEB = re.compile(
    _PREFIX
    + r"Microsoft\.Web/sites/(?P<name>[^/]+)/config/configreferences/appsettings(?P<refresh>/refresh)?/?$",
    re.IGNORECASE,
)
_APP = re.compile(
    _PREFIX + r"Microsoft\.App/containerApps/(?P<name>[^/]+)"
    r"(?:/revisions(?:/(?P<revision>[^/]+)(?:/(?P<action>restart|replicas))?)?)?/?$",
    re.IGNORECASE,
)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _resource_id(sub: str, group: str, provider: str, name: str) -> str:
    return f"/subscriptions/{sub}/resourceGroups/{group}/providers/{provider}/{name}"


@dataclass
class _Held:
    """What a reference or a replica resolved: the version, its value, and when."""

    version: str = ""
    value: str = ""
    status: str = "Initialized"
    resolved_on: dt.datetime | None = None


@dataclass
class _Site:
    resource_id: str
    references: dict[str, str]  # app setting -> Key Vault secret URI (unversioned or pinned)
    held: dict[str, _Held] = field(default_factory=dict)
    endless: bool = False  # a hostile answer: every page links to itself as the next
    refreshed_on: dt.datetime | None = None
    # Its identity lost access to the vault: refreshes fail and it keeps what it had.
    denied: bool = False


@dataclass
class _Replica:
    name: str
    created: dt.datetime
    running_at: float  # time.monotonic() when it runs
    held: dict[str, _Held] = field(default_factory=dict)


@dataclass
class _App:
    resource_id: str
    secrets: dict[str, str]  # app secret name -> Key Vault secret URI
    revision: str
    replicas: list[_Replica] = field(default_factory=list)
    starting: list[_Replica] = field(default_factory=list)
    started_on: dt.datetime | None = None


class ConsumerApps:
    """Web Apps and Container Apps reading secrets from the Key Vault emulator."""

    def __init__(
        self, arm: ArmStorageStandIn, emulator: KeyVaultEmulator, *, restart_seconds: float = 0.3
    ) -> None:
        self.arm, self.emulator, self.restart_seconds = arm, emulator, restart_seconds
        self.subscription, self.resource_group = "00000000-0000-0000-0000-000000000000", "devstack"
        self.request_counts: dict[str, int] = {}
        self._lock = threading.RLock()
        self._sites: dict[str, _Site] = {}
        self._apps: dict[str, _App] = {}
        self._client: SecretClient | None = None
        self._url = ""  # the request being answered (under the lock)
        arm.mount(self.route)

    # ----------------------------------------------------------------- set-up (tests, chaos)

    def secret_uri(self, secret_name: str, version: str = "") -> str:
        return f"{self.emulator.vault_url}/secrets/{secret_name}" + (f"/{version}" if version else "")

    def add_site(self, name: str, references: dict[str, str]) -> str:
        """A Web App whose app settings reference these secret URIs; resolved at once, as at start-up."""
        resource_id = _resource_id(self.subscription, self.resource_group, "Microsoft.Web/sites", name)
        site = _Site(resource_id, dict(references))
        with self._lock:
            self._sites[resource_id.lower()] = site
            self._refresh_site(site)
        return resource_id

    def add_app(self, name: str, secrets: dict[str, str], replicas: int = 2) -> str:
        """A Container App with `keyVaultUrl` secrets, one active revision and running replicas."""
        resource_id = _resource_id(
            self.subscription, self.resource_group, "Microsoft.App/containerApps", name
        )
        app = _App(resource_id, dict(secrets), revision=f"{name}--{uuid.uuid4().hex[:7]}")
        with self._lock:
            self._apps[resource_id.lower()] = app
            app.replicas = [self._new_replica(app, running_in=0.0) for _ in range(replicas)]
            app.started_on = self.emulator.clock.now()
        return resource_id

    def page_endlessly(self, resource_id: str) -> None:
        """The site's reference listing links to itself as its next page, forever."""
        with self._lock:
            self._sites[resource_id.lower()].endless = True

    def deny_vault(self, resource_id: str, denied: bool = True) -> None:
        with self._lock:
            self._sites[resource_id.lower()].denied = denied

    def value_of(self, resource_id: str, setting: str) -> str:
        """What the app reads in its environment: a web app setting, or a running replica's secret."""
        with self._lock:
            site = self._sites.get(resource_id.lower())
            if site is not None:
                self._age_site(site)
                return site.held[setting].value
            app = self._apps[resource_id.lower()]
            self._age_app(app)
            return app.replicas[0].held[setting].value

    def version_of(self, resource_id: str, setting: str) -> str:
        with self._lock:
            site = self._sites.get(resource_id.lower())
            if site is not None:
                return site.held[setting].version
            return self._apps[resource_id.lower()].replicas[0].held[setting].version

    # ----------------------------------------------------------------- ARM

    def route(self, method: str, path: str, query: str, body: bytes) -> tuple[int, Any] | None:
        web, app = _WEB.match(path), _APP.match(path)
        if web is None and app is None:
            return None
        with self._lock:
            self._url = f"{self.arm.arm_endpoint}{path}" + (f"?{query}" if query else "")
            return self._web(method, web) if web is not None else self._app(method, app)  # type: ignore[arg-type]

    def _count(self, operation: str) -> None:
        self.request_counts[operation] = self.request_counts.get(operation, 0) + 1

    def _not_found(self, kind: str, name: str) -> tuple[int, Any]:
        message = f"The Resource '{kind}/{name[:64]}' was not found."
        return 404, {"error": {"code": "ResourceNotFound", "message": message}}

    def _web(self, method: str, match: re.Match[str]) -> tuple[int, Any] | None:
        resource_id = _resource_id(match["sub"], match["rg"], "Microsoft.Web/sites", match["name"])
        site = self._sites.get(resource_id.lower())
        if site is None:
            return self._not_found("Microsoft.Web/sites", match["name"])
        if match["refresh"] and method == "POST":
            self._count("web:refresh")
            self._refresh_site(site)
        elif match["refresh"] or method != "GET":
            return None
        else:
            self._count("web:references")
            self._age_site(site)
        return 200, {
            "value": [self._reference(site, setting) for setting in site.references],
            "nextLink": self._url if site.endless else None,
        }

    def _reference(self, site: _Site, setting: str) -> dict[str, Any]:
        uri = site.references[setting]
        parts = [p for p in urlsplit(uri).path.split("/") if p]
        held = site.held.get(setting, _Held())
        return {
            "id": f"{site.resource_id}/config/configreferences/appsettings/{setting}",
            "name": setting,
            "type": "Microsoft.Web/sites/config/configreferences",
            "properties": {
                "reference": f"@Microsoft.KeyVault(SecretUri={uri})",
                "status": held.status,
                "vaultName": urlsplit(uri).hostname,
                "secretName": parts[1] if len(parts) > 1 else "",
                "secretVersion": parts[2] if len(parts) > 2 else None,
                "identityType": {"type": "SystemAssigned"},
                "details": "Reference resolved successfully." if held.status == "Resolved" else held.status,
                "source": "KeyVault",
                "activeVersion": held.version or None,
            },
        }

    def _app(self, method: str, match: re.Match[str]) -> tuple[int, Any] | None:
        resource_id = _resource_id(match["sub"], match["rg"], "Microsoft.App/containerApps", match["name"])
        app = self._apps.get(resource_id.lower())
        if app is None:
            return self._not_found("Microsoft.App/containerApps", match["name"])
        self._age_app(app)
        revision, action = match["revision"], (match["action"] or "").lower()
        if revision is not None and revision.lower() != app.revision.lower():
            return self._not_found("Microsoft.App/containerApps/revisions", revision)
        if method == "GET" and revision is None and "/revisions" not in match.group(0).lower():
            self._count("app:get")
            return 200, self._app_body(app)
        if method == "GET" and revision is None:
            self._count("app:revisions")
            return 200, {"value": [self._revision_body(app)], "nextLink": None}
        if method == "GET" and action == "replicas":
            self._count("app:replicas")
            return 200, {"value": [self._replica_body(app, r) for r in [*app.replicas, *app.starting]]}
        if method == "GET" and not action:
            return 200, self._revision_body(app)
        if method == "POST" and action == "restart":
            self._count("app:restart")
            app.starting = [self._new_replica(app, running_in=self.restart_seconds) for _ in app.replicas]
            app.started_on = self.emulator.clock.now()
            return 200, None
        return None

    def _app_body(self, app: _App) -> dict[str, Any]:
        name = app.resource_id.rsplit("/", 1)[-1]
        return {
            "id": app.resource_id,
            "name": name,
            "type": "Microsoft.App/containerApps",
            "location": "westeurope",
            "properties": {
                "provisioningState": "Succeeded",
                "latestRevisionName": app.revision,
                "configuration": {
                    "activeRevisionsMode": "Single",
                    "secrets": [
                        {"name": secret, "keyVaultUrl": uri, "identity": "system"}
                        for secret, uri in app.secrets.items()
                    ],
                },
                "template": {
                    "containers": [
                        {
                            "name": name,
                            "image": "devstack/consumer:1",
                            "env": [
                                {"name": s.upper().replace("-", "_"), "secretRef": s} for s in app.secrets
                            ],
                        }
                    ]
                },
            },
        }

    def _revision_body(self, app: _App) -> dict[str, Any]:
        return {
            "id": f"{app.resource_id}/revisions/{app.revision}",
            "name": app.revision,
            "type": "Microsoft.App/containerApps/revisions",
            "properties": {
                "createdTime": _iso(app.started_on or self.emulator.clock.now()),
                "active": True,
                "replicas": len(app.replicas),
                "trafficWeight": 100,
                "healthState": "Healthy",
                "provisioningState": "Provisioned",
                "runningState": "Activating" if app.starting else "Running",
            },
        }

    def _replica_body(self, app: _App, replica: _Replica) -> dict[str, Any]:
        running = replica.running_at <= time.monotonic()
        return {
            "id": f"{app.resource_id}/revisions/{app.revision}/replicas/{replica.name}",
            "name": replica.name,
            "type": "Microsoft.App/containerApps/revisions/replicas",
            "properties": {
                "createdTime": _iso(replica.created),
                "runningState": "Running" if running else "NotRunning",
                "containers": [{"name": "app", "ready": running, "started": running, "restartCount": 0}],
            },
        }

    # ----------------------------------------------------------------- the platforms' behaviour

    def _resolve(self, uri: str) -> _Held:
        """Read a secret as the platform does: through Key Vault, with the app's managed identity."""
        parts = [p for p in urlsplit(uri).path.split("/") if p]
        if self._client is None:
            self._client = SecretClient(
                self.emulator.vault_url,
                self.emulator.credential(),
                verify_challenge_resource=False,
                connection_verify=str(self.emulator.ca_path),
                api_version="7.6",
            )
        now = self.emulator.clock.now()
        try:
            secret = self._client.get_secret(parts[1], parts[2] if len(parts) > 2 else None)
        except AzureError as error:
            log.info("resolving %s failed: %s", uri, type(error).__name__)
            return _Held(status="OtherReasons", resolved_on=now)
        return _Held(secret.properties.version or "", secret.value or "", "Resolved", now)

    def _refresh_site(self, site: _Site) -> None:
        for setting, uri in site.references.items():
            held = _Held(status="AccessToKeyVaultDenied") if site.denied else self._resolve(uri)
            if held.status == "Resolved" or setting not in site.held:
                site.held[setting] = held
            else:  # a failed refresh keeps serving what it had
                site.held[setting].status = held.status
        site.refreshed_on = self.emulator.clock.now()

    def _age_site(self, site: _Site) -> None:
        if site.refreshed_on is None or self.emulator.clock.now() - site.refreshed_on >= WEB_REFRESH:
            self._refresh_site(site)

    def _new_replica(self, app: _App, *, running_in: float) -> _Replica:
        replica = _Replica(f"{app.revision}-{uuid.uuid4().hex[:10]}", self.emulator.clock.now(), 0.0)
        replica.running_at = time.monotonic() + running_in
        replica.held = {secret: self._resolve(uri) for secret, uri in app.secrets.items()}
        return replica

    def _age_app(self, app: _App) -> None:
        if app.starting and all(r.running_at <= time.monotonic() for r in app.starting):
            app.replicas, app.starting = app.starting, []
        started = app.started_on or self.emulator.clock.now()
        if not app.starting and self.emulator.clock.now() - started >= APP_REFRESH:
            app.replicas = [self._new_replica(app, running_in=0.0) for _ in app.replicas]
            app.started_on = self.emulator.clock.now()
