"""The timer's sweep: retire due overlaps, resume stalled rotations, and rotate managed secrets
close to expiry whose event never came (events are at-least-once, and NearExpiry fires once)."""

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta
from functools import partial

from azure.keyvault.secrets import SecretProperties

from shared import posture, steps
from shared.binding import refusal_key
from shared.config import is_managed, parse_config
from shared.errors import ConfigError
from shared.inventory import list_secrets, record_inventory
from shared.ledger import OVERLAP, ROTATING, SecretState
from shared.outcomes import ROLLED_BACK, ROTATION_FAILED, Outcome, describe_error
from shared.runtime import Runtime

logger = logging.getLogger("shared.engine")


def sweep(rt: Runtime, rotate: Callable[..., Outcome]) -> list[Outcome]:
    """Retire due overlaps, resume stalled rotations, rotate near-expiry secrets with no event.

    Runs `sweep_concurrency` secrets at a time. The Key Vault clients pace themselves to
    each vault's budget, so a fleet due at once rotates as fast as Key Vault allows.
    """
    now = rt.clock()
    # Each vault's posture when due (hourly): a refusing policy then admits on this reading.
    posture.sweep(rt)
    # Ledger first, then the vaults: a retirement claims the row with the ETag read here,
    # so whatever changed after this read makes it back off rather than act on stale tags.
    states = {(state.vault_url, state.name): state for state in rt.ledger.states()}
    listed: dict[tuple[str, str], SecretProperties] = {}
    for vault_url in sorted(rt.settings.allowed_vaults):
        properties = list_secrets(rt, vault_url)
        listed.update(((vault_url, (props.name or "").lower()), props) for props in properties)
        record_inventory(rt, vault_url, properties, now)
    work: list[tuple[str, Callable[[], Outcome]]] = []
    for state in states.values():
        if not rt.settings.vault_allowed(state.vault_url) or state.lease_held(now):
            continue
        if state.state == OVERLAP and state.retire_after and state.retire_after <= now:
            work.append((state.name, partial(steps.retire, rt, state)))
        elif state.state == ROTATING:
            work.append((state.name, partial(steps.resume, rt, state)))
    horizon = now + rt.settings.sweep_lead_time
    for (vault_url, name), props in listed.items():
        due = _due_for_rotation(
            rt,
            enabled=props.enabled,
            vault_url=vault_url,
            version=props.version or "",
            tags=props.tags,
            expires_on=props.expires_on,
            state=states.get((vault_url, name)),
            horizon=horizon,
            now=now,
        )
        if due:
            rotate_one = partial(
                rotate,
                vault_url,
                name,
                trigger="sweep",
                requested_by="timer",
                expected_version=props.version,
                ledger_row=states.get((vault_url, name)) or SecretState(vault_url=vault_url, name=name),
            )
            work.append((name, rotate_one))
    return _run_all(rt, work)


def _run_all(rt: Runtime, work: list[tuple[str, Callable[[], Outcome]]]) -> list[Outcome]:
    def run_one(item: tuple[str, Callable[[], Outcome]]) -> list[Outcome]:
        name, action = item
        outcomes: list[Outcome] = []
        with _isolated(name, outcomes):
            outcomes.append(action())
        return outcomes

    workers = min(rt.settings.sweep_concurrency, len(work))
    if workers <= 1:
        return [outcome for item in work for outcome in run_one(item)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sweep") as pool:
        return [outcome for outcomes in pool.map(run_one, work) for outcome in outcomes]


def lead_time(rt: Runtime, tags: dict[str, str] | None, vault_url: str) -> timedelta:
    """How long before expiry the sweep rotates: ROTATION_SWEEP_LEAD_TIME, clamped to half the
    secret's validity, so a short-lived secret is not rotated again on the next sweep."""
    try:
        validity = parse_config(tags, rt.settings, vault_url=vault_url).validity
    except ConfigError:
        return rt.settings.sweep_lead_time  # due: the rotation reports the misconfiguration, once
    return min(rt.settings.sweep_lead_time, validity / 2)


def _due_for_rotation(
    rt: Runtime,
    *,
    enabled: bool | None,
    vault_url: str,
    version: str,
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
    if state and state.refused.startswith(refusal_key(version, tags)):  # reported: an operator acts
        return False
    if expires_on > now + lead_time(rt, tags, vault_url):
        return False
    failed_recently = (
        state is not None
        and state.last_outcome in (ROTATION_FAILED, ROLLED_BACK)
        and state.last_attempt_on is not None
        and state.last_attempt_on + rt.settings.retry_after_failure > now
    )
    return not failed_recently


@contextmanager
def _isolated(name: str, outcomes: list[Outcome]) -> Iterator[None]:
    """One secret's failure must not stop a sweep over the others."""
    try:
        yield
    except Exception as error:
        logger.error("%s: sweep failed: %s", name, describe_error(error))
        outcomes.append(Outcome(ROTATION_FAILED, name, describe_error(error), retryable=True))
