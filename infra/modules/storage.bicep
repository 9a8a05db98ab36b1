// The Function App's own storage account: Functions host (blobs, queues), the Flex Consumption
// deployment package container, the Event Grid queue `keyvault-events` and its dead-letter
// container, and the rotation ledger (Table storage). Entra ID only: shared keys are disabled.

@description('Location of the account.')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('Storage account name.')
param name string

@description('Replication: Standard_LRS works in every region (ZRS/GZRS need availability zones, GRS/GZRS a paired region).')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param skuName string = 'Standard_LRS'

@description('Deny public network traffic (trusted Azure services such as Event Grid still deliver with their managed identity); reach the account through private endpoints.')
param enablePrivateNetworking bool = true

@description('Container the Flex Consumption app deploys its package from.')
param deploymentContainerName string

@description('Container Event Grid dead-letters undeliverable events to.')
param deadLetterContainerName string = 'eventgrid-deadletter'

@description('Queue the Key Vault events are routed to (the queue trigger reads it).')
param eventsQueueName string = 'keyvault-events'

@description('Principal id of the Function App identity.')
param appPrincipalId string

@description('Log Analytics workspace for the storage services\' diagnostic logs.')
param logAnalyticsId string

@description('Private endpoint subnet (when private networking is on).')
param privateEndpointSubnetId string = ''

@description('Private DNS zones by service (when private networking is on).')
param blobZoneId string = ''
param queueZoneId string = ''
param tableZoneId string = ''

// Built-in role definitions (https://learn.microsoft.com/azure/role-based-access-control/built-in-roles).
var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
}

// The ledger's tables; the app also creates them if missing.
var ledgerTables = [
  'rotationstate'
  'rotationhistory'
  'rotationinventory'
]

resource storage 'Microsoft.Storage/storageAccounts@2023-01-01' = {
  //checkov:skip=CKV_AZURE_206:Replication is the storageSkuName parameter (ROTATION_STORAGE_SKU). Its default, Standard_LRS, is the only one every Flex Consumption region offers (ZRS/GZRS need availability zones, GRS a paired region); set Standard_GZRS where the region has both.
  //checkov:skip=CKV_AZURE_59:publicNetworkAccess stays Enabled with the firewall at default Deny: 'Disabled' would also shut out the trusted-service exception Event Grid needs to deliver to the queue and dead-letter container (it cannot use a private endpoint).
  //checkov:skip=CKV_AZURE_35:defaultAction is Deny whenever enablePrivateNetworking is true (the default); checkov cannot evaluate the conditional. Allow is only for the documented opt-out, where the Flex app has no VNet integration and reaches storage publicly (Entra ID only, no shared keys).
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  properties: {
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    // Enabled + default Deny: only trusted Azure services with a managed identity (Event Grid's
    // queue delivery and dead-lettering) and the private endpoints get in. 'Disabled' would also
    // shut out Event Grid, which cannot deliver through a private endpoint.
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: enablePrivateNetworking ? 'Deny' : 'Allow'
      bypass: 'AzureServices'
      ipRules: []
      virtualNetworkRules: []
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
          keyType: 'Account'
        }
        file: {
          enabled: true
          keyType: 'Account'
        }
        queue: {
          enabled: true
          keyType: 'Account'
        }
        table: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-01-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 14
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 14
    }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-01-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource deadLetterContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-01-01' = {
  parent: blobService
  name: deadLetterContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-01-01' = {
  parent: storage
  name: 'default'
}

resource eventsQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-01-01' = {
  parent: queueService
  name: eventsQueueName
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-01-01' = {
  parent: storage
  name: 'default'
}

resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-01-01' = [for table in ledgerTables: {
  parent: tableService
  name: table
}]

// Functions host: blobs (leases, deployment package) and queues (the queue trigger).
resource appBlobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, appPrincipalId, roles.storageBlobDataOwner)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appQueueContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, appPrincipalId, roles.storageQueueDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// The ledger.
resource appTableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, appPrincipalId, roles.storageTableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Who read or wrote the ledger and the queues, in Log Analytics.
resource blobDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: blobService
  properties: {
    workspaceId: logAnalyticsId
    logs: [
      {
        category: 'StorageWrite'
        enabled: true
      }
      {
        category: 'StorageDelete'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

resource queueDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: queueService
  properties: {
    workspaceId: logAnalyticsId
    logs: [
      {
        category: 'StorageRead'
        enabled: true
      }
      {
        category: 'StorageWrite'
        enabled: true
      }
      {
        category: 'StorageDelete'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

resource tableDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: tableService
  properties: {
    workspaceId: logAnalyticsId
    logs: [
      {
        category: 'StorageRead'
        enabled: true
      }
      {
        category: 'StorageWrite'
        enabled: true
      }
      {
        category: 'StorageDelete'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

module blobEndpoint 'private-endpoint.bicep' = if (enablePrivateNetworking) {
  name: 'pep-${name}-blob'
  params: {
    name: 'pep-${name}-blob'
    location: location
    tags: tags
    subnetId: privateEndpointSubnetId
    targetId: storage.id
    groupId: 'blob'
    privateDnsZoneId: blobZoneId
  }
}

module queueEndpoint 'private-endpoint.bicep' = if (enablePrivateNetworking) {
  name: 'pep-${name}-queue'
  params: {
    name: 'pep-${name}-queue'
    location: location
    tags: tags
    subnetId: privateEndpointSubnetId
    targetId: storage.id
    groupId: 'queue'
    privateDnsZoneId: queueZoneId
  }
}

module tableEndpoint 'private-endpoint.bicep' = if (enablePrivateNetworking) {
  name: 'pep-${name}-table'
  params: {
    name: 'pep-${name}-table'
    location: location
    tags: tags
    subnetId: privateEndpointSubnetId
    targetId: storage.id
    groupId: 'table'
    privateDnsZoneId: tableZoneId
  }
}

output id string = storage.id
output name string = storage.name
output blobEndpoint string = storage.properties.primaryEndpoints.blob
output deploymentContainerName string = deploymentContainer.name
output deadLetterContainerName string = deadLetterContainer.name
output eventsQueueName string = eventsQueue.name
