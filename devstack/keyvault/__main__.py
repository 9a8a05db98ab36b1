"""Run the Key Vault emulator standalone.

    python -m devstack.keyvault --state-dir DIR [--vault-name NAME] [--publish-interval SECONDS]

Prints one JSON line (vault URL, CA path, identity endpoint and header), writes the same to
DIR/keyvault.json, and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from .server import KeyVaultEmulator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.keyvault", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--state-dir", type=Path, required=True, help="where the CA and server certificate live"
    )
    parser.add_argument("--vault-name", default="devstack-vault")
    parser.add_argument(
        "--publish-interval",
        type=float,
        default=None,
        help="publish due SecretNearExpiry/SecretExpired events every N seconds",
    )
    parser.add_argument(
        "--enforce-limits",
        action="store_true",
        help="throttle like Key Vault: 300 secret creates and 4,000 other transactions per 10 s",
    )
    parser.add_argument("--verbose", action="store_true", help="log each request (method, path, status)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    emulator = KeyVaultEmulator(args.state_dir, vault_name=args.vault_name)
    if args.enforce_limits:
        emulator.enforce_limits()
    emulator.start(publish_interval=args.publish_interval)
    try:
        info = {
            "vault_url": emulator.vault_url,
            "ca_path": str(emulator.ca_path),
            "identity_endpoint": emulator.identity_endpoint,
            "identity_header": emulator.identity_header,
            "vault_name": emulator.vault_name,
        }
        line = json.dumps(info)
        (args.state_dir / "keyvault.json").write_text(line + "\n")
        print(line, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
