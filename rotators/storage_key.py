"""Storage account keys: key1 and key2 of one account, regenerated in turn.

A storage account always has two access keys, which are the two slots. A
rotation regenerates the key consumers are NOT using (its old value, from the
rotation before last, is already retired) and stores the new value; retiring a
slot regenerates that key again, so the value that was in Key Vault (and may
have leaked) stops working. Keys are regenerated and listed on the management
plane with azure-mgmt-storage, as the Function App's managed identity, and a new
key is verified on the data plane with azure-storage-blob (SharedKey).

Tags read here: `rotation-target` (or Microsoft's `ProviderAddress`), the
account's resource id `/subscriptions/<id>/resourceGroups/<rg>/providers/
Microsoft.Storage/storageAccounts/<name>`; `rotation-slots` (optional, must be
`key1,key2`); `rotation-storage-format`: `key` (the default: the bare key) or
`connection-string` (`DefaultEndpointsProtocol=https;AccountName=...;AccountKey=...`).

The identity needs the "Storage Account Key Operator Service Role" on the account
(`listKeys` and `regenerateKey`, nothing else). Keys never reach a log, an error
message or the ledger: only the key name does.
"""

import hmac
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError
from azure.mgmt.storage import StorageManagementClient
from azure.mgmt.storage.models import StorageAccountListKeysResult, StorageAccountRegenerateKeyParameters
from azure.storage.blob import BlobServiceClient
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from rotators.base import NewCredential, RotationContext
from shared.config import RotationConfig
from shared.errors import ConfigError, PossessionNotProven, UpstreamError, VerificationFailed
from shared.retry import call_with_retry

logger = logging.getLogger(__name__)

T = TypeVar("T")

TAG_FORMAT = "rotation-storage-format"
FORMAT_KEY = "key"
FORMAT_CONNECTION_STRING = "connection-string"
CONTENT_TYPES = {FORMAT_KEY: "text/plain", FORMAT_CONNECTION_STRING: "application/x-connection-string"}
KEY_SLOTS = frozenset({"key1", "key2"})
ROLE = "Storage Account Key Operator Service Role"
_RESOURCE_ID = re.compile(
    r"^/subscriptions/(?P<subscription>[0-9A-Fa-f-]{36})/resourceGroups/(?P<group>[-\w.()]{1,90})"
    r"/providers/Microsoft\.Storage/storageAccounts/(?P<name>[a-z0-9]{3,24})$",
    re.IGNORECASE,
)
# `https://{account}.blob.<suffix>`: a public or sovereign cloud, named by its endpoint suffix.
_CLOUD_BLOB_ENDPOINT = re.compile(r"^https://\{account\}\.blob\.(?P<suffix>[A-Za-z0-9.-]+)/?$")


@dataclass(frozen=True)
class _Account:
    subscription: str
    group: str
    name: str

    def __str__(self) -> str:
        return f"storage account {self.name}"


def _account(config: RotationConfig) -> _Account:
    match = _RESOURCE_ID.match(config.target.resource_id)
    if match is None:
        raise ConfigError(
            "rotation-target must be a storage account's resource id: /subscriptions/<id>/resourceGroups/"
            "<group>/providers/Microsoft.Storage/storageAccounts/<name>"
        )
    return _Account(match.group("subscription"), match.group("group"), match.group("name").lower())


def _format(config: RotationConfig) -> str:
    value = config.tags.get(TAG_FORMAT, "").strip().lower() or FORMAT_KEY
    if value not in CONTENT_TYPES:
        raise ConfigError(f"{TAG_FORMAT} must be {FORMAT_KEY} or {FORMAT_CONNECTION_STRING}")
    return value


def _describe(error: AzureError) -> str:
    if isinstance(error, HttpResponseError):
        code = getattr(error, "error_code", None) or (error.error.code if error.error else None)
        return f"HTTP {error.status_code}" + (f" {code}" if code else "")
    return type(error).__name__


def _key_from(value: str, account: str) -> str:
    """The account key in a stored value: the bare key, or the AccountKey of a connection string."""
    text = value.strip()
    if "=" not in text.rstrip("="):
        return text
    fields = dict(part.split("=", 1) for part in text.split(";") if "=" in part)
    if fields.get("AccountName", "").lower() != account or not fields.get("AccountKey"):
        raise VerificationFailed(f"the connection string is not one for {account}")
    return fields["AccountKey"]


class StorageKeyRotator:
    name = "storage-key"

    def validate(self, context: RotationContext) -> None:
        config = context.config
        if set(config.slots) != KEY_SLOTS:
            raise ConfigError("a storage account's slots are its keys: rotation-slots must be key1,key2")
        _account(config)
        _format(config)

    def prepare_slots(self, context: RotationContext) -> list[str]:
        self.validate(context)
        account = _account(context.config)
        done: list[str] = []
        with self._management(context) as client:
            keys = self._list_keys(client, account)
            try:
                # The key operator role cannot read the account: this check is a courtesy.
                properties = call_with_retry(
                    lambda: client.storage_accounts.get_properties(account.group, account.name),
                    what=f"get properties of {account}",
                    attempts=2,
                )
            except AzureError as error:
                done.append(f"{account}: shared key access not checked ({_describe(error)})")
            else:
                if properties.allow_shared_key_access is False:
                    raise ConfigError(
                        f"{account} does not allow shared key access: its keys authenticate nothing"
                    )
        missing = sorted(KEY_SLOTS - set(keys))
        if missing:
            raise UpstreamError(f"{account} has no {', '.join(missing)}")
        current = context.config.current_slot
        return [
            f"{account}: {slot} exists" + (" (current)" if slot == current else " (rotated next)")
            for slot in sorted(KEY_SLOTS)
        ] + done

    def create(self, context: RotationContext, slot: str) -> NewCredential:
        self.validate(context)
        account = _account(context.config)
        key = self._regenerate(context, account, slot)
        value_format = _format(context.config)
        value = key if value_format == FORMAT_KEY else self._connection_string(context, account, key)
        return NewCredential(value=value, credential_id=slot, content_type=CONTENT_TYPES[value_format])

    def verify(self, context: RotationContext, value: str) -> None:
        account = _account(context.config)
        self._authenticate(context, account, _key_from(value, account.name))

    def prove_possession(self, context: RotationContext, value: str) -> None:
        """The value is the account's key on the current slot, as listKeys gives it."""
        self.validate(context)
        account, slot = _account(context.config), context.config.current_slot
        try:
            presented = _key_from(value, account.name)
        except VerificationFailed as error:
            raise PossessionNotProven(str(error)) from None
        with self._management(context) as client:
            keys = self._list_keys(client, account)
        if not hmac.compare_digest(keys.get(slot, "").encode(), presented.encode()):
            raise PossessionNotProven(f"the secret's value is not {account}'s {slot}")

    def retire(self, context: RotationContext, slot: str) -> None:
        self.validate(context)
        account = _account(context.config)
        self._regenerate(context, account, slot)
        logger.info("regenerated %s of %s: its previous value no longer authenticates", slot, account)

    # ----------------------------------------------------------------- management plane

    @contextmanager
    def _management(self, context: RotationContext) -> Iterator[StorageManagementClient]:
        settings = context.settings
        # One retry layer, ours: bounded, jittered, honours Retry-After, and covers POST on 429.
        options: dict[str, Any] = {"retry_total": 0}
        if settings.upstream_ca_bundle:
            options["connection_verify"] = settings.upstream_ca_bundle
        client = StorageManagementClient(
            credential=context.credential,
            subscription_id=_account(context.config).subscription,
            base_url=settings.arm_endpoint,
            **options,
        )
        try:
            yield client
        finally:
            client.close()

    def _call(self, operation: Callable[[], T], what: str, account: _Account) -> T:
        try:
            return call_with_retry(operation, what=f"{what} of {account}", attempts=4)
        except HttpResponseError as error:
            if error.status_code in (401, 403):
                raise UpstreamError(
                    f"{what} of {account} refused ({_describe(error)}): "
                    f"the app's identity needs the {ROLE} on the account"
                ) from None
            if error.status_code == 404:
                raise ConfigError(
                    f"{account} not found ({_describe(error)}): check rotation-target"
                ) from None
            raise UpstreamError(f"{what} of {account} failed: {_describe(error)}") from None
        except AzureError as error:
            raise UpstreamError(f"{what} of {account} failed: {_describe(error)}") from None

    def _regenerate(self, context: RotationContext, account: _Account, slot: str) -> str:
        if slot not in KEY_SLOTS:
            raise ConfigError(f"slot {slot[:64]!r} is not key1 or key2")
        parameters = StorageAccountRegenerateKeyParameters(key_name=slot)
        with self._management(context) as client:
            result = self._call(
                lambda: client.storage_accounts.regenerate_key(account.group, account.name, parameters),
                f"regenerate {slot}",
                account,
            )
            keys = self._keys(result)
            if slot not in keys:  # some API versions answer without the keys: ask for them
                keys = self._list_keys(client, account)
        if slot not in keys:
            raise UpstreamError(f"{account} did not return {slot} after regenerating it")
        return keys[slot]

    def _list_keys(self, client: StorageManagementClient, account: _Account) -> dict[str, str]:
        return self._keys(
            self._call(
                lambda: client.storage_accounts.list_keys(account.group, account.name), "list keys", account
            )
        )

    @staticmethod
    def _keys(result: StorageAccountListKeysResult) -> dict[str, str]:
        return {k.key_name: k.value for k in result.keys or [] if k.key_name in KEY_SLOTS and k.value}

    # ----------------------------------------------------------------- data plane

    def _blob_endpoint(self, context: RotationContext, account: _Account) -> str:
        return context.settings.storage_blob_endpoint.format(account=account.name).rstrip("/")

    def _connection_string(self, context: RotationContext, account: _Account, key: str) -> str:
        base = f"DefaultEndpointsProtocol=https;AccountName={account.name};AccountKey={key};"
        cloud = _CLOUD_BLOB_ENDPOINT.match(context.settings.storage_blob_endpoint)
        if cloud:
            return base + f"EndpointSuffix={cloud.group('suffix')}"
        return base + f"BlobEndpoint={self._blob_endpoint(context, account)}"

    @retry(
        retry=retry_if_exception_type(VerificationFailed),
        stop=stop_after_attempt(4),
        wait=wait_random_exponential(multiplier=0.3, max=3),
        reraise=True,
    )
    def _authenticate(self, context: RotationContext, account: _Account, key: str) -> None:
        """A cheap signed call (account information); a new key may take a moment to propagate."""
        options: dict[str, Any] = {"retry_total": 0}  # the retry is this method's
        if context.settings.upstream_ca_bundle:
            options["connection_verify"] = context.settings.upstream_ca_bundle
        client = BlobServiceClient(
            account_url=self._blob_endpoint(context, account),
            credential={"account_name": account.name, "account_key": key},
            **options,
        )
        try:
            with client:
                client.get_account_information()
        except ClientAuthenticationError as error:
            raise VerificationFailed(
                f"the new key of {account} did not authenticate on the blob endpoint ({_describe(error)})"
            ) from None
        except AzureError as error:
            raise VerificationFailed(
                f"the blob endpoint of {account} did not accept the new key ({_describe(error)})"
            ) from None
