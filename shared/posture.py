"""Vault posture: the hardening checklist of each served vault, read live from the management plane.

Each row is `pass`, `fail` or `unknown` (the app may not read it: the detail names the role to
grant). The vault's properties come from azure-mgmt-keyvault, its diagnostic settings from
azure-mgmt-monitor, the role assignments at and above it from azure-mgmt-authorization, all as
the app's identity. The sweep records the result in the ledger every ROTATION_POSTURE_INTERVAL,
with a history row when a row changes, and notifies when a row newly fails. A row whose policy
(ROTATION_POSTURE_POLICY) is `refuse` stops rotations into a vault that does not pass it, before
anything is claimed or changed.

The SDKs are imported on first read: only the sweep, the posture API and a refusing policy pay
for them.
"""

import base64
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from shared.jsonsafe import at_most
from shared.settings import POSTURE_ROWS, Settings

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.keyvault.secrets import SecretProperties

    from shared.ledger import SecretState
    from shared.outcomes import Outcome
    from shared.runtime import Runtime

logger = logging.getLogger(__name__)

T = TypeVar("T")
PASS, FAIL, UNKNOWN = "pass", "fail", "unknown"
NOTICE_STATUS = "posture_failed"
ARM_SCOPE = "https://management.azure.com/.default"
_DETAIL_CHARS = 300
MAX_LISTED = 5000

# Built-in role definition ids (the same in every tenant).
OWNER = "8e3af657-a8ff-443c-a75c-2fe8c4bcb635"
CONTRIBUTOR = "b24988ac-6180-42a0-ab88-20f7382dd24c"
KEY_VAULT_ADMINISTRATOR = "00482a5a-887f-4fb3-b363-3b7fe8e74483"
PRIVILEGED_ROLES = {
    OWNER: "Owner",
    CONTRIBUTOR: "Contributor",
    KEY_VAULT_ADMINISTRATOR: "Key Vault Administrator",
}
# What the app itself may hold: the data-plane officer roles it rotates with, and readers.
NARROW_ROLES = {
    "b86a8fe4-44ce-4948-aee5-eccb2c155cd7": "Key Vault Secrets Officer",
    "14b46e9e-c2b7-41b4-b07b-48a6ebf60603": "Key Vault Crypto Officer",
    "a4417e6f-fecd-4de8-b567-7b0420556985": "Key Vault Certificates Officer",
    "4633458b-17de-408a-b874-0445c86b69e6": "Key Vault Secrets User",
    "12338af0-0e69-4776-bea7-57ae8d297424": "Key Vault Crypto User",
    "21090545-7ca7-4776-b22c-e363652d74d2": "Key Vault Reader",
    "acdd72a7-3385-48ef-bd42-f606fba81ae7": "Reader",
    "43d0d8ad-25c7-4714-9337-8ba259a9fe05": "Monitoring Reader",
}
# The role that lets the app read each part, named in an `unknown` row.
READ_VAULT = "Reader on the vault (Microsoft.KeyVault/vaults/read)"
READ_DIAGNOSTICS = "Monitoring Reader or Reader on the vault (Microsoft.Insights/diagnosticSettings/read)"
READ_ROLES = "Reader on the vault (Microsoft.Authorization/roleAssignments/read)"
AUDIT_GROUPS = ("audit", "alllogs")
VAULT_ROWS = POSTURE_ROWS[:7]


@dataclass(frozen=True)
class Check:
    row: str
    status: str
    detail: str

    def __post_init__(self) -> None:
        # Details quote upstream answers (custom role names, setting names): one printable line.
        clean = "".join(c if c.isprintable() else " " for c in self.detail)[:_DETAIL_CHARS]
        object.__setattr__(self, "detail", clean)

    def as_dict(self) -> dict[str, str]:
        return {"row": self.row, "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class Posture:
    vault_url: str
    resource_id: str
    checked_on: datetime
    checks: tuple[Check, ...]

    def status(self, row: str) -> str:
        return next((check.status for check in self.checks if check.row == row), UNKNOWN)

    def check(self, row: str) -> Check:
        return next((c for c in self.checks if c.row == row), Check(row, UNKNOWN, "not checked"))

    def rows_with(self, status: str) -> list[str]:
        return [check.row for check in self.checks if check.status == status]

    def summary(self) -> dict[str, Any]:
        failing, unknown = self.rows_with(FAIL), self.rows_with(UNKNOWN)
        overall = FAIL if failing else UNKNOWN if unknown else PASS
        return {
            "status": overall,
            "failing": failing,
            "unknown": unknown,
            "checked_on": self.checked_on.isoformat(),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "vault": self.vault_url,
            "resource_id": self.resource_id,
            "checked_on": self.checked_on.isoformat(),
            "summary": self.summary(),
            "checks": [check.as_dict() for check in self.checks],
        }

    def checks_json(self) -> str:
        return json.dumps([check.as_dict() for check in self.checks])


def checks_from_json(text: str) -> tuple[Check, ...]:
    return tuple(Check(item["row"], item["status"], item["detail"]) for item in json.loads(text or "[]"))


def _all(rows: Iterable[str], status: str, detail: str) -> list[Check]:
    return [Check(row, status, detail[:_DETAIL_CHARS]) for row in rows]


class _Unreadable(Exception):
    """A part of the posture could not be read; the message says why (and what to grant)."""


def _describe(error: BaseException) -> str:
    from azure.core.exceptions import HttpResponseError  # noqa: PLC0415

    if isinstance(error, HttpResponseError):
        code = error.error.code if error.error else None
        return f"HTTP {error.status_code}" + (f" {code}" if code else "")
    return type(error).__name__


def _bounded(items: Iterable[T], what: str) -> list[T]:
    """A listing read to MAX_LISTED items (Azure allows 4,000 role assignments a subscription):
    one that pages on past that leaves its rows unknown instead of reading forever."""
    listed = at_most(items, MAX_LISTED)
    if listed is None:
        raise _Unreadable(f"{what}: more than {MAX_LISTED} listed; not read further")
    return listed


def _read(operation: Callable[[], T], what: str, role: str) -> T:
    from azure.core.exceptions import AzureError, HttpResponseError  # noqa: PLC0415

    from shared.retry import call_with_retry  # noqa: PLC0415

    try:
        return call_with_retry(operation, what=what, attempts=3)
    except HttpResponseError as error:
        if error.status_code in (401, 403):
            raise _Unreadable(
                f"not allowed to read {what} ({_describe(error)}): grant the app {role}"
            ) from None
        if error.status_code == 404:
            raise _Unreadable(
                f"{what}: not found ({_describe(error)}): check ROTATION_VAULT_RESOURCE_IDS"
            ) from None
        raise _Unreadable(f"could not read {what}: {_describe(error)}") from None
    except AzureError as error:
        raise _Unreadable(f"could not read {what}: {_describe(error)}") from None


def _options(settings: Settings) -> dict[str, Any]:
    from shared.service import transport_options  # noqa: PLC0415

    # One retry layer, ours (bounded, jittered, honours Retry-After).
    options: dict[str, Any] = {"retry_total": 0, **transport_options()}
    if settings.upstream_ca_bundle:
        options["connection_verify"] = settings.upstream_ca_bundle
    return options


def _text(value: Any, default: str) -> str:
    """An SDK enum's wire value (str() of one is `NetworkRuleAction.DENY`), or the default."""
    return str(getattr(value, "value", value)) if value else default


def _parts(resource_id: str) -> tuple[str, str, str]:
    parts = resource_id.split("/")
    return parts[2], parts[4], parts[8]


# ----------------------------------------------------------------- vault properties


def _vault_checks(settings: Settings, credential: "TokenCredential", resource_id: str) -> list[Check]:
    from azure.mgmt.keyvault import KeyVaultManagementClient  # noqa: PLC0415

    subscription, group, name = _parts(resource_id)
    client = KeyVaultManagementClient(
        credential, subscription, base_url=settings.arm_endpoint, **_options(settings)
    )
    try:
        with client:
            vault = _read(lambda: client.vaults.get(group, name), f"vault {name}", READ_VAULT)
    except _Unreadable as error:
        return _all(VAULT_ROWS, UNKNOWN, str(error))
    props = vault.properties
    minimum = settings.posture_min_retention_days
    # The raw JSON values (the model is a Mapping over them): the SDK reads the string "false"
    # as True. Only a JSON `true` is true; the API's defaults for absent fields: soft delete
    # on, 90 days.
    rbac, purge = props.get("enableRbacAuthorization") is True, props.get("enablePurgeProtection") is True
    soft_delete = props.get("enableSoftDelete", True) is True
    retention = props.get("softDeleteRetentionInDays", 90)
    retention = retention if type(retention) is int else 0
    acls = props.network_acls
    default_action = _text(acls.default_action if acls else None, "Allow")
    bypass = _text(acls.bypass if acls else None, "AzureServices")
    public = _text(props.public_network_access, "Enabled")
    approved = [
        pec
        for pec in props.private_endpoint_connections or []
        if pec.private_link_service_connection_state is not None
        and _text(pec.private_link_service_connection_state.status, "").lower() == "approved"
    ]
    checks = {
        "rbac": (PASS, "Azure RBAC permission model")
        if rbac
        else (FAIL, "access policies: any principal with vault write can grant itself data access"),
        "soft_delete": (PASS, "soft delete on") if soft_delete else (FAIL, "soft delete off"),
        "soft_delete_retention": (PASS, f"{retention} days")
        if soft_delete and retention >= minimum
        else (FAIL, f"{retention} days, below {minimum}" if soft_delete else "soft delete off"),
        "purge_protection": (PASS, "purge protection on")
        if purge
        else (FAIL, "purge protection off: a deleted vault or secret can be purged at once"),
        "public_network_access": (PASS, "public network access disabled")
        if public.lower() == "disabled"
        else (FAIL, f"public network access {public}"),
        "firewall": (PASS, f"default action Deny, bypass {bypass}")
        if default_action.lower() == "deny"
        else (FAIL, f"default action {default_action}: every network may reach the vault"),
        "private_endpoint": (PASS, f"{len(approved)} approved private endpoint(s)")
        if approved
        else (FAIL, "no approved private endpoint connection"),
    }
    return [Check(row, status, detail[:_DETAIL_CHARS]) for row, (status, detail) in checks.items()]


# ----------------------------------------------------------------- diagnostic settings


def _diagnostics_check(settings: Settings, credential: "TokenCredential", resource_id: str) -> Check:
    from azure.mgmt.monitor import MonitorManagementClient  # noqa: PLC0415

    subscription = _parts(resource_id)[0]
    client = MonitorManagementClient(
        credential, subscription, base_url=settings.arm_endpoint, **_options(settings)
    )
    try:
        with client:
            found = _read(
                lambda: _bounded(client.diagnostic_settings.list(resource_id), "diagnostic settings"),
                "diagnostic settings",
                READ_DIAGNOSTICS,
            )
    except _Unreadable as error:
        return Check("diagnostics", UNKNOWN, str(error)[:_DETAIL_CHARS])
    for setting in found:
        audited = any(
            log.enabled is True
            and (
                (log.category or "").lower() == "auditevent"
                or (log.category_group or "").lower() in AUDIT_GROUPS
            )
            for log in setting.logs or []
        )
        if audited and isinstance(setting.workspace_id, str) and setting.workspace_id:
            return Check(
                "diagnostics", PASS, f"setting {setting.name} sends AuditEvent to a Log Analytics workspace"
            )
    if not found:
        return Check("diagnostics", FAIL, "no diagnostic setting: Key Vault's AuditEvent log is kept nowhere")
    return Check("diagnostics", FAIL, "no diagnostic setting sends AuditEvent to a Log Analytics workspace")


# ----------------------------------------------------------------- role assignments


def _own_principal(settings: Settings, credential: "TokenCredential") -> str | None:
    """The app's principal (object) id: the setting, else the `oid` of its own ARM token."""
    if settings.app_principal_id:
        return settings.app_principal_id.lower()
    try:
        token = credential.get_token(ARM_SCOPE).token
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except Exception:  # an opaque token: only the setting names the principal then
        return None
    oid = claims.get("oid") if isinstance(claims, dict) else None
    return str(oid).lower() if oid else None


def _role_checks(settings: Settings, credential: "TokenCredential", resource_id: str) -> list[Check]:
    from azure.mgmt.authorization import AuthorizationManagementClient  # noqa: PLC0415

    rows = ("privileged_roles", "app_roles")
    subscription = _parts(resource_id)[0]
    client = AuthorizationManagementClient(
        credential, subscription, base_url=settings.arm_endpoint, **_options(settings)
    )
    try:
        with client:
            assignments = _read(
                lambda: _bounded(
                    client.role_assignments.list_for_scope(resource_id, filter="atScope()"),
                    "role assignments",
                ),
                "role assignments",
                READ_ROLES,
            )
            names = _role_names(client, {a.role_definition_id or "" for a in assignments})
    except _Unreadable as error:
        return _all(rows, UNKNOWN, str(error))
    privileged: list[str] = []
    app_roles: list[tuple[str, bool]] = []
    me = _own_principal(settings, credential)
    for assignment in assignments:
        role_id = (assignment.role_definition_id or "").rsplit("/", 1)[-1].lower()
        role = PRIVILEGED_ROLES.get(role_id) or NARROW_ROLES.get(role_id) or names.get(role_id, role_id)
        scope = assignment.scope or "?"
        where = "the vault" if scope.lower() == resource_id.lower() else scope
        if role_id in PRIVILEGED_ROLES or role.startswith("*"):
            privileged.append(f"{role.lstrip('*')} for {assignment.principal_id} at {where}")
        if me and (assignment.principal_id or "").lower() == me:
            app_roles.append((f"{role.lstrip('*')} at {where}", role_id in NARROW_ROLES))
    checks = [
        Check("privileged_roles", FAIL, ("standing: " + "; ".join(privileged))[:_DETAIL_CHARS])
        if privileged
        else Check("privileged_roles", PASS, "no standing Owner, Contributor or Key Vault Administrator"),
    ]
    wide = [role for role, narrow in app_roles if not narrow]
    if me is None:
        checks.append(
            Check("app_roles", UNKNOWN, "the app's principal is unknown: set ROTATION_APP_PRINCIPAL_ID")
        )
    elif wide:
        checks.append(Check("app_roles", FAIL, ("the app holds " + "; ".join(wide))[:_DETAIL_CHARS]))
    elif app_roles:
        checks.append(
            Check("app_roles", PASS, ("narrow: " + "; ".join(r for r, _ in app_roles))[:_DETAIL_CHARS])
        )
    else:
        checks.append(
            Check(
                "app_roles",
                UNKNOWN,
                "no role assigned to the app itself at or above the vault (groups are not resolved)",
            )
        )
    return checks


def _role_names(client: Any, role_ids: set[str]) -> dict[str, str]:
    """Names of the roles that are not built-ins known here; `*`-prefixed when a custom role may
    do everything (`*` actions). A role that cannot be read keeps its id."""
    names: dict[str, str] = {}
    for full_id in sorted(role_ids):
        guid = full_id.rsplit("/", 1)[-1].lower()
        if not full_id or guid in PRIVILEGED_ROLES or guid in NARROW_ROLES:
            continue
        try:
            definition = _read(
                partial(client.role_definitions.get_by_id, full_id), "role definition", READ_ROLES
            )
        except _Unreadable:
            continue
        actions = [
            action for permission in definition.permissions or [] for action in permission.actions or []
        ]
        names[guid] = ("*" if "*" in actions else "") + (definition.role_name or guid)
    return names


# ----------------------------------------------------------------- the checklist


def read_posture(settings: Settings, credential: "TokenCredential", vault_url: str, now: datetime) -> Posture:
    """Every row of the vault's checklist, read now. Never raises for an unreadable part."""
    resource_id = settings.vault_resource_ids.get(vault_url, "")
    if not resource_id:
        detail = (
            f"no resource id for {vault_url}: add it to ROTATION_VAULT_RESOURCE_IDS "
            "(<vault URL>=<resource id>)"
        )
        return Posture(vault_url, "", now, tuple(_all(POSTURE_ROWS, UNKNOWN, detail)))
    checks = [
        *_guarded(VAULT_ROWS, lambda: _vault_checks(settings, credential, resource_id)),
        *_guarded(("diagnostics",), lambda: [_diagnostics_check(settings, credential, resource_id)]),
        *_guarded(("privileged_roles", "app_roles"), lambda: _role_checks(settings, credential, resource_id)),
    ]
    order = {row: index for index, row in enumerate(POSTURE_ROWS)}
    return Posture(vault_url, resource_id, now, tuple(sorted(checks, key=lambda c: order[c.row])))


def _guarded(rows: tuple[str, ...], read: Callable[[], list[Check]]) -> list[Check]:
    """An answer the SDK or these checks cannot make sense of leaves its rows unknown."""
    try:
        return read()
    except Exception as error:
        logger.warning("vault posture: unexpected answer for %s: %s", ", ".join(rows), type(error).__name__)
        return _all(rows, UNKNOWN, f"unexpected answer from the management plane ({type(error).__name__})")


@dataclass
class Drift:
    """What changed between the recorded posture and a new reading."""

    changes: list[str] = field(default_factory=list)
    newly_failing: list[str] = field(default_factory=list)


def compare(before: Posture | None, after: Posture) -> Drift:
    drift = Drift()
    for check in after.checks:
        old = before.status(check.row) if before else None
        if old != check.status:
            drift.changes.append(f"{check.row}: {old or 'none'} -> {check.status}")
            if check.status == FAIL:
                drift.newly_failing.append(check.row)
    return drift


def record(rt: "Runtime", vault_url: str, *, force: bool = False) -> Posture:
    """The vault's recorded posture, read again (and recorded) when older than
    ROTATION_POSTURE_INTERVAL or when `force`. A change is a history row; a new failure a
    notification. Another worker recording the same reading meanwhile wins: its row stands."""
    from shared.ledger import ConcurrentUpdate  # noqa: PLC0415

    now = rt.clock()
    stored = rt.ledger.posture(vault_url)
    before = _from_record(stored) if stored else None
    same_vault = before is not None and before.resource_id == rt.settings.vault_resource_ids.get(
        vault_url, ""
    )
    if before and same_vault and not force and now - before.checked_on < rt.settings.posture_interval:
        return before
    after = read_posture(rt.settings, rt.credential, vault_url, now)
    drift = compare(before, after)
    try:
        rt.ledger.save_posture(vault_url, after.resource_id, now, after.checks_json(), stored)
    except ConcurrentUpdate:
        logger.info("%s: posture recorded meanwhile by another run", vault_url)
        return after
    if drift.changes:
        rt.ledger.write_posture_history(vault_url, now, after.checks_json(), drift.changes)
        if before is None:  # a first reading is no change: one line, a warning only if it fails
            summary = after.summary()
            level = logging.WARNING if summary["failing"] else logging.INFO
            rows = ", ".join(summary["failing"]) or ", ".join(summary["unknown"]) or "all rows pass"
            logger.log(level, "%s: vault posture first read: %s (%s)", vault_url, summary["status"], rows)
        else:
            logger.warning("%s: vault posture changed: %s", vault_url, "; ".join(drift.changes))
    if drift.newly_failing and rt.notify is not None:
        failing = "; ".join(f"{row}: {after.check(row).detail}" for row in drift.newly_failing)
        rt.notify(
            {
                "secret": "",
                "vault": vault_url,
                "status": NOTICE_STATUS,
                "message": f"vault posture: newly failing: {failing}"[:1000],
                "rows": drift.newly_failing,
                "checked_on": now.isoformat(),
            }
        )
    return after


def _from_record(stored: Any) -> Posture:
    return Posture(stored.vault_url, stored.resource_id, stored.checked_on, checks_from_json(stored.checks))


def recorded(rt: "Runtime", vault_url: str) -> Posture | None:
    stored = rt.ledger.posture(vault_url)
    return _from_record(stored) if stored else None


def sweep(rt: "Runtime") -> None:
    """The timer's part: each served vault's posture, recorded when due. One vault's failure is
    logged and does not stop the others or the sweep."""
    from shared.outcomes import describe_error  # noqa: PLC0415

    for vault_url in sorted(rt.settings.allowed_vaults):
        try:
            record(rt, vault_url)
        except Exception as error:
            logger.error("%s: could not record the vault posture: %s", vault_url, describe_error(error))


def admit(
    rt: "Runtime",
    state: "SecretState",
    current: "SecretProperties",
    vault_url: str,
    *,
    emergency: bool = False,
) -> "Outcome | None":
    """Before a rotation writes a new credential: every `refuse` row passes on the vault's
    recorded posture (read again if older than ROTATION_POSTURE_MAX_AGE). A row that fails or
    is unknown refuses; the refusal is recorded and notified once per posture. An emergency
    (a leaked credential) goes ahead, logged: refusing it would leave the leak live."""
    refusing = rt.settings.refused_rows()
    if not refusing:
        return None
    from shared.outcomes import REFUSED, Outcome, logged  # noqa: PLC0415

    expected_id = rt.settings.vault_resource_ids.get(vault_url, "")
    try:
        posture = recorded(rt, vault_url)
        stale = posture is None or rt.clock() - posture.checked_on >= rt.settings.posture_max_age
        if posture is None or stale or posture.resource_id != expected_id:
            posture = record(rt, vault_url, force=True)
    except Exception as error:  # the ledger failed: the refusing rows cannot be shown to pass
        detail = f"the posture could not be read or recorded ({type(error).__name__})"
        posture = Posture(vault_url, expected_id, rt.clock(), tuple(_all(refusing, UNKNOWN, detail)))
    blocking = [posture.check(row) for row in refusing if posture.status(row) != PASS]
    if not blocking:
        return None
    reasons = "; ".join(f"{c.row} {c.status} ({c.detail})" for c in blocking)
    if emergency:
        logger.warning("%s: emergency rotation despite the vault posture: %s", state.name, reasons)
        return None
    message = (
        f"vault posture refuses rotation (ROTATION_POSTURE_POLICY): {reasons}; "
        f"posture checked {posture.checked_on.isoformat()}"
    )
    marker = "posture:" + hashlib.sha256(f"{current.version}:{reasons}".encode()).hexdigest()[:16]
    outcome = Outcome(REFUSED, state.name, message[:1000])
    if state.refused == marker:
        logger.info("%s: refused again by the vault posture (already reported)", state.name)
        return outcome
    state.refused, state.last_outcome, state.last_error = marker, REFUSED, message[:500]
    state.last_attempt_on = rt.clock()
    rt.save_quietly(state)
    return rt.tell(logged(outcome), state)
