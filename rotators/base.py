"""The contract every rotator implements.

A rotator knows one kind of credential. It works on named slots (two login
roles, key1/key2, two API keys): the engine always asks it to create on the
slot consumers are NOT using, so a rotation never breaks a live credential.
"""

import fnmatch
from dataclasses import dataclass
from typing import Protocol

from azure.core.credentials import TokenCredential
from azure.keyvault.secrets import SecretClient

from shared.config import RotationConfig
from shared.errors import Refused
from shared.secret_cache import SecretCache
from shared.settings import Settings

TAG_ADMIN_FOR = "rotation-admin-for"


def admin_serves(admin_tags: dict[str, str], secret_name: str) -> bool:
    """True when the admin secret's `rotation-admin-for` tag lists `secret_name` (case-insensitive;
    `*` matches any run of name characters)."""
    granted = (admin_tags.get(TAG_ADMIN_FOR) or "").replace(",", " ").lower().split()
    name = secret_name.lower()
    return bool(name) and any(fnmatch.fnmatchcase(name, pattern) for pattern in granted)


@dataclass(frozen=True)
class RotationContext:
    """What a rotator may use: the secret's validated config and the app's clients."""

    config: RotationConfig
    secrets: SecretClient
    credential: TokenCredential
    settings: Settings
    admin_secrets: SecretCache | None = None
    # The managed secret this context serves (an admin secret must list it to serve it).
    secret_name: str = ""

    def read_admin_secret(self, name: str, *, fresh: bool = False) -> str:
        """An admin secret's value, cached briefly; pass `fresh` after it failed to authenticate.

        An admin secret serves only the secrets its own tag `rotation-admin-for` lists (names,
        or patterns with `*`): naming it in a tag borrows nothing its owner did not grant."""
        if self.admin_secrets is None:
            secret = self.secrets.get_secret(name)
            value, tags = secret.value or "", dict(secret.properties.tags or {})
        else:
            value, tags = self.admin_secrets.get(self.secrets, name, fresh=fresh)
        if not admin_serves(tags, self.secret_name):
            raise Refused(
                f"admin secret {name} does not serve {self.secret_name or 'this secret'}: its owner must "
                f"list it in the admin secret's {TAG_ADMIN_FOR} tag"
            )
        return value


@dataclass(frozen=True)
class NewCredential:
    """A credential just created upstream.

    `value` is the secret to store in Key Vault; `credential_id` is a
    non-secret identifier (role name, key name, key id) safe for the ledger.
    """

    value: str
    credential_id: str
    content_type: str = "application/json"

    def __repr__(self) -> str:
        return f"NewCredential(credential_id={self.credential_id!r}, value=<redacted>)"


class Rotator(Protocol):
    """A kind of credential. Each operation must be safe to run twice."""

    name: str

    def validate(self, context: RotationContext) -> None:
        """Raise ConfigError when the secret's tags don't suit this rotator."""

    def prepare_slots(self, context: RotationContext) -> list[str]:
        """Onboarding: check both slots exist upstream, creating the missing inactive one if the
        kind allows. Returns what it did, one line each, for the operator."""

    def create(self, context: RotationContext, slot: str) -> NewCredential:
        """Give `slot` a new credential upstream and return it."""

    def verify(self, context: RotationContext, value: str) -> None:
        """Authenticate upstream with `value`; raise VerificationFailed if it does not work."""

    def prove_possession(self, context: RotationContext, value: str) -> None:
        """Check that `value` (the secret's current value) authenticates upstream *as the current
        slot*, and that the slots are a pair its holder may rotate: raise PossessionNotProven (or
        Refused) if not, UpstreamError if the upstream cannot be asked. Runs before any change."""

    def retire(self, context: RotationContext, slot: str) -> None:
        """Make the credential on `slot` unusable (its value is then worthless)."""
