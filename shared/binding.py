"""Putting secrets under rotation: adopt (an operator's first action on a secret)."""

import logging
from contextlib import suppress

from azure.core.exceptions import ResourceNotFoundError

from shared.config import TAG_ROTATION_ID, is_managed, parse_config, validate_secret_name
from shared.errors import ConfigError, RotationError, UnsafeOperation
from shared.inventory import record_inventory_item
from shared.ledger import ConcurrentUpdate, InventoryItem, SecretState
from shared.outcomes import (
    ADOPTED,
    ALREADY_MANAGED,
    DROPPED,
    MISCONFIGURED,
    NOT_FOUND,
    ROTATION_FAILED,
    Outcome,
    describe_error,
    logged,
)
from shared.retry import call_with_retry
from shared.runtime import Runtime
from shared.settings import normalize_vault_url

logger = logging.getLogger("shared.engine")
MAX_TAGS = 15


def adopt(
    rt: Runtime, vault_url: str, name: str, rotation_tags: dict[str, str], requested_by: str = ""
) -> Outcome:
    """Put an existing secret under rotation without rotating it now.

    Writes the rotation tags on the current version, checks that its value
    authenticates upstream, and has the rotator check both slots exist
    (creating the missing inactive one where the kind allows it).
    """
    vault_url = normalize_vault_url(vault_url)
    validate_secret_name(name)
    if not rt.settings.vault_allowed(vault_url):
        return logged(Outcome(DROPPED, name, f"vault {vault_url} is not in ROTATION_ALLOWED_VAULTS"))
    client = rt.secret_client(vault_url)
    try:
        current = rt.get_secret(client, name)
    except ResourceNotFoundError:
        return logged(Outcome(NOT_FOUND, name, "no such secret in the vault"))
    existing = dict(current.properties.tags or {})
    if is_managed(existing):
        return logged(Outcome(ALREADY_MANAGED, name, "the secret is already under rotation"))
    if any(not key.startswith("rotation-") for key in rotation_tags) or TAG_ROTATION_ID in rotation_tags:
        return logged(Outcome(MISCONFIGURED, name, "adopt takes only rotation-* configuration tags"))
    tags = {**existing, **rotation_tags}
    if len(tags) > MAX_TAGS:
        return logged(Outcome(MISCONFIGURED, name, f"Key Vault allows at most {MAX_TAGS} tags per secret"))
    try:
        config = parse_config(tags, rt.settings)
        context = rt.context(config, client, name)
        rotator = rt.rotators.get(config.rotator)
        rotator.validate(context)
        rotator.verify(context, current.value or "")
        done = rotator.prepare_slots(context)
    except (ConfigError, UnsafeOperation) as error:
        return logged(Outcome(MISCONFIGURED, name, str(error)))
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
            vault_url,
            name,
            config.rotator,
            bool(current.properties.enabled),
            current.properties.expires_on,
        ),
    )
    state = rt.ledger.get(vault_url, name) or SecretState(vault_url=vault_url, name=name)
    state.current_version, state.current_slot = version, config.current_slot
    state.expires_on = current.properties.expires_on
    state.requested_by = requested_by[:200]
    with suppress(ConcurrentUpdate):
        rt.ledger.save(state)
    return logged(Outcome(ADOPTED, name, "; ".join(["current credential verified", *done])))
