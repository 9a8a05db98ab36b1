"""App settings: which vaults the service serves, which upstreams it may touch, defaults.

Everything comes from the Function App's settings (environment variables), so the
same code runs on the Functions host and against the local stack.
"""

import fnmatch
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import urlsplit

from shared.durations import parse_duration
from shared.errors import ConfigError
from shared.jsonsafe import parse_int

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Only these verify the server's certificate chain (verify-full also checks its name).
POSTGRES_SSLMODES = ("verify-full", "verify-ca")
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_MAX_SETTING_INT = 1_000_000
# The vault posture checklist (shared/posture.py), by the names ROTATION_POSTURE_POLICY uses.
POSTURE_ROWS = (
    "rbac",
    "soft_delete",
    "soft_delete_retention",
    "purge_protection",
    "public_network_access",
    "firewall",
    "private_endpoint",
    "diagnostics",
    "privileged_roles",
    "app_roles",
)
POSTURE_ACTIONS = ("warn", "refuse")
_VAULT_RESOURCE_ID = re.compile(
    r"^/subscriptions/[0-9A-Fa-f-]{36}/resourceGroups/[-\w.()]{1,90}"
    r"/providers/Microsoft\.KeyVault/vaults/[A-Za-z0-9-]{3,24}$",
    re.IGNORECASE,
)


def normalize_vault_url(value: str) -> str:
    """`myvault`, `https://MyVault.vault.azure.net/` -> `https://myvault.vault.azure.net`."""
    text = value.strip()
    if "://" not in text:
        if not text or "/" in text or "." in text or ":" in text:
            raise ConfigError(f"invalid vault {text[:80]!r}: give a vault name or an https URL")
        return f"https://{text.lower()}.vault.azure.net"
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"invalid vault URL {text[:80]!r}: Key Vault is only reached over https")
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        raise ConfigError(f"invalid port in vault URL {text[:80]!r}") from None
    return f"https://{parts.hostname.lower()}{port}"


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.replace(";", ",").split(",") if item.strip()]


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"invalid boolean setting {value[:20]!r}")


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    return parse_int(raw.strip(), low=1, high=_MAX_SETTING_INT, what=f"setting {name}")


def check_target_pattern(pattern: str) -> str:
    """An allow-list entry: `host`, `host:port`, `*.suffix` or `*.suffix:port`, lower-cased.

    `*` may only be the whole leftmost label, and matches exactly one label (as in TLS
    certificates): `*.blob.core.windows.net` matches `acct.blob.core.windows.net`, not
    `a.b.blob.core.windows.net`. A partial wildcard (`app*.example.com`) is refused.
    """
    entry = pattern.strip().lower()
    host, port = _split_pattern(entry)
    labels = host.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if len(labels) < 2:
            raise ConfigError(f"allow-list entry {entry[:80]!r}: a wildcard needs two labels after it")
    if not labels or not all(_LABEL.match(label) for label in labels):
        raise ConfigError(
            f"invalid allow-list entry {entry[:80]!r}: a host name or address, "
            "with `*` only as a whole leftmost label"
        )
    if port not in ("*", "") and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"invalid port in allow-list entry {entry[:80]!r}")
    return entry


def _split_pattern(entry: str) -> tuple[str, str]:
    host, sep, port = entry.rpartition(":")
    return (host, port) if sep else (entry, "")


def _pattern_matches(pattern: str, host: str, port: int) -> bool:
    pattern_host, pattern_port = _split_pattern(pattern)
    if pattern_port not in ("", "*") and int(pattern_port) != port:
        return False
    if pattern_host.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern_host[2:]
    return host == pattern_host


def _networks(value: str) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for item in _split_list(value):
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError:
            raise ConfigError(f"ROTATION_ALLOWED_NETWORKS: {item[:60]!r} is not a CIDR network") from None
    return tuple(networks)


def _vault_targets(value: str) -> dict[str, tuple[str, ...]]:
    """`vault=pattern pattern;othervault=pattern` -> {vault URL: patterns}."""
    lists: dict[str, tuple[str, ...]] = {}
    for item in value.split(";"):
        if not item.strip():
            continue
        vault, sep, patterns = item.partition("=")
        if not sep:
            raise ConfigError(f"ROTATION_VAULT_TARGETS: {item.strip()[:80]!r} is not vault=pattern ...")
        url = normalize_vault_url(vault)
        entries = tuple(check_target_pattern(p) for p in patterns.replace(",", " ").split())
        if url in lists or not entries:
            raise ConfigError(f"ROTATION_VAULT_TARGETS: give vault {url} one non-empty list")
        lists[url] = entries
    return lists


def _vault_resource_ids(value: str) -> dict[str, str]:
    """`vault=/subscriptions/.../vaults/name;...` -> {vault URL: the vault's ARM resource id}."""
    ids: dict[str, str] = {}
    for item in value.split(";"):
        if not item.strip():
            continue
        vault, sep, resource_id = item.partition("=")
        if not sep:
            raise ConfigError(f"ROTATION_VAULT_RESOURCE_IDS: {item.strip()[:80]!r} is not vault=resource id")
        url = normalize_vault_url(vault)
        resource_id = resource_id.strip().rstrip("/")
        if not _VAULT_RESOURCE_ID.match(resource_id):
            raise ConfigError(
                f"ROTATION_VAULT_RESOURCE_IDS: {resource_id[:120]!r} is not a vault's resource id "
                "(/subscriptions/<id>/resourceGroups/<group>/providers/Microsoft.KeyVault/vaults/<name>)"
            )
        if url in ids:
            raise ConfigError(f"ROTATION_VAULT_RESOURCE_IDS: vault {url} is given twice")
        ids[url] = resource_id
    return ids


def parse_posture_policy(value: str) -> dict[str, str]:
    """`purge_protection=refuse,rbac=refuse` -> {row: action}; rows not named are `warn`."""
    policy: dict[str, str] = {}
    for item in _split_list(value):
        row, sep, action = (part.strip().lower() for part in item.partition("="))
        if not sep or row not in POSTURE_ROWS or action not in POSTURE_ACTIONS:
            raise ConfigError(
                f"ROTATION_POSTURE_POLICY: {item[:80]!r} is not row=warn or row=refuse "
                f"(rows: {', '.join(POSTURE_ROWS)})"
            )
        if row in policy:
            raise ConfigError(f"ROTATION_POSTURE_POLICY: row {row} is given twice")
        policy[row] = action
    return policy


def _consumer_patterns(value: str) -> tuple[str, ...]:
    """Resource-id prefixes, `*` within a segment: `/subscriptions/S/resourceGroups/apps-*`."""
    patterns = []
    for item in _split_list(value):
        if not item.lower().startswith("/subscriptions/") or "//" in item or not item.isascii():
            raise ConfigError(
                f"ROTATION_ALLOWED_CONSUMERS: {item[:80]!r} is not a resource id prefix (/subscriptions/...)"
            )
        patterns.append(item.rstrip("/").lower())
    return tuple(patterns)


@dataclass(frozen=True)
class Settings:
    allowed_vaults: frozenset[str]
    allowed_targets: tuple[str, ...]
    # Per-vault allow-lists (ROTATION_VAULT_TARGETS): a listed vault's secrets reach only these.
    vault_targets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Addresses in these networks may be reached although loopback, private or link-local.
    allowed_networks: tuple[IPNetwork, ...] = ()
    default_validity: timedelta = timedelta(days=90)
    default_overlap: timedelta = timedelta(days=1)
    sweep_lead_time: timedelta = timedelta(days=28)
    lease: timedelta = timedelta(minutes=10)
    retry_after_failure: timedelta = timedelta(hours=1)
    max_attempts: int = 5
    # How long rotators may reuse an admin secret they read (0 turns the cache off).
    admin_secret_cache: timedelta = timedelta(minutes=5)
    # Rotations the timer sweep runs at once, and the share of each vault's Key Vault
    # budget this worker paces itself to (Key Vault allows 300 secret creates and
    # 4,000 other transactions per 10 s per vault; applications reading secrets share
    # the 4,000, so the default leaves them half).
    sweep_concurrency: int = 8
    # GET /rotations serves the managed secrets the last sweep listed, if it is this recent;
    # older (or never listed), it lists the vault itself (0: always).
    inventory_max_age: timedelta = timedelta(minutes=10)
    keyvault_creates_limit: int = 300
    keyvault_transactions_limit: int = 2000
    keyvault_limit_window: timedelta = timedelta(seconds=10)
    probe_timeout: timedelta = timedelta(minutes=2)
    # Consumers (rotation-consumers): which resources may be named, the subscription of the short
    # form, whether the engine makes them read the new version, and how long it waits for that.
    allowed_consumers: tuple[str, ...] = ()
    consumer_subscription: str = ""
    consumer_refresh: bool = True
    consumer_timeout: timedelta = timedelta(minutes=10)
    consumer_poll: timedelta = timedelta(seconds=5)
    # A retirement waits while the old credential is still in use, at most this long.
    drain_max: timedelta = timedelta(hours=24)
    # An API key used more recently than this still has a holder (vendors that report last use).
    drain_quiet: timedelta = timedelta(hours=1)
    postgres_sslmode: str = "verify-full"
    # libpq's sslrootcert: a CA file, or `system` (the OS trust store; libpq 16 and later).
    postgres_ca_bundle: str = "system"
    keyvault_api_version: str = "7.6"
    keyvault_ca_bundle: str | None = None
    # Extra CA for HTTPS upstreams (ARM, storage, vendor APIs); only the local stand-ins need it.
    upstream_ca_bundle: str | None = None
    notify_webhook: str | None = None
    notify_eventgrid_endpoint: str | None = None
    arm_endpoint: str = "https://management.azure.com"
    # Azure DNS for ACME DNS-01, when not on `arm_endpoint` (the local stand-in).
    dns_arm_endpoint: str | None = None
    storage_blob_endpoint: str = "https://{account}.blob.core.windows.net"
    # Microsoft Graph and the Entra authority host (entra-app secrets); sovereign clouds differ.
    graph_endpoint: str = "https://graph.microsoft.com"
    authority_host: str = "https://login.microsoftonline.com"
    keyvault_verify_challenge_resource: bool = True
    ledger_connection_string: str | None = None
    ledger_table_endpoint: str | None = None
    ledger_table_prefix: str = "rotation"
    # Record the App Service authentication principal (X-MS-CLIENT-PRINCIPAL-*) as who called;
    # only safe when that authentication is on, as only then does App Service strip the headers.
    trust_app_service_auth: bool = False
    # Vault posture (shared/posture.py): each vault's ARM resource id, the action per checklist
    # row, how often the sweep reads it, how old a record a refusing row may rely on, the soft
    # delete retention that passes, and the app's own principal (else the token's `oid`).
    vault_resource_ids: Mapping[str, str] = field(default_factory=dict)
    posture_policy: Mapping[str, str] = field(default_factory=dict)
    posture_interval: timedelta = timedelta(hours=1)
    posture_max_age: timedelta = timedelta(hours=6)
    posture_min_retention_days: int = 90
    app_principal_id: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for pattern in (*self.allowed_targets, *(p for ps in self.vault_targets.values() for p in ps)):
            check_target_pattern(pattern)
        if self.postgres_sslmode not in POSTGRES_SSLMODES:
            raise ConfigError(
                f"ROTATION_POSTGRES_SSLMODE {self.postgres_sslmode[:20]!r}: only verify-full or verify-ca, "
                "which check the server's certificate"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env

        def duration(name: str, default: timedelta) -> timedelta:
            raw = env.get(name)
            return parse_duration(raw) if raw else default

        vaults = frozenset(
            normalize_vault_url(v) for v in _split_list(env.get("ROTATION_ALLOWED_VAULTS", ""))
        )
        targets = tuple(check_target_pattern(t) for t in _split_list(env.get("ROTATION_ALLOWED_TARGETS", "")))
        table_endpoint = env.get("LEDGER_TABLE_ENDPOINT") or env.get("AzureWebJobsStorage__tableServiceUri")
        if not table_endpoint and env.get("AzureWebJobsStorage__accountName"):
            table_endpoint = f"https://{env['AzureWebJobsStorage__accountName']}.table.core.windows.net"
        return cls(
            allowed_vaults=vaults,
            allowed_targets=targets,
            vault_targets=_vault_targets(env.get("ROTATION_VAULT_TARGETS", "")),
            allowed_networks=_networks(env.get("ROTATION_ALLOWED_NETWORKS", "")),
            default_validity=duration("ROTATION_DEFAULT_VALIDITY", cls.default_validity),
            default_overlap=duration("ROTATION_DEFAULT_OVERLAP", cls.default_overlap),
            sweep_lead_time=duration("ROTATION_SWEEP_LEAD_TIME", cls.sweep_lead_time),
            lease=duration("ROTATION_LEASE", cls.lease),
            retry_after_failure=duration("ROTATION_RETRY_AFTER_FAILURE", cls.retry_after_failure),
            max_attempts=_int(env, "ROTATION_MAX_ATTEMPTS", cls.max_attempts),
            admin_secret_cache=duration("ROTATION_ADMIN_SECRET_CACHE", cls.admin_secret_cache),
            sweep_concurrency=_int(env, "ROTATION_SWEEP_CONCURRENCY", cls.sweep_concurrency),
            inventory_max_age=duration("ROTATION_INVENTORY_MAX_AGE", cls.inventory_max_age),
            keyvault_creates_limit=_int(env, "KEYVAULT_SECRET_CREATES_LIMIT", cls.keyvault_creates_limit),
            keyvault_transactions_limit=_int(
                env, "KEYVAULT_TRANSACTIONS_LIMIT", cls.keyvault_transactions_limit
            ),
            keyvault_limit_window=duration("KEYVAULT_LIMIT_WINDOW", cls.keyvault_limit_window),
            probe_timeout=duration("ROTATION_PROBE_TIMEOUT", cls.probe_timeout),
            allowed_consumers=_consumer_patterns(env.get("ROTATION_ALLOWED_CONSUMERS", "")),
            consumer_subscription=env.get("ROTATION_CONSUMER_SUBSCRIPTION", "").strip(),
            consumer_refresh=_bool(env.get("ROTATION_CONSUMER_REFRESH", "true")),
            consumer_timeout=duration("ROTATION_CONSUMER_TIMEOUT", cls.consumer_timeout),
            consumer_poll=duration("ROTATION_CONSUMER_POLL", cls.consumer_poll),
            drain_max=duration("ROTATION_DRAIN_MAX", cls.drain_max),
            drain_quiet=duration("ROTATION_DRAIN_QUIET", cls.drain_quiet),
            postgres_sslmode=env.get("ROTATION_POSTGRES_SSLMODE") or cls.postgres_sslmode,
            postgres_ca_bundle=env.get("ROTATION_POSTGRES_CA_BUNDLE") or cls.postgres_ca_bundle,
            keyvault_api_version=env.get("KEYVAULT_API_VERSION", cls.keyvault_api_version),
            keyvault_ca_bundle=env.get("KEYVAULT_CA_BUNDLE") or None,
            upstream_ca_bundle=env.get("ROTATION_UPSTREAM_CA_BUNDLE") or None,
            notify_webhook=env.get("ROTATION_NOTIFY_WEBHOOK") or None,
            notify_eventgrid_endpoint=env.get("ROTATION_NOTIFY_EVENTGRID_ENDPOINT") or None,
            arm_endpoint=env.get("ROTATION_ARM_ENDPOINT", cls.arm_endpoint).rstrip("/"),
            dns_arm_endpoint=(env.get("ROTATION_DNS_ARM_ENDPOINT") or "").rstrip("/") or None,
            storage_blob_endpoint=env.get("ROTATION_STORAGE_BLOB_ENDPOINT", cls.storage_blob_endpoint),
            graph_endpoint=env.get("ROTATION_GRAPH_ENDPOINT", cls.graph_endpoint).rstrip("/"),
            authority_host=(env.get("ROTATION_AUTHORITY_HOST") or cls.authority_host).rstrip("/"),
            keyvault_verify_challenge_resource=_bool(env.get("KEYVAULT_VERIFY_CHALLENGE_RESOURCE", "true")),
            ledger_connection_string=env.get("LEDGER_CONNECTION_STRING") or None,
            ledger_table_endpoint=table_endpoint or None,
            ledger_table_prefix=env.get("LEDGER_TABLE_PREFIX", cls.ledger_table_prefix),
            trust_app_service_auth=_bool(env.get("ROTATION_TRUST_APP_SERVICE_AUTH", "false")),
            vault_resource_ids=_vault_resource_ids(env.get("ROTATION_VAULT_RESOURCE_IDS", "")),
            posture_policy=parse_posture_policy(env.get("ROTATION_POSTURE_POLICY", "")),
            posture_interval=duration("ROTATION_POSTURE_INTERVAL", cls.posture_interval),
            posture_max_age=duration("ROTATION_POSTURE_MAX_AGE", cls.posture_max_age),
            posture_min_retention_days=parse_int(
                (env.get("ROTATION_POSTURE_MIN_RETENTION_DAYS") or "90").strip(),
                low=7,
                high=90,
                what="setting ROTATION_POSTURE_MIN_RETENTION_DAYS",
            ),
            app_principal_id=(env.get("ROTATION_APP_PRINCIPAL_ID") or "").strip() or None,
        )

    def refused_rows(self) -> tuple[str, ...]:
        """The posture rows whose failure refuses a rotation into the vault."""
        return tuple(row for row in POSTURE_ROWS if self.posture_policy.get(row) == "refuse")

    def vault_allowed(self, vault_url: str) -> bool:
        return vault_url in self.allowed_vaults

    def targets_for(self, vault_url: str | None) -> tuple[str, ...]:
        """The allow-list that applies to a vault's secrets: its own list, if it has one."""
        if vault_url:
            try:
                url = normalize_vault_url(vault_url)
            except ConfigError:
                return ()
            if url in self.vault_targets:
                return self.vault_targets[url]
        return self.allowed_targets

    def consumer_allowed(self, resource_id: str) -> bool:
        """True when the id starts with the segments of an ROTATION_ALLOWED_CONSUMERS entry."""
        segments = resource_id.lower().strip("/").split("/")
        for pattern in self.allowed_consumers:
            wanted = pattern.strip("/").split("/")
            if len(wanted) <= len(segments) and all(
                fnmatch.fnmatchcase(have, want) for have, want in zip(segments, wanted, strict=False)
            ):
                return True
        return False

    def target_allowed(self, host: str, port: int, vault_url: str | None = None) -> bool:
        """True when `host:port` matches an entry of the vault's allow-list (see check_target_pattern)."""
        name = host.lower().rstrip(".")
        return any(_pattern_matches(p, name, port) for p in self.targets_for(vault_url))
