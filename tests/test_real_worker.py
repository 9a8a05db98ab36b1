"""function_app.py under Azure's own Python worker library (azure-functions-runtime, Python 3.13).

The suite runs on Python 3.11; the worker library needs 3.13, so tests/worker_harness.py runs it
in .venv-worker/ (made by devstack/worker_venv.py) as a subprocess, with this session's local
stack in its app settings: the function code inside the worker talks to the same Key Vault
emulator, Azurite and PostgreSQL. The worker indexes the app and decodes each trigger's input
from the host's InvocationRequest with its own converters; the harness keeps what the worker
would send the host, log records included.
"""

import base64
import json
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.keyvault.secrets import SecretClient

import function_app
from devstack import worker_venv
from devstack.runner import index
from devstack.stack import LocalStack, app_environment, provision_postgres_secret
from shared import service
from shared.sdk_logging import LEVEL_SETTING, SDK_LOGGERS, quiet_sdk_loggers
from tests.conftest import can_login, soon

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "worker_harness.py"
# The host's rules for a function name (Microsoft.Azure.WebJobs.Host's FunctionNameValidator).
FUNCTION_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,127}$")
DIRECTIONS = {"IN": 0, "OUT": 1, "INOUT": 2}
DATA_TYPES = {"UNDEFINED": 0, "STRING": 1, "BINARY": 2, "STREAM": 3}


@pytest.fixture(scope="module")
def worker_python() -> Path:
    python313 = worker_venv.find_python313()
    if python313 is None:
        pytest.skip(worker_venv.INSTALL_HINT)
    return worker_venv.ensure(python313)


def run_worker(python: Path, settings: dict[str, str], invocations: list[dict[str, Any]], out: Path) -> Any:
    """One worker process: init (indexing), metadata, then each invocation in turn."""
    request = json.dumps({"app_dir": str(ROOT), "invocations": invocations})
    env = {**os.environ, **settings, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(python), str(HARNESS), str(out)],
        input=request,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def event_grid_invocation(event: dict[str, Any]) -> dict[str, Any]:
    """The host sends one invocation per event, the event as JSON (either schema)."""
    return {
        "function": "keyvault_events",
        "input_data": [{"name": "event", "data": {"json": json.dumps(event)}}],
    }


def queue_invocation(body: str) -> dict[str, Any]:
    """A Storage queue message as the host sends it: the (base64-decoded) body and its metadata."""
    now = datetime.now(UTC)

    def when(moment: datetime) -> dict[str, str]:
        return {"json": json.dumps(moment.isoformat())}

    return {
        "function": "keyvault_events_queue",
        "input_data": [{"name": "message", "data": {"string": body}}],
        "trigger_metadata": {
            "Id": {"string": "9b2ce2e4-3b6f-4bb5-8a41-6f2a3d2a8f10"},
            "DequeueCount": {"json": "1"},
            "InsertionTime": when(now),
            "ExpirationTime": when(now + timedelta(days=7)),
            "NextVisibleTime": when(now + timedelta(minutes=10)),
            "PopReceipt": {"string": "AgAAAAMAAAAAAAAA"},
            "QueueTrigger": {"string": body},
        },
    }


def timer_invocation() -> dict[str, Any]:
    now = datetime.now(UTC)
    status = {
        "Last": (now - timedelta(minutes=5)).isoformat(),
        "Next": (now + timedelta(minutes=5)).isoformat(),
        "LastUpdated": now.isoformat(),
    }
    info = {"Schedule": {"AdjustForDST": True}, "ScheduleStatus": status, "IsPastDue": False}
    return {
        "function": "rotation_sweeper",
        "input_data": [{"name": "timer", "data": {"json": json.dumps(info)}}],
    }


def http_get_invocation(function: str, path: str, route_params: dict[str, str]) -> dict[str, Any]:
    """The host's RpcHttp for a GET: route parameters in params, the query string in query."""
    rpc_http = {
        "method": "GET",
        "url": f"http://localhost:7071/api/{path}",
        "headers": {"accept": "application/json"},
        "params": route_params,
        "query": {},
        "body": {"bytes": base64.b64encode(b"").decode()},
    }
    return {"function": function, "input_data": [{"name": "req", "data": {"http": rpc_http}}]}


def versions(vault: SecretClient, name: str) -> list[str]:
    return [p.version or "" for p in vault.list_properties_of_secret_versions(name)]


class Run:
    def __init__(self, result: Any, names: dict[str, str]) -> None:
        self.result = result
        self.names = names  # trigger kind -> the secret it was driven with
        self.by_function = {i["function"]: i for i in result.get("invocations", [])}


@pytest.fixture(scope="module")
def worker_run(
    worker_python: Path,
    stack: LocalStack,
    app_settings: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Run]:
    """Each trigger kind once through the worker, each on its own freshly provisioned secret."""
    unique = f"w{os.urandom(4).hex()}"
    names = {kind: f"{unique}{kind}" for kind in ("eg", "ce", "queue", "timer")}
    provision_postgres_secret(stack, names["eg"], prefix=names["eg"], expires_on=soon(20))
    provision_postgres_secret(stack, names["ce"], prefix=names["ce"], expires_on=soon(20))
    provision_postgres_secret(stack, names["queue"], prefix=names["queue"], expires_on=soon(20))
    provision_postgres_secret(stack, names["timer"], prefix=names["timer"], expires_on=soon(3))
    invocations = [
        event_grid_invocation(stack.vault.events_for(names["eg"], schema="EventGridSchema")),
        event_grid_invocation(stack.vault.events_for(names["ce"], schema="CloudEventSchemaV1_0")),
        queue_invocation(json.dumps(stack.vault.events_for(names["queue"], schema="EventGridSchema"))),
        timer_invocation(),
        http_get_invocation(
            "secret_rotation_status", f"secrets/{names['eg']}/rotation", {"name": names["eg"]}
        ),
    ]
    out = tmp_path_factory.mktemp("worker") / "result.json"
    result = run_worker(worker_python, app_settings, invocations, out)
    yield Run(result, names)


def test_the_worker_indexes_every_function(worker_run: Run) -> None:
    result = worker_run.result
    assert result["init_status"] == 1, result["init_error"]  # StatusResult.Success
    assert result["use_default_metadata_indexing"] is False
    declared = {str(f.get_function_name()) for f in index(function_app.app)}
    assert {m["name"] for m in result["metadata"]} == declared
    assert len(result["metadata"]) == len(declared) == 15


def test_the_workers_metadata_is_what_get_function_json_says(worker_run: Run) -> None:
    metadata = {m["name"]: m for m in worker_run.result["metadata"]}
    for function in index(function_app.app):
        name = str(function.get_function_name())
        declared = json.loads(function.get_function_json())
        indexed = metadata[name]
        assert indexed["script_file"] == declared["scriptFile"] == "function_app.py"
        assert (indexed["entry_point"], indexed["language"]) == (name, "python")
        assert indexed["directory"] == str(ROOT)
        assert [json.loads(raw) for raw in indexed["raw_bindings"]] == declared["bindings"]
        assert indexed["bindings"] == {
            b["name"]: {
                "type": b["type"],
                "direction": DIRECTIONS[b["direction"]],
                "data_type": DATA_TYPES[b["dataType"]] if "dataType" in b else None,
            }
            for b in declared["bindings"]
        }
        assert indexed["retry_options"] is None
        assert indexed["properties"] == {"worker_indexed": "True"}
    kinds = {m["name"]: sorted(b["type"] for b in m["bindings"].values()) for m in metadata.values()}
    assert kinds["keyvault_events"] == ["eventGridTrigger"]
    assert kinds["keyvault_events_queue"] == ["queueTrigger"]
    assert kinds["rotation_sweeper"] == ["timerTrigger"]
    assert kinds["secret_rotation_status"] == ["http", "httpTrigger"]


def test_function_names_follow_the_hosts_rules(worker_run: Run) -> None:
    names = [m["name"] for m in worker_run.result["metadata"]]
    assert all(FUNCTION_NAME.fullmatch(name) for name in names), names
    assert len({name.lower() for name in names}) == len(names)
    ids = [m["function_id"] for m in worker_run.result["metadata"]]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(("kind", "function"), [("eg", "keyvault_events"), ("ce", "keyvault_events")])
def test_event_grid_deliveries_in_both_schemas_rotate_through_the_worker(
    worker_run: Run, stack: LocalStack, vault: SecretClient, kind: str, function: str
) -> None:
    name = worker_run.names[kind]
    invocation = next(
        i for i in worker_run.result["invocations"] if i["function"] == function and _mentions(i, name)
    )
    assert invocation["status"] == "Success", invocation["exception"]
    assert len(versions(vault, name)) == 2
    newest = vault.get_secret(name)
    assert (newest.properties.tags or {})["rotation-current-slot"] == f"{name}_green"
    assert can_login(stack, json.loads(newest.value or "{}"))
    history = service.engine().ledger.rotations(stack.vault.vault_url, name)
    assert [record.trigger for record in history] == ["event:SecretNearExpiry"]


def test_a_queue_message_is_consumed_and_rotates_through_the_worker(
    worker_run: Run, stack: LocalStack, vault: SecretClient
) -> None:
    name = worker_run.names["queue"]
    invocation = worker_run.by_function["keyvault_events_queue"]
    # Success is what makes the host delete the message from the queue (a failure leaves it to retry).
    assert invocation["status"] == "Success", invocation["exception"]
    assert len(versions(vault, name)) == 2
    assert can_login(stack, json.loads(vault.get_secret(name).value or "{}"))
    history = service.engine().ledger.rotations(stack.vault.vault_url, name)
    assert [record.trigger for record in history] == ["event:SecretNearExpiry"]


def test_a_timer_tick_runs_the_sweep_through_the_worker(
    worker_run: Run, stack: LocalStack, vault: SecretClient
) -> None:
    name = worker_run.names["timer"]
    invocation = worker_run.by_function["rotation_sweeper"]
    assert invocation["status"] == "Success", invocation["exception"]
    assert len(versions(vault, name)) == 2
    assert can_login(stack, json.loads(vault.get_secret(name).value or "{}"))
    history = service.engine().ledger.rotations(stack.vault.vault_url, name)
    assert [record.trigger for record in history] == ["sweep"]
    assert any(line["message"].startswith("sweep done: ") for line in invocation["host_logs"])


def test_an_http_get_answers_200_json_through_the_worker(worker_run: Run) -> None:
    invocation = worker_run.by_function["secret_rotation_status"]
    assert invocation["status"] == "Success", invocation["exception"]
    response = invocation["return_value"]
    assert response["kind"] == "http"
    assert response["status_code"] == "200"
    headers = {key.lower(): value for key, value in response["headers"].items()}
    assert headers["content-type"].startswith("application/json")
    assert headers["cache-control"] == "no-store"
    body = json.loads(response["body"])
    name = worker_run.names["eg"]
    assert (body["name"], body["managed"], body["last_outcome"]) == (name, True, "rotated")
    assert body["current_slot"] == f"{name}_green"
    assert "password" not in response["body"]


def _mentions(invocation: dict[str, Any], name: str) -> bool:
    return any(line["message"].startswith(f"{name}: ") for line in invocation["host_logs"])


def _sdk_dumps(lines: list[dict[str, str]]) -> list[dict[str, str]]:
    return [
        line
        for line in lines
        if line["logger"].startswith(("azure.core", "azure.identity"))
        or "Request URL" in line["message"]
        or "Response status" in line["message"]
    ]


def test_only_the_apps_own_lines_reach_the_host_during_a_rotation(worker_run: Run) -> None:
    name = worker_run.names["eg"]
    invocation = next(i for i in worker_run.result["invocations"] if _mentions(i, name))
    lines = invocation["host_logs"]
    assert _sdk_dumps(lines) == []
    assert not [line for line in lines if f"/secrets/{name}" in line["message"]]
    outcome = [
        line for line in lines if line["logger"] == "shared.engine" and line["message"].startswith(name)
    ]
    assert [line["message"].split(": ")[1] for line in outcome] == ["rotated"]


def test_the_sdk_level_setting_lets_the_sdk_lines_through_again(
    worker_python: Path,
    stack: LocalStack,
    app_settings: dict[str, str],
    tmp_path: Path,
) -> None:
    """The control: the same capture sees azure-core's request dumps once the setting asks for them."""
    name = f"w{os.urandom(4).hex()}sdk"
    provision_postgres_secret(stack, name, prefix=name, expires_on=soon(20))
    event = stack.vault.events_for(name, schema="EventGridSchema")
    result = run_worker(
        worker_python,
        {**app_settings, LEVEL_SETTING: "INFO"},
        [event_grid_invocation(event)],
        tmp_path / "r.json",
    )
    (invocation,) = result["invocations"]
    assert invocation["status"] == "Success", invocation["exception"]
    dumps = _sdk_dumps(invocation["host_logs"])
    assert any("Request URL" in line["message"] and f"/secrets/{name}" in line["message"] for line in dumps)


def test_sdk_loggers_default_to_warning_and_follow_the_setting() -> None:
    try:
        assert quiet_sdk_loggers({}) == logging.WARNING
        assert quiet_sdk_loggers({LEVEL_SETTING: "not a level"}) == logging.WARNING
        with app_environment({LEVEL_SETTING: "info"}):
            assert quiet_sdk_loggers() == logging.INFO
        assert {logging.getLogger(n).level for n in SDK_LOGGERS} == {logging.INFO}
    finally:
        quiet_sdk_loggers({})
    assert logging.getLogger("azure.core.pipeline.policies.http_logging_policy").level == logging.WARNING
