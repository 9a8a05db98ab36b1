"""The rotation's steps, each safe to run twice and resumable from the ledger:

    claim -> create -> verify -> write -> validate -> finish   ...   retire

`start` claims the secret's ledger row with an ETag-conditional write, so a second trigger for
the same secret gets "in progress". `create` works on the slot consumers are not using, `write`
stores the verified credential as the newest Key Vault version (tagged with the rotation id,
which is how a resumed rotation knows the write already happened), `validate` runs the consumer
probes and rolls back on failure, and `finish` schedules the retirement of the previous slot
after the overlap. Emergency rotations retire at once.

Invariant, at every instant: the newest enabled Key Vault version holds a credential that
authenticates upstream. What may be rotated at all (tags, binding, proof of possession) is
decided before `start`, in shared/admission.py.
"""

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from azure.core.exceptions import ResourceNotFoundError
from azure.keyvault.secrets import KeyVaultSecret, SecretClient, SecretProperties

from rotators import RotationContext, Rotator
from shared import binding, rollout, telemetry
from shared.config import TAG_ROTATION_ID, RotationConfig, parse_config
from shared.consumers import ConsumersNotMoved, Wanted
from shared.errors import ConfigError, Refused, RotationError, UnsafeOperation
from shared.ledger import FAILED, IDLE, OVERLAP, ROTATING, ConcurrentUpdate, SecretState, history_key
from shared.outcomes import (
    DRY_RUN_PASSED,
    IN_PROGRESS,
    RETIRED,
    ROLLED_BACK,
    ROTATED,
    ROTATION_FAILED,
    Outcome,
    describe_error,
    logged,
)
from shared.retry import call_with_retry
from shared.runtime import Runtime

logger = logging.getLogger("shared.engine")

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


@telemetry.rotation
def start(
    rt: Runtime,
    state: SecretState,
    client: SecretClient,
    config: RotationConfig,
    from_version: str,
    *,
    trigger: str,
    requested_by: str,
    reason: str,
    emergency: bool,
    dry_run: bool,
) -> Outcome:
    """Claim the secret's row for a new rotation and run it."""
    now = rt.clock()
    rotation_id = uuid.uuid4().hex
    state.state, state.step, state.rotation_id = ROTATING, "claim", rotation_id
    state.trigger, state.requested_by, state.reason = trigger, requested_by[:200], reason[:500]
    state.emergency, state.started_on, state.lease_until = emergency, now, now + rt.settings.lease
    state.dry_run = dry_run
    state.from_version, state.from_slot = from_version, config.current_slot
    state.to_slot, state.new_version, state.pending_credential = config.inactive_slot, "", ""
    state.attempts, state.last_error, state.step_timings = 1, "", "{}"
    state.history_key = history_key(now, rotation_id)
    try:
        with telemetry.step("claim"):
            rt.ledger.save(state)
    except ConcurrentUpdate:
        return logged(Outcome(IN_PROGRESS, state.name, "a rotation of this secret is in progress"))
    rt.checkpoint("after:claim")
    return run(rt, state, client, config, claimed_now=True)


@telemetry.rotation
def resume(rt: Runtime, state: SecretState) -> Outcome:
    now = rt.clock()
    state.lease_until = now + rt.settings.lease
    state.attempts += 1
    try:
        rt.ledger.save(state)
    except ConcurrentUpdate:
        return logged(
            Outcome(IN_PROGRESS, state.name, "a rotation of this secret is in progress", state.rotation_id)
        )
    logger.info(
        "%s: resuming rotation %s at step %s (attempt %d)",
        state.name,
        state.rotation_id,
        state.step,
        state.attempts,
    )
    client = rt.secret_client(state.vault_url)
    try:
        current = rt.get_secret(client, state.name)
        config = parse_config(current.properties.tags, rt.settings, vault_url=state.vault_url)
        binding.check_bound(rt, state, config)
    except (ResourceNotFoundError, RotationError) as error:
        return fail(rt, state, error, None)
    if state.step == "rollback":
        return rollback(rt, state, client, config, state.last_error or "resumed rollback")
    return run(rt, state, client, config)


def run(
    rt: Runtime,
    state: SecretState,
    client: SecretClient,
    config: RotationConfig,
    *,
    claimed_now: bool = False,
) -> Outcome:
    """The steps from `create` on. A resumed run first looks for the version it may have written;
    a run that claimed the secret a moment ago cannot have written one (a Key Vault read saved)."""
    context = rt.context(config, client, state.name)
    rotator = None
    try:
        rotator = rt.rotators.get(config.rotator)
        rotator.validate(context)
        written = None if claimed_now else rt.version_written_by(client, state.name, state.rotation_id)
        if written is None:
            rollout.preflight(rt, state, config)
            # Recorded before the upstream call, so an orphan can be found after a crash.
            state.pending_credential = state.to_slot
            with _step(rt, state, "create"):
                new = rotator.create(context, state.to_slot)
            with _step(rt, state, "verify"):
                rotator.verify(context, new.value)
            if state.dry_run:
                return _finish_dry_run(rt, state, rotator, context)
            with _step(rt, state, "write"):
                written = call_with_retry(
                    lambda: client.set_secret(
                        state.name,
                        new.value,
                        tags=config.tags_for_new_version(state.to_slot, state.rotation_id),
                        expires_on=rt.clock() + config.validity,
                        content_type=new.content_type,
                    ),
                    what="write new secret version",
                )
                state.new_version = written.properties.version or ""
        else:
            state.new_version = written.properties.version or ""
        with _step(rt, state, "validate"):
            # Now, not the version's `created` (whole seconds): a replica that started in the same
            # second before the write must not count as holding it.
            wanted = Wanted(state.new_version, rt.clock())
            failure = rollout.move(rt, state, config, wanted) or _probe_consumers(rt, config)
        if failure:
            return rollback(rt, state, client, config, failure)
        with _step(rt, state, "finish"):
            outcome = _finish(rt, state, written, config)
    except ConcurrentUpdate:
        return logged(
            Outcome(IN_PROGRESS, state.name, "the rotation was taken over by another run", state.rotation_id)
        )
    except Exception as error:
        return fail(rt, state, error, (rotator, context) if rotator else None)
    if state.emergency:
        retired = retire(rt, state)
        if retired.status != RETIRED:
            return rt.tell(retired, state)
        return rt.tell(outcome, state)
    return outcome


def _finish(rt: Runtime, state: SecretState, written: KeyVaultSecret, config: RotationConfig) -> Outcome:
    now = rt.clock()
    state.current_version, state.current_slot = state.new_version, state.to_slot
    state.expires_on = written.properties.expires_on
    state.last_rotated_on = state.last_attempt_on = now
    state.last_outcome, state.last_error = ROTATED, ""
    state.retire_slot, state.retire_version = state.from_slot, state.from_version
    state.retire_after = now if state.emergency else now + config.overlap
    state.state, state.step, state.lease_until, state.pending_credential = OVERLAP, "", None, ""
    rt.ledger.save(state)
    rt.write_history(state, outcome=ROTATED, ended_on=now)
    message = (
        f"new version {state.new_version} on slot {state.to_slot}; "
        f"previous slot retires at {state.retire_after.isoformat()}"
    )
    return logged(Outcome(ROTATED, state.name, message, state.rotation_id, state.new_version))


def _finish_dry_run(rt: Runtime, state: SecretState, rotator: Rotator, context: RotationContext) -> Outcome:
    """The new credential worked: revoke it, since nothing will ever use it."""
    with _step(rt, state, "revoke"):
        rotator.retire(context, state.to_slot)
    now = rt.clock()
    state.state, state.step, state.lease_until, state.pending_credential = IDLE, "", None, ""
    rt.ledger.save(state)
    rt.write_history(state, outcome=DRY_RUN_PASSED, ended_on=now)
    message = f"created, verified and revoked a credential on slot {state.to_slot}; Key Vault unchanged"
    return logged(Outcome(DRY_RUN_PASSED, state.name, message, state.rotation_id))


@telemetry.step("rollback")
def rollback(
    rt: Runtime, state: SecretState, client: SecretClient, config: RotationConfig, reason: str
) -> Outcome:
    """Consumers failed on the new credential: make the previous one newest again, revoke the new one."""
    logger.warning("%s: rolling back rotation %s: %s", state.name, state.rotation_id, reason)
    context = rt.context(config, client, state.name)
    rollback_id = f"{state.rotation_id}-rollback"
    try:
        state.step, state.last_error = "rollback", reason[:500]
        rt.ledger.save(state)
        restored = rt.version_written_by(client, state.name, rollback_id)
        if restored is None:
            previous = rt.get_secret(client, state.name, state.from_version)
            tags = dict(previous.properties.tags or {})
            tags[TAG_ROTATION_ID] = rollback_id
            restored = call_with_retry(
                lambda: client.set_secret(
                    state.name,
                    previous.value or "",
                    tags=tags,
                    expires_on=previous.properties.expires_on,
                    content_type=previous.properties.content_type,
                ),
                what="restore previous secret version",
            )
        rt.checkpoint("after:rollback-write")
        # Consumers that moved to the new credential must move back before it is revoked; if
        # they do not, the rollback stays open (retried) and the new credential stays valid.
        unmoved = config.consumers and rollout.move(rt, state, config, _restored(rt, client, state, restored))
        if unmoved:
            raise ConsumersNotMoved(f"{unmoved}; the new credential on slot {state.to_slot} stays valid")
        rt.ledger.save(state)  # still ours? (fence before the upstream revoke)
        rt.rotators.get(config.rotator).retire(context, state.to_slot)
        rt.checkpoint("after:rollback-revoke")
    except ConcurrentUpdate:
        return Outcome(
            IN_PROGRESS, state.name, "the rollback was taken over by another run", state.rotation_id
        )
    except Exception as error:
        return fail(rt, state, error, None)
    now = rt.clock()
    state.state, state.step, state.lease_until, state.pending_credential = IDLE, "", None, ""
    state.last_outcome, state.last_attempt_on = ROLLED_BACK, now
    try:
        rt.ledger.save(state)
    except ConcurrentUpdate:
        return Outcome(
            IN_PROGRESS, state.name, "the rollback was taken over by another run", state.rotation_id
        )
    rt.write_history(state, outcome=ROLLED_BACK, ended_on=now, error=reason)
    outcome = Outcome(ROLLED_BACK, state.name, f"rolled back: {reason}", state.rotation_id)
    return rt.tell(logged(outcome), state)


def _restored(rt: Runtime, client: SecretClient, state: SecretState, restored: KeyVaultSecret) -> Wanted:
    """After a rollback, consumers may hold the restored version or the previous one (the same
    value), but nothing started while the rolled-back version was newest."""
    rolled_back = rt.get_secret(client, state.name, state.new_version) if state.new_version else None
    return Wanted(
        restored.properties.version or "",
        restored.properties.created_on or rt.clock(),
        same_as=state.from_version,
        stale_from=rolled_back.properties.created_on if rolled_back else None,
    )


@telemetry.rotation
@telemetry.step("retire")
def retire(rt: Runtime, state: SecretState, current: SecretProperties | None = None) -> Outcome:
    """Revoke the previous slot once its overlap is over, and disable its Key Vault version.

    `current` is the newest version's properties when the caller has just read them; otherwise
    they are read here (a listing will not do: Key Vault's list of secrets names no version, and
    the binding and the consumers are checked against one)."""
    client = rt.secret_client(state.vault_url)
    try:
        if current is None or not current.version:
            current = rt.get_secret(client, state.name).properties
        config = parse_config(current.tags, rt.settings, vault_url=state.vault_url)
        try:
            binding.check_retire(rt, state, config, client, current.version or "")
        except Refused as error:
            return binding.refuse(rt, state, current, error)
        if config.current_slot == state.retire_slot:
            raise UnsafeOperation(
                f"slot {state.retire_slot} is the one the newest version uses: refusing to retire it"
            )
        context = rt.context(config, client, state.name)
        waiting = rollout.held(rt, state, config, context, current)
        if waiting is not None:
            return waiting
        # Retiring is claimed like a rotation: a lease, taken by a conditional write right
        # before the revoke, so no other run can rotate onto this slot meanwhile.
        state.step, state.lease_until = "retire", rt.clock() + rt.settings.lease
        rt.checkpoint("before:retire")
        rt.ledger.save(state)
        started = time.perf_counter()
        rt.rotators.get(config.rotator).retire(context, state.retire_slot)
        rt.checkpoint("after:retire-upstream")
        if state.retire_version:
            rt.disable_version(client, state.name, state.retire_version)
        rt.checkpoint("after:retire")
        state.record_timing("retire", (time.perf_counter() - started) * 1000)
    except ConcurrentUpdate:
        return Outcome(IN_PROGRESS, state.name, "retirement taken over by another run", state.rotation_id)
    except Exception as error:
        now = rt.clock()
        state.last_error, state.last_attempt_on, state.lease_until = describe_error(error), now, now
        with suppress(ConcurrentUpdate):
            rt.ledger.save(state)
        logger.error("%s: retiring slot %s failed: %s", state.name, state.retire_slot, state.last_error)
        return Outcome(ROTATION_FAILED, state.name, state.last_error, state.rotation_id, retryable=True)
    now = rt.clock()
    slot, version = state.retire_slot, state.retire_version
    state.state, state.step, state.lease_until = IDLE, "", None
    state.retire_slot, state.retire_version, state.retire_after = "", "", None
    state.last_error, state.held_since = "", None
    try:
        rt.ledger.save(state)
    except ConcurrentUpdate:
        return Outcome(IN_PROGRESS, state.name, "retirement taken over by another run", state.rotation_id)
    rt.write_history(
        state, outcome=state.last_outcome or ROTATED, ended_on=state.last_rotated_on, retired_on=now
    )
    return logged(Outcome(RETIRED, state.name, f"retired slot {slot} (version {version})", state.rotation_id))


def fail(
    rt: Runtime,
    state: SecretState,
    error: BaseException,
    revoke: tuple[Rotator, RotationContext] | None,
) -> Outcome:
    now = rt.clock()
    message = describe_error(error)
    state.last_error, state.last_attempt_on, state.lease_until = message, now, now
    written = state.step not in _BEFORE_WRITE
    retryable = not isinstance(error, ConfigError | UnsafeOperation | Refused)
    logger.error("%s: rotation %s failed at step %s: %s", state.name, state.rotation_id, state.step, message)
    if state.new_version:  # say what is true now: consumers may already read the new version
        message += (
            f"; version {state.new_version} (slot {state.to_slot}) is already live in Key Vault and "
            f"works upstream, and the previous slot {state.from_slot} still works"
        )
    if written and retryable and state.attempts < rt.settings.max_attempts:
        # The new version is live: keep the rotation open so the next trigger finishes it.
        rt.save_quietly(state)
        message += "; the next trigger finishes the rotation"
        return Outcome(
            ROTATION_FAILED, state.name, message, state.rotation_id, state.new_version, retryable=True
        )
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
    rt.save_quietly(state)
    rt.write_history(state, outcome=ROTATION_FAILED, ended_on=now, error=message)
    outcome = Outcome(
        ROTATION_FAILED,
        state.name,
        message,
        state.rotation_id,
        state.new_version,
        retryable=retryable and not written,
    )
    return rt.tell(outcome, state)


@contextmanager
def _step(rt: Runtime, state: SecretState, step: str) -> Iterator[None]:
    state.step = step
    rt.checkpoint(f"before:{step}")
    if step in _FENCED_STEPS and _lease_running_out(rt, state):
        # A conditional write right before the step changes something upstream or in Key
        # Vault: a run that stalled and was taken over finds the row changed here and stops
        # (ConcurrentUpdate). No other run can take over while the lease holds, so a run
        # with most of its lease left goes on without it: each ledger write costs as much
        # as the step itself. Read-only steps (verify, validate) never need it.
        rt.ledger.save(state)
    started = time.perf_counter()
    with telemetry.step(step):
        yield
    state.record_timing(step, (time.perf_counter() - started) * 1000)
    rt.checkpoint(f"after:{step}")


def _lease_running_out(rt: Runtime, state: SecretState) -> bool:
    """Less than half the lease is left: far more than clock skew between workers."""
    if state.lease_until is None:
        return True
    return state.lease_until - rt.clock() < rt.settings.lease / 2


def _probe_consumers(rt: Runtime, config: RotationConfig) -> str | None:
    for url in config.probes:
        try:
            rt.probe(url, rt.settings.probe_timeout.total_seconds())
        except Exception as error:
            return f"consumer probe failed: {describe_error(error)}"
    return None
