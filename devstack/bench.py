"""`python -m devstack.bench`: performance figures on the local stack. Prints numbers; asserts nothing.

Measures what an operator would ask about: how long a cold worker takes to import the
app, how long one rotation takes end to end and per step, how fast stale or duplicate
events are dropped, and how long the status and list routes take with many managed
secrets. Figures come from the local stand-ins on loopback, so they bound the service's
own overhead; against Azure, network round trips to Key Vault and the upstream dominate.
"""

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50={statistics.median(ordered):.1f}ms p95={p95:.1f}ms n={len(ordered)}"


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def cold_import_ms(runs: int) -> list[float]:
    code = "import time; t=time.perf_counter(); import function_app; print((time.perf_counter()-t)*1000)"
    samples = []
    for _ in range(runs):
        output = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        samples.append(float(output.strip().splitlines()[-1]))
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--secrets", type=int, default=20)
    parser.add_argument("--imports", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the dropped-event lines would drown the figures

    print(f"cold import of function_app: {percentiles(cold_import_ms(args.imports))}", flush=True)

    from devstack.stack import LocalStack, provision_postgres_secret  # noqa: PLC0415 - after the cold import
    from shared import api, service  # noqa: PLC0415
    from shared.events import parse_payload  # noqa: PLC0415

    with LocalStack() as stack:
        os.environ.update(stack.app_settings())
        engine = service.engine()
        names = [f"bench-{index}" for index in range(args.secrets)]
        expires = datetime.now(UTC) + timedelta(days=200)
        for index, name in enumerate(names):
            provision_postgres_secret(stack, name, prefix=f"bench_{index}", expires_on=expires, overlap="P1D")

        vault_url = stack.vault.vault_url
        rotations = [timed(partial(engine.rotate, vault_url, name, trigger="bench")) for name in names]
        print(f"manual rotation, end to end: {percentiles(rotations)}")
        steps: dict[str, list[float]] = {}
        for name in names:
            (record,) = engine.ledger.history(stack.vault.vault_url, name, 1)
            for step, milliseconds in json.loads(record.step_timings).items():
                steps.setdefault(step, []).append(milliseconds)
        for step, samples in sorted(steps.items()):
            print(f"  step {step}: {percentiles(samples)}")

        stale = [json.dumps([stack.vault.events_for(name, version=None)]).encode() for name in names]
        engine_events = [parse_payload(body)[0] for body in stale]
        for name in names:  # make every event stale: the secret moved on
            engine.rotate(stack.vault.vault_url, name, trigger="bench", emergency=True)
        drops = [timed(partial(engine.handle_event, event)) for event in engine_events]
        print(f"stale event dropped: {percentiles(drops)}")

        status = [timed(partial(api.status, engine, name, {})) for name in names]
        print(f"GET /secrets/{{name}}/rotation: {percentiles(status)}")
        listing = [timed(lambda: api.list_rotations(engine, {"page_size": "200"})) for _ in range(5)]
        print(f"GET /rotations with {args.secrets} managed secrets: {percentiles(listing)}")
        service.use_engine(None)


if __name__ == "__main__":
    main()
