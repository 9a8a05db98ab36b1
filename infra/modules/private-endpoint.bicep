// One private endpoint for one sub-resource (groupId) of a target, registered in a private DNS zone.

@description('Private endpoint name.')
param name string

@description('Location: the virtual network\'s region.')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('Subnet the endpoint gets its address from.')
param subnetId string

@description('Resource id of the target (storage account, vault).')
param targetId string

@description('Sub-resource of the target: blob, queue, table, vault.')
param groupId string

@description('Private DNS zone the endpoint registers in.')
param privateDnsZoneId string

resource endpoint 'Microsoft.Network/privateEndpoints@2023-04-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    subnet: {
      id: subnetId
    }
    privateLinkServiceConnections: [
      {
        name: name
        properties: {
          privateLinkServiceId: targetId
          groupIds: [
            groupId
          ]
        }
      }
    ]
  }
}

resource zoneGroup 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2023-04-01' = {
  parent: endpoint
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [
      {
        name: groupId
        properties: {
          privateDnsZoneId: privateDnsZoneId
        }
      }
    ]
  }
}

output id string = endpoint.id
