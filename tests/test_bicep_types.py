"""infra/ against the Bicep compiler's type definitions (tests/bicep_types.py), and planted errors
showing the checker finds each kind of mistake."""

import shutil
from pathlib import Path

import pytest

from tests.bicep_types import TypeIndex, check

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
TYPES = ROOT.parent / "shared" / "azure-reference" / "bicep-types"


@pytest.fixture(scope="module")
def types() -> TypeIndex:
    if not (TYPES / "INDEX.tsv").is_file():
        pytest.skip(f"Bicep type definitions not found at {TYPES} (reference data next to the repository)")
    return TypeIndex(TYPES)


def test_templates_match_their_type_definitions(types: TypeIndex) -> None:
    assert check(INFRA, types) == []


PLANTED = [
    pytest.param(
        "modules/keyvault.bicep",
        "Microsoft.KeyVault/vaults@2023-07-01' = {",
        "Microsoft.KeyVault/vaults@2023-07-99' = {",
        "keyvault.bicep: vault: Microsoft.KeyVault/vaults@2023-07-99 is not a known resource type"
        " and API version",
        id="unknown-api-version",
    ),
    pytest.param(
        "modules/keyvault.bicep",
        "    enablePurgeProtection: true\n",
        "    enablePurgeProtection: true\n    enablePurgeProtections: true\n",
        "keyvault.bicep: vault.properties.enablePurgeProtections: unknown property",
        id="unknown-property",
    ),
    pytest.param(
        "modules/event-subscription.bicep",
        "    queueName: eventsQueueName",
        "    queue: eventsQueueName",
        "event-subscription.bicep: eventSubscription.properties.deliveryWithResourceIdentity.destination"
        ".properties.queue: unknown property",
        id="unknown-property-through-a-variable-and-a-conditional",
    ),
    pytest.param(
        "modules/keyvault.bicep",
        "    enablePurgeProtection: true\n",
        "    enablePurgeProtection: 'true'\n",
        "keyvault.bicep: vault.properties.enablePurgeProtection: 'true' is not allowed: expected boolean",
        id="wrong-type",
    ),
    pytest.param(
        "modules/functionapp.bicep",
        "  name: 'ftp'",
        "  name: 'sftp'",
        "functionapp.bicep: ftpPublishing.name: 'sftp' is not one of 'ftp' | 'scm'",
        id="disallowed-value",
    ),
    pytest.param(
        "modules/identity.bicep",
        "  tags: tags\n",
        "  tags: tags\n  id: 'x'\n",
        "identity.bicep: appIdentity.id: read-only property",
        id="read-only-property",
    ),
    pytest.param(
        "modules/functionapp.bicep",
        "  parent: functionApp\n  name: 'ftp'",
        "  parent: plan\n  name: 'ftp'",
        "functionapp.bicep: ftpPublishing: parent plan is Microsoft.Web/serverfarms, not the parent of "
        "Microsoft.Web/sites/basicPublishingCredentialsPolicies",
        id="wrong-parent",
    ),
    pytest.param(
        "main.bicep",
        "    appIdentityName: '",
        "    appIdentityNames: 'x'\n    appIdentityName: '",
        "main.bicep: identity: unknown param appIdentityNames of identity.bicep",
        id="unknown-module-param",
    ),
    pytest.param(
        "main.bicep",
        "    applicationInsightsName: '${abbrs.insightsComponents}${resourceToken}'\n",
        "",
        "main.bicep: monitoring: required param applicationInsightsName of monitoring.bicep not given",
        id="missing-required-param",
    ),
    pytest.param(
        "main.bicep",
        "'https://${functionApp.outputs.defaultHostName}'",
        "'https://${functionApp.outputs.hostName}'",
        "main.bicep: functionApp.outputs.hostName: functionapp.bicep has no output hostName",
        id="unknown-output-in-an-interpolation",
    ),
    pytest.param(
        "modules/keyvault.bicep",
        "vault.properties.vaultUri",
        "vault.properties.vaultUrl",
        "keyvault.bicep: vault.properties.vaultUrl: Microsoft.KeyVault/vaults has no property vaultUrl",
        id="unknown-property-read",
    ),
]


@pytest.mark.parametrize(("path", "old", "new", "finding"), PLANTED)
def test_checker_finds_a_planted_error(
    types: TypeIndex, tmp_path: Path, path: str, old: str, new: str, finding: str
) -> None:
    copy = tmp_path / "infra"
    shutil.copytree(INFRA, copy)
    text = (copy / path).read_text()
    assert old in text
    (copy / path).write_text(text.replace(old, new, 1))
    assert check(copy, types) == [finding]
