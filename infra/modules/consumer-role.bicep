// A declared consumer (rotation-consumers) is made to read a new secret version: a Web App or
// Function App refreshes its Key Vault references (POST config/configreferences/appsettings/refresh,
// read back), a Container App restarts its active revisions. Website Contributor on that site, or
// Container Apps Contributor on that app: on that one resource only.

@description('Name of the consumer (in this module\'s resource group).')
param consumerName string

@description('Microsoft.Web/sites or Microsoft.App/containerApps.')
@allowed([
  'Microsoft.Web/sites'
  'Microsoft.App/containerApps'
])
param consumerType string

@description('Principal id of the Function App identity.')
param appPrincipalId string

var websiteContributor = 'de139f84-1756-47ae-9be6-808fbbe84772'
var containerAppsContributor = '358470bc-b998-42bd-ab17-a7e34c199c0f'

resource site 'Microsoft.Web/sites@2023-12-01' existing = if (consumerType == 'Microsoft.Web/sites') {
  name: consumerName
}

resource containerApp 'Microsoft.App/containerApps@2026-01-01' existing = if (consumerType == 'Microsoft.App/containerApps') {
  name: consumerName
}

resource siteRefresher 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (consumerType == 'Microsoft.Web/sites') {
  name: guid(site.id, appPrincipalId, websiteContributor)
  scope: site
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', websiteContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appRestarter 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (consumerType == 'Microsoft.App/containerApps') {
  name: guid(containerApp.id, appPrincipalId, containerAppsContributor)
  scope: containerApp
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', containerAppsContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}
