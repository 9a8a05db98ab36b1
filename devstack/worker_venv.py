"""The Python 3.13 venv (.venv-worker/) that runs Azure's own Functions worker library against the app.

Azure runs Python 3.13 apps with PyPI's azure-functions-runtime; tests/test_real_worker.py drives
it in this venv, with the app's requirements.txt. scripts/setup makes it (`python -m
devstack.worker_venv`) and the test makes it too where it is missing or out of date.

    python -m devstack.worker_venv   # make or refresh .venv-worker; a note, not a failure, without 3.13
"""

import glob
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-worker"
RUNTIME = "azure-functions-runtime>=1.3,<2"
INSTALL_HINT = (
    "Python 3.13 not found: install it (pyenv install 3.13, or apt-get install python3.13) "
    "or set WORKER_PYTHON to a python3.13"
)


def find_python313() -> str | None:
    """WORKER_PYTHON, else python3.13 on PATH, else the newest pyenv 3.13."""
    candidates = [os.environ.get("WORKER_PYTHON", ""), shutil.which("python3.13") or ""]
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/3.13*/bin/python3.13"), reverse=True)
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and _is_313(candidate):
            return candidate
    return None


def _is_313(python: str) -> bool:
    check = [python, "-c", "import sys; sys.exit(sys.version_info[:2] != (3, 13))"]
    return subprocess.run(check, capture_output=True, check=False).returncode == 0


def _stamp() -> str:
    """What the venv was made from: the runtime's requirement and requirements.txt."""
    requirements = (ROOT / "requirements.txt").read_bytes()
    return f"{RUNTIME}\n{hashlib.sha256(requirements).hexdigest()}\n"


def worker_python() -> Path:
    return VENV / "bin" / "python"


def ensure(python313: str) -> Path:
    """Make (or refresh) .venv-worker with the runtime and requirements.txt; its python's path."""
    stamp_file = VENV / ".requirements-stamp"
    if worker_python().exists() and stamp_file.exists() and stamp_file.read_text() == _stamp():
        return worker_python()
    if not worker_python().exists():
        subprocess.run([python313, "-m", "venv", str(VENV)], check=True, capture_output=True)
    requirements = ["-r", str(ROOT / "requirements.txt"), RUNTIME]
    target = str(worker_python())
    try:
        # uv (installed into .venv by scripts/setup) takes seconds where pip takes a minute.
        subprocess.run(
            [sys.executable, "-m", "uv", "pip", "install", "-q", "--python", target, *requirements],
            check=True,
            capture_output=True,
        )
    except subprocess.CalledProcessError:
        subprocess.run(
            [target, "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
            check=True,
            capture_output=True,
        )
    stamp_file.write_text(_stamp())
    return worker_python()


def main() -> None:
    python313 = find_python313()
    if python313 is None:
        print(f"worker venv: skipped. {INSTALL_HINT}; tests/test_real_worker.py will skip")
        return
    try:
        made = ensure(python313)
    except subprocess.CalledProcessError as error:
        sys.stderr.write((error.stderr or b"").decode(errors="replace"))
        raise SystemExit(f"worker venv: failed: {' '.join(map(str, error.cmd))}") from None
    print(f"worker venv: {made} ({RUNTIME}, requirements.txt)")


if __name__ == "__main__":
    main()
