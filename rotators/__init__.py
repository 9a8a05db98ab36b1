"""Pluggable rotators: the built-in ones and those installed under an entry point group.

A package adds a kind of credential by declaring, in its packaging metadata:

    [project.entry-points."secret_rotation.rotators"]
    mykind = "mypackage.rotator:MyRotator"

The entry point's name is the value of the secret's `rotation-rotator` tag.
"""

from collections.abc import Callable
from importlib.metadata import entry_points

from rotators.base import NewCredential, RotationContext, Rotator
from shared.errors import ConfigError

ENTRY_POINT_GROUP = "secret_rotation.rotators"

__all__ = ["ENTRY_POINT_GROUP", "NewCredential", "RotationContext", "Rotator", "RotatorRegistry"]


def _postgres() -> Rotator:
    from rotators.postgres import PostgresRotator  # noqa: PLC0415 - psycopg loads only when used

    return PostgresRotator()


def _storage_key() -> Rotator:
    from rotators.storage_key import StorageKeyRotator  # noqa: PLC0415 - azure-mgmt-storage loads only when used

    return StorageKeyRotator()


def _api_key() -> Rotator:
    from rotators.api_key import ApiKeyRotator  # noqa: PLC0415

    return ApiKeyRotator()


def _entra_app() -> Rotator:
    from rotators.entra_app import EntraAppRotator  # noqa: PLC0415 - azure-identity's credential loads only when used

    return EntraAppRotator()


BUILT_IN: dict[str, Callable[[], Rotator]] = {
    "postgres": _postgres,
    "storage-key": _storage_key,
    "api-key": _api_key,
    "entra-app": _entra_app,
}


class RotatorRegistry:
    """Finds a rotator by name: built-ins first, then installed entry points."""

    def __init__(self, factories: dict[str, Callable[[], Rotator]] | None = None) -> None:
        self._factories = dict(BUILT_IN if factories is None else factories)
        self._instances: dict[str, Rotator] = {}

    def names(self) -> list[str]:
        discovered = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
        return sorted(set(self._factories) | discovered)

    def get(self, name: str) -> Rotator:
        if name not in self._instances:
            factory = self._factories.get(name)
            if factory is None:
                matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
                if not matches:
                    raise ConfigError(f"no rotator named {name!r}; installed: {', '.join(self.names())}")
                factory = matches[0].load()
            self._instances[name] = factory()
        return self._instances[name]
