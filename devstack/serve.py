"""`python -m devstack.serve`: keep the local stack and function host up for hands-on use.

Starts the Key Vault emulator, Azurite and PostgreSQL, hosts function_app.py on
http://127.0.0.1:PORT with a function key, puts one secret of each built-in kind under
rotation (`orders-db` a PostgreSQL login, `billing-api-key` a vendor API key,
`media-storage-key` a storage account key, `partner-app-secret` an Entra application's client
secret on the Graph stand-in), and writes `.devstack/env`: the app settings
plus FUNCTIONS_URL, FUNCTION_KEY and FUNCTIONS_MASTER_KEY (for /admin/*), so
`source .devstack/env` lets curl and `scripts/rotation` talk to it.
Runs until Ctrl-C (or SIGTERM).
"""

import argparse
import os
import secrets
import shlex
import signal
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from devstack.runner import EVENTGRID, LocalFunctionHost
from devstack.stack import (
    LocalStack,
    provision_api_key_secret,
    provision_entra_secret,
    provision_postgres_secret,
    provision_storage_key_secret,
)

ENV_FILE = Path(__file__).resolve().parent.parent / ".devstack" / "env"
STORAGE_ACCOUNT = "stmediademo"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--env-file", type=Path, default=ENV_FILE)
    parser.add_argument("--timer-interval", type=float, default=30.0, help="sweeper period in seconds")
    args = parser.parse_args(argv)

    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())

    with LocalStack() as stack:
        settings = stack.app_settings()
        # Storage accounts are allowed one by one.
        settings["ROTATION_ALLOWED_TARGETS"] += f",{STORAGE_ACCOUNT}.blob.core.windows.net:443"
        os.environ.update(settings)
        key = secrets.token_urlsafe(24)
        with LocalFunctionHost(port=args.port, function_key=key, timer_interval=args.timer_interval) as host:
            for name in host.names(EVENTGRID):
                stack.vault.subscribe(host.eventgrid_webhook_url(name))
            expires_on = datetime.now(UTC) + timedelta(days=120)
            provision_postgres_secret(stack, "orders-db", prefix="orders", expires_on=expires_on)
            provision_api_key_secret(stack, "billing-api-key", expires_on=expires_on)
            provision_storage_key_secret(stack, "media-storage-key", STORAGE_ACCOUNT, expires_on=expires_on)
            provision_entra_secret(stack, "partner-app-secret", expires_on=expires_on)
            exports = {
                **settings,
                "FUNCTIONS_URL": host.url,
                "FUNCTION_KEY": key,
                "FUNCTIONS_MASTER_KEY": host.master_key,
            }
            args.env_file.parent.mkdir(parents=True, exist_ok=True)
            args.env_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items()))
            args.env_file.chmod(0o600)
            print(
                f"Function host at {host.url}; managed secrets (expiring in 120 days): 'orders-db'"
                " (PostgreSQL), 'billing-api-key' (API key), 'media-storage-key' (storage account key),"
                " 'partner-app-secret' (Entra application client secret)."
            )
            print(f"Settings and the function key are in {args.env_file}: source it, then use curl or")
            print("scripts/rotation (README: 'Operate it'). Ctrl-C stops everything.", flush=True)
            stopping.wait()
    args.env_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
