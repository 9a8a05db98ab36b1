// Secret rotation service: `azd up` deploys everything below into one resource group (plus, for
// existing vaults, the per-vault pieces into each vault's own resource group).
//
//   monitoring      Log Analytics + Application Insights (local auth disabled)
//   identity        the app's user-assigned identity
//   network         (optional, default on) VNet, subnets, private DNS zones
//   storage         the app's account: Functions host, deployment package, events queue,
//                   dead-letter container, ledger tables; no shared keys
//   functionapp     Flex Consumption (FC1), Python 3.11, runs as the user-assigned identity
//   keyvault        (optional) a new hardened vault
//   vault-rotation  per managed vault: RBAC roles, diagnostics, Event Grid system topic,
//                   private endpoint, alerts
//   event-delivery-roles  per topic: its identity may send to the queue / dead-letter container
//   event-subscription    per topic: filtered, retried, dead-lettered subscription (queue or
//                   function route; the function route waits for the postdeploy hook)
//   alerts          action group, failed-rotation log alert
//
// Local modules, not Azure Verified Modules: checkov cannot resolve `br/public:` registry
// references, and every resource here is one it must check (see infra/README.md).

targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('azd environment name; names and tags every resource.')
param environmentName string

@minLength(1)
@description('Region of the resource group and its resources (must offer Flex Consumption).')
param location string

@description('Create a new hardened vault for the secrets under rotation.')
param createVault bool = true

@description('Name of the new vault; empty for a generated one.')
@maxLength(24)
param vaultName string = ''

@description('End of the generated vault name: random per azd environment, kept by the preprovision hook and drawn again when `azd down` left the vault soft-deleted (purge protection keeps a deleted vault\'s name taken for 90 days).')
@maxLength(6)
param vaultNameSuffix string = ''

@description('Existing vaults to manage: comma-separated resource ids. Their configuration is not redeclared (see infra/README.md): they get roles, diagnostics, events, alerts.')
param existingVaultIds string = ''

@description('Public network access of the new vault with private networking: Disabled (only through its private endpoint) or Enabled (operators\' IPs through the Deny firewall). Without private networking the vault is public with firewall Allow, and Disabled is refused by the preprovision hook.')
@allowed([
  'Enabled'
  'Disabled'
])
param vaultPublicNetworkAccess string = 'Disabled'

@description('VNet integration for the app, private endpoints for storage and vaults, storage firewall default Deny.')
param enablePrivateNetworking bool = true

@description('How Key Vault events reach the app: StorageQueue (queue trigger; works with private networking) or AzureFunction (Event Grid trigger).')
@allowed([
  'StorageQueue'
  'AzureFunction'
])
param eventDelivery string = 'StorageQueue'

@description('Set by the postdeploy hook once the keyvault_events function exists: gates the AzureFunction event subscription.')
param functionEventsReady bool = false

@description('ROTATION_ALLOWED_TARGETS: host, host:port or *.suffix:port patterns, comma-separated.')
param rotationAllowedTargets string = ''

@description('ROTATION_DEFAULT_VALIDITY (ISO 8601 duration).')
param rotationDefaultValidity string = 'P90D'

@description('ROTATION_DEFAULT_OVERLAP (ISO 8601 duration).')
param rotationDefaultOverlap string = 'P1D'

@description('Storage accounts whose keys the app rotates: comma-separated resource ids (Storage Account Key Operator Service Role on each).')
param targetStorageAccountIds string = ''

@description('Declared consumers (rotation-consumers): comma-separated resource ids of Web Apps, Function Apps and Container Apps the app makes read new versions (Website Contributor / Container Apps Contributor on each; they become ROTATION_ALLOWED_CONSUMERS).')
param consumerResourceIds string = ''

@description('Email for alerts (failed rotations, dead-lettered events, vault configuration changes).')
param alertEmail string = ''

@description('Replication of the app\'s storage account (ledger, events queue). Standard_LRS works in every region; ZRS and GZRS need availability zones, GRS and GZRS a paired region.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param storageSkuName string = 'Standard_LRS'

var abbrs = loadJsonContent('abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}

var generatedVaultName = '${abbrs.keyVaultVaults}${resourceToken}${empty(vaultNameSuffix) ? '' : '-${vaultNameSuffix}'}'
var newVaultName = empty(vaultName) ? generatedVaultName : vaultName
var existingVaultIdList = empty(existingVaultIds) ? [] : split(replace(existingVaultIds, ' ', ''), ',')
var consumerIdList = empty(consumerResourceIds) ? [] : split(replace(consumerResourceIds, ' ', ''), ',')
var targetStorageIdList = empty(targetStorageAccountIds) ? [] : split(replace(targetStorageAccountIds, ' ', ''), ',')

var keyVaultDns = environment().suffixes.keyvaultDns
var newVaultUris = createVault ? [
  'https://${newVaultName}${keyVaultDns}'
] : []
var existingVaultUris = [for id in existingVaultIdList: 'https://${split(id, '/')[8]}${keyVaultDns}']
var allowedVaults = join(concat(newVaultUris, existingVaultUris), ',')
// Where each served vault is on the management plane, for the posture checklist (vault=id,...).
var newVaultPostureIds = createVault ? [
  '${newVaultUris[0]}=/subscriptions/${subscription().subscriptionId}/resourceGroups/${abbrs.resourcesResourceGroups}${environmentName}/providers/Microsoft.KeyVault/vaults/${newVaultName}'
] : []
var existingVaultPostureIds = [for (id, i) in existingVaultIdList: '${existingVaultUris[i]}=${id}']

var storageAccountName = '${abbrs.storageStorageAccounts}${resourceToken}'
var functionAppName = '${abbrs.webSitesFunctions}${resourceToken}'
var deploymentContainerName = 'app-package-${take(functionAppName, 32)}'
var deployEventSubscription = eventDelivery == 'StorageQueue' || functionEventsReady

resource rg 'Microsoft.Resources/resourceGroups@2022-09-01' = {
  name: '${abbrs.resourcesResourceGroups}${environmentName}'
  location: location
  tags: tags
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    location: location
    tags: tags
    logAnalyticsName: '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
    applicationInsightsName: '${abbrs.insightsComponents}${resourceToken}'
  }
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    location: location
    tags: tags
    appIdentityName: '${abbrs.managedIdentityUserAssignedIdentities}func-${resourceToken}'
  }
}

module network 'modules/network.bicep' = if (enablePrivateNetworking) {
  name: 'network'
  scope: rg
  params: {
    location: location
    tags: tags
    vnetName: '${abbrs.networkVirtualNetworks}${resourceToken}'
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    location: location
    tags: tags
    name: storageAccountName
    skuName: storageSkuName
    enablePrivateNetworking: enablePrivateNetworking
    deploymentContainerName: deploymentContainerName
    appPrincipalId: identity.outputs.appIdentityPrincipalId
    logAnalyticsId: monitoring.outputs.logAnalyticsId
    privateEndpointSubnetId: enablePrivateNetworking ? network.outputs.privateEndpointSubnetId : ''
    blobZoneId: enablePrivateNetworking ? network.outputs.blobZoneId : ''
    queueZoneId: enablePrivateNetworking ? network.outputs.queueZoneId : ''
    tableZoneId: enablePrivateNetworking ? network.outputs.tableZoneId : ''
  }
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  scope: rg
  params: {
    location: location
    tags: tags
    name: functionAppName
    planName: '${abbrs.webServerFarms}${resourceToken}'
    identityId: identity.outputs.appIdentityId
    identityClientId: identity.outputs.appIdentityClientId
    identityPrincipalId: identity.outputs.appIdentityPrincipalId
    storageAccountName: storage.outputs.name
    storageBlobEndpoint: storage.outputs.blobEndpoint
    deploymentContainerName: storage.outputs.deploymentContainerName
    applicationInsightsId: monitoring.outputs.applicationInsightsId
    applicationInsightsConnectionString: monitoring.outputs.applicationInsightsConnectionString
    logAnalyticsId: monitoring.outputs.logAnalyticsId
    appSubnetId: enablePrivateNetworking ? network.outputs.appSubnetId : ''
    rotationSettings: {
      ROTATION_ALLOWED_VAULTS: allowedVaults
      ROTATION_ALLOWED_TARGETS: rotationAllowedTargets
      ROTATION_DEFAULT_VALIDITY: rotationDefaultValidity
      ROTATION_DEFAULT_OVERLAP: rotationDefaultOverlap
      ROTATION_POSTGRES_SSLMODE: 'verify-full'
      ROTATION_ALLOWED_CONSUMERS: join(consumerIdList, ',')
      ROTATION_CONSUMER_SUBSCRIPTION: subscription().subscriptionId
      ROTATION_VAULT_RESOURCE_IDS: join(concat(newVaultPostureIds, existingVaultPostureIds), ',')
      ROTATION_APP_PRINCIPAL_ID: identity.outputs.appIdentityPrincipalId
    }
  }
}

module alerts 'modules/alerts.bicep' = {
  name: 'alerts'
  scope: rg
  params: {
    location: location
    tags: tags
    actionGroupName: '${abbrs.insightsActionGroups}rotation-${resourceToken}'
    alertEmail: alertEmail
    applicationInsightsId: monitoring.outputs.applicationInsightsId
    failedRotationAlertName: '${abbrs.insightsScheduledQueryRules}rotation-failed-${resourceToken}'
  }
}

module newVault 'modules/keyvault.bicep' = if (createVault) {
  name: 'keyvault'
  scope: rg
  params: {
    name: newVaultName
    location: location
    tags: tags
    enablePrivateNetworking: enablePrivateNetworking
    publicNetworkAccess: vaultPublicNetworkAccess
  }
}

module newVaultRotation 'modules/vault-rotation.bicep' = if (createVault) {
  name: 'vault-rotation-${newVaultName}'
  scope: rg
  params: {
    vaultName: createVault ? newVault.outputs.name : newVaultName
    vaultLocation: location
    networkLocation: location
    tags: tags
    appPrincipalId: identity.outputs.appIdentityPrincipalId
    logAnalyticsId: monitoring.outputs.logAnalyticsId
    enablePrivateEndpoint: enablePrivateNetworking
    privateEndpointSubnetId: enablePrivateNetworking ? network.outputs.privateEndpointSubnetId : ''
    vaultZoneId: enablePrivateNetworking ? network.outputs.vaultZoneId : ''
    actionGroupId: alerts.outputs.actionGroupId
  }
}

module newVaultEventRoles 'modules/event-delivery-roles.bicep' = if (createVault) {
  name: 'event-roles-${newVaultName}'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    eventsQueueName: storage.outputs.eventsQueueName
    deadLetterContainerName: storage.outputs.deadLetterContainerName
    topicPrincipalId: createVault ? newVaultRotation.outputs.topicPrincipalId : ''
  }
}

module newVaultSubscription 'modules/event-subscription.bicep' = if (createVault && deployEventSubscription) {
  name: 'event-subscription-${newVaultName}'
  scope: rg
  dependsOn: [
    newVaultEventRoles
  ]
  params: {
    topicName: createVault ? newVaultRotation.outputs.topicName : ''
    eventDelivery: eventDelivery
    functionAppId: functionApp.outputs.id
    storageAccountId: storage.outputs.id
    eventsQueueName: storage.outputs.eventsQueueName
    deadLetterContainerName: storage.outputs.deadLetterContainerName
  }
}

resource existingVaults 'Microsoft.KeyVault/vaults@2023-07-01' existing = [for id in existingVaultIdList: {
  name: split(id, '/')[8]
  scope: resourceGroup(split(id, '/')[2], split(id, '/')[4])
}]

module existingVaultRotation 'modules/vault-rotation.bicep' = [for (id, i) in existingVaultIdList: {
  name: 'vault-rotation-${split(id, '/')[8]}'
  scope: resourceGroup(split(id, '/')[2], split(id, '/')[4])
  params: {
    vaultName: split(id, '/')[8]
    vaultLocation: existingVaults[i].location
    networkLocation: location
    tags: tags
    appPrincipalId: identity.outputs.appIdentityPrincipalId
    logAnalyticsId: monitoring.outputs.logAnalyticsId
    enablePrivateEndpoint: enablePrivateNetworking
    privateEndpointSubnetId: enablePrivateNetworking ? network.outputs.privateEndpointSubnetId : ''
    vaultZoneId: enablePrivateNetworking ? network.outputs.vaultZoneId : ''
    actionGroupId: alerts.outputs.actionGroupId
  }
}]

module existingVaultEventRoles 'modules/event-delivery-roles.bicep' = [for (id, i) in existingVaultIdList: {
  name: 'event-roles-${split(id, '/')[8]}'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    eventsQueueName: storage.outputs.eventsQueueName
    deadLetterContainerName: storage.outputs.deadLetterContainerName
    topicPrincipalId: existingVaultRotation[i].outputs.topicPrincipalId
  }
}]

module existingVaultSubscription 'modules/event-subscription.bicep' = [for (id, i) in existingVaultIdList: if (deployEventSubscription) {
  name: 'event-subscription-${split(id, '/')[8]}'
  scope: resourceGroup(split(id, '/')[2], split(id, '/')[4])
  dependsOn: [
    existingVaultEventRoles
  ]
  params: {
    topicName: existingVaultRotation[i].outputs.topicName
    eventDelivery: eventDelivery
    functionAppId: functionApp.outputs.id
    storageAccountId: storage.outputs.id
    eventsQueueName: storage.outputs.eventsQueueName
    deadLetterContainerName: storage.outputs.deadLetterContainerName
  }
}]

module targetStorageRoles 'modules/target-storage-role.bicep' = [for id in targetStorageIdList: {
  name: 'rotation-target-${split(id, '/')[8]}'
  scope: resourceGroup(split(id, '/')[2], split(id, '/')[4])
  params: {
    storageAccountName: split(id, '/')[8]
    appPrincipalId: identity.outputs.appIdentityPrincipalId
  }
}]

module consumerRoles 'modules/consumer-role.bicep' = [for id in consumerIdList: {
  name: 'rotation-consumer-${uniqueString(id)}'
  scope: resourceGroup(split(id, '/')[2], split(id, '/')[4])
  params: {
    consumerName: split(id, '/')[8]
    consumerType: '${split(id, '/')[6]}/${split(id, '/')[7]}'
    appPrincipalId: identity.outputs.appIdentityPrincipalId
  }
}]

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_APP_ID string = functionApp.outputs.id
output AZURE_FUNCTION_URL string = 'https://${functionApp.outputs.defaultHostName}'
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_CLIENT_ID string = identity.outputs.appIdentityClientId
output AZURE_KEY_VAULT_NAME string = createVault ? newVaultName : ''
output ROTATION_ALLOWED_VAULTS string = allowedVaults
output ROTATION_EVENT_DELIVERY string = eventDelivery
output ROTATION_EVENT_SUBSCRIPTION_DEPLOYED bool = deployEventSubscription
output APPLICATIONINSIGHTS_CONNECTION_STRING string = monitoring.outputs.applicationInsightsConnectionString
