// A new vault for the secrets under rotation, hardened the way Key Vault's security baseline asks:
// Azure RBAC (no access policies), soft delete 90 days, purge protection, no public network
// access by default (private endpoint instead), firewall default Deny with the trusted-services
// bypass (Event Grid, Azure Monitor).

@description('Vault name (3-24 characters, globally unique).')
@minLength(3)
@maxLength(24)
param name string

@description('Location of the vault.')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('Public network access. Disabled: reach the vault through the private endpoint only.')
@allowed([
  'Enabled'
  'Disabled'
])
param publicNetworkAccess string = 'Disabled'

@description('Public IPs allowed through the firewall when public network access is Enabled (operators).')
param allowedIpRanges array = []

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
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
    publicNetworkAccess: publicNetworkAccess
    networkAcls: {
      defaultAction: 'Deny'
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
