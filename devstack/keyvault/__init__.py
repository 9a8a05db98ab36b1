"""Key Vault (secrets and keys) emulator: HTTPS, bearer challenge, managed identity, events, faults."""

from .certs import CertPaths, ensure_certs, generate_certs
from .keys import KEY_EXPIRED, KEY_NEAR_EXPIRY, KeyStore
from .server import (
    EXPIRED,
    NEAR_EXPIRY,
    Delivery,
    EmulatorClock,
    EmulatorCredential,
    EventSchema,
    Fault,
    KeyVaultEmulator,
    ServiceLimits,
    Subscription,
    VaultError,
    build_event,
)

__all__ = [
    "EXPIRED",
    "KEY_EXPIRED",
    "KEY_NEAR_EXPIRY",
    "NEAR_EXPIRY",
    "CertPaths",
    "Delivery",
    "EmulatorClock",
    "EmulatorCredential",
    "EventSchema",
    "Fault",
    "KeyStore",
    "KeyVaultEmulator",
    "ServiceLimits",
    "Subscription",
    "VaultError",
    "build_event",
    "ensure_certs",
    "generate_certs",
]
