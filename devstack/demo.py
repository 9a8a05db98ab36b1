"""`python -m devstack.demo`: watch one secret rotate, end to end, on the local stand-ins.

Key Vault (emulator) publishes SecretNearExpiry for a PostgreSQL credential, Event Grid style, to
the local Functions host; the Event Grid function rotates it to the other login role; after the
overlap the sweeper timer retires the old one. Usernames, versions and slots are printed; passwords
and secret values never are.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg

from devstack.postgres import session_user
from devstack.runner import LocalFunctionHost
from devstack.sigterm import stop_on_sigterm
from devstack.stack import LocalStack, provision_postgres_secret
from shared import service
from shared.durations import parse_duration
from shared.engine import STEPS
from shared.errors import ConfigError
from shared.ledger import IDLE, OVERLAP, Ledger

SECRET = "orders-db"
T = TypeVar("T")


class DemoFailed(Exception):
    pass


def say(text: str = "") -> None:
    print(text, flush=True)


def wait_for(what: str, check: Callable[[], T | None], deadline: float) -> T:
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out waiting for {what}")
        time.sleep(0.2)


def logs_in(stack: LocalStack, credential: dict[str, Any]) -> bool:
    try:
        session_user(credential, stack.postgres.ca_path)
        return True
    except psycopg.OperationalError:
        return False


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("    [%(name)s] %(message)s"))
    # azure-functions warns about auth levels when an app has no HTTP function: not news here.
    handler.addFilter(lambda record: not record.getMessage().startswith("Auth level is not applied"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    for name in ("azure", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("shared.engine").setLevel(logging.INFO)


def run(stack: LocalStack, host: LocalFunctionHost, overlap: str, deadline: float) -> None:
    vault = stack.secret_client()
    ledger: Ledger = service.engine().ledger
    vault_url = stack.vault.vault_url

    # Provisioned (and bound by its operator) far from expiry, then brought near it: Key Vault's
    # SecretNearExpiry comes after the binding, as it does for a secret adopted in good time.
    far = datetime.now(UTC) + timedelta(days=120)
    managed = provision_postgres_secret(stack, SECRET, prefix="orders", expires_on=far, overlap=overlap)
    first = managed.first_version
    old = json.loads(first.value or "{}")
    say(f"1. Provisioned secret {SECRET!r}: version {first.properties.version}, login role {old['username']}")
    say("   bound by its operator: rotator, target, slots and group pinned in the ledger")
    expires = datetime.now(UTC) + timedelta(days=29)
    vault.update_secret_properties(SECRET, first.properties.version, expires_on=expires)
    say(f"   expires {expires:%Y-%m-%d} (29 days): Key Vault's SecretNearExpiry is due now")
    say(f"   old credential logs in: {yes(logs_in(stack, old))}")

    def our_delivery() -> Any:
        return next((d for d in stack.vault.deliveries if d.event.get("subject") == SECRET), None)

    delivery = wait_for("the Event Grid delivery", our_delivery, deadline)
    event_type = delivery.event["eventType"]
    say(f"2. Key Vault -> Event Grid -> keyvault_events: {event_type}, HTTP {delivery.status}")
    if not delivery.ok:
        raise DemoFailed(f"the function host answered the delivery with HTTP {delivery.status}")

    def rotated() -> Any:
        state = ledger.get(vault_url, SECRET)
        done = state and (state.state == OVERLAP or (state.state == IDLE and state.last_outcome == "rotated"))
        return state if done else None

    state = wait_for("the rotation", rotated, deadline)
    newest = vault.get_secret(SECRET)
    new = json.loads(newest.value or "{}")
    new_slot = (newest.properties.tags or {}).get("rotation-current-slot")
    new_expiry = newest.properties.expires_on
    say(f"3. Rotated: new version {newest.properties.version}")
    say(f"   slot {state.from_slot} -> {state.to_slot} (secret's current slot tag: {new_slot})")
    say(f"   new expiry {new_expiry:%Y-%m-%d}" if new_expiry else "   new expiry: none")
    new_ok, old_ok = logs_in(stack, new), logs_in(stack, old)
    retire_after = f"{state.retire_after:%H:%M:%S} UTC" if state.retire_after else "?"
    say(f"   new credential ({new['username']}) logs in: {yes(new_ok)}")
    say(f"   old credential ({old['username']}) still logs in (overlap until {retire_after}): {yes(old_ok)}")
    in_overlap = state.state == OVERLAP  # False only if the overlap is over already (--overlap PT0S)
    if newest.properties.version == first.properties.version or not new_ok or (in_overlap and not old_ok):
        raise DemoFailed("the rotation did not leave both credentials working during the overlap")

    say(f"4. Waiting for the overlap ({overlap}) to pass and the sweeper timer to retire {old['username']}")

    def retired() -> Any:
        state = ledger.get(vault_url, SECRET)
        return state if state and state.state == IDLE else None

    state = wait_for("the retirement", retired, deadline)
    old_ok = logs_in(stack, old)
    say(f"   old credential logs in: {yes(old_ok)}; new credential logs in: {yes(logs_in(stack, new))}")
    say(f"   status: state={state.state} current_slot={state.current_slot} last_outcome={state.last_outcome}")
    record = ledger.rotations(vault_url, SECRET)[0]
    timings = json.loads(record.step_timings)
    steps = ", ".join(f"{step} {timings[step]:.0f} ms" for step in STEPS if step in timings)
    say(f"   history: trigger={record.trigger} outcome={record.outcome} steps: {steps}")
    if old_ok or state.current_slot != managed.slots[1] or state.last_outcome != "rotated":
        raise DemoFailed("the old credential was not retired as expected")


def main(argv: list[str] | None = None) -> int:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description="Watch a secret rotate on the local stand-ins.")
    parser.add_argument("--overlap", default="PT15S", help="ISO 8601 duration the old credential stays valid")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for everything")
    args = parser.parse_args(argv)
    try:
        parse_duration(args.overlap)
    except ConfigError as error:
        parser.error(f"--overlap: {error}")
    configure_logging()
    started = time.monotonic()
    stack: LocalStack | None = None
    host: LocalFunctionHost | None = None
    try:
        say("Starting the local stack: Key Vault emulator, Azurite, PostgreSQL ...")
        stack = LocalStack().start(publish_interval=1.0)
        os.environ.update(stack.app_settings())
        host = LocalFunctionHost(timer_interval=3.0).start()
        stack.vault.subscribe(host.eventgrid_webhook_url("keyvault_events"))
        say(f"Function host at {host.url}: keyvault_events (Event Grid), rotation_sweeper (every 3 s)")
        run(stack, host, args.overlap, started + args.timeout)
    except DemoFailed as error:
        say(f"\nDemo FAILED: {error}")
        return 1
    except KeyboardInterrupt:
        say("\nInterrupted.")
        return 130
    finally:
        if host is not None:
            host.stop()
        if stack is not None:
            stack.stop()
    say(f"\nDone in {time.monotonic() - started:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
