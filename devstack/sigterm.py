"""SIGTERM for the long-running tools (chaos, bench, demo); standard library only, so the
benchmark can install it before its cold-start measurement imports anything else."""

import signal


def stop_on_sigterm() -> None:
    """SIGTERM (a `kill`, a CI timeout) ends the process as Ctrl-C would: the `finally` and
    `with` blocks run, so the stack's PostgreSQL and Azurite stop with it."""

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
