"""The chaos run's own machinery: a tiny run is green, and its checker does catch a broken credential.

Both runs share one local stack of their own (not the session's: the chaos run moves
its clock, restarts PostgreSQL and sweeps every ledger row).
"""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.chaos import ChaosRun, Options, finish, run
from devstack.stack import LocalStack


@pytest.fixture(scope="module")
def chaos_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(Path(tmp_path_factory.mktemp("chaos"))) as local:
        yield local


def test_a_tiny_run_finishes_green_and_ends_with_the_figures_line(
    chaos_stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run(Options(secrets=2, rounds=2, seed=11, kinds=("postgres",)), stack=chaos_stack)

    assert finish(report) == 0, report.problems
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = dict(item.split("=") for item in last.split())
    assert list(figures)[:3] == ["rotations", "crashes", "faults"]
    assert list(figures)[-4:] == ["consumer_failures", "lost", "leaked", "seconds"]
    assert (figures["consumer_failures"], figures["lost"], figures["leaked"]) == ("0", "0", "0")
    assert int(figures["rotations"]) >= 2
    assert int(figures["restarts"]) == 1
    assert int(figures["consumer_checks"]) > 0
    assert int(figures["app_checks"]) > 0 and figures["app_failures"] == "0"
    assert sum(report.coverage.values()) == int(figures["crashes"]) > 0


def _break_the_newest_version(chaos: ChaosRun) -> None:
    """A newest version whose password is wrong: what the run exists to catch."""
    name = chaos.secrets[0].name
    vault = chaos.stack.secret_client()
    newest = vault.get_secret(name)
    value = json.loads(newest.value or "{}")
    value["password"] = "not-the-password-" + value["password"][:4]
    vault.set_secret(
        name,
        json.dumps(value),
        tags=newest.properties.tags,
        expires_on=newest.properties.expires_on,
        content_type=newest.properties.content_type,
    )


def test_the_checker_reports_a_credential_that_does_not_authenticate(
    chaos_stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run(
        Options(secrets=1, rounds=0, seed=3, kinds=("postgres",)),
        stack=chaos_stack,
        sabotage=_break_the_newest_version,
    )

    assert finish(report) == 1
    assert report.figures["lost"] == 1
    assert report.figures["consumer_failures"] > 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("rotations=")
    assert "lost=1" in last


def test_without_the_consumer_steps_the_apps_hold_dead_credentials(chaos_stack: LocalStack) -> None:
    """The control: the same run with the refresh and the drain check off. The apps read through
    Key Vault references and keep the old version; the short overlap retires it under them."""
    report = run(
        Options(secrets=2, rounds=3, seed=12, kinds=("postgres",), consumer_steps=False), stack=chaos_stack
    )

    assert not report.ok
    assert report.figures["app_failures"] > 0
    assert report.figures["consumer_failures"] == report.figures["app_failures"]  # Key Vault readers: fine
    assert report.figures["lost"] == 0
