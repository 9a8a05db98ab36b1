"""The consumer half of a rotation: move the consumers to the version just written (the
`validate` step), and before retiring the old credential, check nothing still uses it (the
drain). Used by shared/steps.py.

The drain asks what the upstream can tell: each declared consumer's position (shared/consumers.py)
and the rotator's own `in_use`, where it has one (PostgreSQL sessions of the old role, a vendor's
last-used time of the old key). While anything holds the old credential the retirement waits,
alerting once, for at most ROTATION_DRAIN_MAX; then it retires and says what it retired under.
An emergency retires at once.
"""

import logging

from azure.keyvault.secrets import SecretProperties

from rotators import RotationContext
from shared.config import RotationConfig
from shared.consumers import WAITING, ConsumersNotMoved, Position, Wanted, positions_json
from shared.errors import RotationError
from shared.ledger import SecretState
from shared.outcomes import RETIRE_HELD, Outcome, describe_error, logged
from shared.runtime import Runtime

logger = logging.getLogger("shared.engine")


def preflight(rt: Runtime, state: SecretState, config: RotationConfig) -> None:
    """Every declared consumer reads this secret, unpinned: checked before anything changes."""
    if config.consumers:
        rt.consumer_apps().preflight(config.consumers, state.vault_url, state.name)


def move(rt: Runtime, state: SecretState, config: RotationConfig, wanted: Wanted) -> str | None:
    """Make the consumers hold the wanted credential; the failure, if they did not in time."""
    if not config.consumers:
        return None
    try:
        positions = rt.consumer_apps().move(config.consumers, state.vault_url, state.name, wanted)
    except ConsumersNotMoved as error:
        return f"consumers did not move: {error}"
    state.consumers = positions_json(positions)
    return None


def held(
    rt: Runtime,
    state: SecretState,
    config: RotationConfig,
    context: RotationContext,
    current: SecretProperties,
) -> Outcome | None:
    """An outcome when the retirement must wait (the row records why), None to retire now."""
    if state.emergency:
        return None
    reasons = _still_in_use(rt, state, config, context, current)
    now = rt.clock()
    if not reasons:
        state.held_since, state.held_reason = None, ""
        return None
    first = state.held_since is None
    since = state.held_since = state.held_since or now
    until = since + rt.settings.drain_max
    why = "; ".join(reasons)[:400]
    if now >= until:
        state.held_reason = f"retired at the maximum hold ({rt.settings.drain_max}) although {why}"
        logger.warning("%s: %s", state.name, state.held_reason)
        rt.tell(Outcome(RETIRE_HELD, state.name, state.held_reason, state.rotation_id), state)
        return None
    state.held_reason = why
    state.lease_until = None
    rt.ledger.save(state)
    outcome = logged(
        Outcome(
            RETIRE_HELD,
            state.name,
            f"retiring slot {state.retire_slot} waits: {why}; it retires by {until.isoformat()} at latest",
            state.rotation_id,
        )
    )
    return rt.tell(outcome, state) if first else outcome


def _still_in_use(
    rt: Runtime,
    state: SecretState,
    config: RotationConfig,
    context: RotationContext,
    current: SecretProperties,
) -> list[str]:
    reasons: list[str] = []
    if config.consumers:
        try:
            wanted = Wanted(current.version or "", current.created_on or rt.clock())
            positions = rt.consumer_apps().positions(config.consumers, state.vault_url, state.name, wanted)
        except RotationError as error:
            positions = [
                Position(str(ref), ref.kind, WAITING, detail=describe_error(error))
                for ref in config.consumers
            ]
        state.consumers = positions_json(positions)
        reasons += [
            f"consumer {p.consumer} still holds an older version ({p.detail})"
            for p in positions
            if p.state == WAITING
        ]
    in_use = getattr(rt.rotators.get(config.rotator), "in_use", None)
    if in_use is not None:
        try:
            usage = in_use(context, state.retire_slot)
        except RotationError as error:
            usage = f"whether slot {state.retire_slot} is in use could not be read: {describe_error(error)}"
        if usage:
            reasons.append(str(usage))
    return reasons
