"""What every part of the engine works with: the clients, the ledger, the clock and the hooks,
and the few Key Vault and ledger helpers they all use."""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from azure.core.credentials import TokenCredential
from azure.core.exceptions import ResourceNotFoundError
from azure.keyvault.secrets import KeyVaultSecret, SecretClient

from rotators import RotationContext, RotatorRegistry
from shared.config import TAG_ROTATION_ID, RotationConfig
from shared.consumers import Consumers
from shared.ledger import ConcurrentUpdate, HistoryRecord, Ledger, SecretState
from shared.outcomes import Outcome, describe_error
from shared.retry import call_with_retry
from shared.secret_cache import SecretCache
from shared.settings import Settings
from shared.telemetry import annotate_rotator

logger = logging.getLogger("shared.engine")


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


@dataclass
class Runtime:
    secret_client: Callable[[str], SecretClient]
    ledger: Ledger
    rotators: RotatorRegistry
    settings: Settings
    credential: TokenCredential
    clock: Callable[[], datetime]
    probe: Callable[[str, float], None]
    checkpoint: Callable[[str], None]
    notify: Callable[[dict[str, Any]], None] | None = None
    # Replaces the consumers' mover and drain check (the chaos run's control run switches them off).
    consumers: Consumers | None = None
    admin_secrets: SecretCache = field(init=False)

    def __post_init__(self) -> None:
        self.admin_secrets = SecretCache(self.settings.admin_secret_cache)

    def consumer_apps(self) -> Consumers:
        if self.consumers is not None:
            return self.consumers
        return Consumers(self.settings, self.credential, self.clock)

    def context(self, config: RotationConfig, client: SecretClient, secret_name: str) -> RotationContext:
        annotate_rotator(config.rotator)  # names the rotator on the rotation span, if one is open
        return RotationContext(
            config, client, self.credential, self.settings, self.admin_secrets, secret_name=secret_name
        )

    def get_secret(self, client: SecretClient, name: str, version: str | None = None) -> KeyVaultSecret:
        return call_with_retry(lambda: client.get_secret(name, version), what="read secret")

    def version_written_by(self, client: SecretClient, name: str, rotation_id: str) -> KeyVaultSecret | None:
        newest = self.get_secret(client, name)
        tags = newest.properties.tags or {}
        return newest if tags.get(TAG_ROTATION_ID) == rotation_id else None

    def disable_version(self, client: SecretClient, name: str, version: str) -> None:
        try:
            call_with_retry(
                lambda: client.update_secret_properties(name, version, enabled=False),
                what="disable retired version",
            )
        except ResourceNotFoundError:
            logger.info("%s: retired version %s no longer exists", name, version)

    def save_quietly(self, state: SecretState) -> None:
        try:
            self.ledger.save(state)
        except ConcurrentUpdate:
            logger.info("%s: the ledger row changed meanwhile; another run records its own", state.name)
        except Exception as error:
            logger.error(
                "%s: could not record the failure in the ledger: %s", state.name, describe_error(error)
            )

    def write_history(
        self,
        state: SecretState,
        *,
        outcome: str,
        ended_on: datetime | None,
        retired_on: datetime | None = None,
        error: str = "",
    ) -> None:
        """Write the rotation's history row when it ends (and again when its overlap is retired).
        The state row holds every field of it until the next claim, so nothing is read first."""
        record = HistoryRecord(
            vault_url=state.vault_url,
            name=state.name,
            rotation_id=state.rotation_id,
            trigger=state.trigger,
            requested_by=state.requested_by,
            reason=state.reason,
            emergency=state.emergency,
            dry_run=state.dry_run,
            started_on=state.started_on,
            ended_on=ended_on,
            retired_on=retired_on,
            outcome=outcome,
            from_version=state.from_version,
            new_version=state.new_version,
            from_slot=state.from_slot,
            to_slot=state.to_slot,
            attempts=state.attempts,
            error=error[:500],
            step_timings=state.step_timings,
        )
        self.ledger.write_history(record, state.history_key)

    def tell(self, outcome: Outcome, state: SecretState) -> Outcome:
        """Notify for outcomes a person should know about (rollbacks, failures, refusals, emergencies)."""
        if self.notify is not None:
            self.notify(
                {
                    "secret": state.name,
                    "vault": state.vault_url,
                    "status": outcome.status,
                    "message": outcome.message,
                    "rotation_id": outcome.rotation_id,
                    "trigger": state.trigger,
                    "requested_by": state.requested_by,
                    "emergency": state.emergency,
                }
            )
        return outcome
