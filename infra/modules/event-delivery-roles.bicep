// One Event Grid system topic's system-assigned identity may send to the events queue and write to
// the dead-letter container of the app's storage account, and nothing else. (A storage account
// behind a firewall takes Event Grid's trusted-service access only with the system-assigned
// identity, not a user-assigned one.) Deployed in the app's resource group, between the topic and
// its subscription.

@description('The app\'s storage account.')
param storageAccountName string

@description('Queue the events are delivered to.')
param eventsQueueName string

@description('Container dead-lettered events are written to.')
param deadLetterContainerName string

@description('Principal id of the system topic\'s system-assigned identity.')
param topicPrincipalId string

// Built-in role definitions (https://learn.microsoft.com/azure/role-based-access-control/built-in-roles).
var roles = {
  storageQueueDataMessageSender: 'c6a89b2d-59bc-44d0-9896-0f6e12d7b80a'
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
}

resource storage 'Microsoft.Storage/storageAccounts@2023-01-01' existing = {
  name: storageAccountName
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-01-01' existing = {
  parent: storage
  name: 'default'
}

resource queue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-01-01' existing = {
  parent: queueService
  name: eventsQueueName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-01-01' existing = {
  parent: storage
  name: 'default'
}

resource container 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-01-01' existing = {
  parent: blobService
  name: deadLetterContainerName
}

resource queueSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, topicPrincipalId, roles.storageQueueDataMessageSender)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataMessageSender)
    principalId: topicPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource deadLetterWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(container.id, topicPrincipalId, roles.storageBlobDataContributor)
  scope: container
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    principalId: topicPrincipalId
    principalType: 'ServicePrincipal'
  }
}
