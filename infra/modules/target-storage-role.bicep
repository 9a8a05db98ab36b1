// The storage-account-key rotator regenerates and lists the keys of a target account
// (listKeys / regenerateKey on the management plane): Storage Account Key Operator Service Role,
// on that account only.

@description('Name of the target storage account (in this module\'s resource group).')
param storageAccountName string

@description('Principal id of the Function App identity.')
param appPrincipalId string

var storageAccountKeyOperatorServiceRole = '81a9662b-bebf-436f-a333-f67b29880f12'

resource target 'Microsoft.Storage/storageAccounts@2023-01-01' existing = {
  name: storageAccountName
}

resource keyOperator 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(target.id, appPrincipalId, storageAccountKeyOperatorServiceRole)
  scope: target
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageAccountKeyOperatorServiceRole)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}
