"""A kind of credential the service has never heard of, added by installing a package.

`tests/plugins/sample_rotator` is an ordinary third-party distribution: its only link
to the service is an entry point in the `secret_rotation.rotators` group. It is built
and installed with pip at test time, and a secret tagged `rotation-rotator=sample-token`
is then rotated by a Key Vault event through the registered functions, with no change
to the service.

The package is installed with `pip install --target` into a directory put on sys.path,
not into the venv itself: the venv is shared with other runs, and a killed test run
must not leave a plug-in installed in it. Entry points are found on sys.path either way.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from types import ModuleType

import pytest
from azure.keyvault.secrets import SecretClient

from devstack.stack import LocalStack
from rotators import ENTRY_POINT_GROUP, RotatorRegistry
from shared import service
from shared.ledger import IDLE
from tests.conftest import soon
from tests.hosting import deliver_event, tick_sweeper

PLUGIN_SOURCE = Path(__file__).parent / "plugins" / "sample_rotator"
TOKEN_SERVICE = "tokens.example.test"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory, app_settings: dict[str, str]) -> Iterator[ModuleType]:
    assert "sample-token" not in RotatorRegistry().names()
    work = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(PLUGIN_SOURCE, work / "sample_rotator")  # builds write into the tree
    site = work / "site-packages"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q"]
    if find_spec("setuptools") and find_spec("wheel"):
        command.append("--no-build-isolation")  # offline; otherwise pip fetches the build backend
    result = subprocess.run(
        [*command, "--target", str(site), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]

    allowed = os.environ["ROTATION_ALLOWED_TARGETS"]
    os.environ["ROTATION_ALLOWED_TARGETS"] = f"{allowed},{TOKEN_SERVICE}:443"
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    service.use_engine(None)  # the next trigger builds an engine that sees the new entry point
    try:
        yield importlib.import_module("sample_rotator")
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("sample_rotator", None)
        importlib.invalidate_caches()
        os.environ["ROTATION_ALLOWED_TARGETS"] = allowed
        service.use_engine(None)


def test_an_installed_plugin_is_found_by_its_entry_point(plugin: ModuleType) -> None:
    registry = RotatorRegistry()
    assert "sample-token" in registry.names()
    rotator = registry.get("sample-token")
    assert type(rotator).__module__ == "sample_rotator"
    assert ENTRY_POINT_GROUP == "secret_rotation.rotators"


def test_a_plugin_credential_is_rotated_by_an_event_with_no_change_to_the_service(
    stack: LocalStack, vault: SecretClient, plugin: ModuleType, unique: str
) -> None:
    # Given a secret of the plug-in's kind, 20 days from expiry, on slot blue
    old_token: str = plugin.issue(unique, "blue")
    tags = {
        "rotation-rotator": "sample-token",
        "rotation-target": f"https://{TOKEN_SERVICE}/{unique}",
        "rotation-slots": "blue,green",
        "rotation-current-slot": "blue",
        "rotation-validity": "P90D",
        "rotation-overlap": "PT1S",
    }
    old_value = json.dumps({"engine": "sample-token", "slot": "blue", "token": old_token})
    first = vault.set_secret(
        unique, old_value, tags=tags, expires_on=soon(20), content_type="application/json"
    )
    assert stack.operator_bind(unique) == "bound"  # the plug-in proves the token holds slot blue
    try:
        # When Key Vault's SecretNearExpiry event arrives
        deliver_event([stack.vault.events_for(unique)])

        # Then the plug-in issued a token on slot green, stored as a new version; both work in the overlap
        newest = vault.get_secret(unique)
        assert newest.properties.version != first.properties.version
        assert (newest.properties.tags or {})["rotation-current-slot"] == "green"
        new_token = json.loads(newest.value or "{}")["token"]
        assert plugin.authenticates(new_token)
        assert plugin.authenticates(old_token)

        # And after the overlap the sweeper has the plug-in retire slot blue
        time.sleep(1.1)
        tick_sweeper()
        assert not plugin.authenticates(old_token)
        assert plugin.authenticates(new_token)
        ledger = service.engine().ledger
        state = ledger.get(stack.vault.vault_url, unique)
        assert state is not None
        assert (state.state, state.current_slot, state.last_outcome) == (IDLE, "green", "rotated")
        (record,) = ledger.rotations(stack.vault.vault_url, unique)
        assert record.retired_on is not None
    finally:
        vault.begin_delete_secret(unique)  # once the plug-in is gone, nothing could rotate it
