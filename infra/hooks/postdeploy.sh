#!/bin/sh
# azd postdeploy hook. Only for ROTATION_EVENT_DELIVERY=AzureFunction: Event Grid refuses a
# subscription whose AzureFunction endpoint (<app>/functions/keyvault_events) does not exist yet,
# and the function exists only once the code is deployed. So the first `azd provision` skips the
# subscription (functionEventsReady=false); after the deploy this hook waits until the host has
# indexed keyvault_events, sets ROTATION_FUNCTION_EVENTS_READY=true and provisions again, which
# adds the subscription. Later `azd up` runs include it from the start; the hook then does nothing.
# The StorageQueue route (default) needs none of this: the queue exists before the subscription.
set -eu

fail() {
  echo "postdeploy: $*" >&2
  exit 1
}

delivery="${ROTATION_EVENT_DELIVERY:-StorageQueue}"
if [ "$delivery" != "AzureFunction" ]; then
  echo "postdeploy: event delivery is $delivery; the subscription was provisioned with the infrastructure."
  exit 0
fi
if [ "${ROTATION_FUNCTION_EVENTS_READY:-false}" = "true" ]; then
  echo "postdeploy: the keyvault_events subscription is already part of the infrastructure."
  exit 0
fi

: "${AZURE_RESOURCE_GROUP:?azd did not export AZURE_RESOURCE_GROUP (run azd provision first)}"
: "${AZURE_FUNCTION_APP_NAME:?azd did not export AZURE_FUNCTION_APP_NAME (run azd provision first)}"
poll_seconds="${ROTATION_HOOK_POLL_SECONDS:-10}"
attempts=30
manual="then run: azd env set ROTATION_FUNCTION_EVENTS_READY true && azd provision"

command -v az >/dev/null 2>&1 || fail "the Azure CLI (az) is not installed; install it and run 'az login', $manual"
if ! err="$(az account show --output none 2>&1)"; then
  fail "az is not logged in or cannot read its account (az account show: $err). Run 'az login', $manual"
fi

# Only "the function does not exist yet" is worth waiting for; any other az error is final.
not_found() {
  case "$1" in
    *SubscriptionNotFound*) return 1 ;;
    *ResourceNotFound* | *NotFound* | *"Not Found"* | *"not found"*) return 0 ;;
  esac
  return 1
}

echo "postdeploy: waiting for $AZURE_FUNCTION_APP_NAME to index keyvault_events..."
tries=0
while :; do
  rc=0
  err="$(az functionapp function show --resource-group "$AZURE_RESOURCE_GROUP" \
    --name "$AZURE_FUNCTION_APP_NAME" --function-name keyvault_events \
    --query name --output tsv 2>&1 >/dev/null)" || rc=$?
  [ "$rc" -eq 0 ] && break
  # az exits 3 when the resource is missing.
  if [ "$rc" -ne 3 ] && ! not_found "$err"; then
    fail "az functionapp function show failed (exit $rc): $err; fix that, $manual"
  fi
  tries=$((tries + 1))
  if [ "$tries" -ge "$attempts" ]; then
    fail "keyvault_events was not indexed after $attempts checks $poll_seconds s apart; check the deployment, $manual"
  fi
  sleep "$poll_seconds"
done

azd env set ROTATION_FUNCTION_EVENTS_READY true
echo "postdeploy: provisioning again to add the Event Grid subscription(s) to keyvault_events."
azd provision --no-prompt
