"""Operator CLI: runbooks, and the way in when the Function App itself is down.

It talks to the vault and the ledger directly, with the same engine and the
same request handlers as the HTTP API, configured by the same app settings
(environment variables). Identity comes from DefaultAzureCredential: on a
laptop that is `az login`.

    python -m shared.cli rotate orders-db --emergency --reason "leaked in CI log"
    python -m shared.cli status orders-db
    python -m shared.cli list --due-within P7D
    python -m shared.cli sweep
    python -m shared.cli adopt orders-db --rotator postgres --target db:5432/app ...
    python -m shared.cli posture --refresh
    python -m shared.cli key-policy orders-cmk --rotate-before-expiry P30D --expires-after P1Y
    python -m shared.cli bind-certificate web-tls
    python -m shared.cli renew-certificate web-tls
    python -m shared.cli certificate-status web-tls
    python -m shared.cli certificates
"""

import argparse
import getpass
import json
import sys
from collections.abc import Sequence
from typing import Any

from shared import api, service

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
_ADOPT_OPTIONS = (
    ("rotator", "rotator name, e.g. postgres"),
    ("target", "host:port/dbname (must be on ROTATION_ALLOWED_TARGETS)"),
    ("slots", "the two slots, comma-separated"),
    ("current-slot", "slot in the current version (default: the first)"),
    ("pg-group", "PostgreSQL group role both slots belong to"),
    ("admin-secret", "secret holding the upstream admin credential"),
    ("admin-user", "Entra ID admin principal (instead of --admin-secret)"),
    ("validity", "ISO 8601 duration, e.g. P90D"),
    ("overlap", "ISO 8601 duration, e.g. P1D"),
    ("probes", "space-separated consumer health URLs"),
    ("window", "rotation window, e.g. 'Mon-Fri 01:00-05:00' (UTC)"),
)
_KEY_POLICY_OPTIONS = (
    ("rotate-before-expiry", "Key Vault rotates the key this long before expiry, e.g. P30D"),
    ("rotate-after-create", "or: Key Vault rotates the key this long after a version's creation, e.g. P90D"),
    ("expires-after", "expiry of each new version, e.g. P1Y (at least P28D)"),
    ("notify-before-expiry", "when KeyNearExpiry is published (default P30D)"),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rotation", description="Operate the secret rotation service.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--vault", help="vault name or URL (needed when the app serves several)")
    commands = parser.add_subparsers(dest="command", required=True)

    rotate = commands.add_parser("rotate", help="rotate a secret now")
    rotate.add_argument("name")
    rotate.add_argument("--reason", default="", help="recorded in the history")
    mode = rotate.add_mutually_exclusive_group()
    mode.add_argument("--emergency", action="store_true", help="retire the old credential at once")
    mode.add_argument("--dry-run", action="store_true", help="create, verify and revoke; Key Vault unchanged")
    rotate.add_argument("--override-window", action="store_true", help="rotate outside the rotation window")

    status = commands.add_parser("status", help="rotation state of one secret")
    status.add_argument("name")
    status.add_argument("--history", default="10", help="how many history records (default 10)")

    listing = commands.add_parser("list", help="every managed secret")
    listing.add_argument("--state", choices=api.STATES)
    listing.add_argument("--due-within", help="only secrets expiring within this ISO 8601 duration")
    listing.add_argument(
        "--refresh", action="store_true", help="list the vaults now, not the last sweep's inventory"
    )

    commands.add_parser("sweep", help="retire due overlaps, resume stalled rotations, rotate what is due")

    adopt = commands.add_parser("adopt", help="put an existing secret under rotation, without rotating")
    adopt.add_argument("name")
    for option, text in _ADOPT_OPTIONS:
        adopt.add_argument(f"--{option}", help=text)

    bind = commands.add_parser(
        "bind", help="pin a managed secret's current tags as its upstream identity (after a tag change)"
    )
    bind.add_argument("name")

    expiring = commands.add_parser(
        "entra-expiring", help="client secrets of apps the identity owns that expire soon, not under rotation"
    )
    expiring.add_argument("--within", help="ISO 8601 duration (default: the sweep's lead time)")

    posture = commands.add_parser("posture", help="each served vault's hardening checklist")
    posture.add_argument("--refresh", action="store_true", help="read the vaults now, not the last record")
    posture.add_argument("--history", default="10", help="changes to show with --vault (default 10)")

    key_policy = commands.add_parser("key-policy", help="set a Key Vault key's rotation policy")
    key_policy.add_argument("name")
    for option, text in _KEY_POLICY_OPTIONS:
        key_policy.add_argument(f"--{option}", help=text)

    renew = commands.add_parser(
        "renew-certificate", help="renew an opted-in certificate from its ACME CA now"
    )
    renew.add_argument("name")
    bind_certificate = commands.add_parser(
        "bind-certificate", help="pin a certificate's ACME directory, DNS zone and names"
    )
    bind_certificate.add_argument("name")
    certificate_status = commands.add_parser(
        "certificate-status", help="renewal state and history of one certificate"
    )
    certificate_status.add_argument("name")
    certificate_status.add_argument("--history", default="10", help="how many history records (default 10)")
    commands.add_parser("certificates", help="every opted-in certificate with expiry and renewal state")
    return parser


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [
        [("" if row.get(column) is None else str(row.get(column))) for column in columns] for row in rows
    ]
    widths = [max([len(column), *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)]
    lines = ["  ".join(column.upper().ljust(width) for column, width in zip(columns, widths, strict=True))]
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in cells
    ]
    return "\n".join(lines)


def _render(command: str, result: api.ApiResult) -> str:
    body = result.body
    if "error" in body:
        return f"error ({result.status} {body['error']['code']}): {body['error']['message']}"
    if command == "list":
        listed = ("name", "rotator", "state", "expires_on", "last_outcome", "last_rotated_on", "retire_after")
        footer = f"\n{body['count']} managed secret(s), as listed at {body['as_of']}"
        return _table(body["value"], listed) + footer
    if command == "certificates":
        shown_columns = ("certificate", "state", "expires_on", "last_outcome", "last_rotated_on", "enabled")
        return _table(body["value"], shown_columns) + f"\n{len(body['value'])} opted-in certificate(s)"
    if command == "certificate-status":
        state = body.get("state") or {}
        fields = [
            ("certificate", body["certificate"]), ("vault", body["vault"]), ("managed", body["managed"]),
            ("current_version", body["current_version"]), ("expires_on", body["expires_on"]),
            ("state", state.get("state", "unbound")), ("step", state.get("step")),
            ("last_outcome", state.get("last_outcome")), ("last_error", state.get("last_error")),
            ("bound_by", state.get("bound_by")),
        ]  # fmt: skip
        shown = [(key, value) for key, value in fields if value not in (None, "")]
        width = max(len(key) for key, _ in shown)
        text = "\n".join(f"{key.ljust(width)}  {value}" for key, value in shown)
        if body.get("history"):
            renewals = ("started_on", "trigger", "outcome", "new_version", "requested_by")
            text += "\n\nhistory\n" + _table(body["history"], renewals)
        return text
    if command == "entra-expiring":
        columns = ("end", "expired", "application", "app_id", "credential", "key_id")
        footer = f"\n{body['count']} client secret(s) ending within {body['within']} and not under rotation"
        return _table(body["value"], columns) + footer

    if command == "posture":
        vaults = body.get("value", [body])
        blocks = []
        for vault in vaults:
            summary = vault["summary"]
            head = f"{vault['vault']}: {summary['status']} (checked {vault['checked_on']})"
            text = head + "\n" + _table(vault["checks"], ("row", "status", "policy", "detail"))
            changes = [
                {"checked_on": item["checked_on"], "change": change}
                for item in vault.get("history") or []
                for change in item["changes"]
            ]
            if changes:
                text += "\n\nchanges\n" + _table(changes, ("checked_on", "change"))
            blocks.append(text)
        return "\n\n".join(blocks) or "no vault served"
    if command == "key-policy":
        policy = body["policy"]
        actions = [
            f"{a['action']} "
            + (f"{a['time_before_expiry']} before expiry" if a.get("time_before_expiry") else "")
            + (f"{a['time_after_create']} after creation" if a.get("time_after_create") else "")
            for a in policy["lifetime_actions"]
        ]
        expiry = (
            f"; new versions expire after {policy['expires_after']}" if policy.get("expires_after") else ""
        )
        return f"rotation policy of key {body['key']}: {', '.join(actions) or 'no actions'}{expiry}"
    if command == "status":
        fields = [
            (key, body[key])
            for key in (
                "name", "vault", "managed", "rotator", "state", "step", "current_slot", "current_version",
                "previous_version", "expires_on", "retire_after", "last_rotated_on", "last_outcome",
                "last_error", "configuration_error", "bound_by", "bound_on",
            )
            if body.get(key) not in (None, "")
        ]  # fmt: skip
        width = max(len(key) for key, _ in fields)
        text = "\n".join(f"{key.ljust(width)}  {value}" for key, value in fields)
        history = body.get("history") or []
        if history:
            columns = ("started_on", "trigger", "outcome", "new_version", "retired_on", "requested_by")
            text += "\n\nhistory\n" + _table(history, columns)
        return text
    return f"{body.get('status')}: {body.get('message')}"


def run(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    params = {"vault": args.vault} if args.vault else {}
    caller = f"cli:{getpass.getuser()}"
    if args.command == "key-policy":  # keys need no ledger: do not build the engine
        fields = {
            option.replace("-", "_"): getattr(args, option.replace("-", "_"))
            for option, _ in _KEY_POLICY_OPTIONS
        }
        body = {key: value for key, value in fields.items() if value is not None}
        result = api.set_key_rotation_policy(
            service.keys(), args.name, params, json.dumps(body).encode(), caller
        )
        return _print(args, result)
    if args.command in ("renew-certificate", "bind-certificate", "certificate-status", "certificates"):
        from shared.certificates import renewal  # noqa: PLC0415 - the ACME client loads only here

        if args.command == "certificates":
            return _print(args, api.list_certificates(renewal(), params))
        if args.command == "certificate-status":
            return _print(
                args, api.certificate_status(renewal(), args.name, {**params, "history": args.history})
            )
        handler = api.renew_certificate if args.command == "renew-certificate" else api.bind_certificate
        return _print(args, handler(renewal(), args.name, params, b"", caller))
    engine = service.engine()
    if args.command == "rotate":
        options = {"reason": args.reason, "emergency": args.emergency, "dry_run": args.dry_run}
        options["override_window"] = args.override_window
        result = api.rotate(engine, args.name, params, json.dumps(options).encode(), caller)
    elif args.command == "status":
        result = api.status(engine, args.name, {**params, "history": args.history})
    elif args.command == "list":
        filters = {"page_size": str(api.MAX_PAGE_SIZE)}
        filters |= {"state": args.state} if args.state else {}
        filters |= {"due_within": args.due_within} if args.due_within else {}
        filters |= {"refresh": "true"} if args.refresh else {}
        result = api.list_rotations(engine, {**params, **filters})
    elif args.command == "sweep":
        outcomes = engine.sweep()
        rows = [{"secret": o.secret, "status": o.status, "message": o.message} for o in outcomes]
        result = api.ApiResult(200, {"value": rows})
        if not args.json:
            print(_table(rows, ("secret", "status", "message")) if rows else "nothing to do")
            return EXIT_OK
    elif args.command == "posture":
        query = {**params, "refresh": "true" if args.refresh else "false"}
        query |= {"history": args.history} if args.vault else {}
        result = api.vault_posture(engine, query)
    elif args.command == "bind":
        result = api.bind(engine, args.name, params, b"", caller)
    elif args.command == "entra-expiring":
        result = api.entra_expiring(engine, {"within": args.within} if args.within else {})
    else:
        fields = {
            option.replace("-", "_"): getattr(args, option.replace("-", "_")) for option, _ in _ADOPT_OPTIONS
        }
        body = {key: value for key, value in fields.items() if value is not None}
        result = api.adopt(engine, args.name, params, json.dumps(body).encode(), caller)
    return _print(args, result)


def _print(args: argparse.Namespace, result: api.ApiResult) -> int:
    text = json.dumps(result.body, indent=2, default=str) if args.json else _render(args.command, result)
    print(text, file=sys.stdout if result.status < 400 else sys.stderr)
    if result.status < 400:
        return EXIT_OK
    return EXIT_FAILED if result.status >= 500 else EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(run())
