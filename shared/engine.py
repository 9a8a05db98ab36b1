"""The rotation engine: every trigger ends here.

It admits a request (the vault is served, the name is valid, the tags parse, no rotation is
in progress, the window is open, the overlap is over) and hands it to the steps
(shared/steps.py). The sweep (shared/sweep.py), status and the list (shared/inventory.py) and
adoption (shared/binding.py) share its clients through one Runtime.
"""

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from azure.core.credentials import TokenCredential
from azure.core.exceptions import ResourceNotFoundError
from azure.keyvault.secrets import SecretClient

from rotators import RotatorRegistry
from shared import binding, inventory, posture, reach, steps, sweep
from shared.config import TAG_WINDOW, parse_config, validate_secret_name
from shared.consumers import Consumers
from shared.errors import ConfigError, NotManaged
from shared.events import VaultEvent
from shared.ledger import OVERLAP, ROTATING, Ledger, SecretState
from shared.outcomes import (
    ADOPTED,
    ALREADY_MANAGED,
    BOUND,
    DEFERRED,
    DROPPED,
    DRY_RUN_PASSED,
    IN_PROGRESS,
    INVALID,
    MISCONFIGURED,
    NOT_FOUND,
    NOT_MANAGED,
    OUTSIDE_WINDOW,
    REFUSED,
    RETIRED,
    ROLLED_BACK,
    ROTATED,
    ROTATION_FAILED,
    Outcome,
    describe_error,
    logged,
)
from shared.runtime import Runtime, utc_now
from shared.settings import Settings, normalize_vault_url
from shared.steps import CHECKPOINTS, STEPS
from shared.windows import in_window

__all__ = [
    "ADOPTED",
    "ALREADY_MANAGED",
    "BOUND",
    "CHECKPOINTS",
    "DEFERRED",
    "DROPPED",
    "DRY_RUN_PASSED",
    "INVALID",
    "IN_PROGRESS",
    "MISCONFIGURED",
    "NOT_FOUND",
    "NOT_MANAGED",
    "OUTSIDE_WINDOW",
    "REFUSED",
    "RETIRED",
    "ROLLED_BACK",
    "ROTATED",
    "ROTATION_FAILED",
    "STEPS",
    "Outcome",
    "RotationEngine",
    "describe_error",
    "http_probe",
    "utc_now",
]

logger = logging.getLogger(__name__)


def http_probe(url: str, deadline_seconds: float) -> None:
    """shared.reach.http_probe with settings from the environment; build_engine passes its own."""
    reach.http_probe(Settings.from_env(), url, deadline_seconds)


class RotationEngine:
    def __init__(
        self,
        *,
        secret_client: Callable[[str], SecretClient],
        ledger: Ledger,
        rotators: RotatorRegistry,
        settings: Settings,
        credential: TokenCredential,
        clock: Callable[[], datetime] = utc_now,
        probe: Callable[[str, float], None] = http_probe,
        checkpoint: Callable[[str], None] | None = None,
        notify: Callable[[dict[str, Any]], None] | None = None,
        consumers: Consumers | None = None,
    ) -> None:
        self._rt = Runtime(
            secret_client=secret_client,
            ledger=ledger,
            rotators=rotators,
            settings=settings,
            credential=credential,
            clock=clock,
            probe=probe,
            checkpoint=checkpoint or (lambda _point: None),
            notify=notify,
            consumers=consumers,
        )

    @property
    def ledger(self) -> Ledger:
        return self._rt.ledger

    @property
    def settings(self) -> Settings:
        return self._rt.settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        self._rt.settings = value

    @property
    def credential(self) -> TokenCredential:
        """The app's identity, for reports that ask upstreams directly (GET /entra/expiring)."""
        return self._rt.credential

    def handle_event(self, event: VaultEvent) -> Outcome:
        if not self.settings.vault_allowed(event.vault_url):
            return logged(
                Outcome(DROPPED, event.name, f"vault {event.vault_url} is not in ROTATION_ALLOWED_VAULTS")
            )
        return self.rotate(
            event.vault_url,
            event.name,
            trigger=f"event:{event.event_type.rsplit('.', 1)[-1]}",
            requested_by=f"eventgrid:{event.event_id}",
            expected_version=event.version,
        )

    def rotate(
        self,
        vault_url: str,
        name: str,
        *,
        trigger: str,
        requested_by: str = "",
        reason: str = "",
        emergency: bool = False,
        dry_run: bool = False,
        override_window: bool = False,
        expected_version: str | None = None,
        ledger_row: SecretState | None = None,
    ) -> Outcome:
        """Rotate one secret now, or resume its stalled rotation.

        `dry_run` creates and verifies a credential on the inactive slot, then revokes
        it, writing nothing to Key Vault. Automatic triggers respect the secret's
        rotation window; an operator may override it, and an emergency always does.
        `ledger_row` is the secret's ledger row as the caller has just read it (a new one if
        it has none), saving a read: the claim is conditional on its ETag either way.
        """
        rt = self._rt
        vault_url = normalize_vault_url(vault_url)
        try:
            name = validate_secret_name(name).lower()
        except ConfigError as error:
            return logged(Outcome(INVALID, name[:128], str(error)))
        if not self.settings.vault_allowed(vault_url):
            return logged(Outcome(DROPPED, name, f"vault {vault_url} is not in ROTATION_ALLOWED_VAULTS"))

        state = ledger_row or self.ledger.get(vault_url, name)
        now = rt.clock()
        if state and state.lease_held(now):
            return logged(
                Outcome(IN_PROGRESS, name, "a rotation of this secret is in progress", state.rotation_id)
            )
        if state and state.state == ROTATING:
            return steps.resume(rt, state)

        client = rt.secret_client(vault_url)
        try:
            current = rt.get_secret(client, name)
        except ResourceNotFoundError:
            return logged(Outcome(NOT_FOUND, name, "no such secret in the vault"))
        try:
            config = parse_config(current.properties.tags, self.settings, vault_url=vault_url)
            # The rotator's own checks too, before anything is claimed or touched.
            rt.rotators.get(config.rotator).validate(rt.context(config, client, name))
        except NotManaged as error:
            return logged(Outcome(NOT_MANAGED, name, str(error)))
        except ConfigError as error:
            row = state or SecretState(vault_url=vault_url, name=name)
            return binding.report_once(rt, row, current.properties, MISCONFIGURED, str(error))
        if expected_version and current.properties.version != expected_version:
            return logged(Outcome(DROPPED, name, f"stale event: version {expected_version} is not current"))

        if not (override_window or emergency or in_window(config.windows, now)):
            window = config.tags.get(TAG_WINDOW, "")
            return logged(Outcome(OUTSIDE_WINDOW, name, f"outside the rotation window ({window} UTC)"))

        # A `refuse` row of ROTATION_POSTURE_POLICY that the vault fails: nothing is touched.
        row = state or SecretState(vault_url=vault_url, name=name)
        refusal = posture.admit(rt, row, current.properties, vault_url, emergency=emergency)
        if refusal is not None:
            return refusal

        if state and state.state == OVERLAP:
            due = state.retire_after is not None and state.retire_after <= now
            if not (due or emergency):
                when = state.retire_after.isoformat() if state.retire_after else "?"
                return logged(Outcome(DEFERRED, name, f"previous credential is in its overlap until {when}"))
            retired = steps.retire(rt, state, current.properties)
            if retired.status != RETIRED:
                return retired

        state = state or SecretState(vault_url=vault_url, name=name)
        version = current.properties.version or ""
        refusal = binding.admit(rt, state, client, config, current)
        if refusal is not None:
            return refusal
        return steps.start(
            rt,
            state,
            client,
            config,
            version,
            trigger=trigger,
            requested_by=requested_by,
            reason=reason,
            emergency=emergency,
            dry_run=dry_run,
        )

    def adopt(
        self, vault_url: str, name: str, rotation_tags: dict[str, str], requested_by: str = ""
    ) -> Outcome:
        return binding.adopt(self._rt, vault_url, name, rotation_tags, requested_by)

    def bind(self, vault_url: str, name: str, requested_by: str = "") -> Outcome:
        return binding.bind(self._rt, vault_url, name, requested_by)

    def status(self, vault_url: str, name: str, history_limit: int = 10) -> dict[str, Any]:
        return inventory.status(self._rt, vault_url, name, history_limit)

    def managed_secrets(self, *, refresh: bool = False) -> tuple[list[dict[str, Any]], datetime]:
        return inventory.managed_secrets(self._rt, refresh=refresh)

    def retire_due(self, vault_url: str, name: str) -> Outcome:
        state = self.ledger.get(normalize_vault_url(vault_url), name.lower())
        if not state or state.state != OVERLAP:
            return Outcome(DROPPED, name, "nothing to retire")
        if state.retire_after and state.retire_after > self._rt.clock():
            return Outcome(DEFERRED, name, f"overlap runs until {state.retire_after.isoformat()}")
        if state.lease_held(self._rt.clock()):
            return Outcome(IN_PROGRESS, name, "the retirement is in progress", state.rotation_id)
        return steps.retire(self._rt, state)

    def sweep(self) -> list[Outcome]:
        return sweep.sweep(self._rt, self.rotate)

    def vault_posture(self, vault_url: str, *, refresh: bool = False) -> posture.Posture:
        """The vault's recorded posture (read and recorded first when due, or with `refresh`)."""
        return posture.record(self._rt, normalize_vault_url(vault_url), force=refresh)
