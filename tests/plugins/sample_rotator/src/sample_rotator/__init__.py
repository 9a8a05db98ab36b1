"""A sample third-party rotator: tokens issued by an in-process token service.

It shows the whole contract a plug-in implements (validate, prepare_slots, create,
verify, prove_possession, retire on two named slots) and how it registers: an entry point in the
`secret_rotation.rotators` group, named after the `rotation-rotator` tag value.
Its "upstream" is the small registry below, so a test in the same process can
check which tokens work; a real plug-in would call its vendor here.

Tags read: `rotation-target` (any allow-listed host; its path, if any, names the
realm, a namespace of slots), `rotation-slots`.
"""

import json
import logging
import re
import secrets
import threading

from rotators.base import NewCredential, RotationContext
from shared.errors import ConfigError, PossessionNotProven, VerificationFailed

logger = logging.getLogger(__name__)

_REALM = re.compile(r"^[A-Za-z0-9_-]{0,64}$")
_lock = threading.Lock()
# The token service: (realm, slot) -> the live token of that slot.
_issued: dict[tuple[str, str], str] = {}


def issue(realm: str, slot: str) -> str:
    """Give `slot` a new token; the previous token of the slot stops working."""
    token = f"tok_{secrets.token_urlsafe(24)}"
    with _lock:
        _issued[(realm, slot)] = token
    return token


def revoke(realm: str, slot: str) -> bool:
    with _lock:
        return _issued.pop((realm, slot), None) is not None


def authenticates(token: str) -> bool:
    with _lock:
        return any(secrets.compare_digest(token, live) for live in _issued.values())


def has_token(realm: str, slot: str) -> bool:
    with _lock:
        return (realm, slot) in _issued


def _realm(context: RotationContext) -> str:
    realm = context.config.target.database
    if not _REALM.match(realm):
        raise ConfigError("sample-token: the target's path must be a plain realm name")
    return realm


class SampleTokenRotator:
    name = "sample-token"

    def validate(self, context: RotationContext) -> None:
        _realm(context)

    def prepare_slots(self, context: RotationContext) -> list[str]:
        realm, config = _realm(context), context.config
        if not has_token(realm, config.current_slot):
            raise ConfigError(f"slot {config.current_slot} has no token")
        return [f"slot {config.current_slot} has a token", f"slot {config.inactive_slot}: issued on rotation"]

    def create(self, context: RotationContext, slot: str) -> NewCredential:
        token = issue(_realm(context), slot)
        logger.info("issued a token on slot %s", slot)  # never the token itself
        value = json.dumps({"engine": "sample-token", "slot": slot, "token": token})
        return NewCredential(value=value, credential_id=slot)

    def verify(self, context: RotationContext, value: str) -> None:
        try:
            token = json.loads(value)["token"]
        except (ValueError, KeyError, TypeError):
            raise VerificationFailed("the credential is not the JSON this rotator writes") from None
        if not isinstance(token, str) or not authenticates(token):
            raise VerificationFailed("the token does not authenticate")

    def prove_possession(self, context: RotationContext, value: str) -> None:
        """The value is the live token of the current slot."""
        try:
            token = json.loads(value)["token"]
        except (ValueError, KeyError, TypeError):
            raise PossessionNotProven("the value is not the JSON this rotator writes") from None
        with _lock:
            live = _issued.get((_realm(context), context.config.current_slot), "")
        if not isinstance(token, str) or not live or not secrets.compare_digest(token, live):
            raise PossessionNotProven(f"the value is not the token of slot {context.config.current_slot}")

    def retire(self, context: RotationContext, slot: str) -> None:
        if not revoke(_realm(context), slot):
            logger.info("slot %s has no token: nothing to retire", slot)
