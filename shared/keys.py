"""Key Vault key rotation: `KeyNearExpiry` -> `KeyClient.rotate_key`, and key rotation policies.

Keys need none of the secret machinery. Key Vault makes the new key material
itself, and every earlier version stays usable for decrypt, unwrap and verify,
so there are no slots, no overlap and nothing to retire: consumers that
encrypted with version N can still decrypt after N+1 is current.

A key is rotated by the service only when it opted in with the tag
`rotation-rotator=keyvault-key` on its current version (the service never
rotates a key nobody asked it to). A key whose Key Vault rotation policy has a
Rotate action is rotated by Key Vault itself; its events are dropped, so one
expiry never gives two new versions.

On `KeyNearExpiry` / `KeyExpired` for the *current* version of an opted-in key:

1. `rotate_key(name)` (retried on transient failures; a retry first checks whether the
   key moved on already, so a lost response never makes two versions);
2. the new version keeps the opt-in tags (copied if Key Vault did not carry them over) and
   gets an expiry: the policy's `expiryTime` when there is one, otherwise
   `rotation-validity` (tag) or ROTATION_DEFAULT_VALIDITY, so the next KeyNearExpiry comes.

That validity is bounded as Key Vault bounds a policy's `expiryTime`, checked before the key
is touched: at least 28 days (Key Vault's minimum), and at least 7 days longer than the
key's Notify lead (`timeBeforeExpiry`, by default 30 days), the margin Key Vault demands of
a policy's actions; otherwise the new version would be near expiry at once and every
KeyNearExpiry would rotate again. At most 100 years (Key Vault states no maximum; past that
the expiry is not a date, and the new version would get none).

Stale events (not the current version), vaults off the allow-list and unmanaged keys are
dropped with one log line. A duplicate event after a rotation is stale. No ledger: the
outcome and the log line are the record, and Key Vault's version list is the history.
"""

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.keyvault.keys import (
    KeyClient,
    KeyRotationLifetimeAction,
    KeyRotationPolicy,
    KeyRotationPolicyAction,
    KeyVaultKey,
)

from shared import telemetry
from shared.config import SECRET_NAME, TAG_ROTATOR, TAG_VALIDITY
from shared.durations import MAX_DURATION, parse_duration
from shared.errors import ConfigError
from shared.events import VaultEvent
from shared.retry import call_with_retry, is_transient
from shared.settings import Settings, normalize_vault_url

logger = logging.getLogger(__name__)

KEY_ROTATOR = "keyvault-key"
DEFAULT_NOTIFY_BEFORE_EXPIRY = "P30D"
MIN_EXPIRES_AFTER = timedelta(days=28)
MIN_TRIGGER = timedelta(days=7)
MAX_KEY_VALIDITY = MAX_DURATION  # 100 years
POLICY_FIELDS = ("rotate_before_expiry", "rotate_after_create", "expires_after", "notify_before_expiry")

# Outcome statuses (the same words the secret engine uses, plus "stale").
ROTATED = "rotated"
STALE = "stale"
DROPPED = "dropped"
NOT_FOUND = "not_found"
NOT_MANAGED = "not_managed"
INVALID = "invalid"
FAILED = "failed"

_YEARS_MONTHS = re.compile(
    r"^P(?:(?P<years>[0-9]{1,4})Y)?(?:(?P<months>[0-9]{1,4})M)?(?P<rest>(?:[0-9]+W)?(?:[0-9]+D)?(?:T.*)?)$"
)


def utc_now() -> datetime:
    return datetime.now(UTC)


def policy_duration(text: str) -> tuple[str, timedelta]:
    """Validate an ISO 8601 duration as Key Vault policies take it; return (canonical text, length).

    Beyond what `shared.durations.parse_duration` accepts, years and months are allowed
    (Key Vault takes P1Y, P3M); for the checks here a year counts 365 days, a month 30.
    """
    if not isinstance(text, str):
        raise ConfigError("a duration must be a string such as P30D or P1Y")
    candidate = text.strip().upper()
    match = _YEARS_MONTHS.match(candidate)
    if match and (match["years"] or match["months"]):
        rest = match["rest"]
        extra = parse_duration(f"P{rest}") if rest else timedelta(0)
        length = timedelta(days=365 * int(match["years"] or 0) + 30 * int(match["months"] or 0)) + extra
        if length > MAX_KEY_VALIDITY:
            raise ConfigError(f"duration {text[:40]!r} is out of range: at most 100 years (P100Y)")
        return candidate, length
    try:
        return candidate, parse_duration(candidate)
    except ConfigError as problem:
        if "out of range" in str(problem):
            raise
        raise ConfigError(
            f"invalid duration {text[:40]!r}: use ISO 8601, for example P30D, P90D, P1Y or PT48H"
        ) from None


def _days(length: timedelta) -> str:
    return f"{length.days} days" if length.days and not length % timedelta(days=1) else str(length)


def key_validity(tag: str | None, default: timedelta, notify_before_expiry: timedelta) -> timedelta:
    """How long a new key version is valid: the `rotation-validity` tag, else `default`.

    Bounded as Key Vault bounds a rotation policy's expiryTime (see the module docstring).
    Raises ConfigError, saying which value is wrong and why.
    """
    where = f"tag {TAG_VALIDITY}" if tag else "ROTATION_DEFAULT_VALIDITY"
    try:
        length = policy_duration(tag)[1] if tag else default
    except ConfigError as problem:
        raise ConfigError(f"{where}: {problem}") from None
    shortest = max(MIN_EXPIRES_AFTER, notify_before_expiry + MIN_TRIGGER)
    if length < shortest:
        reason = (
            "Key Vault's minimum expiry is 28 days (P28D)"
            if shortest == MIN_EXPIRES_AFTER
            else f"Key Vault sends KeyNearExpiry {_days(notify_before_expiry)} before expiry (the key's"
            " Notify action), so a shorter validity would be rotated again at once"
        )
        raise ConfigError(f"{where}: a key version must be valid for at least {_days(shortest)}: {reason}")
    if length > MAX_KEY_VALIDITY:
        raise ConfigError(f"{where}: a key version can be valid for at most 100 years")
    return length


def notify_lead(policy: KeyRotationPolicy) -> timedelta:
    """How long before expiry Key Vault sends KeyNearExpiry: the policy's Notify action, else 30 days."""
    for action in policy.lifetime_actions or []:
        if (
            str(getattr(action.action, "value", action.action)).lower() == "notify"
            and action.time_before_expiry
        ):
            try:
                return policy_duration(action.time_before_expiry)[1]
            except ConfigError:
                break
    return policy_duration(DEFAULT_NOTIFY_BEFORE_EXPIRY)[1]


@dataclass(frozen=True)
class KeyOutcome:
    status: str
    key: str
    message: str
    vault: str = ""
    new_version: str = ""
    retryable: bool = False


@dataclass(frozen=True)
class PolicyRequest:
    """A rotation policy as an operator asks for it; `validate` checks it the way Key Vault does."""

    rotate_before_expiry: str | None = None
    rotate_after_create: str | None = None
    expires_after: str | None = None
    notify_before_expiry: str | None = None

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> "PolicyRequest":
        """Syntax only (types, known fields, duration grammar): what a request can get wrong alone."""
        unknown = sorted(set(fields) - set(POLICY_FIELDS))
        if unknown:
            raise ConfigError(f"unknown field(s): {', '.join(unknown)[:200]}")
        if not fields:
            raise ConfigError(f"give at least one of {', '.join(POLICY_FIELDS)}")
        values: dict[str, str] = {}
        for name, value in fields.items():
            if not isinstance(value, str) or len(value) > 40:
                raise ConfigError(f"{name} must be an ISO 8601 duration string")
            values[name] = policy_duration(value)[0]
        if "rotate_before_expiry" in values and "rotate_after_create" in values:
            raise ConfigError("rotate_before_expiry and rotate_after_create exclude each other")
        return cls(**values)

    def validate(self) -> None:
        """The rules Key Vault applies to a policy, checked before the call."""
        expiry = policy_duration(self.expires_after)[1] if self.expires_after else None
        if expiry is not None and expiry < MIN_EXPIRES_AFTER:
            raise ConfigError("expires_after must be at least 28 days (P28D)")
        if self.rotate_before_expiry and expiry is None:
            raise ConfigError(
                "rotate_before_expiry needs expires_after: without an expiry on new versions "
                "the second rotation would never come"
            )
        for name in ("rotate_before_expiry", "rotate_after_create", "notify_before_expiry"):
            text = getattr(self, name)
            if not text:
                continue
            length = policy_duration(text)[1]
            if length < MIN_TRIGGER:
                raise ConfigError(f"{name} must be at least 7 days (P7D)")
            if expiry is not None and length > expiry - MIN_TRIGGER:
                raise ConfigError(f"{name} must be at least 7 days shorter than expires_after")

    def lifetime_actions(self) -> list[KeyRotationLifetimeAction]:
        actions = []
        if self.rotate_before_expiry or self.rotate_after_create:
            actions.append(
                KeyRotationLifetimeAction(
                    KeyRotationPolicyAction.rotate,
                    time_before_expiry=self.rotate_before_expiry,
                    time_after_create=self.rotate_after_create,
                )
            )
        # Keep Key Vault's default notification unless told otherwise: KeyNearExpiry comes from it.
        actions.append(
            KeyRotationLifetimeAction(
                KeyRotationPolicyAction.notify,
                time_before_expiry=self.notify_before_expiry or DEFAULT_NOTIFY_BEFORE_EXPIRY,
            )
        )
        return actions


def policy_as_dict(policy: KeyRotationPolicy) -> dict[str, Any]:
    """A rotation policy in the API's JSON shape."""

    def iso(moment: datetime | None) -> str | None:
        return moment.isoformat() if moment else None

    return {
        "id": policy.id,
        "expires_after": policy.expires_in,
        "lifetime_actions": [
            {
                "action": str(getattr(action.action, "value", action.action)),
                "time_after_create": action.time_after_create,
                "time_before_expiry": action.time_before_expiry,
            }
            for action in policy.lifetime_actions or []
        ],
        "created_on": iso(policy.created_on),
        "updated_on": iso(policy.updated_on),
    }


def _has_rotate_action(policy: KeyRotationPolicy) -> bool:
    return any(
        str(getattr(action.action, "value", action.action)).lower() == "rotate"
        for action in policy.lifetime_actions or []
    )


class KeyRotationService:
    """Rotates opted-in Key Vault keys on their events, and sets key rotation policies."""

    def __init__(
        self,
        key_client: Callable[[str], KeyClient],
        settings: Settings,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        telemetry.configure()  # Azure Monitor when APPLICATIONINSIGHTS_CONNECTION_STRING is set
        self.key_client = key_client
        self.settings = settings
        self._clock = clock
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # ----- events ------------------------------------------------------------------------------

    @telemetry.key_rotation(KEY_ROTATOR, errors=(FAILED,))
    def handle_event(self, event: VaultEvent) -> KeyOutcome:
        """KeyNearExpiry / KeyExpired: rotate the key if the event is about its current version."""
        if not event.is_key:
            return self._log(KeyOutcome(INVALID, event.name, "not a key event", event.vault_url))
        if not self.settings.vault_allowed(event.vault_url):
            return self._log(
                KeyOutcome(DROPPED, event.name, f"vault {event.vault_url} is not in ROTATION_ALLOWED_VAULTS")
            )
        trigger = event.event_type.rsplit(".", 1)[-1]
        with self._lock_for(event.vault_url, event.name):
            try:
                return self._rotate(event.vault_url, event.name, event.version.lower(), trigger)
            except ResourceNotFoundError:
                return self._log(
                    KeyOutcome(NOT_FOUND, event.name, "no such key in the vault", event.vault_url)
                )
            except HttpResponseError as error:
                message = f"Key Vault refused: {error.status_code} {getattr(error.error, 'code', '') or ''}"
                return self._log(
                    KeyOutcome(
                        FAILED, event.name, message.strip(), event.vault_url, retryable=is_transient(error)
                    )
                )
            except (ConnectionError, TimeoutError) as error:
                return self._log(
                    KeyOutcome(FAILED, event.name, type(error).__name__, event.vault_url, retryable=True)
                )

    def _rotate(self, vault: str, name: str, version: str, trigger: str) -> KeyOutcome:
        client = self.key_client(vault)
        current = call_with_retry(lambda: client.get_key(name), what=f"get key {name}")
        current_version = (current.properties.version or "").lower()
        if current_version != version:
            return self._log(
                KeyOutcome(STALE, name, f"event for version {version}, current is {current_version}", vault)
            )
        tags = dict(current.properties.tags or {})
        if tags.get(TAG_ROTATOR) != KEY_ROTATOR:
            return self._log(
                KeyOutcome(NOT_MANAGED, name, f"key is not tagged {TAG_ROTATOR}={KEY_ROTATOR}", vault)
            )
        if current.properties.enabled is False:
            return self._log(KeyOutcome(DROPPED, name, "the current version is disabled", vault))
        policy = call_with_retry(lambda: client.get_key_rotation_policy(name), what=f"get policy of {name}")
        if _has_rotate_action(policy):
            return self._log(
                KeyOutcome(
                    DROPPED, name, "Key Vault rotates this key itself (its policy has a Rotate action)", vault
                )
            )
        try:
            # Before anything changes: a validity Key Vault would refuse, or one that would make
            # every KeyNearExpiry rotate again, leaves the key as it is.
            validity = key_validity(
                tags.get(TAG_VALIDITY), self.settings.default_validity, notify_lead(policy)
            )
        except ConfigError as error:
            message = f"{error}; the key was not rotated (version {version} is still current)"
            return self._log(KeyOutcome(INVALID, name, message, vault))

        def rotate_unless_moved_on() -> KeyVaultKey:
            # A retry after a lost response must not make a second version: look first.
            latest = client.get_key(name)
            if (latest.properties.version or "").lower() != version:
                return latest
            return client.rotate_key(name)

        new = call_with_retry(rotate_unless_moved_on, what=f"rotate key {name}")
        new_version = new.properties.version or ""
        self._settle(client, new, tags, validity)
        return self._log(
            KeyOutcome(
                ROTATED,
                name,
                f"{trigger}: version {version} -> {new_version}; earlier versions still decrypt",
                vault,
                new_version=new_version,
            )
        )

    def _settle(self, client: KeyClient, new: KeyVaultKey, tags: dict[str, str], validity: timedelta) -> None:
        """Carry the opt-in tags over and give the new version an expiry, when Key Vault did not."""
        changes: dict[str, Any] = {}
        if any((new.properties.tags or {}).get(key) != value for key, value in tags.items()):
            changes["tags"] = {**(new.properties.tags or {}), **tags}
        if new.properties.expires_on is None:
            changes["expires_on"] = self._clock() + validity
        if changes:
            version = new.properties.version
            call_with_retry(
                lambda: client.update_key_properties(new.name, version, **changes),
                what=f"update key {new.name}",
            )

    # ----- rotation policies -------------------------------------------------------------------

    def set_rotation_policy(
        self,
        vault_url: str,
        name: str,
        request: PolicyRequest,
        *,
        requested_by: str = "",
    ) -> KeyRotationPolicy:
        """Replace the key's rotation policy. Raises ResourceNotFoundError, ConfigError, HttpResponseError."""
        vault = normalize_vault_url(vault_url)
        if not SECRET_NAME.match(name):
            raise ConfigError(
                "invalid key name: Key Vault names are 1-127 characters of letters, digits and '-'"
            )
        if not self.settings.vault_allowed(vault):
            raise ConfigError(f"vault {vault} is not in ROTATION_ALLOWED_VAULTS")
        client = self.key_client(vault)
        # The key first: a policy for a key that does not exist is a 404, whatever it says.
        call_with_retry(lambda: client.get_key(name), what=f"get key {name}")
        request.validate()
        policy = call_with_retry(
            lambda: client.update_key_rotation_policy(
                name,
                KeyRotationPolicy(),
                lifetime_actions=request.lifetime_actions(),
                expires_in=request.expires_after,
            ),
            what=f"set rotation policy of {name}",
        )
        logger.info(
            "%s: rotation policy set by %s: %s",
            name,
            requested_by or "unknown",
            ", ".join(
                f"{field}={getattr(request, field)}" for field in POLICY_FIELDS if getattr(request, field)
            ),
        )
        return policy

    def get_rotation_policy(self, vault_url: str, name: str) -> KeyRotationPolicy:
        client = self.key_client(normalize_vault_url(vault_url))
        return call_with_retry(lambda: client.get_key_rotation_policy(name), what=f"get policy of {name}")

    # ----- helpers -----------------------------------------------------------------------------

    def _lock_for(self, vault: str, name: str) -> threading.Lock:
        """One rotation of a key at a time in this worker (Key Vault has no conditional rotate)."""
        with self._locks_guard:
            return self._locks.setdefault((vault, name.lower()), threading.Lock())

    @staticmethod
    def _log(outcome: KeyOutcome) -> KeyOutcome:
        level = logging.INFO if outcome.status == ROTATED else logging.WARNING
        logger.log(level, "key %s: %s: %s", outcome.key, outcome.status, outcome.message)
        return outcome
