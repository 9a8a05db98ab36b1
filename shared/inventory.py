"""What operators read: one secret's status, and the list of every managed secret.

The list comes from the inventory the sweep keeps in the ledger (a vault listing), so reading
it spends none of the vaults' Key Vault budget.
"""

import json
import logging
from datetime import datetime, timedelta
from typing import Any

from azure.keyvault.secrets import SecretProperties

from shared import posture
from shared.config import TAG_ROTATOR, is_managed, parse_config, validate_secret_name
from shared.errors import ConfigError
from shared.ledger import IDLE, InventoryItem, as_dict
from shared.outcomes import describe_error
from shared.runtime import Runtime, iso
from shared.settings import normalize_vault_url

logger = logging.getLogger("shared.engine")


def status(rt: Runtime, vault_url: str, name: str, history_limit: int = 10) -> dict[str, Any]:
    """Where one secret stands: never its value. Raises ResourceNotFoundError for an unknown secret."""
    vault_url = normalize_vault_url(vault_url)
    validate_secret_name(name)
    properties = rt.get_secret(rt.secret_client(vault_url), name).properties
    tags = properties.tags or {}
    state = rt.ledger.get(vault_url, name)
    config_error = ""
    if is_managed(tags):
        try:
            parse_config(tags, rt.settings, vault_url=vault_url)
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
        "expires_on": iso(properties.expires_on),
        "retire_after": iso(state.retire_after) if state else None,
        "last_rotated_on": iso(state.last_rotated_on) if state else None,
        "last_outcome": state.last_outcome if state else "",
        "last_error": state.last_error if state else "",
        "attempts": state.attempts if state else 0,
        "bound": bool(state and state.binding),
        "bound_by": state.bound_by if state else "",
        "bound_on": iso(state.bound_on) if state else None,
        "binding": json.loads(state.binding) if state and state.binding else None,
        "posture": _posture_summary(rt, vault_url),
        # Each declared consumer as last asked: the version it holds, since when, moved or waiting.
        "consumers": json.loads(state.consumers) if state and state.consumers else [],
        "retirement_held_since": iso(state.held_since) if state else None,
        "retirement_held_by": state.held_reason if state and state.held_since else "",
        "history": [as_dict(record) for record in rt.ledger.history(vault_url, name, history_limit)],
    }


def managed_secrets(rt: Runtime, *, refresh: bool = False) -> tuple[list[dict[str, Any]], datetime]:
    """Every managed secret in the allowed vaults, with state, expiry and last outcome; and
    when the oldest of the vault listings they come from was made.

    The listings are the inventory the sweep keeps in the ledger: reading it spends none
    of the vault's Key Vault budget. A vault listed longer ago than `inventory_max_age`
    (or never), or every vault with `refresh`, is listed now and its inventory updated.
    """
    now = rt.clock()
    states = {(state.vault_url, state.name): state for state in rt.ledger.states()}
    rows: list[dict[str, Any]] = []
    as_of = now
    for vault_url in sorted(rt.settings.allowed_vaults):
        listed_on, items = (None, []) if refresh else rt.ledger.inventory(vault_url)
        # A listing "from the future" is another worker's clock: not trusted either.
        if listed_on is None or not timedelta(0) <= now - listed_on < rt.settings.inventory_max_age:
            listed_on = now
            listing = list_secrets(rt, vault_url)
            items = record_inventory(rt, vault_url, listing, now, stored=None if refresh else items)
        as_of = min(as_of, listed_on)
        summary = _posture_summary(rt, vault_url)
        vault_posture = summary["status"] if summary else None
        for item in items:
            state = states.get((vault_url, item.name.lower()))
            rotated_since = state and state.last_rotated_on and state.last_rotated_on > listed_on
            rows.append(
                {
                    "name": item.name,
                    "vault": vault_url,
                    "rotator": item.rotator,
                    "enabled": item.enabled,
                    "state": state.state if state else IDLE,
                    # A rotation since the listing wrote a version that expires later.
                    "expires_on": iso(state.expires_on if state and rotated_since else item.expires_on),
                    "retire_after": iso(state.retire_after) if state else None,
                    "retirement_held_since": iso(state.held_since) if state else None,
                    "last_outcome": state.last_outcome if state else "",
                    "last_rotated_on": iso(state.last_rotated_on) if state else None,
                    "posture": vault_posture,
                }
            )
    far_future = "9999"
    rows.sort(key=lambda row: (row["expires_on"] or far_future, row["vault"], row["name"]))
    return rows, as_of


def _posture_summary(rt: Runtime, vault_url: str) -> dict[str, Any] | None:
    """The vault's recorded posture in brief (None: never recorded, or unreadable: logged).
    Reads the ledger only."""
    try:
        recorded = posture.recorded(rt, vault_url)
    except Exception as error:
        logger.error("could not read the posture of %s: %s", vault_url, describe_error(error))
        return None
    return recorded.summary() if recorded else None


def list_secrets(rt: Runtime, vault_url: str) -> list[SecretProperties]:
    return list(rt.secret_client(vault_url).list_properties_of_secrets())


def record_inventory(
    rt: Runtime,
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
        rt.ledger.replace_inventory(vault_url, items, listed_on, stored=stored)
    except Exception as error:
        logger.error("could not record the inventory of %s: %s", vault_url, describe_error(error))
    return items


def record_inventory_item(rt: Runtime, item: InventoryItem) -> None:
    try:
        rt.ledger.add_to_inventory(item)
    except Exception as error:
        logger.error("could not record %s in the inventory: %s", item.name, describe_error(error))
