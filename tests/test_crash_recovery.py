"""Crashes at every step boundary, then the next trigger finishes the rotation.

A crash is simulated by a BaseException raised from the engine's checkpoint
hook: like a process dying, it skips every `except Exception` clean-up, so the
ledger keeps the lease of the dead run until it expires. At every checkpoint
of every run the hook also checks the invariant the whole design rests on:
the newest enabled Key Vault version logs in to PostgreSQL.
"""

import dataclasses
import json
import os
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import pytest
from azure.keyvault.secrets import SecretClient

from devstack.ports import free_port
from devstack.stack import LocalStack, provision_postgres_secret
from shared.engine import RotationEngine
from shared.ledger import IDLE, OVERLAP
from tests.conftest import can_login, soon
from tests.crashes import RETIRE_POINTS, ROTATION_POINTS, SimulatedCrash, TestClock
from tests.hosting import deliver_event, tick_sweeper

pytestmark = pytest.mark.usefixtures("app_settings")


def credential(vault: SecretClient, name: str, version: str | None = None) -> dict[str, object]:
    value: dict[str, object] = json.loads(vault.get_secret(name, version).value or "{}")
    return value


class CrashOnce:
    def __init__(self, stack: LocalStack, vault: SecretClient, name: str, point: str) -> None:
        self.stack, self.vault, self.name, self.point = stack, vault, name, point
        self.crashed = False
        self.checked: list[str] = []

    def __call__(self, point: str) -> None:
        newest = credential(self.vault, self.name)
        assert can_login(self.stack, newest), f"newest version does not log in at {point}"
        self.checked.append(point)
        if point == self.point and not self.crashed:
            self.crashed = True
            raise SimulatedCrash(point)


@pytest.fixture
def clock() -> TestClock:
    return TestClock()


@pytest.mark.parametrize("point", ROTATION_POINTS + RETIRE_POINTS)
def test_a_crash_at_any_step_is_finished_by_the_next_trigger(
    stack: LocalStack, vault: SecretClient, unique: str, clock: TestClock, engine_with: object, point: str
) -> None:
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20), overlap="PT1H")
    old = credential(vault, unique)
    hook = CrashOnce(stack, vault, unique, point)
    engine: RotationEngine = engine_with(clock=clock.now, checkpoint=hook)  # type: ignore[operator]
    event = [stack.vault.events_for(unique)]

    if point in ROTATION_POINTS:
        with pytest.raises(SimulatedCrash):
            deliver_event(event)
        # The dead run's lease runs out; Event Grid redelivers the event.
        clock.advance(engine.settings.lease + timedelta(seconds=1))
        deliver_event(event)
    else:
        deliver_event(event)
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert state.state == OVERLAP

    clock.advance(timedelta(hours=1, minutes=1))
    if point in RETIRE_POINTS:
        with pytest.raises(SimulatedCrash):
            tick_sweeper()
        clock.advance(engine.settings.lease + timedelta(seconds=1))  # the crashed retirement's lease
    tick_sweeper()

    assert hook.crashed
    newest = vault.get_secret(unique)
    assert (newest.properties.tags or {})["rotation-current-slot"] == managed.slots[1]
    assert can_login(stack, credential(vault, unique))
    assert not can_login(stack, old)
    assert len(list(vault.list_properties_of_secret_versions(unique))) == 2
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert (state.state, state.last_outcome) == (IDLE, "rotated")
    history = engine.ledger.rotations(stack.vault.vault_url, unique)
    assert len(history) == 1
    assert history[0].retired_on is not None
    # A crash once the rotation finished leaves nothing to resume: the redelivered event is stale.
    resumed = point in ROTATION_POINTS and point != "after:finish"
    assert history[0].attempts == (2 if resumed else 1)
    assert point in hook.checked


class FailingConsumer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


def test_a_failing_consumer_probe_rolls_back(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: object
) -> None:
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), FailingConsumer)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        managed = provision_postgres_secret(
            stack,
            unique,
            prefix=unique,
            expires_on=soon(20),
            extra_tags={"rotation-probes": f"http://127.0.0.1:{port}/health"},
        )
        allowed = f"{os.environ['ROTATION_ALLOWED_TARGETS']},127.0.0.1:{port}"
        engine: RotationEngine = engine_with(  # type: ignore[operator]
            {"ROTATION_ALLOWED_TARGETS": allowed, "ROTATION_PROBE_TIMEOUT": "PT1S"}
        )
        original = credential(vault, unique)
        deliver_event([stack.vault.events_for(unique)])
    finally:
        server.shutdown()
        server.server_close()

    versions = sorted(vault.list_properties_of_secret_versions(unique), key=lambda p: p.created_on or 0)
    assert len(versions) == 3  # original, the rotated one, the original restored as newest
    rotated = credential(vault, unique, versions[1].version)
    assert rotated["username"] == managed.slots[1]
    assert credential(vault, unique) == original
    assert (vault.get_secret(unique).properties.tags or {})["rotation-current-slot"] == managed.slots[0]
    assert can_login(stack, original)
    assert not can_login(stack, rotated)  # the new credential was revoked
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert (state.state, state.last_outcome) == (IDLE, "rolled_back")
    assert "consumer probe failed" in state.last_error
    (record,) = engine.ledger.rotations(stack.vault.vault_url, unique)
    assert record.outcome == "rolled_back"


def test_emergency_rotation_retires_the_old_credential_at_once(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: object
) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(60), overlap="P1D")
    engine: RotationEngine = engine_with()  # type: ignore[operator]
    leaked = credential(vault, unique)
    outcome = engine.rotate(
        stack.vault.vault_url, unique, trigger="manual", requested_by="sre", reason="leak", emergency=True
    )
    assert outcome.status == "rotated"
    assert not can_login(stack, leaked)
    assert can_login(stack, credential(vault, unique))
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert state.state == IDLE
    (record,) = engine.ledger.rotations(stack.vault.vault_url, unique)
    assert record.emergency
    assert record.reason == "leak"
    assert record.retired_on is not None


class Stall:
    """Pauses the calling thread at one checkpoint, as a GC pause or a slow network would."""

    def __init__(self, point: str, seconds: float) -> None:
        self.point, self.seconds = point, seconds
        self.local = threading.local()
        self.reached = threading.Event()

    def __call__(self, point: str) -> None:
        if point == self.point and getattr(self.local, "stall", False):
            self.reached.set()
            time.sleep(self.seconds)


@pytest.mark.parametrize(("point", "advance"), [("before:retire", "overlap"), ("before:create", "lease")])
def test_a_stalled_run_cannot_revoke_what_a_newer_run_created(
    stack: LocalStack,
    vault: SecretClient,
    unique: str,
    clock: TestClock,
    engine_with: object,
    point: str,
    advance: str,
) -> None:
    """A worker stalls right before an upstream call while another run takes over: when it wakes,
    its conditional ledger write fails and it stops, instead of revoking the newer credential."""
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20), overlap="PT1H")
    stall = Stall(point, seconds=2.0)
    engine: RotationEngine = engine_with(clock=clock.now, checkpoint=stall)  # type: ignore[operator]
    # The stall is per thread: keep the sweep's work on the calling thread.
    engine.settings = dataclasses.replace(engine.settings, sweep_concurrency=1)
    url = stack.vault.vault_url
    if point == "before:retire":
        assert engine.rotate(url, unique, trigger="manual").status == "rotated"
        clock.advance(timedelta(hours=2))  # the overlap is due
    results: list[str] = []

    def stalled_worker() -> None:
        stall.local.stall = True
        if point == "before:retire":
            results.extend(outcome.status for outcome in engine.sweep() if outcome.secret == unique)
        else:
            results.append(engine.rotate(url, unique, trigger="event").status)

    worker = threading.Thread(target=stalled_worker)
    worker.start()
    assert stall.reached.wait(30)
    if advance == "lease":
        clock.advance(engine.settings.lease + timedelta(seconds=1))  # the stalled run's lease is gone
        other = [o.status for o in engine.sweep() if o.secret == unique]
    else:
        other = [engine.rotate(url, unique, trigger="event").status]
    worker.join(30)
    assert "rotated" in other
    assert results == ["in_progress"]
    assert can_login(stack, credential(vault, unique))
