"""Key Vault (secrets) emulator: HTTPS, bearer challenge, managed identity, events, faults."""

from .certs import CertPaths, ensure_certs, generate_certs
from .server import (
    EXPIRED,
    NEAR_EXPIRY,
    Delivery,
    EmulatorClock,
    EmulatorCredential,
    EventSchema,
    Fault,
    KeyVaultEmulator,
    Subscription,
    VaultError,
    build_event,
)

__all__ = [
    "EXPIRED",
    "NEAR_EXPIRY",
    "CertPaths",
    "Delivery",
    "EmulatorClock",
    "EmulatorCredential",
    "EventSchema",
    "Fault",
    "KeyVaultEmulator",
    "Subscription",
    "VaultError",
    "build_event",
    "ensure_certs",
    "generate_certs",
]
