"""The lowest azure-functions that requirements.txt admits decodes a CloudEvents delivery.

Older versions hand a CloudEvents delivery to the function as an EventGridEvent with an empty
type: the event is dropped as unsupported, the invocation succeeds, Event Grid never redelivers.
This installs the declared floor from PyPI into a scratch directory and asks it.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REQUIREMENTS = Path(__file__).parent.parent / "requirements.txt"


def declared_floor() -> str:
    match = re.search(r"^azure-functions>=([0-9.]+)", REQUIREMENTS.read_text(), re.MULTILINE)
    assert match, "requirements.txt must give azure-functions a lower bound"
    return match.group(1)


def test_the_lowest_declared_azure_functions_has_cloud_events(tmp_path: Path) -> None:
    floor = declared_floor()
    install = [sys.executable, "-m", "uv", "pip", "install", "-q", "--target", str(tmp_path)]
    done = subprocess.run(
        [*install, f"azure-functions=={floor}"], capture_output=True, text=True, timeout=180, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot install azure-functions=={floor} from the package index: {done.stderr[-200:]}")
    probe = "import azure.functions as f; print(hasattr(f, 'CloudEvent'))"
    answer = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); {probe}"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert answer.stdout.split()[-1] == "True", f"azure-functions {floor} has no CloudEvent type"
