"""Entra ID application client secrets: two password credentials of one app registration.

The slots are two password credentials this service adds through Microsoft Graph, each
named `rotation:<secret>:<slot>` (its displayName). A rotation removes what the inactive
slot still holds (nobody uses it), adds a password on it (`addPassword`; the secretText is
in that answer only), and checks it obtains a token through azure-identity's
ClientSecretCredential, retrying while Entra propagates it. Retiring a slot removes its
passwords (`removePassword` by keyId). A credential with any other displayName is never
touched: the service did not create it.

Tags read here:
- `rotation-target`: Microsoft Graph's URL (ROTATION_GRAPH_ENDPOINT, `https://graph.microsoft.com`);
- `rotation-entra-tenant`: the tenant id (a GUID);
- `rotation-entra-app`: the application's object id (a GUID; not its appId);
- `rotation-slots`: two slot names (for example `slot-a,slot-b`);
- `rotation-entra-format`: `json` (the default: tenant_id, client_id, client_secret, key_id)
  or `secret` (the bare secret).

The Function App's identity needs the Graph application permission
`Application.ReadWrite.OwnedBy` and must be an owner of each target application. Graph is
called with azure-core's pipeline against the REST API: azure-core is loaded for Key Vault
already, while msgraph-sdk 1.65 adds 150-290 ms of imports on top of it (measured on the dev
machine, GraphServiceClient and the addPassword builders). A secret never reaches a log or an
error: Graph and Entra refusals are reduced to their status and error code (AADSTS number).
"""

import base64
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import requests
from azure.core import PipelineClient
from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError
from azure.core.pipeline.policies import BearerTokenCredentialPolicy, RequestIdPolicy, UserAgentPolicy
from azure.core.pipeline.transport import RequestsTransport
from azure.core.rest import HttpRequest
from azure.identity import ClientSecretCredential
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from rotators.base import NewCredential, RotationContext
from shared.config import RotationConfig
from shared.errors import ConfigError, PossessionNotProven, UpstreamError, VerificationFailed
from shared.reach import PinnedAdapter
from shared.retry import call_with_retry
from shared.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

TAG_TENANT = "rotation-entra-tenant"
TAG_APP = "rotation-entra-app"
TAG_FORMAT = "rotation-entra-format"
FORMAT_JSON = "json"
FORMAT_SECRET = "secret"
CONTENT_TYPES = {FORMAT_JSON: "application/json", FORMAT_SECRET: "text/plain"}
PERMISSION = "Application.ReadWrite.OwnedBy"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
POLICY_CODES = {
    "CredentialInvalidLifetimeAsPerAppPolicy": (
        "the tenant's app management policy refuses a password that long: make rotation-validity "
        "no longer than the policy's maxLifetime for passwords"
    ),
    "CredentialTypeNotAllowedAsPerAppPolicy": (
        "the tenant's app management policy allows no password credentials on this application: "
        "use a certificate or a federated credential instead"
    ),
}
# Graph's answer when an application holds as many password credentials as it may (the
# stand-in's code; Entra's real one is not documented, so a message naming a limit counts too).
LIMIT_CODES = frozenset({"TooManyPasswordCredentials"})
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_CODE = re.compile(r"^[A-Za-z0-9_.]{1,80}$")
_AADSTS = re.compile(r"\bAADSTS(\d{4,8})\b")
_PRINTABLE = re.compile(r"^[\x21-\x7e]{8,1024}$")
_MAX_PAGES = 50


def _tag(config: RotationConfig, name: str) -> str:
    value = config.tags.get(name)
    return value.strip() if isinstance(value, str) else ""


def _guid(config: RotationConfig, name: str, what: str) -> str:
    value = _tag(config, name)
    if not _GUID.match(value):
        raise ConfigError(f"tag {name} must be the {what} (a GUID)")
    return value.lower()


def _format(config: RotationConfig) -> str:
    value = _tag(config, TAG_FORMAT).lower() or FORMAT_JSON
    if value not in CONTENT_TYPES:
        raise ConfigError(f"{TAG_FORMAT} must be {FORMAT_JSON} or {FORMAT_SECRET}")
    return value


def marker(secret_name: str, slot: str) -> str:
    """The displayName of the password this service keeps on `slot` for a secret."""
    return f"rotation:{secret_name.lower()}:{slot}"


@dataclass(frozen=True)
class _Value:
    """A stored value: the client secret, and what the JSON form says about it."""

    secret: str
    key_id: str = ""
    client_id: str = ""
    tenant_id: str = ""


def _parse_value(value: str) -> _Value:
    text = value.strip()
    if text.startswith("{"):
        try:
            document = json.loads(text)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise VerificationFailed("the value is not the JSON this rotator writes")
        fields = {key: document.get(key) for key in ("client_secret", "key_id", "client_id", "tenant_id")}
        if not all(isinstance(field, str) for field in fields.values()):
            raise VerificationFailed("the JSON value needs tenant_id, client_id, client_secret and key_id")
        text = fields["client_secret"] or ""
        parsed = _Value(text, fields["key_id"] or "", fields["client_id"] or "", fields["tenant_id"] or "")
    else:
        parsed = _Value(text)
    if not _PRINTABLE.match(parsed.secret):
        raise VerificationFailed("the value holds no client secret")
    return parsed


def _graph_error(error: HttpResponseError) -> dict[str, Any]:
    """The `error` object of a Graph answer ({} when there is none)."""
    try:
        body = json.loads(error.response.text()) if error.response is not None else None
    except (ValueError, AttributeError):
        return {}
    found = body.get("error") if isinstance(body, dict) else None
    return found if isinstance(found, dict) else {}


def _graph_code(error: HttpResponseError) -> str:
    """Graph's error code, if it is a plain one; never the message or the body."""
    code = _graph_error(error).get("code")
    return code if isinstance(code, str) and _CODE.match(code) else ""


def _graph_message(error: HttpResponseError) -> str:
    """Graph's message: read to recognise a refusal, never recorded."""
    message = _graph_error(error).get("message")
    return message if isinstance(message, str) else ""


def _entra_refusal(error: ClientAuthenticationError) -> str:
    """`AADSTS<number>` from an Entra refusal (its description can quote the request)."""
    found = _AADSTS.search(str(error.message or ""))
    return f"AADSTS{found.group(1)}" if found else "no AADSTS code"


def _claims(token: str) -> dict[str, Any]:
    """An access token's claims. It came from the authority over TLS just now: no signature check."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


class _Graph:
    """Graph's REST API as the Function App's identity, with our CA and the checked address."""

    def __init__(self, settings: Settings, credential: TokenCredential, app_object_id: str = "") -> None:
        self.app_object_id = app_object_id
        self.where = f"application {app_object_id}" if app_object_id else "Graph"
        session = requests.Session()
        session.trust_env = False
        session.mount("https://", PinnedAdapter(settings))
        transport = RequestsTransport(
            session=session,
            session_owner=True,
            connection_verify=settings.upstream_ca_bundle or True,
            connection_timeout=10,
            read_timeout=30,
        )
        self._client: PipelineClient[HttpRequest, Any] = PipelineClient(
            base_url=settings.graph_endpoint,
            policies=[
                RequestIdPolicy(),
                UserAgentPolicy(sdk_moniker="secret-rotation"),
                BearerTokenCredentialPolicy(credential, GRAPH_SCOPE),
            ],
            transport=transport,
        )

    def close(self) -> None:
        self._client.close()

    def _send(self, method: str, path: str, body: Any = None, *, what: str, url: str = "") -> Any:
        request = HttpRequest(
            method,
            url or self._client.format_url(f"/v1.0{path}"),
            json=body,
            headers={"Accept": "application/json"},
        )

        def once() -> Any:
            response = self._client.send_request(request)
            if response.status_code >= 400:
                raise HttpResponseError(response=response)
            return response.json() if response.status_code != 204 and response.content else None

        return self._call(once, what)

    def _call(self, operation: Callable[[], T], what: str) -> T:
        try:
            return call_with_retry(operation, what=f"{what} of {self.where}", attempts=4)
        except HttpResponseError as error:
            status, code = error.status_code, _graph_code(error)
            said = f"HTTP {status}" + (f" {code}" if code else "")
            if status in (401, 403):
                raise UpstreamError(
                    f"Graph refused to {what} of {self.where} ({said}): the Function App's identity needs "
                    f"the Microsoft Graph application permission {PERMISSION} (admin consent) and must be "
                    f"an owner of the application (az ad app owner add --id {self.app_object_id} "
                    "--owner-object-id <the identity's object id>)"
                ) from None
            if status == 404 and what == "read":
                raise ConfigError(
                    f"{self.where} not found ({said}): check {TAG_APP} and {TAG_TENANT}"
                ) from None
            if code in POLICY_CODES:
                raise ConfigError(f"cannot {what} of {self.where} ({said}): {POLICY_CODES[code]}") from None
            raise _GraphRefusal(f"cannot {what} of {self.where}: {said}", status or 0, code, error) from None
        except AzureError as error:
            raise UpstreamError(f"cannot {what} of {self.where}: {type(error).__name__}") from None

    def application(self) -> dict[str, Any]:
        app = self._send("GET", f"/applications/{quote(self.app_object_id)}", what="read")
        if not isinstance(app, dict) or not isinstance(app.get("appId"), str):
            raise UpstreamError(f"Graph's answer for {self.where} has no appId")
        return app

    def add_password(self, display_name: str, end: datetime) -> dict[str, Any]:
        body = {"passwordCredential": {"displayName": display_name, "endDateTime": end.isoformat()}}
        added = self._send(
            "POST", f"/applications/{quote(self.app_object_id)}/addPassword", body, what="add a password"
        )
        if not isinstance(added, dict) or not all(
            isinstance(added.get(field), str) for field in ("keyId", "secretText")
        ):
            raise UpstreamError(f"Graph's addPassword answer for {self.where} has no keyId or secretText")
        return added

    def remove_password(self, key_id: str) -> None:
        try:
            self._send(
                "POST",
                f"/applications/{quote(self.app_object_id)}/removePassword",
                {"keyId": key_id},
                what="remove a password",
            )
        except _GraphRefusal as refusal:
            if refusal.status != 404:  # already gone is fine
                raise

    def owned_applications(self, principal_id: str, endpoint: str) -> list[dict[str, Any]]:
        """The applications a service principal owns, every page (links only below `endpoint`)."""
        path = f"/servicePrincipals/{quote(principal_id)}/ownedObjects/microsoft.graph.application"
        page = self._send("GET", f"{path}?$select=id,appId,displayName,passwordCredentials", what="list")
        apps: list[dict[str, Any]] = []
        for _ in range(_MAX_PAGES):
            if not isinstance(page, dict) or not isinstance(page.get("value"), list):
                raise UpstreamError("Graph's list of owned applications is not a list")
            apps += [app for app in page["value"] if isinstance(app, dict) and isinstance(app.get("id"), str)]
            link = page.get("@odata.nextLink")
            if not isinstance(link, str) or not link.startswith(f"{endpoint}/"):
                return apps
            page = self._send("GET", "", what="list", url=link)
        return apps


class _GraphRefusal(UpstreamError):
    def __init__(self, message: str, status: int, code: str, error: HttpResponseError) -> None:
        super().__init__(message)
        self.status, self.code, self.detail = status, code, _graph_message(error)


def _passwords(app: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(keyId, displayName, hint) of each password credential."""
    found = []
    for item in app.get("passwordCredentials") or []:
        if isinstance(item, dict) and isinstance(item.get("keyId"), str):
            name, hint = item.get("displayName"), item.get("hint")
            found.append(
                (item["keyId"], name if isinstance(name, str) else "", hint if isinstance(hint, str) else "")
            )
    return found


class EntraAppRotator:
    name = "entra-app"

    def validate(self, context: RotationContext) -> None:
        config = context.config
        graph = urlsplit(context.settings.graph_endpoint)
        target = config.target
        if (target.scheme, target.host, target.port) != ("https", graph.hostname, graph.port or 443) or (
            target.database not in ("", "v1.0")
        ):
            raise ConfigError(
                f"rotation-target must be Microsoft Graph's URL, {context.settings.graph_endpoint}: "
                "the service calls Graph there and nowhere else"
            )
        _guid(config, TAG_TENANT, "tenant id")
        _guid(config, TAG_APP, "application's object id")
        _format(config)

    @staticmethod
    def slot_namespace(config: RotationConfig) -> str:
        """Password display names are per application: the tenant and the app's object id."""
        return f"{_tag(config, TAG_TENANT).lower()}/{_tag(config, TAG_APP).lower()}"

    def prepare_slots(self, context: RotationContext) -> list[str]:
        self.validate(context)
        config = context.config
        with self._graph(context) as graph:
            passwords = _passwords(graph.application())
        current = [
            key for key, name, _ in passwords if name == marker(context.secret_name, config.current_slot)
        ]
        if not current:
            raise ConfigError(
                f"application has no password named {marker(context.secret_name, config.current_slot)} "
                "(the current slot)"
            )
        other = [
            key for key, name, _ in passwords if name == marker(context.secret_name, config.inactive_slot)
        ]
        ours = len(current) + len(other)
        done = [f"slot {config.current_slot} has password {', '.join(current)}"]
        done.append(
            f"slot {config.inactive_slot} has password {', '.join(other)}: replaced on the next rotation"
            if other
            else f"slot {config.inactive_slot} has no password: the first rotation adds one"
        )
        if len(passwords) > ours:
            done.append(f"{len(passwords) - ours} other password(s) on the application: never touched")
        return done

    def create(self, context: RotationContext, slot: str) -> NewCredential:
        self.validate(context)
        config = context.config
        name = marker(context.secret_name, slot)
        with self._graph(context) as graph:
            app = graph.application()
            # The slot is inactive: nobody uses its password.
            for key_id, display_name, _ in _passwords(app):
                if display_name == name:
                    graph.remove_password(key_id)
                    logger.info("%s: removed password %s of slot %s", graph.where, key_id, slot)
            try:
                added = graph.add_password(name, datetime.now(UTC) + config.validity)
            except _GraphRefusal as refusal:
                raise self._refused_add(graph, app, context, refusal) from None
            key_id = added["keyId"]
            try:
                logger.info("%s: added password %s on slot %s", graph.where, key_id, slot)
                # A call repeated after a lost answer may have left a twin: one password per slot.
                for other, display_name, _ in _passwords(graph.application()):
                    if display_name == name and other != key_id:
                        graph.remove_password(other)
                value = self._value(config, app["appId"], added["secretText"], key_id)
            except BaseException:
                with suppress(Exception):
                    graph.remove_password(key_id)  # nothing half done
                raise
        return NewCredential(value=value, credential_id=key_id, content_type=CONTENT_TYPES[_format(config)])

    def verify(self, context: RotationContext, value: str) -> None:
        parsed = _parse_value(value)
        tenant = _guid(context.config, TAG_TENANT, "tenant id")
        client_id = parsed.client_id
        if not client_id:
            with self._graph(context) as graph:
                client_id = graph.application()["appId"]
        self._token_retried(context, tenant, client_id, parsed.secret)

    def prove_possession(self, context: RotationContext, value: str) -> None:
        """The value's secret obtains a token as the bound application, and it is the password on
        the current slot (its keyId, or for a bare secret its hint, among that slot's)."""
        self.validate(context)
        config = context.config
        tenant = _guid(config, TAG_TENANT, "tenant id")
        try:
            parsed = _parse_value(value)
        except VerificationFailed as error:
            raise PossessionNotProven(str(error)) from None
        with self._graph(context) as graph:
            app = graph.application()
        client_id = app["appId"]
        if parsed.client_id and parsed.client_id.lower() != client_id.lower():
            raise PossessionNotProven(
                f"the value's client_id is not application {graph.app_object_id}'s appId"
            )
        if parsed.tenant_id and parsed.tenant_id.lower() != tenant:
            raise PossessionNotProven(f"the value's tenant_id is not {TAG_TENANT}")
        name = marker(context.secret_name, config.current_slot)
        on_slot = [(key_id, hint) for key_id, display_name, hint in _passwords(app) if display_name == name]
        if parsed.key_id:
            if parsed.key_id not in {key_id for key_id, _ in on_slot}:
                raise PossessionNotProven(
                    f"password {parsed.key_id[:40]} is not the application's password on slot "
                    f"{config.current_slot}"
                )
        elif not any(hint and parsed.secret.startswith(hint) for _, hint in on_slot):
            raise PossessionNotProven(
                f"the secret is not the application's password on slot {config.current_slot}"
            )
        try:
            token = self._token(context, tenant, client_id, parsed.secret)
        except VerificationFailed as error:
            raise PossessionNotProven(f"the secret's value does not authenticate: {error}") from None
        claims = _claims(token)
        if str(claims.get("appid") or claims.get("azp") or "").lower() != client_id.lower() or (
            str(claims.get("tid") or "").lower() != tenant
        ):
            raise PossessionNotProven(f"the token is not one of application {client_id} in tenant {tenant}")

    def retire(self, context: RotationContext, slot: str) -> None:
        self.validate(context)
        name = marker(context.secret_name, slot)
        with self._graph(context) as graph:
            removed = [
                key_id for key_id, display_name, _ in _passwords(graph.application()) if display_name == name
            ]
            for key_id in removed:
                graph.remove_password(key_id)
                logger.info("%s: removed password %s of slot %s", graph.where, key_id, slot)
        if not removed:
            logger.info("%s: slot %s has no password: nothing to retire", graph.where, slot)

    # ----------------------------------------------------------------- helpers

    @contextmanager
    def _graph(self, context: RotationContext) -> Iterator[_Graph]:
        app = _guid(context.config, TAG_APP, "application's object id")
        graph = _Graph(context.settings, context.credential, app)
        try:
            yield graph
        finally:
            graph.close()

    @staticmethod
    def _refused_add(
        graph: _Graph, app: dict[str, Any], context: RotationContext, refusal: _GraphRefusal
    ) -> Exception:
        ours = {marker(context.secret_name, slot) for slot in context.config.slots}
        passwords = _passwords(app)
        not_ours = sum(1 for _, name, _ in passwords if name not in ours)
        if refusal.code in LIMIT_CODES or "limit" in refusal.detail.lower():
            return ConfigError(
                f"{graph.where} is at its limit of password credentials ({len(passwords)}, of which "
                f"{not_ours} were not made by this service and are never removed by it): an owner must "
                "remove unused ones"
            )
        return refusal

    @staticmethod
    def _value(config: RotationConfig, client_id: str, secret: str, key_id: str) -> str:
        if _format(config) == FORMAT_SECRET:
            return secret
        tenant = _guid(config, TAG_TENANT, "tenant id")
        document = {"tenant_id": tenant, "client_id": client_id, "client_secret": secret, "key_id": key_id}
        return json.dumps(document)

    @staticmethod
    def _token(context: RotationContext, tenant: str, client_id: str, secret: str) -> str:
        """One token request with `secret` as the application; VerificationFailed if Entra refuses it."""
        settings = context.settings
        options: dict[str, Any] = {"connection_timeout": 10, "read_timeout": 30}
        if settings.upstream_ca_bundle:
            options["connection_verify"] = settings.upstream_ca_bundle
        credential = ClientSecretCredential(
            tenant,
            client_id,
            secret,
            authority=settings.authority_host,
            disable_instance_discovery=True,
            **options,
        )
        try:
            with credential:
                return credential.get_token(GRAPH_SCOPE).token
        except ClientAuthenticationError as error:
            raise VerificationFailed(
                f"Entra refused a token for application {client_id} ({_entra_refusal(error)})"
            ) from None
        except AzureError as error:
            raise UpstreamError(f"Entra's token endpoint failed: {type(error).__name__}") from None
        except ValueError:
            raise UpstreamError("Entra's token endpoint gave an unusable answer") from None

    @retry(
        retry=retry_if_exception_type(VerificationFailed),
        stop=stop_after_attempt(8),
        wait=wait_exponential(multiplier=0.25, max=8) + wait_random(0, 0.2),
        reraise=True,
    )
    def _token_retried(self, context: RotationContext, tenant: str, client_id: str, secret: str) -> None:
        """A new password takes a moment to work in Entra: about 30 s of tries at most."""
        self._token(context, tenant, client_id, secret)


def expiring_unrotated(
    settings: Settings, credential: TokenCredential, within: timedelta, rotated: Mapping[str, set[str]]
) -> list[dict[str, str]]:
    """Password credentials of the applications this identity owns that end within `within` (or
    have ended) and are no slot of a managed secret. `rotated` maps an application's object id
    to the display names of its managed slots. Nothing secret is read: Graph lists no secretText."""
    oid = str(_claims(credential.get_token(GRAPH_SCOPE).token).get("oid") or "")
    if not _GUID.match(oid):
        raise UpstreamError("the identity's Graph token names no object id (oid)")
    graph = _Graph(settings, credential)
    try:
        apps = graph.owned_applications(oid, settings.graph_endpoint)
    finally:
        graph.close()
    now = datetime.now(UTC)
    horizon = now + within
    rows = []
    for app in apps:
        managed = rotated.get(str(app["id"]).lower(), set())
        for item in app.get("passwordCredentials") or []:
            if not isinstance(item, dict) or item.get("displayName") in managed:
                continue
            try:
                end = datetime.fromisoformat(str(item.get("endDateTime")).replace("Z", "+00:00"))
            except ValueError:
                continue
            if end.tzinfo is None:
                end = end.replace(tzinfo=UTC)
            if end <= horizon:
                rows.append(
                    {
                        "application_id": str(app["id"]),
                        "app_id": str(app.get("appId") or ""),
                        "application": str(app.get("displayName") or "")[:120],
                        "key_id": str(item.get("keyId") or ""),
                        "credential": str(item.get("displayName") or "")[:120],
                        "end": end.isoformat(),
                        "expired": "true" if end <= now else "false",
                    }
                )
    return sorted(rows, key=lambda row: row["end"])
