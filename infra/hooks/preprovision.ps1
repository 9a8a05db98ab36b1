# azd preprovision hook (Windows). Same as preprovision.sh: refuse a vault closed to the public
# without private networking, check that az is installed and logged in, register the
# Microsoft.App / Microsoft.EventGrid / Microsoft.KeyVault resource providers, and keep a random
# vault name suffix in the azd environment, drawing a new one when `azd down` left the vault with
# the current suffix soft-deleted (purge protection keeps its name taken for 90 days).
$ErrorActionPreference = 'Stop'

function Fail([string] $message) {
    [Console]::Error.WriteLine("preprovision: $message")
    exit 1
}

# Runs az in the subscription azd deploys to; returns @{ Code; Output } (stdout and stderr).
function Invoke-Az([string[]] $arguments) {
    if ($env:AZURE_SUBSCRIPTION_ID) { $arguments += @('--subscription', $env:AZURE_SUBSCRIPTION_ID) }
    $ErrorActionPreference = 'Continue'
    $output = (& az @arguments 2>&1 | Out-String).Trim()
    @{ Code = $LASTEXITCODE; Output = $output }
}

$privateNetworking = if ($env:ROTATION_PRIVATE_NETWORKING) { $env:ROTATION_PRIVATE_NETWORKING } else { 'true' }
if ($privateNetworking -eq 'false' -and $env:ROTATION_VAULT_PUBLIC_NETWORK_ACCESS -eq 'Disabled') {
    Fail "ROTATION_PRIVATE_NETWORKING=false with ROTATION_VAULT_PUBLIC_NETWORK_ACCESS=Disabled: without private networking the new vault has no private endpoint, so the app could not reach it. Run 'azd env set ROTATION_VAULT_PUBLIC_NETWORK_ACCESS Enabled' or turn private networking on."
}

# Whether this hook names the new vault (not when there is none or ROTATION_VAULT_NAME names it).
$nameVault = $env:ROTATION_CREATE_VAULT -ne 'false' -and -not $env:ROTATION_VAULT_NAME
$suffix = $env:ROTATION_VAULT_NAME_SUFFIX
if ($nameVault -and -not $suffix -and $env:ROTATION_ALLOWED_VAULTS) {
    # Provisioned before the suffix existed: a new suffix would mean a new, empty vault.
    Fail "this environment's vault was named without a suffix (ROTATION_ALLOWED_VAULTS=$($env:ROTATION_ALLOWED_VAULTS)). Keep it with 'azd env set ROTATION_VAULT_NAME <its name>', or create a new vault with 'azd env set ROTATION_VAULT_NAME_SUFFIX <6 lowercase letters or digits>'."
}

if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    Fail "the Azure CLI (az) is not installed; it registers the resource providers. Install it (https://aka.ms/azure-cli), run 'az login', then 'azd up' again."
}
$account = Invoke-Az @('account', 'show', '--output', 'none')
if ($account.Code -ne 0) {
    Fail "az is not logged in or cannot read its account (az account show: $($account.Output)). Run 'az login', then 'azd up' again."
}

foreach ($namespace in @('Microsoft.App', 'Microsoft.EventGrid', 'Microsoft.KeyVault')) {
    $state = Invoke-Az @('provider', 'show', '--namespace', $namespace, '--query', 'registrationState', '--output', 'tsv')
    if ($state.Code -ne 0) { Fail "could not read the $namespace resource provider: $($state.Output)" }
    if ($state.Output -ne 'Registered') {
        Write-Host "preprovision: registering the $namespace resource provider ($($state.Output)); this can take a few minutes..."
        $register = Invoke-Az @('provider', 'register', '--namespace', $namespace, '--wait')
        if ($register.Code -ne 0) {
            Fail "az provider register --namespace $namespace failed (it needs Contributor or Owner on the subscription): $($register.Output)"
        }
    }
}

if (-not $nameVault) { exit 0 }
if ($suffix) {
    $deleted = Invoke-Az @('keyvault', 'list-deleted', '--resource-type', 'vault', '--query', "[?ends_with(name, '-$suffix')].name", '--output', 'tsv')
    if ($deleted.Code -ne 0) {
        [Console]::Error.WriteLine("preprovision: warning: could not list deleted vaults ($($deleted.Output)); keeping the vault name suffix $suffix.")
    } elseif ($deleted.Output) {
        Write-Host "preprovision: vault $($deleted.Output) is soft-deleted (azd down?) and purge protection keeps its name for 90 days; drawing a new vault name. Its secrets stay recoverable for those 90 days: az keyvault recover --name $($deleted.Output)"
        $suffix = ''
    }
}
if (-not $suffix) {
    $suffix = -join (1..3 | ForEach-Object { '{0:x2}' -f (Get-Random -Maximum 256) })
    azd env set ROTATION_VAULT_NAME_SUFFIX $suffix
    if ($LASTEXITCODE -ne 0) { Fail 'azd env set ROTATION_VAULT_NAME_SUFFIX failed' }
    Write-Host "preprovision: the new vault's name ends in -$suffix (ROTATION_VAULT_NAME_SUFFIX)."
}
