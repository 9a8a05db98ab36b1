// Flex Consumption Function App (Linux, Python 3.11) running as a user-assigned identity:
// identity-based AzureWebJobsStorage, deployment package pulled with the identity, telemetry
// to Application Insights with Entra ID auth, HTTPS only, TLS 1.2, no FTP / basic publishing.

@description('Location of the app.')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('Function App name.')
param name string

@description('Flex Consumption plan name.')
param planName string

@description('Resource id of the user-assigned identity the app runs as.')
param identityId string

@description('Client id of that identity.')
param identityClientId string

@description('Principal id of that identity.')
param identityPrincipalId string

@description('The app\'s storage account (host, deployment package, ledger).')
param storageAccountName string

@description('Blob endpoint of the storage account.')
param storageBlobEndpoint string

@description('Container holding the deployment package.')
param deploymentContainerName string

@description('Application Insights component (resource id).')
param applicationInsightsId string

@description('Application Insights connection string (no secret: local auth is disabled).')
param applicationInsightsConnectionString string

@description('Log Analytics workspace for the app\'s platform logs.')
param logAnalyticsId string

@description('Subnet for outbound VNet integration; empty for none.')
param appSubnetId string = ''

@description('App settings of the rotation service (README, "App settings").')
param rotationSettings object

@description('Maximum instances the app scales out to.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Memory per instance (MB).')
@allowed([
  2048
  4096
])
param instanceMemoryMB int = 2048

var monitoringMetricsPublisher = '3913510d-42f4-4e42-8a64-420c390055eb'

var platformSettings = {
  AzureWebJobsStorage__accountName: storageAccountName
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  AZURE_CLIENT_ID: identityClientId
  APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
  // host.json says OpenTelemetry, to Application Insights: the Python worker then configures the
  // distro itself, runs each invocation in the trace of the host and stops the host from logging
  // every line twice. PYTHON_ENABLE_OPENTELEMETRY is the setting for an OTLP exporter instead.
  PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY: 'true'
}

var allSettings = union(rotationSettings, platformSettings)

resource plan 'Microsoft.Web/serverfarms@2023-12-01' = {
  //checkov:skip=CKV_AZURE_225:Zone redundancy on Flex Consumption is offered only in some regions; the service tolerates a zone outage (events are retried for 24 h, the sweeper catches up), so it is left to the region choice.
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2023-12-01' = {
  //checkov:skip=CKV_AZURE_222:The HTTP routes (rotate, adopt, status) are called by operators and runbooks over the internet with function keys; Event Grid's AzureFunction route also needs a public endpoint. Put Front Door / APIM or an inbound private endpoint in front to close it.
  //checkov:skip=CKV_AZURE_212:Flex Consumption scales per execution; there is no minimum instance count to set (always-ready instances cost money and are not needed for a rotation service).
  //checkov:skip=CKV_AZURE_213:The app has no health endpoint and Flex Consumption has no health-check instance rotation; failures surface through the failed-rotation alert.
  //checkov:skip=CKV_AZURE_17:Client certificates would break Event Grid's webhook delivery and the function-key HTTP API; callers authenticate with function keys.
  //checkov:skip=CKV_AZURE_78:Flex Consumption does not support siteConfig.ftpsState; FTP is off through the ftp basicPublishingCredentialsPolicies below (allow: false, checked by CKV_ROT_8 and tests/test_infra.py).
  //checkov:skip=CKV_AZURE_16:App Service Authentication (Easy Auth) is not used: the HTTP API is protected by function keys (AuthLevel.FUNCTION), and the Event Grid webhook would fail behind Easy Auth.
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    publicNetworkAccess: 'Enabled'
    virtualNetworkSubnetId: empty(appSubnetId) ? null : appSubnetId
    keyVaultReferenceIdentity: identityId
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storageBlobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      http20Enabled: true
      remoteDebuggingEnabled: false
      cors: {
        allowedOrigins: []
      }
      appSettings: [for setting in items(allSettings): {
        name: setting.key
        value: setting.value
      }]
    }
  }
}

resource ftpPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2023-12-01' = {
  parent: functionApp
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2023-12-01' = {
  parent: functionApp
  name: 'scm'
  properties: {
    allow: false
  }
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: last(split(applicationInsightsId, '/'))
}

// Local auth is off, so the app's identity needs this role to send telemetry.
resource telemetryPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(applicationInsights.id, identityPrincipalId, monitoringMetricsPublisher)
  scope: applicationInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisher)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource diagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: functionApp
  properties: {
    workspaceId: logAnalyticsId
    logs: [
      {
        category: 'FunctionAppLogs'
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

output id string = functionApp.id
output name string = functionApp.name
output defaultHostName string = functionApp.properties.defaultHostName
