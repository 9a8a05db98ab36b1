// What one managed vault (new or existing) needs for rotation, deployed in the vault's own
// resource group: the app's data-plane roles on the vault, diagnostic settings to Log Analytics,
// the Event Grid system topic (its subscription is event-subscription.bicep, deployed once the
// topic's identity may write to the app's storage), an optional private endpoint, and the vault's
// alerts (dead-lettered events, access-model or network-rule changes).

@description('Name of the vault (it exists: new vaults are created by keyvault.bicep first).')
param vaultName string

@description('Location of the vault: the system topic must be in the same region.')
param vaultLocation string

@description('Location of the virtual network (for the private endpoint).')
param networkLocation string

@description('Tags for every resource.')
param tags object = {}

@description('Principal id of the Function App identity.')
param appPrincipalId string

@description('Log Analytics workspace for the vault\'s AuditEvent log and metrics.')
param logAnalyticsId string

@description('Create a private endpoint for the vault.')
param enablePrivateEndpoint bool = false

@description('Private endpoint subnet.')
param privateEndpointSubnetId string = ''

@description('privatelink.vaultcore.azure.net zone.')
param vaultZoneId string = ''

@description('Action group the alerts notify.')
param actionGroupId string

// Built-in role definitions (https://learn.microsoft.com/azure/role-based-access-control/built-in-roles).
// Officer, never Administrator: the app manages secrets and keys, never the vault's role assignments.
var roles = {
  keyVaultSecretsOfficer: 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
  keyVaultCryptoOfficer: '14b46e9e-c2b7-41b4-b07b-48a6ebf60603'
  // The posture checklist reads the vault's properties, diagnostic settings and role assignments.
  reader: 'acdd72a7-3385-48ef-bd42-f606fba81ae7'
}

var topicName = 'egst-${vaultName}'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: vaultName
}

resource secretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, appPrincipalId, roles.keyVaultSecretsOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsOfficer)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource postureReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, appPrincipalId, roles.reader)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.reader)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource cryptoOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, appPrincipalId, roles.keyVaultCryptoOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultCryptoOfficer)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource vaultDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: vault
  properties: {
    workspaceId: logAnalyticsId
    logs: [
      {
        category: 'AuditEvent'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

resource topic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: topicName
  location: vaultLocation
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: vault.id
    topicType: 'Microsoft.KeyVault.vaults'
  }
}

resource topicDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: topic
  properties: {
    workspaceId: logAnalyticsId
    logs: [
      {
        category: 'DeliveryFailures'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

resource deadLetterAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'ma-deadletter-${vaultName}'
  location: 'global'
  tags: tags
  properties: {
    description: 'Key Vault events for ${vaultName} were dead-lettered: a rotation was not triggered. Inspect the dead-letter container and replay or rotate by hand.'
    severity: 1
    enabled: true
    scopes: [
      topic.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          name: 'DeadLettered'
          criterionType: 'StaticThresholdCriterion'
          metricNamespace: 'Microsoft.EventGrid/systemTopics'
          metricName: 'DeadLetteredCount'
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Total'
        }
      ]
    }
    actions: [
      {
        actionGroupId: actionGroupId
      }
    ]
  }
}

// Someone changed the vault itself: access model (RBAC / access policies), network rules, public
// access, purge protection... all of them are a write on the vault resource.
resource vaultChangeAlert 'Microsoft.Insights/activityLogAlerts@2020-10-01' = {
  name: 'ala-vault-change-${vaultName}'
  location: 'global'
  tags: tags
  properties: {
    description: 'The configuration of vault ${vaultName} (access model, network rules, access policies) changed.'
    enabled: true
    scopes: [
      resourceGroup().id
    ]
    condition: {
      allOf: [
        {
          field: 'category'
          equals: 'Administrative'
        }
        {
          field: 'resourceId'
          equals: vault.id
        }
        {
          anyOf: [
            {
              field: 'operationName'
              equals: 'Microsoft.KeyVault/vaults/write'
            }
            {
              field: 'operationName'
              equals: 'Microsoft.KeyVault/vaults/accessPolicies/write'
            }
          ]
        }
      ]
    }
    actions: {
      actionGroups: [
        {
          actionGroupId: actionGroupId
        }
      ]
    }
  }
}

module privateEndpoint 'private-endpoint.bicep' = if (enablePrivateEndpoint) {
  name: 'pep-${vaultName}'
  params: {
    name: 'pep-${vaultName}'
    location: networkLocation
    tags: tags
    subnetId: privateEndpointSubnetId
    targetId: vault.id
    groupId: 'vault'
    privateDnsZoneId: vaultZoneId
  }
}

output topicId string = topic.id
output topicName string = topic.name
output topicPrincipalId string = topic.identity.principalId
output vaultUri string = 'https://${vaultName}${environment().suffixes.keyvaultDns}'
