// The Event Grid subscription of one vault's system topic, in the vault's resource group: only
// the Key Vault expiry events, retried for 24 h, dead-lettered to the app's storage, delivered
// either to the `keyvault-events` queue (queue trigger) or straight to the keyvault_events
// function. Both delivery and dead-lettering use the topic's system-assigned identity (the app's
// storage takes no shared keys; its firewall lets Event Grid in as a trusted service only then).

@description('The vault\'s system topic.')
param topicName string

@description('StorageQueue: events go to the queue the queue trigger reads (works with private networking). AzureFunction: straight to the Event Grid trigger.')
@allowed([
  'StorageQueue'
  'AzureFunction'
])
param eventDelivery string = 'StorageQueue'

@description('Function App resource id (AzureFunction route).')
param functionAppId string

@description('The app\'s storage account (queue destination and dead-letter container).')
param storageAccountId string

@description('Queue the events go to (StorageQueue route).')
param eventsQueueName string = 'keyvault-events'

@description('Blob container for dead-lettered events.')
param deadLetterContainerName string = 'eventgrid-deadletter'

var eventTypes = [
  'Microsoft.KeyVault.SecretNearExpiry'
  'Microsoft.KeyVault.SecretExpired'
  'Microsoft.KeyVault.KeyNearExpiry'
]

var toQueue = eventDelivery == 'StorageQueue'

var queueDestination = {
  endpointType: 'StorageQueue'
  properties: {
    resourceId: storageAccountId
    queueName: eventsQueueName
    queueMessageTimeToLiveInSeconds: 604800
  }
}

var functionDestination = {
  endpointType: 'AzureFunction'
  properties: {
    resourceId: '${functionAppId}/functions/keyvault_events'
    maxEventsPerBatch: 1
    preferredBatchSizeInKilobytes: 64
  }
}

resource topic 'Microsoft.EventGrid/systemTopics@2022-06-15' existing = {
  name: topicName
}

resource eventSubscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: topic
  // One name for both routes: switching eventDelivery updates this subscription in place instead
  // of leaving the old route's subscription behind (every event would arrive twice).
  name: 'rotation'
  properties: {
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: eventTypes
      enableAdvancedFilteringOnArrays: true
    }
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
    // Queue: delivered with the topic's identity (Event Grid base64-encodes the message, as the
    // queue trigger expects). Function: Event Grid calls the function with its system key.
    deliveryWithResourceIdentity: toQueue ? {
      identity: {
        type: 'SystemAssigned'
      }
      destination: queueDestination
    } : null
    destination: toQueue ? null : functionDestination
    deadLetterWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      deadLetterDestination: {
        endpointType: 'StorageBlob'
        properties: {
          resourceId: storageAccountId
          blobContainerName: deadLetterContainerName
        }
      }
    }
  }
}

output id string = eventSubscription.id
output name string = eventSubscription.name
