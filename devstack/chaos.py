"""The chaos run: many managed secrets, crashes, duplicate triggers, throttling, a database restart.

    python -m devstack.chaos [--small] [--secrets N] [--rounds N] [--seed N] [--max-seconds S]
                             [--kinds postgres,api-key,storage-key,entra-app] [--stalls]

Everything runs on 127.0.0.1 against a fresh local stack (Key Vault emulator,
Azurite, PostgreSQL) and stops by itself. Triggers go through the functions
that `function_app.py` registers (Event Grid event, manual HTTP rotate, sweeper
timer), all served by one engine built by `shared.service.build_engine` with:

- a shared test clock (real time plus an offset) that the run moves forward to
  jump past leases and overlaps instead of waiting (the emulator's clock
  follows it);
- a checkpoint hook that raises `Crash` (a BaseException, so it skips every
  `except Exception` clean-up like a dying process) at the points listed in
  `shared.engine.CHECKPOINTS`: at random, and with high probability the first
  times a point is reached, so that every point is crashed at least once;
- a consumer-probe function (instead of HTTP) that fails on purpose for the
  secrets picked for a rollback in a round. The secrets' `rotation-probes` tag
  names a URL that is never fetched; only its last segment (the secret) matters.

A run is a sequence of rounds. A round moves the clock three days (every
secret is then near expiry for the sweeper, and every overlap is due), injects
Key Vault faults, and "kicks" every secret concurrently: an event, a manual
rotation, a sweep tick, an emergency rotation, a rollback, nothing, or a burst
of event + manual + sweep fired at once from several threads. Then it recovers:
while a rotation is left half-done by a crash, it moves the clock past the
lease and fires a random next trigger (the event redelivered, a manual rotate,
a sweep tick). Clock moves happen only between phases, when no trigger is in
flight, so a lease never expires under a live run. Once mid-way PostgreSQL is
restarted while a round runs.

Faults: 429 bursts with and without Retry-After (Key Vault's real 429 carries
none; ours says 1 s at most), 500/503 bursts and dropped connections, on the
engine's writes (PUT /secrets/{name}, PATCH /secrets/{name}/{version}) and on
reads of the managed secrets (GET /secrets/{name}). The emulator cannot tell
clients apart, so consumers see the read faults too: a consumer simply retries
a read that fails with 429/5xx or a reset (counted as a read retry, never as a
consumer failure).

Consumers: one thread per secret, with its own SecretClient, reads the newest
version and logs in upstream with it, in a loop. A consumer failure is a
credential that is refused while its version is still the newest (the
consumer reads the newest version again before counting). An upstream that
does not answer (the restart) is an outage, counted apart.

At the end the run finishes all pending work (clock past every overlap, sweep
until every ledger row is idle) and checks each secret: idle, newest version
authenticates (else `lost`), exactly one live slot upstream. `leaked` counts
the secret values (every value the vault ever stored, and the admin password)
found in any log record of the run or in PostgreSQL's server log. The last
line printed is the figures line; the exit status is 1 if consumer_failures,
lost or leaked is not 0 or a check failed (the reasons are printed before).

Kinds of credential are pluggable (`Kind`: provision, authenticate, slot_of,
live_slots, plus the app settings it needs): PostgreSQL always, the vendor API
key (`rotators.api_key` against `devstack.vendor_api`) and the storage account
key (`rotators.storage_key` against the ARM stand-in) and the Entra application
secret (`rotators.entra_app` against `devstack.graph`) when they import;
`--kinds` picks. Adding a kind is one class and one entry in KIND_FACTORIES.

`--stalls` (not in CI) also pauses workers at random checkpoints and staggers
duplicate triggers, so slow workers race fast ones within a phase.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import azure.functions as func
import psycopg
from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.functions.eventgrid import EventGridEventInConverter
from azure.functions.meta import Datum
from azure.functions.timer import TimerRequest
from azure.identity import DefaultAzureCredential
from azure.keyvault.secrets import SecretClient

from devstack.arm_consumers import ConsumerApps
from devstack.keyvault.server import Fault
from devstack.postgres import session_user
from devstack.sigterm import stop_on_sigterm
from devstack.stack import (
    LocalStack,
    app_environment,
    provision_entra_secret,
    provision_postgres_secret,
    provision_storage_key_secret,
)
from rotators.base import TAG_ADMIN_FOR
from shared import service
from shared.consumers import MOVED, TAG_CONSUMERS, ConsumerRef, Consumers, Position, Wanted
from shared.engine import CHECKPOINTS, RotationEngine
from shared.ledger import FAILED, IDLE, OVERLAP, ROTATING
from shared.settings import Settings

ROUND_STEP = timedelta(days=3)  # past every overlap and lease; with P30D validity, every secret is due
VALIDITY = timedelta(days=30)
OVERLAP_TAG = "PT1H"  # longer than all the lease jumps of one round's recovery
# Secrets read by a Web App: an overlap that ends within the recovery's lease jumps, far short of
# App Service's own 24-hour refresh, so only the engine's refresh and drain check keep the app up.
APP_OVERLAP_TAG = "PT3M"
LEASE = timedelta(minutes=2)
ENGINE_ENV = {
    "ROTATION_LEASE": "PT2M",
    "ROTATION_SWEEP_LEAD_TIME": "P28D",
    "ROTATION_RETRY_AFTER_FAILURE": "PT1M",
    "ROTATION_PROBE_TIMEOUT": "PT1S",
    "ROTATION_CONSUMER_TIMEOUT": "PT30S",
}
KICKS = ("event", "manual", "sweep", "burst", "rollback", "emergency", "none")
KICK_WEIGHTS = (4, 3, 2, 3, 1, 1, 1)
TRANSIENT_READ = frozenset({408, 429, 500, 502, 503, 504})
# Fields of a JSON secret value that hold the secret part (the rest names a host, a role, a key id).
SECRET_FIELDS = frozenset(
    {"password", "key", "secret", "token", "api_key", "apikey", "connection_string", "client_secret"}
)


class Crash(BaseException):
    """The worker process dies at a checkpoint."""


class Auth(Enum):
    OK = "ok"
    DENIED = "denied"  # the upstream answered and refused the credential
    DOWN = "down"  # the upstream did not answer: an outage, not a credential failure


# ----------------------------------------------------------------------------- plumbing


class Clock:
    """Real time plus an offset, shared by the engine and the emulator."""

    def __init__(self, stack: LocalStack) -> None:
        self._stack = stack
        self._lock = threading.Lock()
        self._offset = timedelta(0)

    def now(self) -> datetime:
        with self._lock:
            return datetime.now(UTC) + self._offset

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._offset += delta
            self._stack.vault.clock.set_offset(self._offset)


class Tally:
    """Thread-safe counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.counts[name] += amount

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self.counts[name]


class LogCapture(logging.Handler):
    """Every log record of the run (consumer threads excepted: they are the harness, not the service)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(threadName)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.threadName and record.threadName.startswith("consumer-"):
            return
        try:
            self.lines.append(self.format(record))
        except Exception:
            self.lines.append(f"unformattable record from {record.name}")


class CrashHook:
    """The engine's checkpoint hook: crashes at random, and readily at points not crashed yet."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._lock = threading.Lock()
        self.rate = 0.0
        self.stall_rate = 0.0  # --stalls: a slow worker (GC pause, slow network) at a checkpoint
        self.reached: Counter[str] = Counter()
        self.crashed: Counter[str] = Counter()
        self.stalls = 0

    def __call__(self, point: str) -> None:
        with self._lock:
            self.reached[point] += 1
            first_time = self.crashed[point] == 0 and self._rng.random() < 0.6
            crash = self.rate > 0 and (first_time or self._rng.random() < self.rate)
            if crash:
                self.crashed[point] += 1
            stall = 0.0
            if not crash and self.rate > 0 and self._rng.random() < self.stall_rate:
                stall = self._rng.uniform(0.2, 1.0)
                self.stalls += 1
        if crash:
            raise Crash(point)
        time.sleep(stall)


class Probe:
    """The engine's consumer probe: fails for the secrets set up for a rollback."""

    def __init__(self) -> None:
        self.failing: set[str] = set()

    def __call__(self, url: str, deadline_seconds: float) -> None:
        if url.rstrip("/").rsplit("/", 1)[-1] in self.failing:
            raise RuntimeError("consumer health check answered 503 (chaos)")


# ----------------------------------------------------------------------------- kinds of credential


class Kind(Protocol):
    """One kind of managed credential, as the chaos run needs to know it."""

    name: str

    def provision(self, secret: str, index: int, expires_on: datetime) -> None:
        """Create the upstream slots and a managed Key Vault secret for them."""

    def authenticate(self, value: str) -> Auth:
        """Log in upstream with a value as stored in Key Vault."""

    def slot_of(self, value: str) -> str:
        """Which slot a stored value belongs to."""

    def live_slots(self, secret: str, values_ever: set[str]) -> set[str]:
        """The secret's slots that any value the vault ever held still opens."""

    def extra_env(self, env: dict[str, str]) -> dict[str, str]:
        """App settings this kind needs on top of the stack's (allow-listed targets, CA)."""

    def close(self) -> None:
        """Stop whatever stand-in the kind started."""


class PostgresKind:
    name = "postgres"

    def __init__(self, stack: LocalStack, run_id: str) -> None:
        self._stack = stack
        self._run_id = run_id
        self._slots: dict[str, tuple[str, str]] = {}

    def provision(self, secret: str, index: int, expires_on: datetime) -> None:
        pg = self._stack.postgres
        managed = provision_postgres_secret(
            self._stack,
            secret,
            prefix=f"{self._run_id}_pg{index:02d}",
            expires_on=expires_on,
            validity=VALIDITY,
            overlap=OVERLAP_TAG,
            extra_tags={"rotation-probes": f"http://{pg.host}:{pg.port}/health/{secret}"},
        )
        self._slots[secret] = managed.slots

    def authenticate(self, value: str) -> Auth:
        credential = json.loads(value)
        try:
            user = session_user(credential, self._stack.postgres.ca_path, connect_timeout=3)
        except psycopg.OperationalError as error:
            # 28P01 invalid_password, 28000 invalid_authorization_specification
            refused = error.sqlstate in ("28P01", "28000") or "authentication failed" in str(error)
            return Auth.DENIED if refused else Auth.DOWN
        return Auth.OK if user == credential["username"] else Auth.DENIED

    def slot_of(self, value: str) -> str:
        return str(json.loads(value).get("username", ""))

    def extra_env(self, env: dict[str, str]) -> dict[str, str]:
        return {}

    def close(self) -> None:
        return

    def live_slots(self, secret: str, values_ever: set[str]) -> set[str]:
        live: set[str] = set()
        pg = self._stack.postgres
        for value in values_ever:
            try:
                credential = json.loads(value)
            except ValueError:
                continue
            if not isinstance(credential, dict) or credential.get("port") != pg.port:
                continue
            slot = credential.get("username")
            if slot in self._slots[secret] and slot not in live and self.authenticate(value) == Auth.OK:
                live.add(slot)
        return live


class ApiKeyKind:
    """A vendor API with key management (devstack.vendor_api); one vendor account per secret."""

    name = "api-key"

    def __init__(self, stack: LocalStack, run_id: str) -> None:
        from devstack.vendor_api import VendorApi  # noqa: PLC0415 - only when this kind runs

        self._stack = stack
        # ensure_certs on the emulator's directory: the vendor shares the vault's CA.
        self.vendor = VendorApi(stack.vault.ca_path.parent).start()
        self._admin: dict[str, str] = {}

    def extra_env(self, env: dict[str, str]) -> dict[str, str]:
        return {
            "ROTATION_UPSTREAM_CA_BUNDLE": str(self._stack.vault.ca_path),
            "ROTATION_ALLOWED_TARGETS": f"{env['ROTATION_ALLOWED_TARGETS']},127.0.0.1:{self.vendor.port}",
        }

    def close(self) -> None:
        self.vendor.stop()

    def provision(self, secret: str, index: int, expires_on: datetime) -> None:
        vault = self._stack.secret_client()
        admin_key = self.vendor.add_account()
        self._admin[secret] = admin_key
        vault.set_secret(
            f"{secret}-admin",
            json.dumps({"key": admin_key}),
            content_type="application/json",
            tags={TAG_ADMIN_FOR: secret},
        )
        key_id, key = self.vendor.issue(admin_key, "primary")
        value = {"engine": "api-key", "base_url": self.vendor.base_url, "key_id": key_id, "key": key}
        tags = {
            "rotation-rotator": "api-key",
            "rotation-target": self.vendor.base_url,
            "rotation-slots": "primary,secondary",
            "rotation-current-slot": "primary",
            "rotation-validity": f"P{VALIDITY.days}D",
            "rotation-overlap": OVERLAP_TAG,
            "rotation-admin-secret": f"{secret}-admin",
            "rotation-probes": f"{self.vendor.base_url}/health/{secret}",
        }
        vault.set_secret(
            secret, json.dumps(value), tags=tags, expires_on=expires_on, content_type="application/json"
        )
        self._stack.operator_bind(secret)

    def authenticate(self, value: str) -> Auth:
        try:
            return Auth.OK if self.vendor.authenticates(str(json.loads(value)["key"])) else Auth.DENIED
        except OSError:
            return Auth.DOWN

    def slot_of(self, value: str) -> str:
        key_id = str(json.loads(value).get("key_id", ""))
        for admin_key in self._admin.values():
            for live_id, name in self.vendor.keys(admin_key):
                if live_id == key_id:
                    return name
        return f"revoked key {key_id}"

    def live_slots(self, secret: str, values_ever: set[str]) -> set[str]:
        live: set[str] = set()
        mine = {key_id for key_id, _ in self.vendor.keys(self._admin[secret])}
        for value in values_ever:
            try:
                credential = json.loads(value)
            except ValueError:
                continue
            mine_and_live = (
                isinstance(credential, dict)
                and credential.get("key_id") in mine
                and self.authenticate(value) == Auth.OK
            )
            if mine_and_live:
                live.add(self.slot_of(value))
        return live


class StorageKeyKind:
    """A storage account on the ARM stand-in per secret; key1 and key2 are the slots."""

    name = "storage-key"

    def __init__(self, stack: LocalStack, run_id: str) -> None:
        self._stack = stack
        self._prefix = f"st{run_id}"  # run ids are lower-case letters and digits
        self._accounts: dict[str, str] = {}

    def extra_env(self, env: dict[str, str]) -> dict[str, str]:
        allowed = f"{env['ROTATION_ALLOWED_TARGETS']},*.blob.core.windows.net:443"
        return {"ROTATION_ALLOWED_TARGETS": allowed}

    def close(self) -> None:
        return

    def provision(self, secret: str, index: int, expires_on: datetime) -> None:
        account = self._accounts[secret] = f"{self._prefix}{index:02d}"
        provision_storage_key_secret(
            self._stack,
            secret,
            account,
            expires_on=expires_on,
            overlap=OVERLAP_TAG,
            validity=VALIDITY,
            extra_tags={"rotation-probes": f"https://{account}.blob.core.windows.net/health/{secret}"},
        )

    def _slot_holding(self, value: str) -> str | None:
        """The key of any of this run's accounts whose current value is `value`."""
        for account in self._accounts.values():
            for key_name, key in self._stack.storage.keys(account).items():
                if key == value:
                    return key_name
        return None

    def authenticate(self, value: str) -> Auth:
        # The blob stand-in accepts a SharedKey signature made with a current key, and only that.
        return Auth.OK if self._slot_holding(value) else Auth.DENIED

    def slot_of(self, value: str) -> str:
        return self._slot_holding(value) or "a regenerated key"

    def live_slots(self, secret: str, values_ever: set[str]) -> set[str]:
        keys = self._stack.storage.keys(self._accounts[secret])
        return {key_name for key_name, key in keys.items() if key in values_ever}


class EntraAppKind:
    """An app registration on the Graph stand-in per secret; two of its passwords are the slots."""

    name = "entra-app"

    def __init__(self, stack: LocalStack, run_id: str) -> None:
        self._graph = stack.graph
        self._stack = stack
        self._apps: dict[str, str] = {}  # secret -> application object id

    def extra_env(self, env: dict[str, str]) -> dict[str, str]:
        return {}

    def close(self) -> None:
        return

    def provision(self, secret: str, index: int, expires_on: datetime) -> None:
        managed = provision_entra_secret(
            self._stack,
            secret,
            expires_on=expires_on,
            validity=VALIDITY,
            overlap=OVERLAP_TAG,
            extra_tags={"rotation-probes": f"{self._graph.base_url}/health/{secret}"},
        )
        self._apps[secret] = managed.app_object_id

    def _app_of(self, value: dict[str, Any]) -> str:
        return next((app for app in self._apps.values() if app in self._by_client(value)), "")

    def _by_client(self, value: dict[str, Any]) -> set[str]:
        return {app for app in self._apps.values() if value.get("key_id") in dict(self._graph.passwords(app))}

    def authenticate(self, value: str) -> Auth:
        credential = json.loads(value)
        app = self._app_of(credential)
        if not app:
            return Auth.DENIED  # its password was removed
        try:
            return Auth.OK if self._graph.authenticates(app, credential["client_secret"]) else Auth.DENIED
        except OSError:
            return Auth.DOWN

    def slot_of(self, value: str) -> str:
        key_id = json.loads(value).get("key_id")
        for app in self._apps.values():
            name = dict(self._graph.passwords(app)).get(key_id)
            if name:
                return name.rsplit(":", 1)[-1]
        return f"removed password {key_id}"

    def live_slots(self, secret: str, values_ever: set[str]) -> set[str]:
        mine = dict(self._graph.passwords(self._apps[secret]))
        live: set[str] = set()
        for value in values_ever:
            try:
                credential = json.loads(value)
            except ValueError:
                continue
            ours = isinstance(credential, dict) and credential.get("key_id") in mine
            if ours and self.authenticate(value) == Auth.OK:
                live.add(mine[credential["key_id"]].rsplit(":", 1)[-1])
        return live


def available_kinds() -> list[str]:
    """PostgreSQL always; the other kinds when their rotator and stand-in import."""
    kinds = ["postgres"]
    try:
        import devstack.vendor_api  # noqa: F401, PLC0415
        import rotators.api_key  # noqa: PLC0415
    except ImportError:
        pass
    else:
        kinds.append("api-key")
    try:
        import rotators.storage_key  # noqa: F401, PLC0415
    except ImportError:
        pass
    else:
        kinds.append("storage-key")
    try:
        from rotators import entra_app  # noqa: F401, PLC0415
    except ImportError:
        pass
    else:
        kinds.append("entra-app")
    return kinds


KIND_FACTORIES: dict[str, Callable[[LocalStack, str], Kind]] = {
    "postgres": PostgresKind,
    "api-key": ApiKeyKind,
    "storage-key": StorageKeyKind,
    "entra-app": EntraAppKind,
}


# ----------------------------------------------------------------------------- the triggers


class Triggers:
    """Invoke the registered functions the way the Functions host does."""

    def __init__(self, tally: Tally, http_bodies: list[str]) -> None:
        import function_app  # noqa: PLC0415 - the app under test, imported once as the host does
        from devstack.runner import index  # noqa: PLC0415

        self._functions = {str(f.get_function_name()): f.get_user_function() for f in index(function_app.app)}
        self._retryable: type[Exception] = function_app.RetryableFailure
        self._tally = tally
        self._bodies = http_bodies
        self.errors: list[str] = []

    def event(self, payload: dict[str, Any]) -> None:
        event = EventGridEventInConverter.decode(Datum(json.dumps(payload), "json"), trigger_metadata={})
        self._guard("event", lambda: self._functions["keyvault_events"](event))

    def manual(self, name: str, emergency: bool = False) -> None:
        body = json.dumps({"reason": "chaos run", "emergency": emergency}).encode()
        request = func.HttpRequest(
            method="POST",
            url=f"http://localhost:7071/api/secrets/{name}/rotate",
            headers={"content-type": "application/json"},
            params={},
            route_params={"name": name},
            body=body,
        )

        def call() -> None:
            response: func.HttpResponse = self._functions["rotate_secret"](request)
            self._bodies.append(response.get_body().decode(errors="replace"))
            self._tally.add(f"http_{response.status_code}")

        self._guard("manual", call)

    def sweep(self) -> None:
        self._guard("sweep", lambda: self._functions["rotation_sweeper"](TimerRequest(past_due=False)))

    def _guard(self, what: str, call: Callable[[], None]) -> None:
        self._tally.add(f"trigger_{what}")
        try:
            call()
        except Crash:
            self._tally.add("crashes")
        except Exception as error:
            if isinstance(error, self._retryable):
                self._tally.add("redeliveries")  # Event Grid would deliver the event again
            else:
                # An exception out of a function: the host answers 500 / Event Grid redelivers.
                self._tally.add("trigger_errors")
                frames = [
                    f for f in traceback.extract_tb(error.__traceback__) if f.filename.endswith("engine.py")
                ]
                where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
                self.errors.append(f"{what} trigger raised {type(error).__name__}{where}: {error}")
                print(f"  ! {self.errors[-1]}", flush=True)


# ----------------------------------------------------------------------------- the consumers


@dataclass
class Managed:
    name: str
    kind: Kind
    event: dict[str, Any] = field(default_factory=dict)


class Consumer(threading.Thread):
    """An app that reads the secret and logs in with it, in a loop. A refused login is a failure
    only if what it read is still what it holds (else its read was just stale)."""

    pause = 0.1
    checks = "consumer_checks"  # the tally of its good logins
    failure_tallies: tuple[str, ...] = ("consumer_failures",)

    def __init__(self, secret: Managed, tally: Tally, stop: threading.Event, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.secret, self.tally, self.stop = secret, tally, stop
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            newest = self._read()
            if newest is not None:
                self._check(*newest)
            self.stop.wait(self.pause)

    def _read(self) -> tuple[str, str] | None:
        """(version, value) it holds now, or None if it could not read."""
        raise NotImplementedError

    def _refused(self, version: str, slot: str) -> str:
        raise NotImplementedError

    def _check(self, version: str, value: str) -> None:
        result = self.secret.kind.authenticate(value)
        if result == Auth.OK:
            self.tally.add(self.checks)
            return
        if result == Auth.DOWN:
            self.tally.add("outages")
            return
        for _ in range(20):
            again = self._read()
            if again is not None:
                break
            time.sleep(0.1)
        if again is not None and again[0] != version:
            self.tally.add("stale_reads")
            return
        for tally in self.failure_tallies:
            self.tally.add(tally)
        self.failures.append(self._refused(version, self.secret.kind.slot_of(value)))


class VaultConsumer(Consumer):
    """An app that reads the newest version from Key Vault itself."""

    def __init__(self, secret: Managed, client: SecretClient, tally: Tally, stop: threading.Event) -> None:
        super().__init__(secret, tally, stop, name=f"consumer-{secret.name}")
        self.client = client

    def _read(self) -> tuple[str, str] | None:
        try:
            secret = self.client.get_secret(self.secret.name)
        except (ServiceRequestError, ServiceResponseError):
            self.tally.add("read_retries")
            return None
        except HttpResponseError as error:
            if error.status_code in TRANSIENT_READ:
                self.tally.add("read_retries")
                return None
            self.tally.add("consumer_failures")
            self.failures.append(f"{self.secret.name}: newest version unreadable: HTTP {error.status_code}")
            return None
        return secret.properties.version or "", secret.value or ""

    def _refused(self, version: str, slot: str) -> str:
        return f"{self.secret.name}: newest version {version} (slot {slot}) refused upstream"


class AppConsumer(Consumer):
    """A Web App of the ARM stand-in that reads the secret through a Key Vault reference: it
    holds what it resolved at its last refresh (the engine's, or its own every 24 hours)."""

    SETTING = "SECRET"
    pause = 0.3  # an app's requests are not what this run measures: it asks often enough
    checks = "app_checks"
    failure_tallies = ("consumer_failures", "app_failures")

    def __init__(
        self, secret: Managed, site: str, apps: ConsumerApps, tally: Tally, stop: threading.Event
    ) -> None:
        super().__init__(secret, tally, stop, name=f"consumer-app-{secret.name}")
        self.site, self.apps = site, apps

    def _read(self) -> tuple[str, str] | None:
        value = self.apps.value_of(self.site, self.SETTING)
        version = self.apps.version_of(self.site, self.SETTING)
        return (version, value) if value else None

    def _refused(self, version: str, slot: str) -> str:
        return f"{self.site.rsplit('/', 1)[-1]}: holds version {version} (slot {slot}), refused"


class ConsumerStepsOff(Consumers):
    """The control run: consumers are neither moved nor waited for (what rotation tools do today)."""

    def move(
        self, consumers: Sequence[ConsumerRef], vault_url: str, secret_name: str, wanted: Wanted
    ) -> list[Position]:
        return []

    def positions(
        self, consumers: Sequence[ConsumerRef], vault_url: str, secret_name: str, wanted: Wanted
    ) -> list[Position]:
        return [Position(str(ref), ref.kind, MOVED) for ref in consumers]


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Options:
    secrets: int = 20
    rounds: int = 30
    seed: int | None = None
    max_seconds: float = 600.0
    stalls: bool = False
    kinds: tuple[str, ...] = field(default_factory=lambda: tuple(available_kinds()))
    # The control run: the engine neither moves the apps nor checks them before retiring.
    consumer_steps: bool = True


@dataclass
class Report:
    figures: dict[str, int | float]
    problems: list[str]
    coverage: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        bad = self.figures["consumer_failures"] or self.figures["lost"] or self.figures["leaked"]
        return not bad and not self.problems

    def figures_line(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.figures.items())


class ChaosRun:
    def __init__(self, stack: LocalStack, options: Options) -> None:
        self.stack = stack
        self.options = options
        self.seed = options.seed if options.seed is not None else random.randrange(2**31)
        self.rng = random.Random(self.seed)
        self.run_id = f"chaos{self.rng.randrange(16**4):04x}"
        self.clock = Clock(stack)
        self.tally = Tally()
        self.hook = CrashHook(random.Random(self.seed + 1))
        self.hook.stall_rate = 0.15 if options.stalls else 0.0
        self.probe = Probe()
        self.http_bodies: list[str] = []
        self.problems: list[str] = []
        self.faults: list[tuple[Fault, int]] = []
        self.kinds = {name: KIND_FACTORIES[name](stack, self.run_id) for name in options.kinds}
        self.secrets: list[Managed] = []
        self._engine: RotationEngine | None = None
        self.consumers: list[Consumer] = []
        self.stop_consumers = threading.Event()

    # ------------------------------------------------------------------- set-up

    @property
    def engine(self) -> RotationEngine:
        if self._engine is None:
            raise RuntimeError("setup() has not run")
        return self._engine

    def app_settings(self) -> dict[str, str]:
        env = {**self.stack.app_settings(), **ENGINE_ENV}
        for kind in self.kinds.values():
            env.update(kind.extra_env(env))
        return env

    def setup(self) -> None:
        """Build and install the engine (from the environment, as on the host), provision, start consumers."""
        settings = Settings.from_env()
        blind = None
        if not self.options.consumer_steps:
            blind = ConsumerStepsOff(settings, DefaultAzureCredential(), self.clock.now)
        self._engine = service.build_engine(
            settings, clock=self.clock.now, checkpoint=self.hook, probe=self.probe, consumers=blind
        )
        service.use_engine(self._engine)
        self.triggers = Triggers(self.tally, self.http_bodies)
        kinds = list(self.kinds.values())
        for index in range(self.options.secrets):
            kind = kinds[index % len(kinds)]
            name = f"{self.run_id}-{kind.name}-{index:02d}".replace("_", "-")
            kind.provision(name, index, self.clock.now() + timedelta(days=20))
            self.secrets.append(Managed(name, kind))
        for secret in self.secrets:
            consumer = VaultConsumer(secret, self.stack.secret_client(), self.tally, self.stop_consumers)
            consumer.start()
            self.consumers.append(consumer)
            self.consumers.append(self._app_reading(secret))

    def _app_reading(self, secret: Managed) -> Consumer:
        """A Web App referencing the secret, declared in its rotation-consumers tag (bound again)."""
        apps = self.stack.apps
        site_name = f"{secret.name}-web"
        site = apps.add_site(site_name, {AppConsumer.SETTING: apps.secret_uri(secret.name)})
        vault = self.stack.secret_client()
        tags = dict(vault.get_secret(secret.name).properties.tags or {})
        tags |= {TAG_CONSUMERS: f"web:{apps.resource_group}/{site_name}", "rotation-overlap": APP_OVERLAP_TAG}
        vault.update_secret_properties(secret.name, tags=tags)
        self.stack.operator_bind(secret.name)
        consumer = AppConsumer(secret, site, apps, self.tally, self.stop_consumers)
        consumer.start()
        return consumer

    # ------------------------------------------------------------------- rounds

    def round(self, number: int, restart: bool) -> None:
        self.clock.advance(ROUND_STEP)
        self.hook.rate = 0.08
        for secret in self.secrets:
            secret.event = self._event_for(secret.name)
        before = {s.name: self._rotation_ids(s.name) for s in self.secrets}
        kicks = {s.name: self.rng.choices(KICKS, KICK_WEIGHTS)[0] for s in self.secrets}
        if not (self.hook.crashed["after:rollback-write"] and self.hook.crashed["after:rollback-revoke"]):
            kicks[self.rng.choice(self.secrets).name] = "rollback"  # until its checkpoints are covered
        self.probe.failing = {name for name, kick in kicks.items() if kick == "rollback"}
        self._inject_faults()

        restarter = threading.Thread(target=self._restart_postgres, name="chaos-restart") if restart else None
        if restarter:
            restarter.start()
        self._concurrently([partial(self._kick, s, kicks[s.name]) for s in self.secrets])
        if restarter:
            restarter.join()

        self.hook.rate = 0.03
        for attempt in range(12):
            pending = [s for s in self.secrets if self._pending(s, kicks[s.name], before[s.name])]
            if not pending:
                break
            if attempt >= 6:
                self.hook.rate = 0.0  # make sure the round ends
            self.clock.advance(LEASE + timedelta(seconds=1))
            self._concurrently([partial(self._next_trigger, s) for s in pending])
        self._clear_faults()
        self.probe.failing = set()

        for secret in self.secrets:
            self._check_round(secret, kicks[secret.name], before[secret.name], number)

    def _pending(self, secret: Managed, kick: str, before: set[str]) -> bool:
        """Work a real deployment would still do: a stalled rotation or retirement, or a due
        secret whose trigger was lost to a crash (Event Grid redelivers, the sweeper comes back)."""
        state = self.engine.ledger.get(self.stack.vault.vault_url, secret.name)
        if state is None:
            return kick in ("event", "manual", "sweep", "burst")
        if state.state == ROTATING:
            return True
        if state.state == OVERLAP and state.retire_after and state.retire_after <= self.clock.now():
            return True
        if kick not in ("event", "manual", "sweep", "burst"):
            return False
        return not (self._rotation_ids(secret.name) - before)

    def _kick(self, secret: Managed, kick: str) -> None:
        if kick == "event":
            self.triggers.event(secret.event)
        elif kick in ("manual", "rollback"):
            self.triggers.manual(secret.name)
        elif kick == "emergency":
            self.triggers.manual(secret.name, emergency=True)
        elif kick == "sweep":
            self.triggers.sweep()
        elif kick == "burst":
            calls: list[Callable[[], None]] = [
                lambda: self.triggers.event(secret.event),
                lambda: self.triggers.manual(secret.name),
                self.triggers.sweep,
            ]
            if self.rng.random() < 0.5:
                calls.append(lambda: self.triggers.event(secret.event))  # Event Grid's duplicate delivery
            self.tally.add("duplicates", len(calls) - 1)
            if self.options.stalls:
                # Duplicates that arrive a little later find the first one's claim already made.
                delays = [0.0, *(self.rng.uniform(0.05, 0.6) for _ in calls[1:])]
                calls = [partial(_after, delay, call) for delay, call in zip(delays, calls, strict=True)]
            self._concurrently(calls)

    def _next_trigger(self, secret: Managed) -> None:
        choices: tuple[str, ...] = ("event", "manual", "sweep")
        if self._state(secret.name) == OVERLAP:
            # Only a retirement is left: a manual request would (rightly) start a second rotation.
            choices = ("event", "sweep")
        self._kick(secret, self.rng.choice(choices))

    def _check_round(self, secret: Managed, kick: str, before: set[str], number: int) -> None:
        history = self.engine.ledger.history(self.stack.vault.vault_url, secret.name, 200)
        new = [record for record in history if record.rotation_id not in before]
        rotated = [record for record in new if record.outcome == "rotated"]
        unfinished = [record for record in new if record.outcome not in ("rotated", "rolled_back", "failed")]
        if len(rotated) > 1:
            self.problems.append(f"round {number}: {secret.name} rotated {len(rotated)} times ({kick})")
        if kick == "burst" and not rotated and not any(r.outcome == "failed" for r in new):
            state_row = self.engine.ledger.get(self.stack.vault.vault_url, secret.name)
            self.problems.append(
                f"round {number}: the burst on {secret.name} rotated nothing: new history "
                f"{[(r.outcome, r.trigger, r.error) for r in new]}, ledger "
                f"{state_row and (state_row.state, state_row.last_outcome, state_row.last_error)}"
            )
        state = self._state(secret.name)
        if state == ROTATING or unfinished:
            self.problems.append(f"round {number}: {secret.name} still {state} after recovery")

    # ------------------------------------------------------------------- faults and restarts

    def _inject_faults(self) -> None:
        names = "|".join(re.escape(s.name) for s in self.secrets)
        for _ in range(self.rng.randint(1, 3)):
            target = (
                re.escape(self.rng.choice(self.secrets).name) if self.rng.random() < 0.5 else f"(?:{names})"
            )
            method, path = self.rng.choice(
                [
                    ("PUT", f"^/secrets/{target}/?$"),
                    ("PATCH", f"^/secrets/{target}/[0-9a-f]+/?$"),
                    ("GET", f"^/secrets/{target}/?$"),
                ]
            )
            status = self.rng.choice((429, 429, 429, 500, 503, 0))
            retry_after = 1 if status == 429 and self.rng.random() < 0.5 else None
            code = {429: "Throttled", 0: "Reset"}.get(status, "InternalServerError")
            times = self.rng.randint(1, 3)
            fault = self.stack.vault.inject_fault(
                method, path, status, times=times, retry_after=retry_after, code=code
            )
            self.faults.append((fault, times))

    def _clear_faults(self) -> None:
        self.stack.vault.clear_faults()
        for fault, times in self.faults:
            self.tally.add("faults", times - max(0, fault.remaining))
        self.faults = []

    def _restart_postgres(self) -> None:
        time.sleep(self.rng.uniform(0.05, 0.3))
        began = time.monotonic()
        self.stack.postgres.restart()
        self.tally.add("restarts")
        print(f"  postgres restarted ({time.monotonic() - began:.1f} s down)", flush=True)

    # ------------------------------------------------------------------- the end

    def converge(self) -> None:
        self.hook.rate = 0.0
        self._clear_faults()
        for _ in range(10):
            states = {s.name: self._state(s.name) for s in self.secrets}
            if all(state == IDLE for state in states.values()):
                return
            self.clock.advance(timedelta(minutes=10))
            self.triggers.sweep()
        left = {s.name: self._state(s.name) for s in self.secrets if self._state(s.name) != IDLE}
        self.problems.append(f"not converged: {left}")

    def check(self) -> dict[str, int]:
        client = self.stack.secret_client()
        values_ever = self.stack.vault.values_stored()
        lost = 0
        for secret in self.secrets:
            newest = client.get_secret(secret.name)
            value = newest.value or ""
            if secret.kind.authenticate(value) != Auth.OK:
                lost += 1
                self.problems.append(f"{secret.name}: the newest version does not authenticate")
            live = secret.kind.live_slots(secret.name, values_ever)
            if live != {secret.kind.slot_of(value)}:
                self.problems.append(f"{secret.name}: live slots upstream {sorted(live)}, expected one")
            state = self.engine.ledger.get(self.stack.vault.vault_url, secret.name)
            if state and state.state == FAILED:
                self.problems.append(f"{secret.name}: left failed at step {state.step}: {state.last_error}")
        rotations = sum(
            record.outcome == "rotated"
            for secret in self.secrets
            for record in self.engine.ledger.history(self.stack.vault.vault_url, secret.name, 1000)
        )
        return {"rotations": rotations, "lost": lost}

    def leaked(self, logs: list[str]) -> int:
        """How many secret values appear in the run's logs, HTTP answers or PostgreSQL's log."""
        needles: set[str] = {self.stack.postgres.admin_password}
        for value in self.stack.vault.values_stored():
            needles.add(value)
            try:
                decoded = json.loads(value)
            except ValueError:
                continue
            if isinstance(decoded, dict):
                needles.update(
                    str(v) for k, v in decoded.items() if k.lower() in SECRET_FIELDS and isinstance(v, str)
                )
        haystack = "\n".join(
            [*logs, *self.http_bodies, self.stack.postgres.log_path.read_text(errors="replace")]
        )
        found = sorted(needle for needle in needles if needle and needle in haystack)
        for needle in found:
            where = haystack.find(needle)
            self.problems.append(
                f"a secret value appears in the logs near: {haystack[max(0, where - 80) : where]!r}"
            )
        return len(found)

    # ------------------------------------------------------------------- helpers

    def _event_for(self, name: str) -> dict[str, Any]:
        schema = self.rng.choice(("EventGridSchema", "CloudEventSchemaV1_0"))
        return self.stack.vault.events_for(name, schema=schema)  # type: ignore[arg-type]

    def _state(self, name: str) -> str:
        state = self.engine.ledger.get(self.stack.vault.vault_url, name)
        return state.state if state else IDLE

    def _rotation_ids(self, name: str) -> set[str]:
        return {r.rotation_id for r in self.engine.ledger.history(self.stack.vault.vault_url, name, 1000)}

    def _concurrently(self, calls: list[Callable[[], None]]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, len(calls)), thread_name_prefix="trigger") as pool:
            for future in [pool.submit(call) for call in calls]:
                future.result()


def _after(delay: float, call: Callable[[], None]) -> None:
    time.sleep(delay)
    call()


def checked_by_kind(chaos: ChaosRun) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for secret in chaos.secrets:
        history = chaos.engine.ledger.history(chaos.stack.vault.vault_url, secret.name, 1000)
        counts[secret.kind.name] += sum(record.outcome == "rotated" for record in history)
    return dict(counts)


def run(
    options: Options,
    stack: LocalStack | None = None,
    sabotage: Callable[[ChaosRun], None] | None = None,
) -> Report:
    """One chaos run; starts (and stops) its own stack unless given one.

    `sabotage` (for tests of the checker) runs after convergence, while consumers still run.
    """
    began = time.monotonic()
    capture = LogCapture()
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    own_stack = stack is None
    local = stack or LocalStack()
    chaos: ChaosRun | None = None
    try:
        if own_stack:
            local.start()
        chaos = ChaosRun(local, options)
        with app_environment(chaos.app_settings()):
            print(
                f"chaos: seed={chaos.seed} secrets={options.secrets} rounds={options.rounds} "
                f"kinds={','.join(options.kinds)} stack up in {time.monotonic() - began:.1f} s",
                flush=True,
            )
            chaos.setup()
            restart_round = max(1, options.rounds // 2)
            done = 0
            for number in range(1, options.rounds + 1):
                if time.monotonic() - began > options.max_seconds:
                    print(f"chaos: time budget of {options.max_seconds:.0f} s reached", flush=True)
                    break
                chaos.round(number, restart=number == restart_round)
                done = number
                crashes = sum(chaos.hook.crashed.values())
                print(
                    f"  round {number}: triggers so far: {chaos.tally['trigger_event']} events, "
                    f"{chaos.tally['trigger_manual']} manual, {chaos.tally['trigger_sweep']} sweeps; "
                    f"crashes {crashes}, consumer checks {chaos.tally['consumer_checks']}, "
                    f"t={time.monotonic() - began:.0f} s",
                    flush=True,
                )
            if done and not chaos.tally["restarts"]:
                chaos._restart_postgres()  # a run cut short still restarts the database once
            chaos.converge()
            if sabotage:
                sabotage(chaos)
            time.sleep(1.0)  # consumers see the final state
            chaos.stop_consumers.set()
            for consumer in chaos.consumers:
                consumer.join(timeout=15)
            checked = chaos.check()
            leaked = chaos.leaked(capture.lines)
            for consumer in chaos.consumers:
                chaos.problems.extend(consumer.failures[:5])
            figures: dict[str, int | float] = {
                "rotations": checked["rotations"],
                # Counted by the hook: a sweep runs secrets in parallel and surfaces one crash.
                "crashes": sum(chaos.hook.crashed.values()),
                "faults": chaos.tally["faults"],
                "duplicates": chaos.tally["duplicates"],
                "restarts": chaos.tally["restarts"],
                "consumer_checks": chaos.tally["consumer_checks"],
                "app_checks": chaos.tally["app_checks"],
                "outages": chaos.tally["outages"],
                "app_failures": chaos.tally["app_failures"],  # counted in consumer_failures too
                "consumer_failures": chaos.tally["consumer_failures"],
                "lost": checked["lost"],
                "leaked": leaked,
                "seconds": round(time.monotonic() - began, 1),
            }
            coverage = {point: chaos.hook.crashed[point] for point in CHECKPOINTS}
            notes = [
                f"rotations by kind: {checked_by_kind(chaos)}",
                f"consumer read retries (injected read faults) {chaos.tally['read_retries']}, "
                f"stale reads {chaos.tally['stale_reads']}, "
                f"event redeliveries {chaos.tally['redeliveries']}, stalls {chaos.hook.stalls}",
                *(f"unhandled: {error}" for error in chaos.triggers.errors),
            ]
            return Report(figures, chaos.problems, coverage, notes)
    finally:
        if chaos is not None:
            chaos.stop_consumers.set()
            for kind in chaos.kinds.values():
                kind.close()
        service.use_engine(None)
        root.removeHandler(capture)
        root.setLevel(saved_level)
        if own_stack:
            local.stop()


def main(argv: list[str] | None = None) -> int:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="the CI size: 4 secrets, 6 rounds")
    parser.add_argument("--secrets", type=int, help="managed secrets (default 20; --small 4)")
    parser.add_argument("--rounds", type=int, help="rounds (default 30; --small 6)")
    parser.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    parser.add_argument(
        "--stalls",
        action="store_true",
        help="also stall workers at random checkpoints (slow workers racing fast ones); off in CI",
    )
    parser.add_argument(
        "--kinds", help=f"comma-separated kinds of credential (default: {','.join(available_kinds())})"
    )
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop starting rounds after this")
    parser.add_argument(
        "--consumer-steps-off",
        action="store_true",
        help="the control run: no refresh of the apps, no drain check (expect app_failures > 0)",
    )
    args = parser.parse_args(argv)
    options = Options(
        secrets=args.secrets or (4 if args.small else 20),
        rounds=args.rounds if args.rounds is not None else (6 if args.small else 30),
        seed=args.seed,
        max_seconds=min(args.max_seconds, 150.0) if args.small else args.max_seconds,
        kinds=tuple(args.kinds.split(",")) if args.kinds else tuple(available_kinds()),
        stalls=args.stalls,
        consumer_steps=not args.consumer_steps_off,
    )
    return finish(run(options))


def finish(report: Report) -> int:
    """Print the summary, the figures line last; return the exit status."""
    crashed = sum(1 for count in report.coverage.values() if count)
    points = " ".join(f"{point}={count}" for point, count in report.coverage.items())
    print(f"checkpoints crashed: {crashed}/{len(report.coverage)}: {points}")
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    print(report.figures_line(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
