#!/bin/sh
# azd preprovision hook: what a fresh subscription or a second `azd up` after `azd down` needs
# before the templates are deployed.
#   1. Resource providers ARM does not register by itself: Microsoft.App (the Flex Consumption
#      subnet is delegated to Microsoft.App/environments, which fails while the provider is not
#      registered), Microsoft.EventGrid (the vaults' system topics) and Microsoft.KeyVault (the
#      deleted-vault lookup below).
#   2. The new vault's name suffix (ROTATION_VAULT_NAME_SUFFIX), random and kept in the azd
#      environment. `azd down` leaves the vault soft-deleted and purge protection keeps its name
#      taken for 90 days, so when the vault with this suffix is found deleted, a new one is drawn.
#   3. A vault closed to the public without private networking would be unreachable: refused.
# Needs the Azure CLI, logged in (`az login`; azd's own login does not cover az).
set -eu

fail() {
  echo "preprovision: $*" >&2
  exit 1
}

lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

# The subscription azd deploys to, which need not be az's default one.
az_sub() {
  if [ -n "${AZURE_SUBSCRIPTION_ID:-}" ]; then
    az "$@" --subscription "$AZURE_SUBSCRIPTION_ID"
  else
    az "$@"
  fi
}

private="$(lower "${ROTATION_PRIVATE_NETWORKING:-true}")"
if [ "$private" = "false" ] && [ "$(lower "${ROTATION_VAULT_PUBLIC_NETWORK_ACCESS:-}")" = "disabled" ]; then
  fail "ROTATION_PRIVATE_NETWORKING=false with ROTATION_VAULT_PUBLIC_NETWORK_ACCESS=Disabled: without private networking the new vault has no private endpoint, so the app could not reach it. Run 'azd env set ROTATION_VAULT_PUBLIC_NETWORK_ACCESS Enabled' or turn private networking on."
fi

# Whether this hook names the new vault (not when there is none or ROTATION_VAULT_NAME names it).
name_vault=yes
if [ "$(lower "${ROTATION_CREATE_VAULT:-true}")" = "false" ] || [ -n "${ROTATION_VAULT_NAME:-}" ]; then
  name_vault=no
fi
suffix="${ROTATION_VAULT_NAME_SUFFIX:-}"
if [ "$name_vault" = "yes" ] && [ -z "$suffix" ] && [ -n "${ROTATION_ALLOWED_VAULTS:-}" ]; then
  # Provisioned before the suffix existed: a new suffix would mean a new, empty vault.
  fail "this environment's vault was named without a suffix (ROTATION_ALLOWED_VAULTS=$ROTATION_ALLOWED_VAULTS). Keep it with 'azd env set ROTATION_VAULT_NAME <its name>', or create a new vault with 'azd env set ROTATION_VAULT_NAME_SUFFIX <6 lowercase letters or digits>'."
fi

command -v az >/dev/null 2>&1 \
  || fail "the Azure CLI (az) is not installed; it registers the resource providers. Install it (https://aka.ms/azure-cli), run 'az login', then 'azd up' again."
if ! err="$(az account show --output none 2>&1)"; then
  fail "az is not logged in or cannot read its account (az account show: $err). Run 'az login', then 'azd up' again."
fi

for namespace in Microsoft.App Microsoft.EventGrid Microsoft.KeyVault; do
  if ! state="$(az_sub provider show --namespace "$namespace" --query registrationState --output tsv 2>&1)"; then
    fail "could not read the $namespace resource provider: $state"
  fi
  if [ "$state" != "Registered" ]; then
    echo "preprovision: registering the $namespace resource provider ($state); this can take a few minutes..."
    if ! err="$(az_sub provider register --namespace "$namespace" --wait 2>&1)"; then
      fail "az provider register --namespace $namespace failed (it needs Contributor or Owner on the subscription): $err"
    fi
  fi
done

if [ "$name_vault" = "no" ]; then
  exit 0
fi
if [ -n "$suffix" ]; then
  if deleted="$(az_sub keyvault list-deleted --resource-type vault --query "[?ends_with(name, '-$suffix')].name" --output tsv 2>&1)"; then
    if [ -n "$deleted" ]; then
      echo "preprovision: vault $deleted is soft-deleted (azd down?) and purge protection keeps its name for 90 days; drawing a new vault name. Its secrets stay recoverable for those 90 days: az keyvault recover --name $deleted"
      suffix=""
    fi
  else
    echo "preprovision: warning: could not list deleted vaults ($deleted); keeping the vault name suffix $suffix." >&2
  fi
fi
if [ -z "$suffix" ]; then
  suffix="$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
  azd env set ROTATION_VAULT_NAME_SUFFIX "$suffix" || fail "azd env set ROTATION_VAULT_NAME_SUFFIX failed"
  echo "preprovision: the new vault's name ends in -$suffix (ROTATION_VAULT_NAME_SUFFIX)."
fi
