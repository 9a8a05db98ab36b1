# azd postdeploy hook (Windows). Same as postdeploy.sh: for ROTATION_EVENT_DELIVERY=AzureFunction,
# wait until keyvault_events exists, then set ROTATION_FUNCTION_EVENTS_READY=true and provision
# again so the Event Grid subscription to the function is created.
$ErrorActionPreference = 'Stop'

$delivery = if ($env:ROTATION_EVENT_DELIVERY) { $env:ROTATION_EVENT_DELIVERY } else { 'StorageQueue' }
if ($delivery -ne 'AzureFunction') {
    Write-Host "postdeploy: event delivery is $delivery; the subscription was provisioned with the infrastructure."
    exit 0
}
if ($env:ROTATION_FUNCTION_EVENTS_READY -eq 'true') {
    Write-Host 'postdeploy: the keyvault_events subscription is already part of the infrastructure.'
    exit 0
}
if (-not $env:AZURE_RESOURCE_GROUP -or -not $env:AZURE_FUNCTION_APP_NAME) {
    throw 'azd did not export AZURE_RESOURCE_GROUP / AZURE_FUNCTION_APP_NAME (run azd provision first)'
}

if (Get-Command az -ErrorAction SilentlyContinue) {
    Write-Host "postdeploy: waiting for $($env:AZURE_FUNCTION_APP_NAME) to index keyvault_events..."
    $found = $false
    for ($i = 0; $i -lt 30; $i++) {
        az functionapp function show --resource-group $env:AZURE_RESOURCE_GROUP `
            --name $env:AZURE_FUNCTION_APP_NAME --function-name keyvault_events `
            --query name --output tsv *> $null
        if ($LASTEXITCODE -eq 0) { $found = $true; break }
        Start-Sleep -Seconds 10
    }
    if (-not $found) {
        throw 'keyvault_events did not appear in 5 minutes; check the deployment, then run: azd env set ROTATION_FUNCTION_EVENTS_READY true; azd provision'
    }
} else {
    Write-Host 'postdeploy: az CLI not found; giving the host 60 s to index the functions.'
    Start-Sleep -Seconds 60
}

azd env set ROTATION_FUNCTION_EVENTS_READY true
if ($LASTEXITCODE -ne 0) { throw 'azd env set failed' }
Write-Host 'postdeploy: provisioning again to add the Event Grid subscription(s) to keyvault_events.'
azd provision --no-prompt
if ($LASTEXITCODE -ne 0) { throw 'azd provision failed' }
