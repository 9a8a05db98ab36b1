"""Composition root: builds the engine (secrets) and the key rotation service from app settings.

Production and the local stack use this same code; only the settings differ
(vault URLs, the ledger's endpoint, a CA bundle for the local vault). Clients
are created once per worker process and reused across invocations.
"""

import os
import threading
from collections.abc import Callable
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any

from azure.core.credentials import TokenCredential
from azure.data.tables import TableServiceClient
from azure.identity import DefaultAzureCredential
from azure.keyvault.secrets import SecretClient

from rotators import RotatorRegistry
from shared import reach, telemetry
from shared.engine import RotationEngine
from shared.ledger import Ledger
from shared.notify import build_notifier
from shared.pacing import PacingPolicy, budget_for
from shared.settings import Settings

if TYPE_CHECKING:
    from azure.keyvault.keys import KeyClient

    from shared.keys import KeyRotationService

_lock = threading.Lock()
_engine: RotationEngine | None = None
_keys: "KeyRotationService | None" = None


# Environment variables that make requests route through a proxy. Without any, the clients
# skip reading the environment on every request (about a tenth of a rotation's CPU time); a CA
# bundle named in the environment is then passed explicitly, as requests would have used it.
_PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def transport_options() -> dict[str, Any]:
    if any(name.lower() in _PROXY_ENV for name in os.environ):
        return {}
    options: dict[str, Any] = {"use_env_settings": False}
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        options["connection_verify"] = bundle
    return options


def vault_client_options(settings: Settings, vault_url: str) -> dict[str, object]:
    """Every Key Vault client's options: API version, the local CA if any, pacing to the vault's budget."""
    budget = budget_for(
        vault_url,
        settings.keyvault_creates_limit,
        settings.keyvault_transactions_limit,
        settings.keyvault_limit_window.total_seconds(),
    )
    options: dict[str, object] = {
        "api_version": settings.keyvault_api_version,
        "verify_challenge_resource": settings.keyvault_verify_challenge_resource,
        "per_retry_policies": [PacingPolicy(budget)],
        **transport_options(),
    }
    if settings.keyvault_ca_bundle:
        options["connection_verify"] = settings.keyvault_ca_bundle
    return options


def key_client_factory(settings: Settings, credential: TokenCredential) -> "Callable[[str], KeyClient]":
    """`key_client(vault_url)`: one KeyClient per vault, with the SecretClient's options."""
    from azure.keyvault.keys import KeyClient  # noqa: PLC0415 - only the key paths pay for this import

    @lru_cache(maxsize=32)
    def key_client(vault_url: str) -> KeyClient:
        return KeyClient(vault_url, credential, **vault_client_options(settings, vault_url))

    return key_client


def build_keys(settings: Settings, **options: Any) -> "KeyRotationService":
    """The key rotation service with real clients; `options` (clock) serve tests."""
    from shared.keys import KeyRotationService  # noqa: PLC0415

    return KeyRotationService(key_client_factory(settings, DefaultAzureCredential()), settings, **options)


def keys() -> "KeyRotationService":
    """The process-wide key rotation service, built on first use from the environment."""
    global _keys  # noqa: PLW0603 - one per worker process, created lazily
    with _lock:
        if _keys is None:
            _keys = build_keys(Settings.from_env())
        return _keys


def use_keys(replacement: "KeyRotationService | None") -> None:
    """Install a key rotation service (or clear it, so the next call builds one from the environment)."""
    global _keys  # noqa: PLW0603
    with _lock:
        _keys = replacement


def key_client(vault_url: str) -> "KeyClient":
    """The process-wide service's KeyClient for `vault_url`."""
    return keys().key_client(vault_url)


def build_engine(settings: Settings, **engine_options: Any) -> RotationEngine:
    """Real clients from settings; `engine_options` (clock, probe, checkpoint) serve tests and chaos runs."""
    telemetry.configure()  # Azure Monitor when APPLICATIONINSIGHTS_CONNECTION_STRING is set
    credential = DefaultAzureCredential()

    @lru_cache(maxsize=32)
    def secret_client(vault_url: str) -> SecretClient:
        return SecretClient(vault_url, credential, **vault_client_options(settings, vault_url))

    if settings.ledger_connection_string:
        tables = TableServiceClient.from_connection_string(
            settings.ledger_connection_string, **transport_options()
        )
    elif settings.ledger_table_endpoint:
        tables = TableServiceClient(
            settings.ledger_table_endpoint, credential=credential, **transport_options()
        )
    else:
        raise RuntimeError(
            "no ledger configured: set AzureWebJobsStorage__accountName, LEDGER_TABLE_ENDPOINT "
            "or LEDGER_CONNECTION_STRING"
        )
    engine_options.setdefault("notify", build_notifier(settings, credential))
    engine_options.setdefault("probe", partial(reach.http_probe, settings))
    ledger = Ledger.from_service(tables, settings.ledger_table_prefix)
    ledger.ensure_tables()
    ledger.migrate_names()  # one point read once migrated
    return RotationEngine(
        secret_client=secret_client,
        ledger=ledger,
        rotators=RotatorRegistry(),
        settings=settings,
        credential=credential,
        **engine_options,
    )


def engine() -> RotationEngine:
    """The process-wide engine, built on first use from the environment."""
    global _engine  # noqa: PLW0603 - one engine per worker process, created lazily
    with _lock:
        if _engine is None:
            _engine = build_engine(Settings.from_env())
        return _engine


def use_engine(replacement: RotationEngine | None) -> None:
    """Install an engine (or clear it, so the next call builds one from the environment)."""
    global _engine  # noqa: PLW0603
    with _lock:
        _engine = replacement
