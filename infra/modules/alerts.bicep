// The action group every alert notifies, and the failed-rotation alert: a log search on the app's
// Application Insights for the engine's failure lines and for the exception the event triggers
// raise so that Event Grid / the queue redeliver.

@description('Location of the log alert.')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('Action group name.')
param actionGroupName string

@description('Email that receives the alerts; empty for none (add receivers later).')
param alertEmail string = ''

@description('Application Insights component the rotation logs go to.')
param applicationInsightsId string

@description('Name for the failed-rotation alert.')
param failedRotationAlertName string

var emailReceivers = empty(alertEmail) ? [] : [
  {
    name: 'operator'
    emailAddress: alertEmail
    useCommonAlertSchema: true
  }
]

// Lines the engine logs on failure: "<name>: rotation <id> failed at step <step>: ...",
// "<name>: retiring slot <slot> failed: ...", "<name>: sweep failed: ...", rollbacks, and the
// RetryableFailure the event triggers raise.
var failedRotationQuery = 'union isfuzzy=true (traces | where severityLevel >= 2 | where message has " failed at step " or message has " failed: " or message has "rolling back rotation" | project timestamp, cloud_RoleName, message), (exceptions | where type endswith "RetryableFailure" or outerMessage has " failed at step " | project timestamp, cloud_RoleName, message = outerMessage)'

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: actionGroupName
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'rotation'
    enabled: true
    emailReceivers: emailReceivers
  }
}

resource failedRotations 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: failedRotationAlertName
  location: location
  tags: tags
  properties: {
    displayName: 'Secret rotation failed'
    description: 'A rotation failed, was rolled back, or could not retire an old credential. Run `scripts/rotation status <name>` and see the ledger\'s last error.'
    severity: 1
    enabled: true
    scopes: [
      applicationInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: failedRotationQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

output actionGroupId string = actionGroup.id
output failedRotationAlertId string = failedRotations.id
