"""The README's curl and CLI examples run as written against `scripts/local`'s stack."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from devstack.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- local-examples -->\n```sh\n(.*?)```\n<!-- /local-examples -->", text, re.S)
    assert match, "README.md lost its local-examples block"
    return match.group(1)


def test_readme_local_examples_run_as_written(tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    server = subprocess.Popen(
        [sys.executable, "-m", "devstack.serve", "--port", str(free_port()), "--env-file", str(env_file)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists():
            assert server.poll() is None, server.stdout.read() if server.stdout else "devstack.serve exited"
            assert time.monotonic() < deadline, "devstack.serve did not come up in 60 s"
            time.sleep(0.2)
        # The one substitution: this run's env file instead of the default .devstack/env.
        script = "set -euo pipefail\n" + readme_block().replace(".devstack/env", str(env_file))
        environment = {key: value for key, value in os.environ.items() if not key.startswith("ROTATION_")}
        result = subprocess.run(
            ["bash", "-c", script],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env=environment,
            check=False,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert '"status": "rotated"' in out
    assert re.search(r"[}\n]401\n", out), "the call without a key should print 401"
    assert "state             overlap" in out
    # The CLI's four rotations: the emergency one, the API key, the storage key, the client secret
    assert out.count("rotated: new version") == 4
    assert re.search(r"billing-api-key\s+api-key\s+.*overlap", out), "the list shows the API key in overlap"
    assert re.search(r"media-storage-key\s+storage-key\s+.*overlap", out)
    assert re.search(r"partner-app-secret\s+entra-app\s+.*overlap", out)
    assert "dry_run_passed: created, verified and revoked" in out
    assert "orders-db" in out
    assert not env_file.exists()
