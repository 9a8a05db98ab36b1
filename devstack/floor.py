"""The function-facing tests on the lowest azure-functions that requirements.txt admits.

requirements.txt declares `azure-functions>=<floor>`; the main .venv gets the newest release, so
without this nothing runs the app on the floor a user's `pip install` may pick. This makes
.venv-floor (the .venv's Python, requirements-dev.txt, azure-functions pinned to the floor) and
runs there the tests that import function_app or azure.functions, or call the functions through
tests/hosting.py, the way the Functions host does.

    python -m devstack.floor            # make or refresh .venv-floor, run the function-facing tests
    python -m devstack.floor -k events  # extra arguments go to pytest
"""

import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-floor"
REQUIREMENTS = ROOT / "requirements.txt"
DEV_REQUIREMENTS = ROOT / "requirements-dev.txt"
# A test file is function-facing when it imports the app or the library, or the host helpers.
_FUNCTION_FACING = re.compile(
    r"^\s*(?:import|from)\s+(?:function_app|azure\.functions|tests\.hosting)\b", re.MULTILINE
)
# Not run here: the real worker has its own venv (.venv-worker); the floor test installs the floor itself.
_ELSEWHERE = {"test_real_worker.py", "test_dependency_floor.py"}


def declared_floor() -> str:
    match = re.search(r"^azure-functions>=([0-9.]+)", REQUIREMENTS.read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit("floor: requirements.txt gives azure-functions no lower bound (azure-functions>=X)")
    return match.group(1)


def function_facing_tests() -> list[Path]:
    tests = sorted((ROOT / "tests").glob("test_*.py"))
    return [t for t in tests if t.name not in _ELSEWHERE and _FUNCTION_FACING.search(t.read_text())]


def python() -> Path:
    return VENV / "bin" / "python"


def _stamp(floor: str) -> str:
    digest = hashlib.sha256(REQUIREMENTS.read_bytes() + DEV_REQUIREMENTS.read_bytes()).hexdigest()
    return f"azure-functions=={floor}\n{digest}\n"


def ensure(floor: str) -> Path:
    """Make (or refresh) .venv-floor: requirements-dev.txt with azure-functions at the floor."""
    stamp_file = VENV / ".requirements-stamp"
    if python().exists() and stamp_file.exists() and stamp_file.read_text() == _stamp(floor):
        return python()
    uv = [sys.executable, "-m", "uv"]
    if not python().exists():
        # --seed: pip in the venv, for the tests that pip-install a plug-in (test_third_party_rotator)
        subprocess.run([*uv, "venv", "-q", "--seed", "--python", sys.executable, str(VENV)], check=True)
    pinned = ["-r", str(DEV_REQUIREMENTS), f"azure-functions=={floor}"]
    subprocess.run([*uv, "pip", "install", "-q", "--python", str(python()), *pinned], check=True)
    stamp_file.write_text(_stamp(floor))
    return python()


def installed_version(venv_python: Path) -> str:
    probe = "from importlib.metadata import version; print(version('azure-functions'))"
    return subprocess.run(
        [str(venv_python), "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()


def main(argv: list[str]) -> int:
    floor = declared_floor()
    started = time.monotonic()
    try:
        venv_python = ensure(floor)
    except subprocess.CalledProcessError as error:
        print(f"floor: making {VENV.name} failed: {' '.join(map(str, error.cmd))}", file=sys.stderr)
        return 2
    version = installed_version(venv_python)
    if version.removesuffix(".0") != floor.removesuffix(".0"):
        print(f"floor: {VENV.name} has azure-functions {version}, not the floor {floor}", file=sys.stderr)
        return 2
    tests = function_facing_tests()
    ready = time.monotonic() - started
    print(f"floor: azure-functions {version} in {VENV.name} ({ready:.0f} s); {len(tests)} test files")
    done = subprocess.run([str(venv_python), "-m", "pytest", *map(str, tests), *argv], cwd=ROOT, check=False)
    took = time.monotonic() - started
    print(f"floor: azure-functions {version}: pytest exited {done.returncode} after {took:.0f} s")
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
