"""Adoption and binding: which upstream identity a managed secret may act on.

Tags are configuration, not authority: whoever may write one secret may write its tags. So:

- **Binding**: an operator's `adopt` or `bind` pins the secret's upstream identity (rotator,
  target, slots and every other tag that says where the service reaches, as `binding_of` lists)
  in the secret's ledger row. A later change of a bound tag is refused until an operator binds
  again. Secrets this service rotated before bindings existed (`SecretState.legacy`) are bound
  by their first rotation after the upgrade, once their value proves possession.
- **Proof of possession**: before anything changes upstream, the secret's current value must
  authenticate upstream as its current slot (each rotator's `prove_possession`). Whoever wrote
  a secret that passes already held that credential.
- **Slot claims**: a slot of an upstream serves one managed secret; possession of the current
  slot says nothing about the other one.

A refusal changes nothing, and is reported once per secret version (status, list, one
notification); the sweep does not retry it.
"""

import hashlib
import json
import logging
import uuid
from contextlib import suppress

from azure.core.exceptions import ResourceNotFoundError
from azure.keyvault.secrets import KeyVaultSecret, SecretClient, SecretProperties

from shared.config import (
    MS_CREDENTIAL_ID,
    MS_PROVIDER_ADDRESS,
    MS_VALIDITY_DAYS,
    TAG_CURRENT_SLOT,
    TAG_OVERLAP,
    TAG_ROTATION_ID,
    TAG_VALIDITY,
    TAG_WINDOW,
    RotationConfig,
    is_managed,
    parse_config,
    validate_secret_name,
)
from shared.errors import ConfigError, Refused, RotationError, UnsafeOperation
from shared.inventory import record_inventory_item
from shared.ledger import (
    OVERLAP,
    ROTATING,
    ConcurrentUpdate,
    HistoryRecord,
    InventoryItem,
    SecretState,
    history_key,
    vault_key,
)
from shared.outcomes import (
    ADOPTED,
    ALREADY_MANAGED,
    BOUND,
    DROPPED,
    IN_PROGRESS,
    MISCONFIGURED,
    NOT_FOUND,
    REFUSED,
    ROTATION_FAILED,
    Outcome,
    describe_error,
    logged,
)
from shared.retry import call_with_retry
from shared.runtime import Runtime
from shared.settings import normalize_vault_url

logger = logging.getLogger("shared.engine")
# Tags that say when and how often, never where: a tag writer may change them freely.
# (`rotation-admin-for` is the admin secret's own grant, owned by that secret's owner.)
UNBOUND_TAGS = frozenset(
    {
        TAG_CURRENT_SLOT,
        TAG_ROTATION_ID,
        TAG_VALIDITY,
        TAG_OVERLAP,
        TAG_WINDOW,
        MS_CREDENTIAL_ID,
        MS_VALIDITY_DAYS,
        "rotation-admin-for",
    }
)


def binding_of(rt: Runtime, config: RotationConfig) -> str:
    """The bound identity, as stable JSON: every rotation tag that is not in UNBOUND_TAGS, and
    the upstream namespace the slots are names in."""
    bound = {
        "rotator": config.rotator,
        "target": str(config.target),
        "slots": ",".join(sorted(config.slots)),
        "slot_namespace": slot_namespace(rt, config),
    }
    for key, value in config.tags.items():
        if (key.startswith("rotation-") or key == MS_PROVIDER_ADDRESS) and key not in UNBOUND_TAGS:
            bound[key] = value.strip()
    return json.dumps(bound, sort_keys=True)


def slot_namespace(rt: Runtime, config: RotationConfig) -> str:
    """Where slot names are unique upstream (a rotator's `slot_namespace`, else its target):
    PostgreSQL roles are per server, API keys per vendor account."""
    rotator = rt.rotators.get(config.rotator)
    namespace = getattr(rotator, "slot_namespace", None)
    where = namespace(config) if namespace is not None else str(config.target)
    return f"{config.rotator}|{str(where).lower()}"


def _changed(bound: str, wanted: str) -> list[str]:
    before, now = json.loads(bound), json.loads(wanted)
    return sorted(key for key in set(before) | set(now) if before.get(key) != now.get(key))


def _owner(state: SecretState) -> str:
    return f"{vault_key(state.vault_url)}|{state.name}"


def check_bound(rt: Runtime, state: SecretState, config: RotationConfig) -> None:
    """Raise Refused when the tags disagree with the secret's binding (if it has one)."""
    wanted = binding_of(rt, config)
    if state.binding and state.binding != wanted:
        raise Refused(
            f"tags changed since the binding ({', '.join(_changed(state.binding, wanted))}): an "
            f"operator must bind the secret again (POST /api/secrets/{state.name}/bind)"
        )


def prove_possession(
    rt: Runtime, config: RotationConfig, client: SecretClient, name: str, value: str
) -> None:
    rotator = rt.rotators.get(config.rotator)
    prove = getattr(rotator, "prove_possession", None)
    if prove is None:
        raise Refused(
            f"rotator {config.rotator} has no prove_possession: it cannot show that the secret's value "
            "holds the current slot, so it may not change anything upstream"
        )
    prove(rt.context(config, client, name), value)


def admit(
    rt: Runtime, state: SecretState, client: SecretClient, config: RotationConfig, current: KeyVaultSecret
) -> Outcome | None:
    """Before a rotation or a dry run: the tags match the binding and the value proves possession.
    A legacy secret is bound here. Returns the refusal (or failure) outcome, or None to go on."""
    try:
        check_bound(rt, state, config)
        if not state.binding and not state.legacy:
            raise Refused(
                "not bound to an upstream identity: an operator must adopt or bind it "
                f"(POST /api/secrets/{state.name}/bind, or `rotation bind {state.name}`)"
            )
        prove_possession(rt, config, client, state.name, current.value or "")
        if not state.binding:
            _bind(rt, state, config, "first rotation after upgrade (possession proven)")
    except Refused as error:
        return refuse(rt, state, current.properties, error)
    except ConfigError as error:
        return report_once(rt, state, current.properties, MISCONFIGURED, str(error))
    except ConcurrentUpdate:
        return logged(Outcome(IN_PROGRESS, state.name, "a rotation of this secret is in progress"))
    except RotationError as error:
        # Nothing changed, but the sweep backs off as after any failure, and someone is told.
        state.last_outcome, state.last_error = ROTATION_FAILED, describe_error(error)
        state.last_attempt_on = rt.clock()
        rt.save_quietly(state)
        outcome = Outcome(ROTATION_FAILED, state.name, state.last_error, retryable=True)
        return rt.tell(logged(outcome), state)
    return None


def check_retire(
    rt: Runtime, state: SecretState, config: RotationConfig, client: SecretClient, version: str
) -> None:
    """Before retiring: the tags still match the binding, and a version the service did not write
    (someone set a new value during the overlap) proves possession first."""
    check_bound(rt, state, config)
    if version != state.current_version:
        value = rt.get_secret(client, state.name, version or None).value or ""
        prove_possession(rt, config, client, state.name, value)


def refusal_key(version: str, tags: dict[str, str] | None) -> str:
    """What a refusal was about: one version with one set of tags. Changing either (a fixed
    tag, a new value) is worth another attempt; the sweep skips the rest."""
    digest = hashlib.sha256(json.dumps(tags or {}, sort_keys=True).encode()).hexdigest()[:12]
    return f"{version}:{digest}:"


def refuse(rt: Runtime, state: SecretState, current: SecretProperties, error: Refused) -> Outcome:
    return report_once(rt, state, current, REFUSED, str(error))


def report_once(
    rt: Runtime, state: SecretState, current: SecretProperties, status: str, message: str
) -> Outcome:
    """Record and report a refusal or a misconfiguration once per version and tags (status, list,
    one notification); a repeat is one log line."""
    marker = (
        refusal_key(current.version or "", current.tags) + hashlib.sha256(message.encode()).hexdigest()[:12]
    )
    outcome = Outcome(status, state.name, message, state.rotation_id)
    if state.refused == marker:
        logger.info("%s: %s again (already reported): %s", state.name, status, message)
        return outcome
    state.refused, state.last_outcome, state.last_error = marker, status, message[:500]
    state.last_attempt_on = rt.clock()
    rt.save_quietly(state)
    return rt.tell(logged(outcome), state)


def bind(rt: Runtime, vault_url: str, name: str, requested_by: str) -> Outcome:
    """An operator pins the secret's current tags as its upstream identity, once its value proves
    possession and its slots are free. Recorded in the history."""
    vault_url, name = normalize_vault_url(vault_url), validate_secret_name(name).lower()
    found = _read_served(rt, vault_url, name)
    if isinstance(found, Outcome):
        return found
    client, current = found
    try:
        config = parse_config(current.properties.tags, rt.settings, vault_url=vault_url)
        rt.rotators.get(config.rotator).validate(rt.context(config, client, name))
        prove_possession(rt, config, client, name, current.value or "")
        for attempt in range(3):  # a sweep may record a refusal of this secret meanwhile
            state = rt.ledger.get(vault_url, name) or SecretState(vault_url=vault_url, name=name)
            if state.state in (ROTATING, OVERLAP):
                message = f"the secret is {state.state}: bind it once the overlap is retired"
                return logged(Outcome(IN_PROGRESS, name, message))
            try:
                summary = _bind(rt, state, config, requested_by or "operator")
                break
            except ConcurrentUpdate:
                if attempt == 2:
                    raise
    except Refused as error:
        return logged(Outcome(REFUSED, name, str(error)))
    except ConfigError as error:
        return logged(Outcome(MISCONFIGURED, name, str(error)))
    except ConcurrentUpdate:
        return logged(Outcome(IN_PROGRESS, name, "the ledger row changed meanwhile: try again"))
    except RotationError as error:
        return logged(Outcome(ROTATION_FAILED, name, describe_error(error), retryable=True))
    now = rt.clock()
    record = HistoryRecord(
        vault_url=vault_url,
        name=name,
        rotation_id=f"bind-{uuid.uuid4().hex}",
        trigger="bind",
        requested_by=requested_by[:200],
        reason=summary[:500],
        started_on=now,
        ended_on=now,
        outcome=BOUND,
    )
    with suppress(Exception):
        rt.ledger.write_history(record, history_key(now, record.rotation_id))
    return logged(Outcome(BOUND, name, summary))


def _read_served(rt: Runtime, vault_url: str, name: str) -> tuple[SecretClient, KeyVaultSecret] | Outcome:
    """The secret's client and current version, or the outcome that says why there are none."""
    if not rt.settings.vault_allowed(vault_url):
        return logged(Outcome(DROPPED, name, f"vault {vault_url} is not in ROTATION_ALLOWED_VAULTS"))
    client = rt.secret_client(vault_url)
    try:
        return client, rt.get_secret(client, name)
    except ResourceNotFoundError:
        return logged(Outcome(NOT_FOUND, name, "no such secret in the vault"))


def _bind(rt: Runtime, state: SecretState, config: RotationConfig, by: str) -> str:
    """Claim the slots (giving up those of a previous binding) and save the binding."""
    owner, upstream = _owner(state), slot_namespace(rt, config)
    if state.binding:
        before = json.loads(state.binding)
        old_upstream, old_slots = (
            str(before.get("slot_namespace", "")),
            tuple(str(before.get("slots", "")).split(",")),
        )
        if (old_upstream, old_slots) != (upstream, tuple(sorted(config.slots))):
            rt.ledger.release_slots(old_upstream, old_slots, owner)
    other = rt.ledger.claim_slots(upstream, tuple(sorted(config.slots)), owner)
    if other:
        raise Refused(
            f"a slot of {config.target} ({', '.join(config.slots)}) already serves secret {other}: "
            "a slot belongs to one managed secret"
        )
    state.binding, state.bound_by, state.bound_on = binding_of(rt, config), by[:200], rt.clock()
    state.refused = ""
    if state.last_outcome in (REFUSED, MISCONFIGURED):
        state.last_outcome, state.last_error = "", ""
    rt.ledger.save(state)
    return f"bound to {config.rotator} {config.target}, slots {', '.join(config.slots)}"


def adopt(
    rt: Runtime, vault_url: str, name: str, rotation_tags: dict[str, str], requested_by: str = ""
) -> Outcome:
    """Put an existing secret under rotation without rotating it now.

    Checks that the current value proves possession of the current slot, binds the secret
    (its slots claimed), has the rotator check both slots exist (creating the missing inactive
    one where the kind allows it), then writes the rotation tags on the current version.
    """
    vault_url, name = normalize_vault_url(vault_url), validate_secret_name(name).lower()
    found = _read_served(rt, vault_url, name)
    if isinstance(found, Outcome):
        return found
    client, current = found
    existing = dict(current.properties.tags or {})
    if is_managed(existing):
        return logged(Outcome(ALREADY_MANAGED, name, "the secret is already under rotation"))
    if any(not key.startswith("rotation-") for key in rotation_tags) or TAG_ROTATION_ID in rotation_tags:
        return logged(Outcome(MISCONFIGURED, name, "adopt takes only rotation-* configuration tags"))
    tags = {**existing, **rotation_tags}  # parse_config refuses more than Key Vault's tag limit
    state = rt.ledger.get(vault_url, name) or SecretState(vault_url=vault_url, name=name)
    try:
        config = parse_config(tags, rt.settings, vault_url=vault_url)
        context = rt.context(config, client, name)
        rotator = rt.rotators.get(config.rotator)
        rotator.validate(context)
        prove_possession(rt, config, client, name, current.value or "")
        _bind(rt, state, config, requested_by or "operator (adopt)")
        done = rotator.prepare_slots(context)
    except Refused as error:
        return logged(Outcome(REFUSED, name, str(error)))
    except (ConfigError, UnsafeOperation) as error:
        return logged(Outcome(MISCONFIGURED, name, str(error)))
    except ConcurrentUpdate:
        return logged(Outcome(IN_PROGRESS, name, "the ledger row changed meanwhile: try again"))
    except RotationError as error:
        return logged(Outcome(ROTATION_FAILED, name, describe_error(error)))
    version = current.properties.version or ""
    call_with_retry(
        lambda: client.update_secret_properties(name, version, tags=tags),
        what="write rotation tags",
    )
    # Listed from now on, not only after the next sweep.
    record_inventory_item(
        rt,
        InventoryItem(
            vault_url, name, config.rotator, bool(current.properties.enabled), current.properties.expires_on
        ),
    )
    state.current_version, state.current_slot = version, config.current_slot
    state.expires_on = current.properties.expires_on
    state.requested_by = requested_by[:200]
    with suppress(ConcurrentUpdate):
        rt.ledger.save(state)
    return logged(Outcome(ADOPTED, name, "; ".join(["current credential proven and bound", *done])))
