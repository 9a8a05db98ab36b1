// Private networking (optional): a virtual network with a subnet for the Function App's outbound
// VNet integration (Flex Consumption: delegated to Microsoft.App/environments) and a subnet for
// private endpoints, plus the private DNS zones those endpoints register in.

@description('Location of the virtual network.')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('Virtual network name.')
param vnetName string

@description('Address space of the virtual network.')
param addressPrefix string = '10.80.0.0/16'

@description('Subnet for the Function App integration.')
param appSubnetPrefix string = '10.80.1.0/24'

@description('Subnet for private endpoints.')
param privateEndpointSubnetPrefix string = '10.80.2.0/24'

var storageSuffix = environment().suffixes.storage
var zoneNames = [
  'privatelink.blob.${storageSuffix}'
  'privatelink.queue.${storageSuffix}'
  'privatelink.table.${storageSuffix}'
  'privatelink.vaultcore.azure.net'
]

resource vnet 'Microsoft.Network/virtualNetworks@2023-04-01' = {
  name: vnetName
  location: location
  tags: tags
  properties: {
    addressSpace: {
      addressPrefixes: [
        addressPrefix
      ]
    }
    subnets: [
      {
        name: 'snet-app'
        properties: {
          addressPrefix: appSubnetPrefix
          delegations: [
            {
              name: 'flex-consumption'
              properties: {
                serviceName: 'Microsoft.App/environments'
              }
            }
          ]
          privateEndpointNetworkPolicies: 'Disabled'
          privateLinkServiceNetworkPolicies: 'Enabled'
        }
      }
      {
        name: 'snet-private-endpoints'
        properties: {
          addressPrefix: privateEndpointSubnetPrefix
          privateEndpointNetworkPolicies: 'Disabled'
          privateLinkServiceNetworkPolicies: 'Enabled'
        }
      }
    ]
  }
}

resource zones 'Microsoft.Network/privateDnsZones@2020-06-01' = [for zoneName in zoneNames: {
  name: zoneName
  location: 'global'
  tags: tags
}]

resource zoneLinks 'Microsoft.Network/privateDnsZones/virtualNetworkLinks@2020-06-01' = [for (zoneName, i) in zoneNames: {
  parent: zones[i]
  name: '${vnetName}-link'
  location: 'global'
  tags: tags
  properties: {
    registrationEnabled: false
    virtualNetwork: {
      id: vnet.id
    }
  }
}]

output vnetId string = vnet.id
output appSubnetId string = '${vnet.id}/subnets/snet-app'
output privateEndpointSubnetId string = '${vnet.id}/subnets/snet-private-endpoints'
output blobZoneId string = zones[0].id
output queueZoneId string = zones[1].id
output tableZoneId string = zones[2].id
output vaultZoneId string = zones[3].id
