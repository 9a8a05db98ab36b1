"""`scripts/bench [--quick]`: what a rotation costs, how fast a fleet rotates. Prints tables; asserts nothing.

Sections:

1. Key Vault transactions per rotation, counted at the emulator, per rotator kind, on the
   happy path: the event-driven rotation, then the retirement by the sweeper. Every
   transaction is billed and spends the vault's throttling budget.
2. Service time per step of one rotation on loopback (median), so a regression shows where.
3. Fleet: secrets all due at once, swept by the timer function's engine, against a vault
   that throttles like Key Vault (300 secret creates and 4,000 other transactions per 10 s,
   429 beyond, no Retry-After). Ceiling = fleet / (creates per second); the ratio to the
   ceiling is ceiling time / wall time, so 1.0 is Key Vault's own limit.
4. Cold start: importing `function_app` in a fresh interpreter vs a bare azure-functions app.
5. Status at scale: `GET /api/rotations`, first page and a full scan, over many managed secrets:
   listing the vault, then from the inventory the sweep keeps in the ledger.

`--quick` scales the fleet and the status vault down (the fleet keeps the same number of
windows and the same creates per second, so its ratio compares) and takes fewer samples.
Figures come from stand-ins on loopback sharing this machine's cores: they bound the
service's own overhead; against Azure, round trips to Key Vault and the upstream add to them.
"""

import argparse
import json
import logging
import os
import ssl
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devstack.sigterm import stop_on_sigterm

if TYPE_CHECKING:
    from devstack.stack import LocalStack
    from shared.engine import RotationEngine

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("postgres", "api-key", "storage-key")
STEPS = ("create", "verify", "write", "validate")
REST = "the rest: claim, reads, ledger"
END_TO_END = "rotation, end to end (event)"


@dataclass(frozen=True)
class Scale:
    fleet: int
    creates: int  # per window, at the vault
    others: int
    window: float  # seconds
    status_secrets: int
    samples: int
    imports: int


FULL = Scale(fleet=1000, creates=300, others=4000, window=10.0, status_secrets=10_000, samples=20, imports=7)
QUICK = Scale(fleet=200, creates=60, others=800, window=2.0, status_secrets=2_000, samples=5, imports=3)


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    sys.stdout.flush()


class OffsetClock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


@contextmanager
def engine_for(env: dict[str, str], **options: Any) -> Iterator["RotationEngine"]:
    """An engine built exactly as the function app builds it, from these app settings."""
    from devstack.stack import app_environment  # noqa: PLC0415 - after the cold-start measurement
    from shared import service  # noqa: PLC0415
    from shared.settings import Settings  # noqa: PLC0415

    with app_environment(env):
        yield service.build_engine(Settings.from_env(), **options)


# ----------------------------------------------------------------------------- 1 and 2


def cost_per_rotation(stack: "LocalStack", samples: int) -> None:
    from devstack.stack import (  # noqa: PLC0415
        provision_api_key_secret,
        provision_postgres_secret,
        provision_storage_key_secret,
    )
    from shared.events import parse_payload  # noqa: PLC0415

    vault = stack.vault
    env = {
        **stack.app_settings(),
        "LEDGER_TABLE_PREFIX": "benchcost",
        "ROTATION_SWEEP_CONCURRENCY": "1",  # service times, not contention
        "ROTATION_ALLOWED_TARGETS": f"{stack.app_settings()['ROTATION_ALLOWED_TARGETS']},"
        "*.blob.core.windows.net:443",
    }
    expires = datetime.now(UTC) + timedelta(days=20)
    provision: dict[str, Callable[[str, int], object]] = {
        "postgres": lambda name, i: provision_postgres_secret(
            stack, name, prefix=f"bench_{i}", expires_on=expires, overlap="PT1M"
        ),
        "api-key": lambda name, i: provision_api_key_secret(stack, name, expires_on=expires, overlap="PT1M"),
        "storage-key": lambda name, i: provision_storage_key_secret(
            stack, name, f"stbench{i}", expires_on=expires, overlap="PT1M"
        ),
    }
    cost_rows, step_rows = [], {step: [step] for step in (*STEPS, REST, END_TO_END, "retire")}
    summary = []
    clock = OffsetClock()
    with engine_for(env, clock=clock.now, probe=lambda url, deadline: None) as engine:
        for kind in KINDS:
            names = [f"bench-{kind}-{i}" for i in range(samples + 1)]
            offset = KINDS.index(kind) * 1000
            for i, name in enumerate(names):
                provision[kind](name, offset + i)

            def rotate_by_event(name: str) -> tuple[dict[str, int], float]:
                event = parse_payload(json.dumps([vault.events_for(name)]).encode())[0]
                vault.reset_counts()
                started = time.perf_counter()
                outcome = engine.handle_event(event)
                elapsed = (time.perf_counter() - started) * 1000
                if outcome.status != "rotated":
                    raise RuntimeError(f"{name}: {outcome.status}: {outcome.message}")
                return vault.transactions(), elapsed

            first, _ = rotate_by_event(names[0])  # a fresh worker: empty admin-secret cache
            rotations = [rotate_by_event(name) for name in names[1:]]
            clock.offset += timedelta(minutes=2)  # every overlap is over
            vault.reset_counts()
            retired = [o for o in engine.sweep() if o.status == "retired"]
            counts = dict(vault.request_counts)
            lists = counts.get(("GET", "/secrets"), 0)
            retire_each = (sum(counts.values()) - lists) / max(1, len(retired))
            rotate_each = median([float(tx["creates"] + tx["others"]) for tx, _ in rotations])
            total = rotate_each + retire_each
            summary.append(f"{kind}={total:g}")
            cost_rows.append(
                [
                    kind,
                    f"{rotate_each:g}",
                    f"{retire_each:g}",
                    f"{total:g}",
                    f"{first['creates'] + first['others'] + retire_each:g}",
                    str(lists),
                ]
            )
            timings: dict[str, list[float]] = {}
            for name, (_, end_to_end) in zip(names[1:], rotations, strict=True):
                (record,) = engine.ledger.history(vault.vault_url, name, 1)
                recorded = json.loads(record.step_timings)
                for step, milliseconds in recorded.items():
                    timings.setdefault(step, []).append(milliseconds)
                timings.setdefault(REST, []).append(end_to_end - sum(recorded.get(s, 0) for s in STEPS))
                timings.setdefault(END_TO_END, []).append(end_to_end)
            for step, row in step_rows.items():
                row.append(f"{median(timings.get(step, [])):.1f}")
    print_table(
        "Key Vault transactions per rotation (happy path, counted at the emulator; median)",
        ["rotator", "rotate (event)", "retire (sweep)", "total", "first in a fresh worker", "sweep lists"],
        cost_rows,
    )
    print(f"  transactions per rotation: {' '.join(summary)}")
    print(
        "  rotate = read the secret, write the new version; retire = disable the old version.\n"
        "  Admin secrets come from a 5-minute cache: the PostgreSQL secrets here share one admin\n"
        "  secret, each API-key secret has its own (one vendor account each), so its read is not\n"
        "  amortised; storage keys need none (managed identity on ARM). A sweep lists 25 per call."
    )
    print_table(
        f"Service time per step, ms (median of {samples}, loopback)",
        ["step", *KINDS],
        list(step_rows.values()),
    )


# ----------------------------------------------------------------------------- 3


class VaultProcess:
    """The Key Vault emulator in a process of its own, as Key Vault's CPU is not the worker's."""

    def __init__(self, state_dir: Path, name: str) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "devstack.keyvault", "--state-dir", str(state_dir), "--vault-name", name],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        first_line = self._process.stdout.readline() if self._process.stdout else ""
        self.info = json.loads(first_line)
        self.vault_url: str = self.info["vault_url"]
        self.ca_path: str = self.info["ca_path"]

    def env(self) -> dict[str, str]:
        return {
            "ROTATION_ALLOWED_VAULTS": self.vault_url,
            "KEYVAULT_CA_BUNDLE": self.ca_path,
            "IDENTITY_ENDPOINT": self.info["identity_endpoint"],
            "IDENTITY_HEADER": self.info["identity_header"],
        }

    def control(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(  # noqa: S310 - the emulator's own https URL
            f"{self.vault_url}/_emulator/{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Content-Type": "application/json"},
        )
        context = ssl.create_default_context(cafile=self.ca_path)
        with urllib.request.urlopen(request, context=context, timeout=30) as response:  # noqa: S310 - same
            return json.loads(response.read() or b"null")

    def transactions(self) -> dict[str, int]:
        return dict(self.control("GET", "requests")["transactions"])

    def close(self) -> None:
        self._process.terminate()
        self._process.wait(10)


def fleet(stack: "LocalStack", scale: Scale, concurrency: int) -> None:
    from azure.identity import ManagedIdentityCredential  # noqa: PLC0415
    from azure.keyvault.secrets import SecretClient  # noqa: PLC0415

    from devstack.stack import ADMIN_SECRET, provision_postgres_secret  # noqa: PLC0415

    vault = VaultProcess(stack.base_dir / "fleet-vault", "fleet")
    try:
        env = {
            **stack.app_settings(),
            **vault.env(),
            "LEDGER_TABLE_PREFIX": "benchfleet",
            "ROTATION_SWEEP_CONCURRENCY": str(concurrency),
            "KEYVAULT_SECRET_CREATES_LIMIT": str(scale.creates),
            "KEYVAULT_TRANSACTIONS_LIMIT": str(scale.others // 2),
            "KEYVAULT_LIMIT_WINDOW": f"PT{scale.window:g}S",
        }
        with engine_for(env, probe=lambda url, deadline: None) as engine:
            credential = ManagedIdentityCredential()  # built while the fleet vault's identity env is set
            client = SecretClient(
                vault.vault_url,
                credential,
                verify_challenge_resource=False,
                connection_verify=vault.ca_path,
                api_version="7.6",
            )
            admin = stack.secret_client().get_secret(ADMIN_SECRET)
            client.set_secret(ADMIN_SECRET, admin.value or "", content_type="application/json")
            expires = datetime.now(UTC) + timedelta(days=20)
            with stack.postgres.admin_connect() as conn:
                for i in range(scale.fleet):
                    provision_postgres_secret(
                        stack, f"fleet-{i}", prefix=f"fleet_{i}", expires_on=expires, admin=conn, vault=client
                    )
            # Steady state: the secrets existed long before they came due, so earlier sweeps
            # have them in the inventory already (a first sweep after a mass import writes it).
            engine.managed_secrets(refresh=True)
            before = vault.transactions()
            limits = {"creates": scale.creates, "others": scale.others, "window": scale.window}
            vault.control("PUT", "limits", limits)
            started = time.perf_counter()
            outcomes = engine.sweep()
            wall = time.perf_counter() - started
            vault.control("PUT", "limits", {"enabled": False})
            after = vault.transactions()
    finally:
        vault.close()
    tx = {key: after[key] - before[key] for key in after}
    rotated = sum(1 for outcome in outcomes if outcome.status == "rotated")
    ceiling = scale.fleet / (scale.creates / scale.window)
    ratio = ceiling / wall
    print_table(
        f"Fleet: {scale.fleet} PostgreSQL secrets due at once, one timer sweep, {concurrency} at a time",
        [
            "vault limits",
            "wall time",
            "ceiling",
            "ratio to ceiling",
            "rotated",
            "failed",
            "429s",
            "tx/rotation",
        ],
        [
            [
                f"{scale.creates} creates + {scale.others} others per {scale.window:g} s",
                f"{wall:.1f} s",
                f"{ceiling:.1f} s",
                f"{ratio:.2f}",
                str(rotated),
                str(scale.fleet - rotated),
                str(tx["throttled"]),
                f"{(tx['creates'] + tx['others']) / max(1, rotated):.2f}",
            ]
        ],
    )
    print(f"  ratio to ceiling: {ratio:.2f} (wall {wall:.1f} s, ceiling {ceiling:.1f} s)")
    print(f"  failed rotations: {scale.fleet - rotated}")


# ----------------------------------------------------------------------------- 4


def import_ms(code: str) -> float:
    program = f"import time; t=time.perf_counter(); {code}; print((time.perf_counter()-t)*1000)"
    output = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return float(output.strip().splitlines()[-1])


def cold_start(runs: int) -> None:
    bare, ours = [], []
    for _ in range(runs):  # interleaved, so a busy moment hits both
        bare.append(import_ms("import azure.functions as func; func.FunctionApp()"))
        ours.append(import_ms("import function_app"))
    ratio = median(ours) / median(bare)
    print_table(
        f"Cold start: import in a fresh interpreter (median of {runs})",
        ["bare azure-functions app", "function_app", "ratio"],
        [[f"{median(bare):.0f} ms", f"{median(ours):.0f} ms", f"{ratio:.2f}"]],
    )
    print(f"  cold start ratio: {ratio:.2f}")


# ----------------------------------------------------------------------------- 5


def status_at_scale(stack: "LocalStack", count: int) -> None:
    from devstack.keyvault import KeyVaultEmulator  # noqa: PLC0415
    from shared import api  # noqa: PLC0415
    from shared.ledger import OVERLAP, SecretState  # noqa: PLC0415

    with KeyVaultEmulator(stack.base_dir / "status-vault", vault_name="status") as vault:
        now = datetime.now(UTC)
        tags = {"rotation-rotator": "postgres", "rotation-target": "db.example.com:5432/app"}
        names = [f"app-{i:05d}" for i in range(count)]
        for i, name in enumerate(names):
            vault.seed_secret(name, "seeded", tags=tags, expires_on=now + timedelta(days=1 + i % 90))
        env = {
            **stack.app_settings(),
            **vault.identity_env(),
            "ROTATION_ALLOWED_VAULTS": vault.vault_url,
            "KEYVAULT_CA_BUNDLE": str(vault.ca_path),
            "LEDGER_TABLE_PREFIX": "benchstatus",
        }
        with engine_for(env) as engine:
            # Every tenth secret has a rotation in its overlap: a ledger row per managed secret.
            def seed_row(index: int) -> None:
                state = SecretState(vault_url=vault.vault_url, name=names[index])
                if index % 10 == 0:
                    state.state, state.retire_after = OVERLAP, now + timedelta(hours=1)
                engine.ledger.save(state)

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(seed_row, range(count)))

            def first_page(**params: str) -> float:
                started = time.perf_counter()
                result = api.list_rotations(engine, {"page_size": "50", **params})
                if result.status != 200:
                    raise RuntimeError(f"GET /rotations answered {result.status}")
                return (time.perf_counter() - started) * 1000

            vault.reset_counts()
            listed = first_page(refresh="true")  # as the sweep does: list the vault, keep the inventory
            listed_tx = sum(vault.request_counts.values())
            vault.reset_counts()
            firsts = [first_page() for _ in range(3)]
            first_tx = sum(vault.request_counts.values()) / 3
            vault.reset_counts()
            started, pages, params = time.perf_counter(), 0, {"page_size": "200"}
            while True:
                body = api.list_rotations(engine, params).body
                pages += 1
                if "continuation" not in body:
                    break
                params = {"page_size": "200", "continuation": body["continuation"]}
            full_ms = (time.perf_counter() - started) * 1000
            full_tx = sum(vault.request_counts.values())
    print_table(
        f"Status at scale: GET /api/rotations over {count} managed secrets",
        ["request", "time", "Key Vault transactions"],
        [
            ["first page (50), listing the vault (refresh=true)", f"{listed:.0f} ms", str(listed_tx)],
            [
                "first page (50), from the inventory, median of 3",
                f"{median(firsts):.0f} ms",
                f"{first_tx:.0f}",
            ],
            [f"full scan ({pages} pages of 200), from the inventory", f"{full_ms:.0f} ms", str(full_tx)],
        ],
    )
    print(
        "  The timer sweep lists each vault every 5 minutes anyway and keeps what it saw in the\n"
        "  ledger; GET /rotations reads that inventory (ROTATION_INVENTORY_MAX_AGE, default 10 min)."
    )


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="scaled down: under a minute")
    parser.add_argument("--concurrency", type=int, default=8, help="ROTATION_SWEEP_CONCURRENCY for the fleet")
    parser.add_argument("--only", choices=("cost", "fleet", "cold", "status"), action="append")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    sections = set(args.only or ("cost", "fleet", "cold", "status"))
    logging.basicConfig(level=logging.ERROR)  # the engine's per-secret lines would drown the tables
    started = time.perf_counter()
    command = "scripts/bench --quick" if args.quick else "scripts/bench"
    print(f"{command}: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    if "cold" in sections:
        cold_start(scale.imports)  # first: before this process's own imports warm the page cache less
    from devstack.stack import LocalStack  # noqa: PLC0415

    with LocalStack() as stack:
        if "cost" in sections:
            cost_per_rotation(stack, scale.samples)
        if "fleet" in sections:
            fleet(stack, scale, args.concurrency)
        if "status" in sections:
            status_at_scale(stack, scale.status_secrets)
    print(f"\nbench finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
