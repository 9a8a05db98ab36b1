"""The rotation engine: every trigger ends here.

A rotation is a sequence of named steps, each safe to run twice and
resumable from the ledger:

    claim -> create -> verify -> write -> validate -> finish   ...   retire

`claim` takes the secret's ledger row with an ETag-conditional write, so a
second trigger for the same secret gets "in progress". `create` works on the
slot consumers are not using, `write` stores the verified credential as the
newest Key Vault version (tagged with the rotation id, which is how a resumed
rotation knows the write already happened), `validate` runs the consumer
probes and rolls back on failure, and `finish` schedules the retirement of
the previous slot after the overlap. Emergency rotations retire at once.

Invariant, at every instant: the newest enabled Key Vault version holds a
credential that authenticates upstream.
"""

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from azure.core.credentials import TokenCredential
from azure.core.exceptions import ResourceNotFoundError
from azure.keyvault.secrets import KeyVaultSecret, SecretClient, SecretProperties

from rotators import RotationContext, Rotator, RotatorRegistry
from shared import reach
from shared.config import (
    TAG_ROTATION_ID,
    TAG_ROTATOR,
    TAG_WINDOW,
    RotationConfig,
    is_managed,
    parse_config,
    validate_secret_name,
)
from shared.errors import ConfigError, NotManaged, RotationError, UnsafeOperation
from shared.events import VaultEvent
from shared.ledger import (
    FAILED,
    IDLE,
    OVERLAP,
    ROTATING,
    ConcurrentUpdate,
    HistoryRecord,
    InventoryItem,
    Ledger,
    SecretState,
    as_dict,
    history_key,
)
from shared.retry import call_with_retry
from shared.secret_cache import SecretCache
from shared.settings import Settings, normalize_vault_url
from shared.windows import in_window

logger = logging.getLogger(__name__)

# Outcome statuses, as the triggers and the status API report them.
ROTATED = "rotated"
RETIRED = "retired"
ROLLED_BACK = "rolled_back"
ROTATION_FAILED = "failed"
IN_PROGRESS = "in_progress"
DEFERRED = "deferred"
DROPPED = "dropped"
NOT_FOUND = "not_found"
NOT_MANAGED = "not_managed"
INVALID = "invalid"
MISCONFIGURED = "misconfigured"
OUTSIDE_WINDOW = "outside_window"
DRY_RUN_PASSED = "dry_run_passed"
ADOPTED = "adopted"
ALREADY_MANAGED = "already_managed"
MAX_TAGS = 15

STEPS = ("claim", "create", "verify", "write", "validate", "finish", "retire")
# Every point where the engine calls its checkpoint hook (tests and the chaos run crash there).
CHECKPOINTS = (
    "after:claim",
    *(
        f"{edge}:{step}"
        for step in ("create", "verify", "write", "validate", "finish")
        for edge in ("before", "after")
    ),
    "before:retire",
    "after:retire-upstream",
    "after:retire",
    "after:rollback-write",
    "after:rollback-revoke",
)
_BEFORE_WRITE = ("claim", "create", "verify")
_FENCED_STEPS = frozenset({"create", "write", "revoke"})


def utc_now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


@dataclass(frozen=True)
class Outcome:
    status: str
    secret: str
    message: str
    rotation_id: str = ""
    new_version: str = ""
    retryable: bool = False


def describe_error(error: BaseException) -> str:
    """One line for the ledger and the logs. Errors raised here never carry secret values."""
    text = " ".join(str(error).split())[:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
    ) -> None:
        self._secret_client = secret_client
        self.ledger = ledger
        self._rotators = rotators
        self.settings = settings
        self._credential = credential
        self._clock = clock
        self._probe = probe
        self._checkpoint = checkpoint or (lambda _point: None)
        self._notify = notify
        self._admin_secrets = SecretCache(settings.admin_secret_cache)

    # ----------------------------------------------------------------- entry points

    def handle_event(self, event: VaultEvent) -> Outcome:
        if not self.settings.vault_allowed(event.vault_url):
            return self._log(
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
        vault_url = normalize_vault_url(vault_url)
        try:
            validate_secret_name(name)
        except ConfigError as error:
            return self._log(Outcome(INVALID, name[:128], str(error)))
        if not self.settings.vault_allowed(vault_url):
            return self._log(Outcome(DROPPED, name, f"vault {vault_url} is not in ROTATION_ALLOWED_VAULTS"))

        state = ledger_row or self.ledger.get(vault_url, name)
        now = self._clock()
        if state and state.lease_held(now):
            return self._log(
                Outcome(IN_PROGRESS, name, "a rotation of this secret is in progress", state.rotation_id)
            )
        if state and state.state == ROTATING:
            return self._resume(state)

        client = self._secret_client(vault_url)
        try:
            current = self._get_secret(client, name)
        except ResourceNotFoundError:
            return self._log(Outcome(NOT_FOUND, name, "no such secret in the vault"))
        try:
            config = parse_config(current.properties.tags, self.settings)
            # The rotator's own checks too, before anything is claimed or touched.
            self._rotators.get(config.rotator).validate(self._context(config, client))
        except NotManaged as error:
            return self._log(Outcome(NOT_MANAGED, name, str(error)))
        except ConfigError as error:
            return self._log(Outcome(MISCONFIGURED, name, str(error)))
        if expected_version and current.properties.version != expected_version:
            return self._log(
                Outcome(DROPPED, name, f"stale event: version {expected_version} is not current")
            )

        if not (override_window or emergency or in_window(config.windows, now)):
            window = config.tags.get(TAG_WINDOW, "")
            return self._log(Outcome(OUTSIDE_WINDOW, name, f"outside the rotation window ({window} UTC)"))

        if state and state.state == OVERLAP:
            due = state.retire_after is not None and state.retire_after <= now
            if not (due or emergency):
                when = state.retire_after.isoformat() if state.retire_after else "?"
                return self._log(
                    Outcome(DEFERRED, name, f"previous credential is in its overlap until {when}")
                )
            retired = self._retire(state, current.properties.tags)
            if retired.status != RETIRED:
                return retired

        state = state or SecretState(vault_url=vault_url, name=name)
        rotation_id = uuid.uuid4().hex
        state.state, state.step, state.rotation_id = ROTATING, "claim", rotation_id
        state.trigger, state.requested_by, state.reason = trigger, requested_by[:200], reason[:500]
        state.emergency, state.started_on, state.lease_until = emergency, now, now + self.settings.lease
        state.dry_run = dry_run
        state.from_version, state.from_slot = current.properties.version or "", config.current_slot
        state.to_slot, state.new_version, state.pending_credential = config.inactive_slot, "", ""
        state.attempts, state.last_error, state.step_timings = 1, "", "{}"
        state.history_key = history_key(now, rotation_id)
        try:
            self.ledger.save(state)
        except ConcurrentUpdate:
            return self._log(Outcome(IN_PROGRESS, name, "a rotation of this secret is in progress"))
        self._checkpoint("after:claim")
        return self._run(state, client, config, claimed_now=True)

    def adopt(
        self, vault_url: str, name: str, rotation_tags: dict[str, str], requested_by: str = ""
    ) -> Outcome:
        """Put an existing secret under rotation without rotating it now.

        Writes the rotation tags on the current version, checks that its value
        authenticates upstream, and has the rotator check both slots exist
        (creating the missing inactive one where the kind allows it).
        """
        vault_url = normalize_vault_url(vault_url)
        validate_secret_name(name)
        if not self.settings.vault_allowed(vault_url):
            return self._log(Outcome(DROPPED, name, f"vault {vault_url} is not in ROTATION_ALLOWED_VAULTS"))
        client = self._secret_client(vault_url)
        try:
            current = self._get_secret(client, name)
        except ResourceNotFoundError:
            return self._log(Outcome(NOT_FOUND, name, "no such secret in the vault"))
        existing = dict(current.properties.tags or {})
        if is_managed(existing):
            return self._log(Outcome(ALREADY_MANAGED, name, "the secret is already under rotation"))
        if any(not key.startswith("rotation-") for key in rotation_tags) or TAG_ROTATION_ID in rotation_tags:
            return self._log(Outcome(MISCONFIGURED, name, "adopt takes only rotation-* configuration tags"))
        tags = {**existing, **rotation_tags}
        if len(tags) > MAX_TAGS:
            return self._log(
                Outcome(MISCONFIGURED, name, f"Key Vault allows at most {MAX_TAGS} tags per secret")
            )
        try:
            config = parse_config(tags, self.settings)
            context = self._context(config, client)
            rotator = self._rotators.get(config.rotator)
            rotator.validate(context)
            rotator.verify(context, current.value or "")
            done = rotator.prepare_slots(context)
        except (ConfigError, UnsafeOperation) as error:
            return self._log(Outcome(MISCONFIGURED, name, str(error)))
        except RotationError as error:
            return self._log(Outcome(ROTATION_FAILED, name, describe_error(error)))
        version = current.properties.version or ""
        call_with_retry(
            lambda: client.update_secret_properties(name, version, tags=tags),
            what="write rotation tags",
        )
        # Listed from now on, not only after the next sweep.
        self._record_inventory_item(
            InventoryItem(
                vault_url,
                name,
                config.rotator,
                bool(current.properties.enabled),
                current.properties.expires_on,
            )
        )
        state = self.ledger.get(vault_url, name) or SecretState(vault_url=vault_url, name=name)
        state.current_version, state.current_slot = version, config.current_slot
        state.expires_on = current.properties.expires_on
        state.requested_by = requested_by[:200]
        with suppress(ConcurrentUpdate):
            self.ledger.save(state)
        return self._log(Outcome(ADOPTED, name, "; ".join(["current credential verified", *done])))

    def status(self, vault_url: str, name: str, history_limit: int = 10) -> dict[str, Any]:
        """Where one secret stands: never its value. Raises ResourceNotFoundError for an unknown secret."""
        vault_url = normalize_vault_url(vault_url)
        validate_secret_name(name)
        properties = self._get_secret(self._secret_client(vault_url), name).properties
        tags = properties.tags or {}
        state = self.ledger.get(vault_url, name)
        config_error = ""
        if is_managed(tags):
            try:
                parse_config(tags, self.settings)
            except ConfigError as error:
                config_error = str(error)
        return {
            "name": name,
            "vault": vault_url,
            "managed": is_managed(tags),
            "configuration_error": config_error,
            "rotator": tags.get("rotation-rotator", ""),
            "state": state.state if state else IDLE,
            "step": state.step if state else "",
            "rotation_id": state.rotation_id if state else "",
            "current_version": properties.version,
            "current_slot": tags.get("rotation-current-slot", ""),
            "previous_version": (state.retire_version or state.from_version) if state else "",
            "expires_on": _iso(properties.expires_on),
            "retire_after": _iso(state.retire_after) if state else None,
            "last_rotated_on": _iso(state.last_rotated_on) if state else None,
            "last_outcome": state.last_outcome if state else "",
            "last_error": state.last_error if state else "",
            "attempts": state.attempts if state else 0,
            "history": [as_dict(record) for record in self.ledger.history(vault_url, name, history_limit)],
        }

    def managed_secrets(self, *, refresh: bool = False) -> tuple[list[dict[str, Any]], datetime]:
        """Every managed secret in the allowed vaults, with state, expiry and last outcome; and
        when the oldest of the vault listings they come from was made.

        The listings are the inventory the sweep keeps in the ledger: reading it spends none
        of the vault's Key Vault budget. A vault listed longer ago than `inventory_max_age`
        (or never), or every vault with `refresh`, is listed now and its inventory updated.
        """
        now = self._clock()
        states = {(state.vault_url, state.name): state for state in self.ledger.states()}
        rows: list[dict[str, Any]] = []
        as_of = now
        for vault_url in sorted(self.settings.allowed_vaults):
            listed_on, items = (None, []) if refresh else self.ledger.inventory(vault_url)
            # A listing "from the future" is another worker's clock: not trusted either.
            if listed_on is None or not timedelta(0) <= now - listed_on < self.settings.inventory_max_age:
                listed_on = now
                listing = self._list_secrets(vault_url)
                items = self._record_inventory(vault_url, listing, now, stored=None if refresh else items)
            as_of = min(as_of, listed_on)
            for item in items:
                state = states.get((vault_url, item.name))
                rotated_since = state and state.last_rotated_on and state.last_rotated_on > listed_on
                rows.append(
                    {
                        "name": item.name,
                        "vault": vault_url,
                        "rotator": item.rotator,
                        "enabled": item.enabled,
                        "state": state.state if state else IDLE,
                        # A rotation since the listing wrote a version that expires later.
                        "expires_on": _iso(state.expires_on if state and rotated_since else item.expires_on),
                        "retire_after": _iso(state.retire_after) if state else None,
                        "last_outcome": state.last_outcome if state else "",
                        "last_rotated_on": _iso(state.last_rotated_on) if state else None,
                    }
                )
        far_future = "9999"
        rows.sort(key=lambda row: (row["expires_on"] or far_future, row["vault"], row["name"]))
        return rows, as_of

    def retire_due(self, vault_url: str, name: str) -> Outcome:
        state = self.ledger.get(normalize_vault_url(vault_url), name)
        if not state or state.state != OVERLAP:
            return Outcome(DROPPED, name, "nothing to retire")
        if state.retire_after and state.retire_after > self._clock():
            return Outcome(DEFERRED, name, f"overlap runs until {state.retire_after.isoformat()}")
        if state.lease_held(self._clock()):
            return Outcome(IN_PROGRESS, name, "the retirement is in progress", state.rotation_id)
        return self._retire(state)

    def sweep(self) -> list[Outcome]:
        """Retire due overlaps, resume stalled rotations, rotate near-expiry secrets with no event.

        Runs `sweep_concurrency` secrets at a time. The Key Vault clients pace themselves to
        each vault's budget, so a fleet due at once rotates as fast as Key Vault allows.
        """
        now = self._clock()
        # Ledger first, then the vaults: a retirement claims the row with the ETag read here,
        # so whatever changed after this read makes it back off rather than act on stale tags.
        states = {(state.vault_url, state.name): state for state in self.ledger.states()}
        listed: dict[tuple[str, str], SecretProperties] = {}
        for vault_url in sorted(self.settings.allowed_vaults):
            properties = self._list_secrets(vault_url)
            listed.update(((vault_url, props.name or ""), props) for props in properties)
            self._record_inventory(vault_url, properties, now)
        work: list[tuple[str, Callable[[], Outcome]]] = []
        for key, state in states.items():
            if not self.settings.vault_allowed(state.vault_url) or state.lease_held(now):
                continue
            if state.state == OVERLAP and state.retire_after and state.retire_after <= now:
                seen = listed.get(key)
                tags = (seen.tags or {}) if seen else None
                work.append((state.name, partial(self._retire, state, tags)))
            elif state.state == ROTATING:
                work.append((state.name, partial(self._resume, state)))
        horizon = now + self.settings.sweep_lead_time
        for (vault_url, name), props in listed.items():
            due = self._due_for_rotation(
                enabled=props.enabled,
                tags=props.tags,
                expires_on=props.expires_on,
                state=states.get((vault_url, name)),
                horizon=horizon,
                now=now,
            )
            if due:
                rotate = partial(
                    self.rotate,
                    vault_url,
                    name,
                    trigger="sweep",
                    requested_by="timer",
                    expected_version=props.version,
                    ledger_row=states.get((vault_url, name)) or SecretState(vault_url=vault_url, name=name),
                )
                work.append((name, rotate))
        return self._run_all(work)

    def _run_all(self, work: list[tuple[str, Callable[[], Outcome]]]) -> list[Outcome]:
        def run_one(item: tuple[str, Callable[[], Outcome]]) -> list[Outcome]:
            name, action = item
            outcomes: list[Outcome] = []
            with self._isolated(name, outcomes):
                outcomes.append(action())
            return outcomes

        workers = min(self.settings.sweep_concurrency, len(work))
        if workers <= 1:
            return [outcome for item in work for outcome in run_one(item)]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sweep") as pool:
            return [outcome for outcomes in pool.map(run_one, work) for outcome in outcomes]

    def _due_for_rotation(
        self,
        *,
        enabled: bool | None,
        tags: dict[str, str] | None,
        expires_on: datetime | None,
        state: SecretState | None,
        horizon: datetime,
        now: datetime,
    ) -> bool:
        if not enabled or not is_managed(tags) or not expires_on or expires_on > horizon:
            return False
        if state and state.state in (ROTATING, OVERLAP):
            return False
        failed_recently = (
            state is not None
            and state.last_outcome in (ROTATION_FAILED, ROLLED_BACK)
            and state.last_attempt_on is not None
            and state.last_attempt_on + self.settings.retry_after_failure > now
        )
        return not failed_recently

    # ----------------------------------------------------------------- the steps

    def _resume(self, state: SecretState) -> Outcome:
        now = self._clock()
        state.lease_until = now + self.settings.lease
        state.attempts += 1
        try:
            self.ledger.save(state)
        except ConcurrentUpdate:
            return self._log(
                Outcome(
                    IN_PROGRESS, state.name, "a rotation of this secret is in progress", state.rotation_id
                )
            )
        logger.info(
            "%s: resuming rotation %s at step %s (attempt %d)",
            state.name,
            state.rotation_id,
            state.step,
            state.attempts,
        )
        client = self._secret_client(state.vault_url)
        try:
            current = self._get_secret(client, state.name)
            config = parse_config(current.properties.tags, self.settings)
        except (ResourceNotFoundError, RotationError) as error:
            return self._fail(state, error, None)
        if state.step == "rollback":
            return self._rollback(state, client, config, state.last_error or "resumed rollback")
        return self._run(state, client, config)

    def _run(
        self, state: SecretState, client: SecretClient, config: RotationConfig, *, claimed_now: bool = False
    ) -> Outcome:
        """The steps from `create` on. A resumed run first looks for the version it may have written;
        a run that claimed the secret a moment ago cannot have written one (a Key Vault read saved)."""
        context = self._context(config, client)
        rotator = None
        try:
            rotator = self._rotators.get(config.rotator)
            rotator.validate(context)
            written = None if claimed_now else self._version_written_by(client, state.name, state.rotation_id)
            if written is None:
                # Recorded before the upstream call, so an orphan can be found after a crash.
                state.pending_credential = state.to_slot
                with self._step(state, "create"):
                    new = rotator.create(context, state.to_slot)
                with self._step(state, "verify"):
                    rotator.verify(context, new.value)
                if state.dry_run:
                    return self._finish_dry_run(state, rotator, context)
                with self._step(state, "write"):
                    written = call_with_retry(
                        lambda: client.set_secret(
                            state.name,
                            new.value,
                            tags=config.tags_for_new_version(state.to_slot, state.rotation_id),
                            expires_on=self._clock() + config.validity,
                            content_type=new.content_type,
                        ),
                        what="write new secret version",
                    )
                    state.new_version = written.properties.version or ""
            else:
                state.new_version = written.properties.version or ""
            with self._step(state, "validate"):
                failure = self._probe_consumers(config)
            if failure:
                return self._rollback(state, client, config, failure)
            with self._step(state, "finish"):
                outcome = self._finish(state, written, config)
        except ConcurrentUpdate:
            return self._log(
                Outcome(
                    IN_PROGRESS, state.name, "the rotation was taken over by another run", state.rotation_id
                )
            )
        except Exception as error:
            return self._fail(state, error, (rotator, context) if rotator else None)
        if state.emergency:
            retired = self._retire(state)
            if retired.status != RETIRED:
                return self._tell(retired, state)
            return self._tell(outcome, state)
        return outcome

    def _finish(self, state: SecretState, written: KeyVaultSecret, config: RotationConfig) -> Outcome:
        now = self._clock()
        state.current_version, state.current_slot = state.new_version, state.to_slot
        state.expires_on = written.properties.expires_on
        state.last_rotated_on = state.last_attempt_on = now
        state.last_outcome, state.last_error = ROTATED, ""
        state.retire_slot, state.retire_version = state.from_slot, state.from_version
        state.retire_after = now if state.emergency else now + config.overlap
        state.state, state.step, state.lease_until, state.pending_credential = OVERLAP, "", None, ""
        self.ledger.save(state)
        self._write_history(state, outcome=ROTATED, ended_on=now)
        message = (
            f"new version {state.new_version} on slot {state.to_slot}; "
            f"previous slot retires at {state.retire_after.isoformat()}"
        )
        return self._log(Outcome(ROTATED, state.name, message, state.rotation_id, state.new_version))

    def _finish_dry_run(self, state: SecretState, rotator: Rotator, context: RotationContext) -> Outcome:
        """The new credential worked: revoke it, since nothing will ever use it."""
        with self._step(state, "revoke"):
            rotator.retire(context, state.to_slot)
        now = self._clock()
        state.state, state.step, state.lease_until, state.pending_credential = IDLE, "", None, ""
        self.ledger.save(state)
        self._write_history(state, outcome=DRY_RUN_PASSED, ended_on=now)
        message = f"created, verified and revoked a credential on slot {state.to_slot}; Key Vault unchanged"
        return self._log(Outcome(DRY_RUN_PASSED, state.name, message, state.rotation_id))

    def _rollback(
        self, state: SecretState, client: SecretClient, config: RotationConfig, reason: str
    ) -> Outcome:
        """Consumers failed on the new credential: make the previous one newest again, revoke the new one."""
        logger.warning("%s: rolling back rotation %s: %s", state.name, state.rotation_id, reason)
        context = self._context(config, client)
        rollback_id = f"{state.rotation_id}-rollback"
        try:
            state.step, state.last_error = "rollback", reason[:500]
            self.ledger.save(state)
            if self._version_written_by(client, state.name, rollback_id) is None:
                previous = self._get_secret(client, state.name, state.from_version)
                tags = dict(previous.properties.tags or {})
                tags[TAG_ROTATION_ID] = rollback_id
                call_with_retry(
                    lambda: client.set_secret(
                        state.name,
                        previous.value or "",
                        tags=tags,
                        expires_on=previous.properties.expires_on,
                        content_type=previous.properties.content_type,
                    ),
                    what="restore previous secret version",
                )
            self._checkpoint("after:rollback-write")
            self.ledger.save(state)  # still ours? (fence before the upstream revoke)
            self._rotators.get(config.rotator).retire(context, state.to_slot)
            self._checkpoint("after:rollback-revoke")
        except ConcurrentUpdate:
            return Outcome(
                IN_PROGRESS, state.name, "the rollback was taken over by another run", state.rotation_id
            )
        except Exception as error:
            return self._fail(state, error, None)
        now = self._clock()
        state.state, state.step, state.lease_until, state.pending_credential = IDLE, "", None, ""
        state.last_outcome, state.last_attempt_on = ROLLED_BACK, now
        try:
            self.ledger.save(state)
        except ConcurrentUpdate:
            return Outcome(
                IN_PROGRESS, state.name, "the rollback was taken over by another run", state.rotation_id
            )
        self._write_history(state, outcome=ROLLED_BACK, ended_on=now, error=reason)
        outcome = Outcome(ROLLED_BACK, state.name, f"rolled back: {reason}", state.rotation_id)
        return self._tell(self._log(outcome), state)

    def _retire(self, state: SecretState, current_tags: dict[str, str] | None = None) -> Outcome:
        """Revoke the previous slot once its overlap is over, and disable its Key Vault version.

        `current_tags` are the newest version's tags when the caller has just read or listed
        them; otherwise they are read here."""
        client = self._secret_client(state.vault_url)
        try:
            if current_tags is None:
                current_tags = self._get_secret(client, state.name).properties.tags
            config = parse_config(current_tags, self.settings)
            if config.current_slot == state.retire_slot:
                raise UnsafeOperation(
                    f"slot {state.retire_slot} is the one the newest version uses: refusing to retire it"
                )
            # Retiring is claimed like a rotation: a lease, taken by a conditional write right
            # before the revoke, so no other run can rotate onto this slot meanwhile.
            state.step, state.lease_until = "retire", self._clock() + self.settings.lease
            context = self._context(config, client)
            self._checkpoint("before:retire")
            self.ledger.save(state)
            started = time.perf_counter()
            self._rotators.get(config.rotator).retire(context, state.retire_slot)
            self._checkpoint("after:retire-upstream")
            if state.retire_version:
                self._disable_version(client, state.name, state.retire_version)
            self._checkpoint("after:retire")
            state.record_timing("retire", (time.perf_counter() - started) * 1000)
        except ConcurrentUpdate:
            return Outcome(IN_PROGRESS, state.name, "retirement taken over by another run", state.rotation_id)
        except Exception as error:
            now = self._clock()
            state.last_error, state.last_attempt_on, state.lease_until = describe_error(error), now, now
            with suppress(ConcurrentUpdate):
                self.ledger.save(state)
            logger.error("%s: retiring slot %s failed: %s", state.name, state.retire_slot, state.last_error)
            return Outcome(ROTATION_FAILED, state.name, state.last_error, state.rotation_id, retryable=True)
        now = self._clock()
        slot, version = state.retire_slot, state.retire_version
        state.state, state.step, state.lease_until = IDLE, "", None
        state.retire_slot, state.retire_version, state.retire_after = "", "", None
        state.last_error = ""
        try:
            self.ledger.save(state)
        except ConcurrentUpdate:
            return Outcome(IN_PROGRESS, state.name, "retirement taken over by another run", state.rotation_id)
        self._write_history(
            state, outcome=state.last_outcome or ROTATED, ended_on=state.last_rotated_on, retired_on=now
        )
        return self._log(
            Outcome(RETIRED, state.name, f"retired slot {slot} (version {version})", state.rotation_id)
        )

    def _fail(
        self,
        state: SecretState,
        error: BaseException,
        revoke: tuple[Rotator, RotationContext] | None,
    ) -> Outcome:
        now = self._clock()
        message = describe_error(error)
        state.last_error, state.last_attempt_on, state.lease_until = message, now, now
        written = state.step not in _BEFORE_WRITE
        retryable = not isinstance(error, ConfigError | UnsafeOperation)
        logger.error(
            "%s: rotation %s failed at step %s: %s", state.name, state.rotation_id, state.step, message
        )
        if written and retryable and state.attempts < self.settings.max_attempts:
            # The new version is live: keep the rotation open so the next trigger finishes it.
            self._save_quietly(state)
            return Outcome(ROTATION_FAILED, state.name, message, state.rotation_id, retryable=True)
        revoked = True
        if not written and revoke is not None and state.pending_credential:
            rotator, context = revoke
            try:
                rotator.retire(context, state.to_slot)
            except Exception as revoke_error:
                revoked = False  # the orphan stays recorded in pending_credential
                logger.warning(
                    "%s: could not revoke unused slot %s: %s",
                    state.name,
                    state.to_slot,
                    describe_error(revoke_error),
                )
        state.state = FAILED if written else IDLE
        if not written:
            state.step = ""
            state.pending_credential = "" if revoked else state.pending_credential
        state.last_outcome = ROTATION_FAILED
        self._save_quietly(state)
        self._write_history(state, outcome=ROTATION_FAILED, ended_on=now, error=message)
        outcome = Outcome(
            ROTATION_FAILED, state.name, message, state.rotation_id, retryable=retryable and not written
        )
        return self._tell(outcome, state)

    # ----------------------------------------------------------------- helpers

    def _context(self, config: RotationConfig, client: SecretClient) -> RotationContext:
        return RotationContext(config, client, self._credential, self.settings, self._admin_secrets)

    @contextmanager
    def _step(self, state: SecretState, step: str) -> Iterator[None]:
        state.step = step
        self._checkpoint(f"before:{step}")
        if step in _FENCED_STEPS and self._lease_running_out(state):
            # A conditional write right before the step changes something upstream or in Key
            # Vault: a run that stalled and was taken over finds the row changed here and stops
            # (ConcurrentUpdate). No other run can take over while the lease holds, so a run
            # with most of its lease left goes on without it: each ledger write costs as much
            # as the step itself. Read-only steps (verify, validate) never need it.
            self.ledger.save(state)
        started = time.perf_counter()
        yield
        state.record_timing(step, (time.perf_counter() - started) * 1000)
        self._checkpoint(f"after:{step}")

    def _lease_running_out(self, state: SecretState) -> bool:
        """Less than half the lease is left: far more than clock skew between workers."""
        if state.lease_until is None:
            return True
        return state.lease_until - self._clock() < self.settings.lease / 2

    @contextmanager
    def _isolated(self, name: str, outcomes: list[Outcome]) -> Iterator[None]:
        """One secret's failure must not stop a sweep over the others."""
        try:
            yield
        except Exception as error:
            logger.error("%s: sweep failed: %s", name, describe_error(error))
            outcomes.append(Outcome(ROTATION_FAILED, name, describe_error(error), retryable=True))

    def _probe_consumers(self, config: RotationConfig) -> str | None:
        for url in config.probes:
            try:
                self._probe(url, self.settings.probe_timeout.total_seconds())
            except Exception as error:
                return f"consumer probe failed: {describe_error(error)}"
        return None

    def _list_secrets(self, vault_url: str) -> list[SecretProperties]:
        return list(self._secret_client(vault_url).list_properties_of_secrets())

    def _record_inventory(
        self,
        vault_url: str,
        properties: list[SecretProperties],
        listed_on: datetime,
        *,
        stored: list[InventoryItem] | None = None,
    ) -> list[InventoryItem]:
        """The managed secrets of a listing, kept as the vault's inventory (`stored`: as just read).
        A failure to write it is logged, not raised: the listing at hand is still good, and the
        next one writes it."""
        items = [
            InventoryItem(
                vault_url=vault_url,
                name=props.name or "",
                rotator=(props.tags or {}).get(TAG_ROTATOR, ""),
                enabled=bool(props.enabled),
                expires_on=props.expires_on,
            )
            for props in properties
            if is_managed(props.tags)
        ]
        try:
            self.ledger.replace_inventory(vault_url, items, listed_on, stored=stored)
        except Exception as error:
            logger.error("could not record the inventory of %s: %s", vault_url, describe_error(error))
        return items

    def _record_inventory_item(self, item: InventoryItem) -> None:
        try:
            self.ledger.add_to_inventory(item)
        except Exception as error:
            logger.error("could not record %s in the inventory: %s", item.name, describe_error(error))

    def _get_secret(self, client: SecretClient, name: str, version: str | None = None) -> KeyVaultSecret:
        return call_with_retry(lambda: client.get_secret(name, version), what="read secret")

    def _version_written_by(self, client: SecretClient, name: str, rotation_id: str) -> KeyVaultSecret | None:
        newest = self._get_secret(client, name)
        tags = newest.properties.tags or {}
        return newest if tags.get(TAG_ROTATION_ID) == rotation_id else None

    def _disable_version(self, client: SecretClient, name: str, version: str) -> None:
        try:
            call_with_retry(
                lambda: client.update_secret_properties(name, version, enabled=False),
                what="disable retired version",
            )
        except ResourceNotFoundError:
            logger.info("%s: retired version %s no longer exists", name, version)

    def _save_quietly(self, state: SecretState) -> None:
        try:
            self.ledger.save(state)
        except Exception as error:
            logger.error(
                "%s: could not record the failure in the ledger: %s", state.name, describe_error(error)
            )

    def _write_history(
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

    def _tell(self, outcome: Outcome, state: SecretState) -> Outcome:
        """Notify for outcomes a person should know about (rollbacks, failures, emergencies)."""
        if self._notify is not None:
            self._notify(
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

    def _log(self, outcome: Outcome) -> Outcome:
        level = (
            logging.INFO if outcome.status in (ROTATED, RETIRED, IN_PROGRESS, DEFERRED) else logging.WARNING
        )
        logger.log(level, "%s: %s: %s", outcome.secret, outcome.status, outcome.message)
        return outcome
