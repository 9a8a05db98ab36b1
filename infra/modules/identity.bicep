// The Function App's user-assigned managed identity (Key Vault, ledger, Functions host, telemetry,
// deployment package). Event Grid delivers with each system topic's own system-assigned identity:
// a storage account behind a firewall accepts Event Grid's trusted-service access only from that.

@description('Location of the identities.')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('Name of the Function App identity.')
param appIdentityName string

resource appIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: appIdentityName
  location: location
  tags: tags
}

output appIdentityId string = appIdentity.id
output appIdentityName string = appIdentity.name
output appIdentityClientId string = appIdentity.properties.clientId
output appIdentityPrincipalId string = appIdentity.properties.principalId
