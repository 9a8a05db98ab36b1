"""An Entra ID application's client secret, rotated end to end through the registered functions.

Graph and the Entra token endpoint are one stand-in over HTTPS (the stack's CA), reached by
azure-core's pipeline (Graph, as the app's managed identity) and by azure-identity's
unmodified ClientSecretCredential (the secrets). Each test gets its own app registration and
secret; the proofs are those of the other rotators: rotation, overlap and retirement,
duplicate and stale events, a crash at every step, a consumer-probe rollback, hostile tags,
Graph's refusals (ownership, policy, limit) with nothing half done, and the security model's
attacks done as an attacker who may write one secret would do them.
"""

import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import pytest
import requests
from azure.keyvault.secrets import SecretClient

from devstack.graph import GraphStandIn
from devstack.ports import free_port
from devstack.stack import LocalStack, ManagedEntraSecret, provision_entra_secret
from rotators.base import RotationContext
from rotators.entra_app import EntraAppRotator, marker
from shared import service
from shared.cli import EXIT_OK
from shared.cli import run as cli_run
from shared.config import parse_config
from shared.engine import RotationEngine
from shared.errors import UpstreamError
from shared.ledger import IDLE, OVERLAP
from shared.settings import Settings
from tests.conftest import SESSION_LOGS, soon
from tests.crashes import RETIRE_POINTS, ROTATION_POINTS, SimulatedCrash, TestClock
from tests.hosting import call_http, deliver_event, tick_sweeper


@pytest.fixture(scope="module", autouse=True)
def _clean_up(stack: LocalStack, app_settings: dict[str, str]) -> Iterator[None]:
    """Leave nothing for later modules' sweeps: end overlaps (a day ahead), delete this module's secrets."""
    yield
    later = datetime.now(UTC) + timedelta(days=1)
    engine = service.build_engine(Settings.from_env(), clock=lambda: later)
    vault = stack.secret_client()
    for properties in vault.list_properties_of_secrets():
        name = properties.name or ""
        if (properties.tags or {}).get("rotation-rotator") != "entra-app":
            continue
        state = engine.ledger.get(stack.vault.vault_url, name)
        if state and state.state == OVERLAP:
            engine.retire_due(stack.vault.vault_url, name)
        vault.begin_delete_secret(name)


@pytest.fixture
def graph(stack: LocalStack, app_settings: dict[str, str]) -> Iterator[GraphStandIn]:
    """The stack's Graph stand-in, its policy and faults put back after each test."""
    yield stack.graph
    stack.graph.reset_policy()
    stack.graph.clear_faults()
    stack.graph.grant_permission(True)


def provision(stack: LocalStack, name: str, *, days: int = 20, **options: object) -> ManagedEntraSecret:
    """A managed secret `days` from expiry (a victim far from it: the sweep leaves it alone)."""
    return provision_entra_secret(stack, name, expires_on=soon(days), **options)  # type: ignore[arg-type]


def value_of(vault: SecretClient, name: str, version: str | None = None) -> dict[str, str]:
    value: dict[str, str] = json.loads(vault.get_secret(name, version).value or "{}")
    return value


def versions(vault: SecretClient, name: str) -> list[str]:
    return [p.version or "" for p in vault.list_properties_of_secret_versions(name)]


def event(stack: LocalStack, name: str) -> list[object]:
    return [stack.vault.events_for(name)]


def state_of(stack: LocalStack, name: str) -> tuple[str, str, str]:
    state = service.engine().ledger.get(stack.vault.vault_url, name)
    assert state is not None
    return state.state, state.last_outcome, state.last_error


# ------------------------------------------------------------------ the stand-in speaks Graph's shapes


def test_the_graph_stand_in_answers_in_graphs_shapes(stack: LocalStack, graph: GraphStandIn) -> None:
    token = stack.vault.credential().get_token("https://graph.microsoft.com/.default").token
    auth = {"Authorization": f"Bearer {token}"}
    app = graph.add_application("shapes")
    other = graph.add_application("not owned", owned=False)
    verify = str(graph.ca_path)

    def get(path: str, headers: dict[str, str] = auth) -> requests.Response:
        return requests.get(f"{graph.base_url}{path}", headers=headers, verify=verify, timeout=5)

    by_app_id = get(f"/v1.0/applications(appId='{app.app_id}')").json()
    assert by_app_id["id"] == app.id and get(f"/v1.0/applications/{app.id}").json()["appId"] == app.app_id
    owners = get(f"/v1.0/applications/{app.id}/owners").json()["value"]
    assert {"@odata.type": "#microsoft.graph.servicePrincipal", "id": graph.caller_id} in owners
    denied = get(f"/v1.0/applications/{other.id}")
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "Authorization_RequestDenied"
    assert set(denied.json()["error"]["innerError"]) >= {"date", "request-id", "client-request-id"}
    assert get(f"/v1.0/applications/{app.id}", headers={}).status_code == 401
    vault_token = stack.vault.credential().get_token("https://vault.azure.net/.default").token
    assert (
        get(f"/v1.0/applications/{app.id}", headers={"Authorization": f"Bearer {vault_token}"}).status_code
        == 401
    )
    openid = get(f"/{graph.tenant_id}/v2.0/.well-known/openid-configuration", headers={}).json()
    assert openid["token_endpoint"] == f"{graph.base_url}/{graph.tenant_id}/oauth2/v2.0/token"
    assert "tenant_discovery_endpoint" in get("/common/discovery/instance", headers={}).json()


# ------------------------------------------------------------------ rotation and retirement


def test_near_expiry_event_adds_a_password_and_the_sweeper_removes_the_old_one(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str
) -> None:
    # Given an app registration whose client secret (slot-a) is 20 days from expiry
    managed = provision(stack, unique, overlap="PT2S")
    old = managed.value
    foreign_id, foreign = graph.add_password(managed.app_object_id, "ci pipeline")  # not ours
    assert graph.authenticates(managed.app_object_id, old["client_secret"])

    # When Key Vault's SecretNearExpiry event arrives
    deliver_event(event(stack, unique))

    # Then a new version holds a new password on slot-b that obtains a token
    newest = vault.get_secret(unique)
    assert (newest.properties.tags or {})["rotation-current-slot"] == "slot-b"
    assert newest.properties.content_type == "application/json"
    new = json.loads(newest.value or "{}")
    assert set(new) == {"tenant_id", "client_id", "client_secret", "key_id"}
    assert (new["tenant_id"], new["client_id"]) == (graph.tenant_id, managed.client_id)
    assert graph.authenticates(managed.app_object_id, new["client_secret"])
    assert sorted(graph.passwords(managed.app_object_id)) == sorted(
        [
            (old["key_id"], marker(unique, "slot-a")),
            (foreign_id, "ci pipeline"),
            (new["key_id"], marker(unique, "slot-b")),
        ]
    )
    # and the old one still works during the overlap
    assert graph.authenticates(managed.app_object_id, old["client_secret"])
    assert state_of(stack, unique)[0] == OVERLAP

    # When the overlap has passed and the timer fires
    time.sleep(2.1)
    tick_sweeper()

    # Then the old password is removed; the new one and the one not ours are untouched
    assert not graph.authenticates(managed.app_object_id, old["client_secret"])
    assert graph.authenticates(managed.app_object_id, new["client_secret"])
    assert graph.authenticates(managed.app_object_id, foreign)
    assert sorted(graph.passwords(managed.app_object_id)) == sorted(
        [(foreign_id, "ci pipeline"), (new["key_id"], marker(unique, "slot-b"))]
    )
    assert state_of(stack, unique)[:2] == (IDLE, "rotated")


def test_a_bare_secret_format_rotates_and_proves_possession_by_its_hint(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str
) -> None:
    managed = provision(stack, unique, extra_tags={"rotation-entra-format": "secret"})
    vault.set_secret(  # the operator stores the bare secret instead, same tags
        unique,
        managed.value["client_secret"],
        tags=vault.get_secret(unique).properties.tags,
        content_type="text/plain",
    )
    outcome = service.engine().rotate(stack.vault.vault_url, unique, trigger="manual")
    assert outcome.status == "rotated", outcome.message
    newest = vault.get_secret(unique)
    assert newest.properties.content_type == "text/plain"
    assert graph.authenticates(managed.app_object_id, newest.value or "")


def test_slow_propagation_and_transient_graph_failures_are_ridden_out(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str
) -> None:
    managed = provision(stack, unique)
    graph.propagation_delay = 0.8  # a new password works only after a moment
    graph.inject_fault(503, 1, method="POST", path_contains="/addPassword")
    graph.inject_fault(429, 1, method="GET", path_contains="/applications/")
    deliver_event(event(stack, unique))
    new = value_of(vault, unique)
    assert new["key_id"] != managed.value["key_id"]
    graph.propagation_delay = 0.0
    assert graph.authenticates(managed.app_object_id, new["client_secret"])
    token_calls = [status for method, path, status in graph.requests if path.endswith("/oauth2/v2.0/token")]
    assert 401 in token_calls and token_calls[-1] == 200
    # One password per slot: a retried addPassword left no twin.
    assert len(graph.passwords(managed.app_object_id)) == 2


# ------------------------------------------------------------------ duplicate and stale events


def test_duplicate_and_stale_events_change_nothing(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str
) -> None:
    managed = provision(stack, unique, overlap="PT1H")
    first_event = event(stack, unique)
    deliver_event(first_event)
    passwords = sorted(graph.passwords(managed.app_object_id))
    rotated = versions(vault, unique)

    deliver_event(first_event)
    deliver_event([stack.vault.events_for(unique, managed.first_version.properties.version)])

    assert versions(vault, unique) == rotated
    assert len(rotated) == 2
    assert sorted(graph.passwords(managed.app_object_id)) == passwords
    assert len(service.engine().ledger.rotations(stack.vault.vault_url, unique)) == 1


# ------------------------------------------------------------------ crashes at every step


class CrashOnce:
    """At every checkpoint: the newest version's secret obtains a token. At one: the process dies."""

    def __init__(
        self, vault: SecretClient, graph: GraphStandIn, managed: ManagedEntraSecret, name: str, point: str
    ):
        self.vault, self.graph, self.managed, self.name, self.point = vault, graph, managed, name, point
        self.crashed = False
        self.checked: list[str] = []

    def __call__(self, point: str) -> None:
        newest = value_of(self.vault, self.name)
        assert self.graph.authenticates(self.managed.app_object_id, newest["client_secret"]), point
        self.checked.append(point)
        if point == self.point and not self.crashed:
            self.crashed = True
            raise SimulatedCrash(point)


@pytest.mark.parametrize("point", ROTATION_POINTS + RETIRE_POINTS)
def test_a_crash_at_any_step_is_finished_by_the_next_trigger(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str, engine_with: object, point: str
) -> None:
    managed = provision(stack, unique, overlap="PT1H")
    clock = TestClock()
    hook = CrashOnce(vault, graph, managed, unique, point)
    engine: RotationEngine = engine_with(clock=clock.now, checkpoint=hook)  # type: ignore[operator]
    delivery = event(stack, unique)

    if point in ROTATION_POINTS:
        with pytest.raises(SimulatedCrash):
            deliver_event(delivery)
        clock.advance(engine.settings.lease + timedelta(seconds=1))
        deliver_event(delivery)
    else:
        deliver_event(delivery)
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert state.state == OVERLAP

    clock.advance(timedelta(hours=1, minutes=1))
    if point in RETIRE_POINTS:
        with pytest.raises(SimulatedCrash):
            tick_sweeper()
        clock.advance(engine.settings.lease + timedelta(seconds=1))
    tick_sweeper()

    assert hook.crashed and point in hook.checked
    new = value_of(vault, unique)
    assert (vault.get_secret(unique).properties.tags or {})["rotation-current-slot"] == "slot-b"
    assert graph.authenticates(managed.app_object_id, new["client_secret"])
    assert not graph.authenticates(managed.app_object_id, managed.value["client_secret"])
    # No orphan: one password upstream, the one in the newest version.
    assert graph.passwords(managed.app_object_id) == [(new["key_id"], marker(unique, "slot-b"))]
    assert len(versions(vault, unique)) == 2
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert (state.state, state.last_outcome) == (IDLE, "rotated")


# ------------------------------------------------------------------ consumer probe rollback


class FailingConsumer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


def test_a_failing_consumer_probe_rolls_back_and_removes_the_new_password(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str, engine_with: object
) -> None:
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), FailingConsumer)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        managed = provision(stack, unique, extra_tags={"rotation-probes": f"http://127.0.0.1:{port}/health"})
        allowed = f"{os.environ['ROTATION_ALLOWED_TARGETS']},127.0.0.1:{port}"
        engine: RotationEngine = engine_with(  # type: ignore[operator]
            {"ROTATION_ALLOWED_TARGETS": allowed, "ROTATION_PROBE_TIMEOUT": "PT1S"}
        )
        deliver_event(event(stack, unique))
    finally:
        server.shutdown()
        server.server_close()
    by_age = sorted(vault.list_properties_of_secret_versions(unique), key=lambda p: p.created_on or 0)
    assert len(by_age) == 3  # original, the rotated one, the original restored as newest
    rotated = value_of(vault, unique, by_age[1].version)
    assert value_of(vault, unique) == managed.value
    assert not graph.authenticates(managed.app_object_id, rotated["client_secret"])
    assert graph.passwords(managed.app_object_id) == [(managed.value["key_id"], marker(unique, "slot-a"))]
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert (state.state, state.last_outcome) == (IDLE, "rolled_back")


# ------------------------------------------------------------------ hostile tags

HOSTILE = {
    "graph-elsewhere": {"rotation-target": "https://127.0.0.1:1/"},
    # On the allow-list (the vendor API's host), yet not Graph: the identity's Graph token stays home.
    "allow-listed-non-graph": {"rotation-target": "{vendor}"},
    "tenant-not-a-guid": {"rotation-entra-tenant": "contoso.onmicrosoft.com/../x"},
    "app-not-a-guid": {"rotation-entra-app": "'; DROP"},
    "app-path": {"rotation-entra-app": "11111111-2222-3333-4444-555555555555/addPassword"},
    "format": {"rotation-entra-format": "yaml"},
}


@pytest.mark.parametrize("tags", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_tags_are_refused_before_graph_is_called(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str, tags: dict[str, str]
) -> None:
    tags = {key: value.replace("{vendor}", stack.vendor.base_url) for key, value in tags.items()}
    managed = provision(stack, unique, extra_tags=tags)  # the operator's bind refuses it too
    seen = len(graph.requests)
    deliver_event(event(stack, unique))
    tick_sweeper()
    _, outcome, error = state_of(stack, unique)
    assert outcome == "misconfigured"
    assert any(tag in error for tag in tags) or "target 127.0.0.1:1 is not in" in error
    if stack.vendor.base_url in tags.values():
        assert "rotation-target must be Microsoft Graph's URL" in error
    assert versions(vault, unique) == [managed.first_version.properties.version]
    assert graph.requests[seen:] == []  # not one request reached Graph or Entra
    assert graph.passwords(managed.app_object_id) == [(managed.value["key_id"], marker(unique, "slot-a"))]


# ------------------------------------------------------------------ Graph's refusals: nothing half done


def test_without_ownership_the_error_names_what_to_grant(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str
) -> None:
    managed = provision(stack, unique)
    graph.set_owned(managed.app_object_id, False)  # an owner removed the service
    outcome = service.engine().rotate(stack.vault.vault_url, unique, trigger="manual")
    assert outcome.status == "failed", outcome.message
    assert "403 Authorization_RequestDenied" in outcome.message
    assert "Application.ReadWrite.OwnedBy" in outcome.message and "owner" in outcome.message
    assert versions(vault, unique) == [managed.first_version.properties.version]
    assert len(graph.passwords(managed.app_object_id)) == 1


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({"max_password_lifetime": timedelta(days=30)}, "CredentialInvalidLifetimeAsPerAppPolicy"),
        ({"passwords_allowed": False}, "CredentialTypeNotAllowedAsPerAppPolicy"),
    ],
    ids=["lifetime", "no-passwords"],
)
def test_an_app_management_policy_refusal_is_clear_and_changes_nothing(
    stack: LocalStack,
    vault: SecretClient,
    graph: GraphStandIn,
    unique: str,
    policy: dict[str, object],
    expected: str,
) -> None:
    managed = provision(stack, unique)
    for key, value in policy.items():
        setattr(graph, key, value)
    outcome = service.engine().rotate(stack.vault.vault_url, unique, trigger="manual")
    assert outcome.status in ("misconfigured", "failed"), outcome.message
    assert expected in outcome.message and "app management policy" in outcome.message
    assert versions(vault, unique) == [managed.first_version.properties.version]
    assert graph.passwords(managed.app_object_id) == [(managed.value["key_id"], marker(unique, "slot-a"))]
    assert graph.authenticates(managed.app_object_id, managed.value["client_secret"])


def test_an_app_at_its_credential_limit_with_passwords_not_ours_is_refused_clearly(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str
) -> None:
    managed = provision(stack, unique)
    graph.max_passwords = 3
    others = [graph.add_password(managed.app_object_id, f"team key {n}") for n in range(2)]
    outcome = service.engine().rotate(stack.vault.vault_url, unique, trigger="manual")
    assert outcome.status in ("misconfigured", "failed"), outcome.message
    assert "limit of password credentials (3, of which 2 were not made by this service" in outcome.message
    assert sorted(graph.passwords(managed.app_object_id)) == sorted(
        [
            (managed.value["key_id"], marker(unique, "slot-a")),
            *((k, f"team key {n}") for n, (k, _) in enumerate(others)),
        ]
    )


def test_a_failure_after_add_password_removes_what_was_added(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str
) -> None:
    managed = provision(stack, unique)
    only_the_first = [(managed.value["key_id"], marker(unique, "slot-a"))]
    # The rotator on its own (the engine would also revoke the slot after a failure):
    context = RotationContext(
        config=parse_config(vault.get_secret(unique).properties.tags, Settings.from_env()),
        secrets=vault,
        credential=stack.vault.credential(),
        settings=Settings.from_env(),
        secret_name=unique,
    )
    graph.fail_reads_after_add = 4  # the read that follows addPassword fails every retry
    with pytest.raises(UpstreamError, match="HTTP 500"):
        EntraAppRotator().create(context, "slot-b")
    assert graph.passwords(managed.app_object_id) == only_the_first
    # And through the engine: a failed rotation, Key Vault unchanged.
    graph.fail_reads_after_add = 4
    outcome = service.engine().rotate(stack.vault.vault_url, unique, trigger="manual")
    assert outcome.status == "failed", outcome.message
    assert graph.passwords(managed.app_object_id) == only_the_first
    assert versions(vault, unique) == [managed.first_version.properties.version]


# ------------------------------------------------------------------ the security model's attacks


def retag(vault: SecretClient, name: str, **changes: str) -> None:
    current = vault.get_secret(name).properties
    tags = {**(current.tags or {}), **{key.replace("_", "-"): value for key, value in changes.items()}}
    vault.update_secret_properties(name, current.version, tags=tags)


def attack_by_event_and_timer(stack: LocalStack, name: str) -> None:
    deliver_event(event(stack, name))
    tick_sweeper()


def refused(stack: LocalStack, name: str, expected: str) -> None:
    state = service.engine().ledger.get(stack.vault.vault_url, name)
    assert state is not None
    assert (state.last_outcome, state.state, state.rotation_id) == ("refused", "idle", "")
    assert expected in state.last_error, state.last_error


def test_an_unbound_target_is_refused(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str
) -> None:
    """An attacker tags a secret of their own for another team's application and waits."""
    victim = provision(stack, f"{unique}-victim", days=200)
    vault.set_secret(
        f"{unique}-att", "not-a-secret-at-all", tags=vault.get_secret(f"{unique}-victim").properties.tags
    )
    attack_by_event_and_timer(stack, f"{unique}-att")
    refused(stack, f"{unique}-att", "not bound")
    assert graph.passwords(victim.app_object_id) == [
        (victim.value["key_id"], marker(f"{unique}-victim", "slot-a"))
    ]


def test_pointing_a_bound_secret_at_another_application_is_refused(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str
) -> None:
    victim = provision(stack, f"{unique}-victim", days=200)
    attacker = provision(stack, f"{unique}-att")
    retag(vault, f"{unique}-att", rotation_entra_app=victim.app_object_id)
    attack_by_event_and_timer(stack, f"{unique}-att")
    refused(stack, f"{unique}-att", "tags changed since the binding (rotation-entra-app, slot_namespace)")
    # A tricked operator's bind: the attacker's value is no password of the victim's app.
    bound = service.engine().bind(stack.vault.vault_url, f"{unique}-att", requested_by="tricked operator")
    assert bound.status == "refused"
    assert "appId" in bound.message or "is not the application's password" in bound.message
    assert graph.passwords(victim.app_object_id) == [
        (victim.value["key_id"], marker(f"{unique}-victim", "slot-a"))
    ]
    assert graph.authenticates(victim.app_object_id, victim.value["client_secret"])
    assert graph.authenticates(attacker.app_object_id, attacker.value["client_secret"])


def test_a_value_that_does_not_authenticate_is_refused(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str
) -> None:
    """The right keyId and client id, a made-up secret: Entra refuses it, so nothing changes."""
    managed = provision(stack, unique)
    forged = {**managed.value, "client_secret": managed.value["client_secret"][:3] + "x" * 37}
    vault.set_secret(unique, json.dumps(forged), tags=vault.get_secret(unique).properties.tags)
    attack_by_event_and_timer(stack, unique)
    refused(stack, unique, "does not authenticate: Entra refused a token for application")
    assert "AADSTS7000215" in state_of(stack, unique)[2]
    assert graph.passwords(managed.app_object_id) == [(managed.value["key_id"], marker(unique, "slot-a"))]


def test_a_password_the_service_did_not_create_is_no_slot_and_stays_untouched(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str
) -> None:
    """A working secret of the app that is not the service's password on the current slot (an
    attacker who holds the CI pipeline's secret, say) proves nothing: refused, and retirements
    never remove it."""
    managed = provision(stack, unique, overlap="PT1S")
    foreign_id, foreign = graph.add_password(managed.app_object_id, "ci pipeline")
    stolen = {**managed.value, "client_secret": foreign, "key_id": foreign_id}
    original = vault.get_secret(unique)
    vault.set_secret(unique, json.dumps(stolen), tags=original.properties.tags)
    attack_by_event_and_timer(stack, unique)
    refused(stack, unique, f"password {foreign_id} is not the application's password on slot slot-a")

    # The owner puts the real value back; rotations and retirements leave the CI password alone.
    vault.set_secret(unique, original.value or "", tags=original.properties.tags)
    assert service.engine().rotate(stack.vault.vault_url, unique, trigger="manual").status == "rotated"
    time.sleep(1.1)
    tick_sweeper()
    assert service.engine().rotate(stack.vault.vault_url, unique, trigger="manual").status == "rotated"
    time.sleep(1.1)
    tick_sweeper()
    assert (foreign_id, "ci pipeline") in graph.passwords(managed.app_object_id)
    assert graph.authenticates(managed.app_object_id, foreign)
    assert len(graph.passwords(managed.app_object_id)) == 2


def test_a_copy_of_a_bound_secret_cannot_be_bound_to_its_slots(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str
) -> None:
    victim = provision(stack, f"{unique}-victim", days=200)
    copy = vault.get_secret(f"{unique}-victim")
    vault.set_secret(f"{unique}-copy", copy.value or "", tags=copy.properties.tags)
    bound = service.engine().bind(stack.vault.vault_url, f"{unique}-copy", requested_by="operator")
    assert bound.status == "refused"  # its marker names another secret; the slots are claimed
    attack_by_event_and_timer(stack, f"{unique}-copy")
    refused(stack, f"{unique}-copy", "not bound")
    assert len(graph.passwords(victim.app_object_id)) == 1


# ------------------------------------------------------------------ adopting an existing client secret


def test_adopt_proves_the_secret_and_a_rotation_follows(
    stack: LocalStack, vault: SecretClient, graph: GraphStandIn, unique: str
) -> None:
    app = graph.add_application(f"adopted {unique}")
    graph.add_password(app.id, "portal secret")  # made by hand earlier: never touched
    key_id, secret = graph.add_password(app.id, marker(unique, "blue"))
    vault.set_secret(unique, secret, expires_on=soon(60))  # a bare secret, as many apps keep one
    tags = {
        "rotation-rotator": "entra-app",
        "rotation-target": graph.base_url,
        "rotation-entra-tenant": graph.tenant_id,
        "rotation-entra-app": app.id,
        "rotation-entra-format": "secret",
        "rotation-slots": "blue,green",
        "rotation-current-slot": "green",  # wrong: the password is on blue
    }
    engine = service.engine()
    refused = engine.adopt(stack.vault.vault_url, unique, tags)
    assert refused.status == "refused"
    assert "is not the application's password on slot green" in refused.message

    adopted = engine.adopt(stack.vault.vault_url, unique, {**tags, "rotation-current-slot": "blue"})
    assert adopted.status == "adopted", adopted.message
    assert "slot green has no password" in adopted.message
    assert "1 other password(s) on the application: never touched" in adopted.message
    rotated = engine.rotate(stack.vault.vault_url, unique, trigger="manual")
    assert rotated.status == "rotated", rotated.message
    assert graph.authenticates(app.id, vault.get_secret(unique).value or "")
    assert (key_id, marker(unique, "blue")) in graph.passwords(app.id)  # in overlap until retired


# ------------------------------------------------------------------ nothing expires unseen


def test_expiring_client_secrets_not_under_rotation_are_reported(
    stack: LocalStack, graph: GraphStandIn, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    managed = provision(stack, unique)  # its slot-a password ends in 90 days, under rotation
    legacy = graph.add_application(f"legacy {unique}")
    soon_id, _ = graph.add_password(legacy.id, "set by hand", days=10)
    later_id, _ = graph.add_password(legacy.id, "long-lived", days=200)
    stranger = graph.add_application(f"not ours {unique}", owned=False)
    hidden_id, _ = graph.add_password(stranger.id, "someone else's", days=5)

    response = call_http("entra_expiring", "GET", "entra/expiring", params={"within": "P100D"})
    assert response.status_code == 200
    body = json.loads(response.get_body())
    listed = {row["key_id"]: row for row in body["value"]}
    assert listed[soon_id]["application_id"] == legacy.id
    assert (listed[soon_id]["credential"], listed[soon_id]["expired"]) == ("set by hand", "false")
    assert later_id not in listed  # beyond the horizon
    assert hidden_id not in listed  # an application the identity does not own
    assert managed.value["key_id"] not in listed  # under rotation
    assert all("secret" not in key for row in body["value"] for key in row)

    assert cli_run(["entra-expiring", "--within", "P30D"]) == EXIT_OK
    out = capsys.readouterr().out
    assert soon_id in out and later_id not in out
    assert "not under rotation" in out
    bad = call_http("entra_expiring", "GET", "entra/expiring", params={"within": "soon"})
    assert bad.status_code == 400


# ------------------------------------------------------------------ nothing leaks


def test_no_client_secret_reached_a_log(graph: GraphStandIn) -> None:
    issued = graph.issued_secrets()
    assert issued
    leaks = [line for line in SESSION_LOGS.lines if any(secret in line for secret in issued)]
    assert leaks == []
