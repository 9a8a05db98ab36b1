"""A secret's rotation configuration, read from its Key Vault tags.

Tags are copied to every new version, so the configuration travels with the
secret. Tags are input from whoever can write the secret: every value is
validated here before it reaches a rotator, a host name or an SQL statement.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import SplitResult, urlsplit

from shared.consumers import TAG_CONSUMERS, ConsumerRef, check_overlap, parse_consumers
from shared.durations import parse_duration
from shared.errors import ConfigError, InvalidInput, NotManaged, TargetNotAllowed
from shared.jsonsafe import parse_int
from shared.settings import Settings
from shared.windows import Window, parse_windows

TAG_ROTATOR = "rotation-rotator"
TAG_TARGET = "rotation-target"
TAG_SLOTS = "rotation-slots"
TAG_CURRENT_SLOT = "rotation-current-slot"
TAG_VALIDITY = "rotation-validity"
TAG_OVERLAP = "rotation-overlap"
TAG_PROBES = "rotation-probes"
TAG_ADMIN_SECRET = "rotation-admin-secret"
TAG_WINDOW = "rotation-window"
# Written by the engine on each version it creates: which rotation wrote it.
TAG_ROTATION_ID = "rotation-id"

# Tags of Microsoft's Key Vault rotation samples, accepted as aliases.
MS_CREDENTIAL_ID = "CredentialId"
MS_PROVIDER_ADDRESS = "ProviderAddress"
MS_VALIDITY_DAYS = "ValidityPeriodDays"

SECRET_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")
_ROTATOR_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_SLOT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")
_HOST = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_DBNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_$-]{0,62}$")
_ARM_ID = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/(?P<provider>[^/]+/[^/]+)/(?P<name>[^/]+)$",
    re.IGNORECASE,
)
_ARM_ROTATORS = {
    "microsoft.dbforpostgresql/flexibleservers": ("postgres", ".postgres.database.azure.com", 5432),
    "microsoft.storage/storageaccounts": ("storage-key", ".blob.core.windows.net", 443),
}
_URL_PATH = re.compile(r"^[A-Za-z0-9/_.~-]{0,200}$")

# Rotators whose slots have fixed names upstream need no rotation-slots tag.
DEFAULT_SLOTS = {"storage-key": "key1,key2"}
MIN_VALIDITY = timedelta(hours=1)
MAX_VALIDITY = timedelta(days=5 * 366)
MAX_PROBES = 5
MAX_TAGS = 15  # Key Vault's limit per secret version


@dataclass(frozen=True)
class Target:
    """Where a credential lives upstream.

    `host:port[/database]`, an `https://host[:port][/path]` URL (`path` in `database`), or an
    Azure resource id (`resource_id`, with the data-plane host it implies). `host` and `port`
    are what the allow-list is checked against.
    """

    host: str
    port: int
    database: str = ""
    scheme: str = ""
    resource_id: str = ""

    @property
    def resource_name(self) -> str:
        return self.resource_id.rsplit("/", 1)[-1] if self.resource_id else ""

    def __str__(self) -> str:
        if self.resource_id:
            return self.resource_id
        if self.scheme:
            return f"{self.scheme}://{self.host}:{self.port}/{self.database}".rstrip("/")
        return f"{self.host}:{self.port}" + (f"/{self.database}" if self.database else "")


@dataclass(frozen=True)
class RotationConfig:
    """The validated rotation settings of one secret."""

    rotator: str
    target: Target
    slots: tuple[str, str]
    current_slot: str
    validity: timedelta
    overlap: timedelta
    probes: tuple[str, ...] = ()
    admin_secret: str | None = None
    windows: tuple[Window, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    consumers: tuple[ConsumerRef, ...] = ()

    @property
    def inactive_slot(self) -> str:
        return self.slots[1] if self.current_slot == self.slots[0] else self.slots[0]

    def tags_for_new_version(self, slot: str, rotation_id: str) -> dict[str, str]:
        """The tags carried over to a new version, with the slot and the writing rotation."""
        tags = dict(self.tags)
        tags[TAG_CURRENT_SLOT] = slot
        tags[TAG_ROTATION_ID] = rotation_id
        if MS_CREDENTIAL_ID in tags:
            tags[MS_CREDENTIAL_ID] = slot
        return tags


def is_managed(tags: Mapping[str, str] | None) -> bool:
    """A secret is under rotation when it names a rotator, directly or the way Microsoft's samples do."""
    tags = tags or {}
    return TAG_ROTATOR in tags or (MS_CREDENTIAL_ID in tags and MS_PROVIDER_ADDRESS in tags)


def validate_secret_name(name: str) -> str:
    if not isinstance(name, str) or not SECRET_NAME.match(name):
        raise ConfigError(
            "invalid secret name: Key Vault names are 1-127 characters of letters, digits and '-'"
        )
    return name


def parse_target(text: str) -> Target:
    """`host:port/database`, `host/database`, `host:port`, an https URL or an Azure resource id."""
    raw = text.strip()
    if raw.lower().startswith("/subscriptions/"):
        return _target_from_arm_id(raw)[1]
    if raw.lower().startswith("https://"):
        return _target_from_url(raw)
    host_port, _, database = raw.partition("/")
    host, _, port_text = host_port.rpartition(":") if ":" in host_port else (host_port, "", "")
    if not _HOST.match(host):
        raise ConfigError(f"invalid target host in {raw[:80]!r}")
    try:
        port = parse_int(port_text, low=1, high=65535, what="port") if port_text else 5432
    except InvalidInput:
        raise ConfigError(f"invalid target port in {raw[:80]!r}") from None
    if database and not _DBNAME.match(database):
        raise ConfigError(f"invalid database name in target {raw[:80]!r}")
    return Target(host=host.lower(), port=port, database=database)


def _url_port(url: str, default: int) -> tuple[SplitResult, int]:
    """The URL's parts and port (ASCII digits, 1-65535), or ConfigError."""
    try:
        parts = urlsplit(url)
        netloc_port = parts.netloc.rpartition("]")[2].rpartition(":")[2] if ":" in parts.netloc else ""
        if netloc_port and not netloc_port.isascii():
            raise ValueError
        port = parts.port
    except ValueError:
        raise ConfigError(f"invalid URL or port in {url[:80]!r}") from None
    if port is None:
        return parts, default
    if not 1 <= port <= 65535:
        raise ConfigError(f"invalid port in {url[:80]!r}")
    return parts, port


def _target_from_url(url: str) -> Target:
    parts, port = _url_port(url, 443)
    host = parts.hostname or ""
    path = parts.path.strip("/")
    if not _HOST.match(host) or not _URL_PATH.match(path) or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"invalid target URL {url[:80]!r}")
    return Target(host=host.lower(), port=port, database=path, scheme="https")


def _target_from_arm_id(resource_id: str) -> tuple[str, Target]:
    """Microsoft's `ProviderAddress` form: the rotator it implies and the data-plane host."""
    match = _ARM_ID.match(resource_id.strip())
    known = _ARM_ROTATORS.get(match.group("provider").lower()) if match else None
    if not match or not known:
        raise ConfigError(f"resource id {resource_id[:120]!r} is not a resource this service rotates")
    rotator, suffix, port = known
    name = match.group("name")
    if not re.fullmatch(r"[a-z0-9-]{3,63}", name.lower()):
        raise ConfigError(f"invalid resource name in {resource_id[:120]!r}")
    return rotator, Target(host=f"{name.lower()}{suffix}", port=port, resource_id=resource_id.strip())


def _tag(tags: Mapping[str, str], name: str) -> str | None:
    value = tags.get(name)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _not_allowed(what: str, settings: Settings, vault_url: str | None) -> TargetNotAllowed:
    if settings.targets_for(vault_url) is not settings.allowed_targets:
        return TargetNotAllowed(f"{what} is not on vault {vault_url}'s list in ROTATION_VAULT_TARGETS")
    return TargetNotAllowed(f"{what} is not in ROTATION_ALLOWED_TARGETS")


def _check_probe(url: str, settings: Settings, vault_url: str | None) -> str:
    parts, port = _url_port(url, 443 if url.lower().startswith("https:") else 80)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"invalid consumer probe {url[:80]!r}: an http(s) URL is required")
    if not settings.target_allowed(parts.hostname, port, vault_url):
        raise _not_allowed(f"consumer probe host {parts.hostname}:{port}", settings, vault_url)
    return url


def parse_config(
    tags: Mapping[str, str] | None, settings: Settings, *, vault_url: str | None = None
) -> RotationConfig:
    """Validate a secret's tags. Raises NotManaged when it has no rotation tags at all.

    `vault_url` (the secret's vault) selects its allow-list when ROTATION_VAULT_TARGETS lists it."""
    tags = dict(tags or {})
    if not is_managed(tags):
        raise NotManaged("the secret has no rotation tags")

    rotator = _tag(tags, TAG_ROTATOR)
    target_text = _tag(tags, TAG_TARGET)
    target: Target | None = parse_target(target_text) if target_text else None
    provider_address = _tag(tags, MS_PROVIDER_ADDRESS)
    if provider_address and (target is None or rotator is None):
        inferred_rotator, inferred_target = _target_from_arm_id(provider_address)
        rotator = rotator or inferred_rotator
        target = target or inferred_target
    if rotator is None or not _ROTATOR_NAME.match(rotator):
        raise ConfigError(f"tag {TAG_ROTATOR} is missing or invalid")
    if target is None:
        raise ConfigError(f"tag {TAG_TARGET} is missing")
    if not settings.target_allowed(target.host, target.port, vault_url):
        raise _not_allowed(f"target {target.host}:{target.port}", settings, vault_url)

    slots_text = _tag(tags, TAG_SLOTS) or DEFAULT_SLOTS.get(rotator)
    if not slots_text:
        raise ConfigError(f"tag {TAG_SLOTS} is missing: name the two credential slots, comma-separated")
    slots = tuple(s.strip() for s in slots_text.split(","))
    if len(slots) != 2 or slots[0] == slots[1] or not all(_SLOT_NAME.match(s) for s in slots):
        raise ConfigError(f"tag {TAG_SLOTS} must name two different slots, for example app_blue,app_green")
    current = _tag(tags, TAG_CURRENT_SLOT) or _tag(tags, MS_CREDENTIAL_ID) or slots[0]
    if current not in slots:
        raise ConfigError(f"current slot {current[:64]!r} is not one of {TAG_SLOTS}")

    validity_days = _tag(tags, MS_VALIDITY_DAYS)
    validity_text = _tag(tags, TAG_VALIDITY)
    if validity_text:
        validity = parse_duration(validity_text)
    elif validity_days:
        try:
            days = parse_int(validity_days, low=1, high=MAX_VALIDITY.days, what=f"tag {MS_VALIDITY_DAYS}")
        except InvalidInput as error:
            raise ConfigError(f"{error} (a whole number of days)") from None
        validity = timedelta(days=days)
    else:
        validity = settings.default_validity
    if not MIN_VALIDITY <= validity <= MAX_VALIDITY:
        raise ConfigError("validity must be between 1 hour and 5 years")

    overlap_text = _tag(tags, TAG_OVERLAP)
    overlap = parse_duration(overlap_text) if overlap_text else settings.default_overlap
    if overlap >= validity:
        raise ConfigError("overlap must be shorter than validity")

    probes_text = _tag(tags, TAG_PROBES)
    probes = tuple(p for p in (probes_text or "").split() if p)
    if len(probes) > MAX_PROBES:
        raise ConfigError(f"at most {MAX_PROBES} consumer probes")
    for probe in probes:
        _check_probe(probe, settings, vault_url)

    consumers = parse_consumers(_tag(tags, TAG_CONSUMERS), settings)
    check_overlap(consumers, overlap, forced=settings.consumer_refresh)

    admin_secret = _tag(tags, TAG_ADMIN_SECRET)
    if admin_secret is not None and not SECRET_NAME.match(admin_secret):
        raise ConfigError(f"tag {TAG_ADMIN_SECRET} is not a valid secret name")

    window_text = _tag(tags, TAG_WINDOW)
    windows = parse_windows(window_text) if window_text else ()

    config = RotationConfig(
        rotator=rotator,
        target=target,
        slots=(slots[0], slots[1]),
        current_slot=current,
        validity=validity,
        overlap=overlap,
        probes=probes,
        admin_secret=admin_secret,
        windows=windows,
        tags=tags,
        consumers=consumers,
    )
    written = len(config.tags_for_new_version(config.inactive_slot, "-"))
    if written > MAX_TAGS:
        raise ConfigError(
            f"the new version would carry {written} tags (the rotation adds its own) and Key Vault allows "
            f"{MAX_TAGS}: remove {written - MAX_TAGS} tag(s)"
        )
    return config
