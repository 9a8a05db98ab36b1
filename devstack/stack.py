"""The local stack: Key Vault emulator, Azurite (Table storage), PostgreSQL, and the ARM
storage and vendor API stand-ins, together.

`LocalStack` starts the stand-ins and gives the app settings that point the
unmodified service at them. `provision_postgres_secret` sets up what an
operator would have in Azure: a database with a group role holding the app's
grants, a first login role, the admin credential in the vault, and a secret
tagged for rotation.
"""

import json
import os
import secrets
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from azure.keyvault.secrets import KeyVaultSecret, SecretClient
from psycopg import sql

from devstack.arm_consumers import ConsumerApps
from devstack.arm_storage import ArmStorageStandIn
from devstack.azurite import Azurite
from devstack.graph import GraphStandIn
from devstack.keyvault import KeyVaultEmulator
from devstack.postgres import PostgresServer
from devstack.vendor_api import VendorApi
from rotators.base import TAG_ADMIN_FOR

APP_DATABASE = "appdb"
ADMIN_SECRET = "pg-admin"
_SERVICE_SETTINGS = ("ROTATION_", "KEYVAULT_", "LEDGER_")


class LocalStack:
    def __init__(self, base_dir: Path | None = None) -> None:
        self._tmp = None if base_dir else tempfile.TemporaryDirectory(prefix="rotation-devstack-")
        self.base_dir = Path(base_dir or self._tmp.name)  # type: ignore[union-attr]
        self.vault = KeyVaultEmulator(self.base_dir / "keyvault")
        self.azurite = Azurite(self.base_dir / "azurite")
        # Its server certificate is issued by the vault emulator's CA (same certificate directory).
        self.postgres = PostgresServer(self.base_dir / "postgres", tls_dir=self.base_dir / "keyvault")
        # Both share the vault emulator's CA (same certificate directory).
        self.storage = ArmStorageStandIn(self.base_dir / "keyvault", self.vault)
        self.vendor = VendorApi(self.base_dir / "keyvault")
        # Microsoft Graph and the Entra token endpoint; callers authenticate with the emulator's identity.
        self.graph = GraphStandIn(self.base_dir / "keyvault", self.vault)
        # Web Apps and Container Apps that read the vault's secrets, on the same ARM endpoint.
        self.apps = ConsumerApps(self.storage, self.vault)
        self._binders: dict[str, Any] = {}
        self._binder_lock = threading.Lock()

    def start(self, publish_interval: float | None = None) -> "LocalStack":
        try:
            self.postgres.start()
            self.azurite.start()
            self.vault.start(publish_interval=publish_interval)
            self.storage.start()
            self.vendor.start()
            self.graph.start()
            self._prepare_database()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        servers: tuple[Any, ...] = (
            self.graph,
            self.vendor,
            self.storage,
            self.vault,
            self.azurite,
            self.postgres,
        )
        for server in servers:
            try:
                server.stop()
            except Exception:  # noqa: S112 - stop the others whatever one does
                continue
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def app_settings(self) -> dict[str, str]:
        """The Function App settings that aim the service at this stack."""
        return {
            "ROTATION_ALLOWED_VAULTS": self.vault.vault_url,
            # Storage accounts are allowed one by one (`<account>.blob.core.windows.net:443`).
            "ROTATION_ALLOWED_TARGETS": (
                f"127.0.0.1:{self.postgres.port},127.0.0.1:{self.vendor.port},127.0.0.1:{self.graph.port}"
            ),
            "ROTATION_POSTGRES_SSLMODE": "verify-full",
            "ROTATION_POSTGRES_CA_BUNDLE": str(self.postgres.ca_path),
            # Every stand-in listens on loopback, which targets may otherwise never reach.
            "ROTATION_ALLOWED_NETWORKS": "127.0.0.0/8",
            "KEYVAULT_CA_BUNDLE": str(self.vault.ca_path),
            "ROTATION_UPSTREAM_CA_BUNDLE": str(self.vault.ca_path),
            "ROTATION_ARM_ENDPOINT": self.storage.arm_endpoint,
            "ROTATION_ALLOWED_CONSUMERS": f"/subscriptions/{self.apps.subscription}/resourceGroups/devstack",
            "ROTATION_CONSUMER_SUBSCRIPTION": self.apps.subscription,
            "ROTATION_CONSUMER_POLL": "PT0.2S",
            "ROTATION_STORAGE_BLOB_ENDPOINT": self.storage.blob_endpoint_template,
            "ROTATION_GRAPH_ENDPOINT": self.graph.base_url,
            "ROTATION_AUTHORITY_HOST": self.graph.base_url,
            "KEYVAULT_VERIFY_CHALLENGE_RESOURCE": "false",
            "LEDGER_CONNECTION_STRING": self.azurite.connection_string,
            **self.vault.identity_env(),
        }

    def operator_bind(self, name: str) -> str:
        """Bind a secret just provisioned, as the operator who set it up would (the proof of
        possession included). Returns the outcome's status: a secret provisioned with tags that
        do not parse stays unbound, and its rotation reports the misconfiguration."""
        from shared import service  # noqa: PLC0415 - the stand-ins themselves need none of the service
        from shared.settings import Settings  # noqa: PLC0415

        # The settings the service in this process runs with (a test may point it at its own
        # stand-ins or ledger tables), except that the operator of this stack may reach all of it.
        settings = self.app_settings()
        settings |= {key: value for key, value in os.environ.items() if key.startswith(_SERVICE_SETTINGS)}
        allowed = settings.get("ROTATION_ALLOWED_TARGETS", "")
        settings["ROTATION_ALLOWED_TARGETS"] = f"{allowed},127.0.0.1,*.blob.core.windows.net:443"
        key = json.dumps(settings, sort_keys=True)
        with self._binder_lock, app_environment(settings):
            if key not in self._binders:
                self._binders[key] = service.build_engine(Settings.from_env(settings), notify=None)
            outcome = self._binders[key].bind(
                self.vault.vault_url, name, requested_by="devstack provisioning"
            )
        return str(outcome.status)

    def secret_client(self) -> SecretClient:
        return SecretClient(
            self.vault.vault_url,
            self.vault.credential(),
            verify_challenge_resource=False,
            connection_verify=str(self.vault.ca_path),
            api_version="7.6",
        )

    def _prepare_database(self) -> None:
        with self.postgres.admin_connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(APP_DATABASE)))
        admin = {"username": self.postgres.admin_user, "password": self.postgres.admin_password}
        # This stack's database admin serves every secret in the vault (an operator's choice).
        self.secret_client().set_secret(
            ADMIN_SECRET,
            json.dumps(admin),
            content_type="application/json",
            tags={TAG_ADMIN_FOR: "*"},
        )


@dataclass(frozen=True)
class ManagedPostgresSecret:
    name: str
    group: str
    slots: tuple[str, str]
    first_version: KeyVaultSecret


@contextmanager
def app_environment(settings: dict[str, str]) -> Iterator[None]:
    """These app settings in the environment (where the function app reads them) meanwhile;
    each one's previous value, or absence, afterwards."""
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def provision_postgres_secret(
    stack: LocalStack,
    name: str,
    *,
    prefix: str,
    expires_on: datetime,
    validity: timedelta = timedelta(days=90),
    overlap: str = "PT10S",
    extra_tags: dict[str, str] | None = None,
    admin: psycopg.Connection[Any] | None = None,
    vault: SecretClient | None = None,
) -> ManagedPostgresSecret:
    """A secret under rotation whose first credential is the `<prefix>_blue` login role.

    `admin` and `vault` let a caller provisioning many secrets reuse one connection and client."""
    group, blue, green = prefix, f"{prefix}_blue", f"{prefix}_green"
    password = secrets.token_urlsafe(32)
    pg = stack.postgres
    with nullcontext(admin) if admin else pg.admin_connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(group)))
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(APP_DATABASE), sql.Identifier(group)
            )
        )
        verifier = conn.pgconn.encrypt_password(password.encode(), blue.encode(), b"scram-sha-256")
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN INHERIT PASSWORD {} IN ROLE {}").format(
                sql.Identifier(blue), sql.Literal(verifier.decode()), sql.Identifier(group)
            )
        )
        conn.execute(sql.SQL("ALTER ROLE {} SET role = {}").format(sql.Identifier(blue), sql.Literal(group)))
    value: dict[str, Any] = {
        "engine": "postgres",
        "host": pg.host,
        "port": pg.port,
        "dbname": APP_DATABASE,
        "username": blue,
        "password": password,
    }
    tags = {
        "rotation-rotator": "postgres",
        "rotation-target": f"{pg.host}:{pg.port}/{APP_DATABASE}",
        "rotation-slots": f"{blue},{green}",
        "rotation-current-slot": blue,
        "rotation-validity": f"P{validity.days}D",
        "rotation-overlap": overlap,
        "rotation-pg-group": group,
        "rotation-admin-secret": ADMIN_SECRET,
        **(extra_tags or {}),
    }
    first = (vault or stack.secret_client()).set_secret(
        name, json.dumps(value), tags=tags, expires_on=expires_on, content_type="application/json"
    )
    stack.operator_bind(name)
    return ManagedPostgresSecret(name=name, group=group, slots=(blue, green), first_version=first)


@dataclass(frozen=True)
class ManagedApiKeySecret:
    admin_key: str
    first_version: KeyVaultSecret
    value: dict[str, str]


def provision_api_key_secret(
    stack: LocalStack,
    name: str,
    *,
    expires_on: datetime,
    overlap: str = "PT10S",
    validity: timedelta = timedelta(days=90),
    vendor: VendorApi | None = None,
    extra_tags: dict[str, str] | None = None,
) -> ManagedApiKeySecret:
    """A vendor account (on `vendor`, default the stack's) with its first key on slot `primary`,
    its admin key in `<name>-admin`, and the secret holding the first key under rotation."""
    vault, vendor = stack.secret_client(), vendor or stack.vendor
    admin_key = vendor.add_account()
    vault.set_secret(
        f"{name}-admin",
        json.dumps({"key": admin_key}),
        content_type="application/json",
        tags={TAG_ADMIN_FOR: name},
    )
    key_id, key = vendor.issue(admin_key, "primary")
    value = {"engine": "api-key", "base_url": vendor.base_url, "key_id": key_id, "key": key}
    tags = {
        "rotation-rotator": "api-key",
        "rotation-target": vendor.base_url,
        "rotation-slots": "primary,secondary",
        "rotation-current-slot": "primary",
        "rotation-validity": f"P{validity.days}D",
        "rotation-overlap": overlap,
        "rotation-admin-secret": f"{name}-admin",
        **(extra_tags or {}),
    }
    first = vault.set_secret(
        name, json.dumps(value), tags=tags, expires_on=expires_on, content_type="application/json"
    )
    stack.operator_bind(name)
    return ManagedApiKeySecret(admin_key, first, value)


def provision_storage_key_secret(
    stack: LocalStack,
    name: str,
    account: str,
    *,
    expires_on: datetime,
    overlap: str = "PT10S",
    validity: timedelta = timedelta(days=90),
    extra_tags: dict[str, str] | None = None,
) -> str:
    """A storage account on the ARM stand-in whose key1 is in a secret under rotation.
    The account must be allowed: `ROTATION_ALLOWED_TARGETS` needs `<account>.blob.core.windows.net`."""
    resource_id = stack.storage.add_account(account)
    tags = {
        "rotation-rotator": "storage-key",
        "rotation-target": resource_id,
        "rotation-current-slot": "key1",
        "rotation-validity": f"P{validity.days}D",
        "rotation-overlap": overlap,
        **(extra_tags or {}),
    }
    stack.secret_client().set_secret(
        name, stack.storage.keys(account)["key1"], tags=tags, expires_on=expires_on, content_type="text/plain"
    )
    stack.operator_bind(name)
    return resource_id


@dataclass(frozen=True)
class ManagedEntraSecret:
    app_object_id: str
    client_id: str
    first_version: KeyVaultSecret
    value: dict[str, str]


def provision_entra_secret(
    stack: LocalStack,
    name: str,
    *,
    expires_on: datetime,
    overlap: str = "PT10S",
    validity: timedelta = timedelta(days=90),
    extra_tags: dict[str, str] | None = None,
) -> ManagedEntraSecret:
    """An app registration the service's identity owns, its first client secret on slot `slot-a`
    (named as the rotator names its passwords), and the secret holding it, under rotation."""
    from rotators.entra_app import marker  # noqa: PLC0415

    graph = stack.graph
    app = graph.add_application(f"app of {name}")
    key_id, secret = graph.add_password(app.id, marker(name, "slot-a"), days=validity.days)
    value = {"tenant_id": graph.tenant_id, "client_id": app.app_id, "client_secret": secret, "key_id": key_id}
    tags = {
        "rotation-rotator": "entra-app",
        "rotation-target": graph.base_url,
        "rotation-entra-tenant": graph.tenant_id,
        "rotation-entra-app": app.id,
        "rotation-slots": "slot-a,slot-b",
        "rotation-current-slot": "slot-a",
        "rotation-validity": f"P{validity.days}D",
        "rotation-overlap": overlap,
        **(extra_tags or {}),
    }
    first = stack.secret_client().set_secret(
        name, json.dumps(value), tags=tags, expires_on=expires_on, content_type="application/json"
    )
    stack.operator_bind(name)
    return ManagedEntraSecret(app.id, app.app_id, first, value)
