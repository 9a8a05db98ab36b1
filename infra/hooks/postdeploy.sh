#!/bin/sh
# azd postdeploy hook. Only for ROTATION_EVENT_DELIVERY=AzureFunction: Event Grid refuses a
# subscription whose AzureFunction endpoint (<app>/functions/keyvault_events) does not exist yet,
# and the function exists only once the code is deployed. So the first `azd provision` skips the
# subscription (functionEventsReady=false); after the deploy this hook waits until the host has
# indexed keyvault_events, sets ROTATION_FUNCTION_EVENTS_READY=true and provisions again, which
# adds the subscription. Later `azd up` runs include it from the start; the hook then does nothing.
# The StorageQueue route (default) needs none of this: the queue exists before the subscription.
set -eu

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

if command -v az >/dev/null 2>&1; then
  echo "postdeploy: waiting for $AZURE_FUNCTION_APP_NAME to index keyvault_events..."
  tries=0
  until az functionapp function show --resource-group "$AZURE_RESOURCE_GROUP" \
      --name "$AZURE_FUNCTION_APP_NAME" --function-name keyvault_events \
      --query name --output tsv >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge 30 ]; then
      echo "postdeploy: keyvault_events did not appear in 5 minutes; check the deployment, then run" >&2
      echo "  azd env set ROTATION_FUNCTION_EVENTS_READY true && azd provision" >&2
      exit 1
    fi
    sleep 10
  done
else
  echo "postdeploy: az CLI not found; giving the host 60 s to index the functions."
  sleep 60
fi

azd env set ROTATION_FUNCTION_EVENTS_READY true
echo "postdeploy: provisioning again to add the Event Grid subscription(s) to keyvault_events."
azd provision --no-prompt
