// A new vault for the secrets under rotation, hardened the way Key Vault's security baseline asks:
// Azure RBAC (no access policies), soft delete 90 days, purge protection, no public network
// access by default (private endpoint instead), firewall default Deny with the trusted-services
// bypass (Event Grid, Azure Monitor). Without private networking the app reaches the vault over
// the internet from outbound addresses Flex Consumption does not fix, so the vault is then public
// with firewall Allow: Entra ID and the RBAC roles are what guard it.

@description('Vault name (3-24 characters, globally unique).')
@minLength(3)
@maxLength(24)
param name string

@description('Location of the vault.')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('The app reaches the vault through a private endpoint (true) or over the internet (false).')
param enablePrivateNetworking bool = true

@description('Public network access with private networking. Disabled: through the private endpoint only; Enabled: also from allowedIpRanges. Without private networking it is always Enabled.')
@allowed([
  'Enabled'
  'Disabled'
])
param publicNetworkAccess string = 'Disabled'

@description('Public IPs allowed through the firewall when public network access is Enabled (operators).')
param allowedIpRanges array = []

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  //checkov:skip=CKV_AZURE_109:defaultAction is Deny whenever enablePrivateNetworking is true (the default); checkov cannot evaluate the conditional. Allow is only for the documented opt-out without private networking, where the Flex app has no fixed outbound address to allow.
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForDiskEncryption: false
    enabledForTemplateDeployment: false
    publicNetworkAccess: enablePrivateNetworking ? publicNetworkAccess : 'Enabled'
    networkAcls: {
      defaultAction: enablePrivateNetworking ? 'Deny' : 'Allow'
      bypass: 'AzureServices'
      ipRules: [for range in allowedIpRanges: {
        value: range
      }]
      virtualNetworkRules: []
    }
  }
}

output id string = vault.id
output name string = vault.name
output uri string = vault.properties.vaultUri
