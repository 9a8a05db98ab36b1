"""Key Vault posture on the ARM stand-in: what azure-mgmt-keyvault, -monitor and -authorization read.

Mounted into the storage stand-in's management plane (devstack/arm_storage.py), which checks
the bearer token and the api-version first. Served, in ARM's shapes (see the REST API specs'
examples getVault, listDiagnosticSettings, RoleAssignments_ListForScope, GetRoleDefinitionById):

* ``GET /subscriptions/{s}/resourceGroups/{g}/providers/Microsoft.KeyVault/vaults/{name}``
* ``GET {vault id}/providers/Microsoft.Insights/diagnosticSettings``
* ``GET {scope}/providers/Microsoft.Authorization/roleAssignments`` (``$filter=atScope()``: at
  and above the scope; without it, below too)
* ``GET {.../providers/Microsoft.Authorization/roleDefinitions/{id}}``

Each vault is configured per test: a preset (``hardened``, ``legacy``), then changes (drift),
and parts the caller may not read (``forbid``: ARM's 403 AuthorizationFailed).
"""

from __future__ import annotations

import copy
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

Part = Literal["vault", "diagnostics", "roles"]
SUBSCRIPTION_ID = "00000000-0000-0000-0000-000000000000"
RESOURCE_GROUP = "devstack"
TENANT_ID = "00000000-0000-0000-0000-0000000000aa"
ROLE_IDS = {
    "Owner": "8e3af657-a8ff-443c-a75c-2fe8c4bcb635",
    "Contributor": "b24988ac-6180-42a0-ab88-20f7382dd24c",
    "Reader": "acdd72a7-3385-48ef-bd42-f606fba81ae7",
    "Key Vault Administrator": "00482a5a-887f-4fb3-b363-3b7fe8e74483",
    "Key Vault Secrets Officer": "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
    "Key Vault Crypto Officer": "14b46e9e-c2b7-41b4-b07b-48a6ebf60603",
    "Key Vault Reader": "21090545-7ca7-4776-b22c-e363652d74d2",
}
_ACTIONS = {
    "vault": "Microsoft.KeyVault/vaults/read",
    "diagnostics": "Microsoft.Insights/diagnosticSettings/read",
}
_ACTIONS["roles"] = "Microsoft.Authorization/roleAssignments/read"
_VAULT = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.KeyVault/vaults/(?P<name>[^/]+)",
    re.IGNORECASE,
)
_VAULT_ONLY = re.compile(_VAULT.pattern + "/?$", re.IGNORECASE)
_DIAGNOSTICS = re.compile(
    r"^(?P<scope>/.+)/providers/Microsoft\.Insights/diagnosticSettings/?$", re.IGNORECASE
)
_ASSIGNMENTS = re.compile(
    r"^(?P<scope>/.*?)/?providers/Microsoft\.Authorization/roleAssignments/?$", re.IGNORECASE
)
_DEFINITION = re.compile(
    r"/providers/Microsoft\.Authorization/roleDefinitions/(?P<id>[^/]+)/?$", re.IGNORECASE
)


def role_definition_id(role: str, subscription: str = SUBSCRIPTION_ID) -> str:
    """The id ARM gives a role definition in an assignment: subscription-scoped."""
    guid = ROLE_IDS.get(role, role)
    return f"/subscriptions/{subscription}/providers/Microsoft.Authorization/roleDefinitions/{guid}"


@dataclass
class _Vault:
    resource_id: str
    properties: dict[str, Any]
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    forbidden: set[str] = field(default_factory=set)


class ArmVaults:
    """Vaults, their diagnostic settings and the role assignments around them, in memory."""

    def __init__(self, subscription: str = SUBSCRIPTION_ID, resource_group: str = RESOURCE_GROUP) -> None:
        self.subscription, self.resource_group = subscription, resource_group
        self._lock = threading.RLock()
        self._vaults: dict[str, _Vault] = {}
        self._assignments: list[dict[str, Any]] = []
        self._definitions: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []

    # ----- configuration ---------------------------------------------------------------------

    def resource_id(self, name: str) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.KeyVault/vaults/{name}"
        )

    @property
    def group_scope(self) -> str:
        return f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"

    def add_vault(self, name: str, preset: str = "hardened", *, app_principal: str = "") -> str:
        """A vault configured as `preset`; `app_principal` gets the roles the preset gives the app.
        Returns its resource id."""
        resource_id = self.resource_id(name)
        if preset == "hardened":
            vault = _Vault(resource_id, _hardened(resource_id, name), [_audit_to_workspace(resource_id)])
            roles = [("Key Vault Secrets Officer", app_principal, resource_id)]
            roles += [("Key Vault Crypto Officer", app_principal, resource_id)]
            roles += [("Key Vault Reader", str(uuid.uuid4()), self.group_scope)]
        elif preset == "legacy":
            vault = _Vault(resource_id, _legacy(name))
            roles = [("Contributor", app_principal, self.group_scope)]
            roles += [("Owner", str(uuid.uuid4()), f"/subscriptions/{self.subscription}")]
        else:
            raise ValueError(f"unknown preset {preset!r}: hardened or legacy")
        with self._lock:
            if resource_id.lower() in self._vaults:
                raise ValueError(f"vault {name} exists")
            self._vaults[resource_id.lower()] = vault
        for role, principal, scope in roles:
            if principal:
                self.assign(role, principal, scope)
        return resource_id

    def reset(self) -> None:
        """Forget every vault, role assignment and custom role (between tests)."""
        with self._lock:
            self._vaults.clear()
            self._assignments.clear()
            self._definitions.clear()

    def update(self, name: str, **properties: Any) -> None:
        """Change vault properties as someone with vault write would (camelCase ARM names)."""
        with self._lock:
            self._vaults[self.resource_id(name).lower()].properties.update(copy.deepcopy(properties))

    def set_diagnostics(self, name: str, settings: list[dict[str, Any]]) -> None:
        with self._lock:
            self._vaults[self.resource_id(name).lower()].diagnostics = copy.deepcopy(settings)

    def forbid(self, name: str, *parts: Part) -> None:
        """The caller may not read these parts of the vault (403), until `allow`."""
        with self._lock:
            self._vaults[self.resource_id(name).lower()].forbidden.update(parts)

    def allow(self, name: str) -> None:
        with self._lock:
            self._vaults[self.resource_id(name).lower()].forbidden.clear()

    def assign(self, role: str, principal: str, scope: str, principal_type: str = "ServicePrincipal") -> str:
        """A role assignment (a built-in role's name, or a role definition's guid) at `scope`."""
        name = str(uuid.uuid4())
        assignment = {
            "id": f"{scope}/providers/Microsoft.Authorization/roleAssignments/{name}",
            "type": "Microsoft.Authorization/roleAssignments",
            "name": name,
            "properties": {
                "roleDefinitionId": role_definition_id(role, self.subscription),
                "principalId": principal,
                "principalType": principal_type,
                "scope": scope,
                "createdOn": "2026-01-01T00:00:00.0000000Z",
            },
        }
        with self._lock:
            self._assignments.append(assignment)
        return name

    def define_role(self, guid: str, role_name: str, actions: list[str]) -> None:
        """A custom role definition, read by its id."""
        with self._lock:
            self._definitions[guid.lower()] = {
                "id": role_definition_id(guid, self.subscription),
                "type": "Microsoft.Authorization/roleDefinitions",
                "name": guid,
                "properties": {
                    "roleName": role_name,
                    "type": "CustomRole",
                    "description": "",
                    "assignableScopes": [f"/subscriptions/{self.subscription}"],
                    "permissions": [
                        {"actions": actions, "notActions": [], "dataActions": [], "notDataActions": []}
                    ],
                },
            }

    # ----- requests --------------------------------------------------------------------------

    @staticmethod
    def serves(path: str) -> bool:
        path = "/" + path.lstrip("/")
        patterns = (_VAULT_ONLY, _DIAGNOSTICS, _ASSIGNMENTS)
        return any(pattern.match(path) for pattern in patterns) or bool(_DEFINITION.search(path))

    def request(self, method: str, path: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) of one authenticated management-plane request under `serves`."""
        path = "/" + path.lstrip("/")
        if method != "GET":
            return 405, _error("MethodNotAllowed", f"The stand-in serves only GET on {path[:200]}.")
        with self._lock:
            self.requests.append(path)
            if match := _DIAGNOSTICS.match(path):
                vault = self._vault(match.group("scope"))
                if isinstance(vault, tuple):
                    return vault
                return self._read(vault, "diagnostics", lambda: {"value": copy.deepcopy(vault.diagnostics)})
            if match := _ASSIGNMENTS.match(path):
                return self._assignments_at(match.group("scope").rstrip("/"), query.get("$filter", ""))
            if match := _DEFINITION.search(path):
                return self._definition(match.group("id"))
            vault = self._vault(path)
            if isinstance(vault, tuple):
                return vault
            name = vault.resource_id.rsplit("/", 1)[-1]
            return self._read(vault, "vault", lambda: _vault_body(vault.resource_id, name, vault.properties))

    def _vault(self, path: str) -> _Vault | tuple[int, dict[str, Any]]:
        match = _VAULT.match(path)
        vault = self._vaults.get(path.rstrip("/").lower()) if match else None
        if vault is None or match is None:
            name = match.group("name") if match else "?"
            group = match.group("rg") if match else "?"
            return 404, _error(
                "ResourceNotFound",
                f"The Resource 'Microsoft.KeyVault/vaults/{name[:64]}' under resource group "
                f"'{group[:90]}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix",
            )
        return vault

    def _read(self, vault: _Vault, part: str, body: Any) -> tuple[int, dict[str, Any]]:
        if part in vault.forbidden:
            return 403, _error(
                "AuthorizationFailed",
                f"The client '{uuid.uuid4()}' with object id '{uuid.uuid4()}' does not have authorization "
                f"to perform action '{_ACTIONS[part]}' over scope '{vault.resource_id}' or the scope is "
                "invalid. If access was recently granted, please refresh your credentials.",
            )
        return 200, body()

    def _assignments_at(self, scope: str, query_filter: str) -> tuple[int, dict[str, Any]]:
        vault = self._vaults.get(scope.lower())
        if vault is not None and "roles" in vault.forbidden:
            return self._read(vault, "roles", dict)
        at_scope = query_filter.replace(" ", "") == "atScope()"
        if query_filter and not at_scope:
            return 400, _error(
                "InvalidFilter", f"The stand-in supports only $filter=atScope(), not {query_filter[:60]!r}."
            )
        target = scope.lower()
        found = []
        for assignment in self._assignments:
            at = assignment["properties"]["scope"].lower().rstrip("/")
            above = target == at or target.startswith(at + "/") or at == ""
            below = at.startswith(target + "/")
            if above or (below and not at_scope):
                found.append(copy.deepcopy(assignment))
        return 200, {"value": found}

    def _definition(self, guid: str) -> tuple[int, dict[str, Any]]:
        custom = self._definitions.get(guid.lower())
        if custom is not None:
            return 200, copy.deepcopy(custom)
        name = next((role for role, known in ROLE_IDS.items() if known == guid.lower()), None)
        if name is None:
            return 404, _error("RoleDefinitionDoesNotExist", "The specified role definition does not exist.")
        return 200, {
            "id": f"/providers/Microsoft.Authorization/roleDefinitions/{guid}",
            "type": "Microsoft.Authorization/roleDefinitions",
            "name": guid,
            "properties": {"roleName": name, "type": "BuiltInRole", "permissions": []},
        }


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _vault_body(resource_id: str, name: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": resource_id,
        "name": name,
        "type": "Microsoft.KeyVault/vaults",
        "location": "westeurope",
        "tags": {},
        "properties": copy.deepcopy(properties),
    }


def _base(name: str) -> dict[str, Any]:
    return {
        "sku": {"family": "A", "name": "standard"},
        "tenantId": TENANT_ID,
        "accessPolicies": [],
        "enabledForDeployment": False,
        "enabledForDiskEncryption": False,
        "enabledForTemplateDeployment": False,
        "vaultUri": f"https://{name}.vault.azure.net/",
        "provisioningState": "Succeeded",
    }


def _hardened(resource_id: str, name: str) -> dict[str, Any]:
    connection = f"{resource_id}/privateEndpointConnections/pep-{name}"
    return {
        **_base(name),
        "enableSoftDelete": True,
        "softDeleteRetentionInDays": 90,
        "enableRbacAuthorization": True,
        "enablePurgeProtection": True,
        "publicNetworkAccess": "Disabled",
        "networkAcls": {"bypass": "None", "defaultAction": "Deny", "ipRules": [], "virtualNetworkRules": []},
        "privateEndpointConnections": [
            {
                "id": connection,
                "etag": "",
                "properties": {
                    "privateEndpoint": {
                        "id": f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{RESOURCE_GROUP}"
                        f"/providers/Microsoft.Network/privateEndpoints/pep-{name}"
                    },
                    "privateLinkServiceConnectionState": {
                        "status": "Approved",
                        "description": "Auto-Approved",
                        "actionsRequired": "None",
                    },
                    "provisioningState": "Succeeded",
                },
            }
        ],
    }


def _legacy(name: str) -> dict[str, Any]:
    """A vault as created years ago: access policies, 7 days of soft delete, open to the internet."""
    policy = {
        "tenantId": TENANT_ID,
        "objectId": str(uuid.uuid4()),
        "permissions": {"secrets": ["get", "list", "set", "delete"], "keys": [], "certificates": []},
    }
    return {
        **_base(name),
        "accessPolicies": [policy],
        "enableSoftDelete": True,
        "softDeleteRetentionInDays": 7,
        "enableRbacAuthorization": False,
        "publicNetworkAccess": "Enabled",
    }


def _audit_to_workspace(resource_id: str) -> dict[str, Any]:
    workspace = (
        f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{RESOURCE_GROUP}"
        "/providers/Microsoft.OperationalInsights/workspaces/log-devstack"
    )
    return diagnostic_setting(resource_id, "to-log-analytics", workspace_id=workspace, category="AuditEvent")


def diagnostic_setting(
    resource_id: str,
    name: str,
    *,
    workspace_id: str = "",
    category: str | None = None,
    category_group: str | None = None,
    enabled: bool = True,
    storage_account_id: str | None = None,
) -> dict[str, Any]:
    """A diagnostic setting on the vault as ARM lists it."""
    log: dict[str, Any] = {"enabled": enabled, "retentionPolicy": {"enabled": False, "days": 0}}
    if category:
        log["category"] = category
    if category_group:
        log["categoryGroup"] = category_group
    properties: dict[str, Any] = {
        "workspaceId": workspace_id,
        "logs": [log],
        "metrics": [
            {"category": "AllMetrics", "enabled": True, "retentionPolicy": {"enabled": False, "days": 0}}
        ],
    }
    if storage_account_id:
        properties["storageAccountId"] = storage_account_id
    return {
        "id": f"{resource_id}/providers/microsoft.insights/diagnosticSettings/{name}",
        "type": "Microsoft.Insights/diagnosticSettings",
        "name": name,
        "properties": properties,
    }
