"""A short-lived, in-process cache of the admin secrets rotators read.

Every Key Vault read is a billed transaction and spends the vault's throttling
budget; an admin credential shared by hundreds of managed secrets would
otherwise be read once per step of every rotation. Rotators re-read with
`fresh=True` when a cached value fails to authenticate, so an admin credential
rotated elsewhere costs one failed login, not an outage. Values stay in the
worker's memory only; nothing here logs or returns them anywhere else.
"""

import threading
import time
from collections.abc import Callable
from datetime import timedelta

from azure.keyvault.secrets import SecretClient

from shared.retry import call_with_retry


class SecretCache:
    def __init__(self, ttl: timedelta, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl.total_seconds()
        self._clock = clock
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], tuple[float, str, dict[str, str]]] = {}

    def get(self, client: SecretClient, name: str, *, fresh: bool = False) -> tuple[str, dict[str, str]]:
        """The newest value and tags of secret `name`, from the cache unless expired or `fresh`."""
        key = (client.vault_url, name.lower())
        now = self._clock()
        with self._lock:
            cached = self._values.get(key)
        if cached and not fresh and now - cached[0] < self._ttl:
            return cached[1], cached[2]
        secret = call_with_retry(lambda: client.get_secret(name), what="read admin secret")
        value, tags = secret.value or "", dict(secret.properties.tags or {})
        if self._ttl > 0:
            with self._lock:
                self._values[key] = (now, value, tags)
        return value, tags

    def __repr__(self) -> str:
        return f"SecretCache(entries={len(self._values)})"
