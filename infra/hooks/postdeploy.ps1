# azd postdeploy hook (Windows). Same as postdeploy.sh: for ROTATION_EVENT_DELIVERY=AzureFunction,
# check that az is installed and logged in, wait until keyvault_events exists (only "not found"
# is waited for; any other az error is final), then set ROTATION_FUNCTION_EVENTS_READY=true and
# provision again so the Event Grid subscription to the function is created.
$ErrorActionPreference = 'Stop'

$manual = 'then run: azd env set ROTATION_FUNCTION_EVENTS_READY true; azd provision'
function Fail([string] $message) {
    [Console]::Error.WriteLine("postdeploy: $message")
    exit 1
}

# Returns @{ Code; Output } (stdout and stderr) of one az call.
function Invoke-Az([string[]] $arguments) {
    $ErrorActionPreference = 'Continue'
    $output = (& az @arguments 2>&1 | Out-String).Trim()
    @{ Code = $LASTEXITCODE; Output = $output }
}

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
    Fail 'azd did not export AZURE_RESOURCE_GROUP / AZURE_FUNCTION_APP_NAME (run azd provision first)'
}
$pollSeconds = if ($env:ROTATION_HOOK_POLL_SECONDS) { [int] $env:ROTATION_HOOK_POLL_SECONDS } else { 10 }
$attempts = 30

if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    Fail "the Azure CLI (az) is not installed; install it and run 'az login', $manual"
}
$account = Invoke-Az @('account', 'show', '--output', 'none')
if ($account.Code -ne 0) {
    Fail "az is not logged in or cannot read its account (az account show: $($account.Output)). Run 'az login', $manual"
}

Write-Host "postdeploy: waiting for $($env:AZURE_FUNCTION_APP_NAME) to index keyvault_events..."
for ($try = 1; ; $try++) {
    $show = Invoke-Az @('functionapp', 'function', 'show', '--resource-group', $env:AZURE_RESOURCE_GROUP,
        '--name', $env:AZURE_FUNCTION_APP_NAME, '--function-name', 'keyvault_events', '--query', 'name', '--output', 'tsv')
    if ($show.Code -eq 0) { break }
    # az exits 3 when the resource is missing.
    $notFound = $show.Output -notmatch 'SubscriptionNotFound' -and $show.Output -match 'NotFound|Not Found|not found'
    if ($show.Code -ne 3 -and -not $notFound) {
        Fail "az functionapp function show failed (exit $($show.Code)): $($show.Output); fix that, $manual"
    }
    if ($try -ge $attempts) {
        Fail "keyvault_events was not indexed after $attempts checks $pollSeconds s apart; check the deployment, $manual"
    }
    Start-Sleep -Seconds $pollSeconds
}

azd env set ROTATION_FUNCTION_EVENTS_READY true
if ($LASTEXITCODE -ne 0) { Fail 'azd env set failed' }
Write-Host 'postdeploy: provisioning again to add the Event Grid subscription(s) to keyvault_events.'
azd provision --no-prompt
if ($LASTEXITCODE -ne 0) { Fail 'azd provision failed' }
