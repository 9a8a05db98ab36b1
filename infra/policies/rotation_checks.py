"""Checkov policies for what its built-in Bicep checks do not cover.

Checkov has no check for Event Grid system topics or their subscriptions, none for a vault's
access model (Azure RBAC), for storage shared-key access, for Application Insights local auth or
for basic publishing credentials. These run with `--external-checks-dir infra/policies`
(tests/test_infra.py does). They read the resource as pycep parses it: literals are Python
values, anything else (a parameter, an expression) is a string or a dict describing it.
"""

from typing import Any

from checkov.bicep.checks.resource.base_resource_check import BaseResourceCheck
from checkov.common.models.enums import CheckCategories, CheckResult


def _get(conf: dict[str, Any], path: str) -> Any:
    """`properties/filter/includedEventTypes` -> the value, or None when a step is missing."""
    value: Any = conf
    if "condition" in conf and isinstance(conf.get("config"), dict):
        value = conf["config"]  # `resource x ... = if (cond) { ... }`: the body is under "config"
    for key in path.split("/"):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _result(ok: bool) -> CheckResult:
    return CheckResult.PASSED if ok else CheckResult.FAILED


class EventSubscriptionFiltered(BaseResourceCheck):
    def __init__(self) -> None:
        super().__init__(
            name="Ensure the Event Grid subscription is filtered to the event types it handles",
            id="CKV_ROT_1",
            categories=(CheckCategories.GENERAL_SECURITY,),
            supported_resources=("Microsoft.EventGrid/systemTopics/eventSubscriptions",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        # A literal list or a variable holding one; absent means "every event type".
        included = _get(conf, "properties/filter/includedEventTypes")
        return _result(bool(included))


class EventSubscriptionRetried(BaseResourceCheck):
    def __init__(self) -> None:
        super().__init__(
            name="Ensure the Event Grid subscription has an explicit retry policy",
            id="CKV_ROT_2",
            categories=(CheckCategories.GENERAL_SECURITY,),
            supported_resources=("Microsoft.EventGrid/systemTopics/eventSubscriptions",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        attempts = _get(conf, "properties/retryPolicy/maxDeliveryAttempts")
        ttl = _get(conf, "properties/retryPolicy/eventTimeToLiveInMinutes")
        return _result(isinstance(attempts, int) and attempts > 1 and isinstance(ttl, int) and ttl >= 60)


class EventSubscriptionDeadLetteredWithIdentity(BaseResourceCheck):
    def __init__(self) -> None:
        super().__init__(
            name="Ensure the Event Grid subscription dead-letters to storage with a managed identity",
            id="CKV_ROT_3",
            categories=(CheckCategories.BACKUP_AND_RECOVERY,),
            supported_resources=("Microsoft.EventGrid/systemTopics/eventSubscriptions",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        if _get(conf, "properties/deadLetterDestination") is not None:
            return CheckResult.FAILED  # key-based dead-lettering
        identity = _get(conf, "properties/deadLetterWithResourceIdentity/identity/type")
        endpoint = _get(conf, "properties/deadLetterWithResourceIdentity/deadLetterDestination/endpointType")
        return _result(identity in ("UserAssigned", "SystemAssigned") and endpoint == "StorageBlob")


class SystemTopicIdentity(BaseResourceCheck):
    def __init__(self) -> None:
        super().__init__(
            name="Ensure the Event Grid system topic has a managed identity for delivery",
            id="CKV_ROT_4",
            categories=(CheckCategories.IAM,),
            supported_resources=("Microsoft.EventGrid/systemTopics",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        return _result(_get(conf, "identity/type") in ("UserAssigned", "SystemAssigned"))


class KeyVaultRbacAndRetention(BaseResourceCheck):
    def __init__(self) -> None:
        super().__init__(
            name="Ensure the key vault uses Azure RBAC and keeps deleted objects 90 days",
            id="CKV_ROT_5",
            categories=(CheckCategories.IAM,),
            supported_resources=("Microsoft.KeyVault/vaults",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        rbac = _get(conf, "properties/enableRbacAuthorization") is True
        retention = _get(conf, "properties/softDeleteRetentionInDays") == 90
        no_policies = not _get(conf, "properties/accessPolicies")
        return _result(rbac and retention and no_policies)


class StorageEntraOnly(BaseResourceCheck):
    def __init__(self) -> None:
        super().__init__(
            name="Ensure the storage account refuses shared keys and anonymous blob access",
            id="CKV_ROT_6",
            categories=(CheckCategories.IAM,),
            supported_resources=("Microsoft.Storage/storageAccounts",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        return _result(
            _get(conf, "properties/allowSharedKeyAccess") is False
            and _get(conf, "properties/allowBlobPublicAccess") is False
            and _get(conf, "properties/encryption/requireInfrastructureEncryption") is True
        )


class ApplicationInsightsLocalAuthDisabled(BaseResourceCheck):
    def __init__(self) -> None:
        super().__init__(
            name="Ensure Application Insights accepts only Entra ID authenticated telemetry",
            id="CKV_ROT_7",
            categories=(CheckCategories.IAM,),
            supported_resources=("Microsoft.Insights/components",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        return _result(_get(conf, "properties/DisableLocalAuth") is True)


class BasicPublishingDisabled(BaseResourceCheck):
    def __init__(self) -> None:
        super().__init__(
            name="Ensure FTP and SCM basic publishing credentials are disabled",
            id="CKV_ROT_8",
            categories=(CheckCategories.IAM,),
            supported_resources=("Microsoft.Web/sites/basicPublishingCredentialsPolicies",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        return _result(_get(conf, "properties/allow") is False)


class FunctionAppFlexIdentityDeployment(BaseResourceCheck):
    def __init__(self) -> None:
        super().__init__(
            name="Ensure the Flex Consumption app pulls its package with a managed identity",
            id="CKV_ROT_9",
            categories=(CheckCategories.IAM,),
            supported_resources=("Microsoft.Web/sites",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        auth = _get(conf, "properties/functionAppConfig/deployment/storage/authentication/type")
        if _get(conf, "properties/functionAppConfig") is None:
            return CheckResult.UNKNOWN  # not a Flex Consumption app
        return _result(auth in ("UserAssignedIdentity", "SystemAssignedIdentity"))


event_subscription_filtered = EventSubscriptionFiltered()
event_subscription_retried = EventSubscriptionRetried()
event_subscription_dead_lettered = EventSubscriptionDeadLetteredWithIdentity()
system_topic_identity = SystemTopicIdentity()
key_vault_rbac = KeyVaultRbacAndRetention()
storage_entra_only = StorageEntraOnly()
app_insights_local_auth = ApplicationInsightsLocalAuthDisabled()
basic_publishing_disabled = BasicPublishingDisabled()
flex_identity_deployment = FunctionAppFlexIdentityDeployment()
