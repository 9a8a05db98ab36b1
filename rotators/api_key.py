"""API keys: a vendor API that issues, lists and revokes keys, two live keys at a time.

Each slot holds at most one live key upstream, and the key carries the slot's name
as its vendor-side name (or label), so "which key is on slot X" is answered by
listing keys. A rotation deletes whatever key the inactive slot still has (nobody
uses it), then issues a new key named after the slot: vendors that allow two live
keys need the room. Retiring a slot deletes its key.

The vendor's contract comes from tags, with defaults that fit a plain REST vendor,
so common vendors fit without code:

- `rotation-target`: the API's https base URL (on the allow-list);
- `rotation-api-create` (`POST /keys`), `rotation-api-list` (`GET` + the create path),
  `rotation-api-delete` (`DELETE` + the create path + `/{id}`), `rotation-api-verify`
  (`GET /whoami`, called with the new key): a method and a path below the base URL;
- `rotation-api-auth-header` (`Authorization: Bearer {key}`): how a key is presented;
- `rotation-api-fields` (`id=id,secret=key,name=name,list=items,item=`): where the key
  id, the secret and the name are in a key object, where the array is in a list
  response, and where the key object is in a create response (empty: the body itself);
  dotted paths reach into nested objects; `last_used` (none by default), where a listed key
  says when it was last used (ISO 8601 or Unix seconds), turns on the drain check: the old
  key is retired only once it has not been used for `ROTATION_DRAIN_QUIET`;
- `rotation-admin-secret`: a Key Vault secret holding the admin key (`{"key": ...}` or
  the bare key), presented with the same header.

Nothing from a tag can change the host: paths are plain segments below the base URL
(no scheme, no `..`, no query), `{id}` is URL-quoted, redirects are not followed.
Error messages carry the HTTP status and the vendor's error code, never a body or a key.
"""

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import requests
from azure.core.exceptions import ResourceNotFoundError
from tenacity import (
    RetryCallState,
    Retrying,
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_random_exponential

from rotators.base import NewCredential, RotationContext
from shared.config import RotationConfig
from shared.errors import ConfigError, PossessionNotProven, UpstreamError, VerificationFailed
from shared.reach import PinnedAdapter

logger = logging.getLogger(__name__)

TAG_CREATE = "rotation-api-create"
TAG_LIST = "rotation-api-list"
TAG_DELETE = "rotation-api-delete"
TAG_VERIFY = "rotation-api-verify"
TAG_AUTH_HEADER = "rotation-api-auth-header"
TAG_FIELDS = "rotation-api-fields"

DEFAULT_CREATE = "POST /keys"
DEFAULT_VERIFY = "GET /whoami"
DEFAULT_AUTH_HEADER = "Authorization: Bearer {key}"
DEFAULT_FIELDS = {"id": "id", "secret": "key", "name": "name", "list": "items", "item": "", "last_used": ""}

_METHODS = {
    TAG_CREATE: ("POST", "PUT"),
    TAG_LIST: ("GET",),
    TAG_DELETE: ("DELETE", "POST"),
    TAG_VERIFY: ("GET", "POST"),
}
_SEGMENT = r"(?:[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,63}|\{id\})"
_ENDPOINT = re.compile(rf"^(?P<method>[A-Z]{{3,6}}) (?P<path>(?:/{_SEGMENT}){{1,8}})$")
_HEADER = re.compile(r"^(?P<name>[A-Za-z0-9-]{1,64}):[ ]?(?P<value>[\x20-\x7e]{1,100})$")
_FORBIDDEN_HEADERS = {
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "cookie",
    "proxy-authorization",
}
_FIELD_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}(?:\.[A-Za-z_][A-Za-z0-9_-]{0,63}){0,3}$")
_ERROR_CODE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_KEY_SHAPED_LENGTH = 20
_PRINTABLE_KEY = re.compile(r"^[\x21-\x7e]{8,4096}$")
_TRANSIENT = frozenset({408, 429, 500, 502, 503, 504})
_TIMEOUT = (5, 20)
_MAX_RESPONSE = 1024 * 1024
_MAX_RETRY_AFTER = 10.0


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True)
class Contract:
    """How one vendor's key-management API looks, validated from the secret's tags."""

    create: Endpoint
    list: Endpoint
    delete: Endpoint
    verify: Endpoint
    header: str
    header_template: str
    fields: Mapping[str, str]

    def auth(self, key: str) -> dict[str, str]:
        return {self.header: self.header_template.replace("{key}", key)}


def _tag(tags: Mapping[str, str], name: str) -> str | None:
    value = tags.get(name)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _endpoint(tags: Mapping[str, str], tag: str, default: str, *, needs_id: bool) -> Endpoint:
    text = _tag(tags, tag) or default
    match = _ENDPOINT.match(text)
    if not match:
        raise ConfigError(
            f"tag {tag} must be a method and a path below the target URL, like {default!r}: "
            "plain path segments, no scheme, host, '..', query or control characters"
        )
    method, path = match["method"], match["path"]
    if method not in _METHODS[tag]:
        raise ConfigError(f"tag {tag}: method {method} not allowed here (use {' or '.join(_METHODS[tag])})")
    ids = path.count("{id}")
    if needs_id and ids != 1:
        raise ConfigError(f"tag {tag}: the path must contain {{id}} once")
    if not needs_id and ids and tag != TAG_VERIFY:
        raise ConfigError(f"tag {tag}: the path takes no {{id}}")
    return Endpoint(method, path)


def _auth_header(tags: Mapping[str, str]) -> tuple[str, str]:
    text = tags.get(TAG_AUTH_HEADER)
    if text is None or not text.strip():
        text = DEFAULT_AUTH_HEADER
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ConfigError(f"tag {TAG_AUTH_HEADER} must not contain control characters (CR, LF, ...)")
    match = _HEADER.match(text.strip())
    if not match:
        raise ConfigError(f"tag {TAG_AUTH_HEADER} must look like 'Authorization: Bearer {{key}}'")
    name, value = match["name"], match["value"]
    if name.lower() in _FORBIDDEN_HEADERS or name.lower().startswith("proxy-"):
        raise ConfigError(f"tag {TAG_AUTH_HEADER}: header {name} cannot carry a key")
    if (
        value.count("{key}") != 1
        or value.replace("{key}", "").count("{")
        or "}" in value.replace("{key}", "")
    ):
        raise ConfigError(f"tag {TAG_AUTH_HEADER}: the value must contain {{key}} exactly once")
    return name, value


def _fields(tags: Mapping[str, str]) -> dict[str, str]:
    fields = dict(DEFAULT_FIELDS)
    text = _tag(tags, TAG_FIELDS)
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, path = (s.strip() for s in part.partition("="))
        if not sep or name not in DEFAULT_FIELDS:
            raise ConfigError(
                f"tag {TAG_FIELDS} takes name=path pairs for {', '.join(DEFAULT_FIELDS)}; got {name[:20]!r}"
            )
        empty_ok = name in ("list", "item", "last_used")
        if not (_FIELD_PATH.match(path) or (empty_ok and path == "")):
            raise ConfigError(f"tag {TAG_FIELDS}: invalid JSON field path for {name}")
        fields[name] = path
    return fields


def parse_contract(tags: Mapping[str, str]) -> Contract:
    """The vendor contract from tags; each tag is optional and validated."""
    create = _endpoint(tags, TAG_CREATE, DEFAULT_CREATE, needs_id=False)
    header, template = _auth_header(tags)
    return Contract(
        create=create,
        list=_endpoint(tags, TAG_LIST, f"GET {create.path}", needs_id=False),
        delete=_endpoint(tags, TAG_DELETE, f"DELETE {create.path}/{{id}}", needs_id=True),
        verify=_endpoint(tags, TAG_VERIFY, DEFAULT_VERIFY, needs_id=False),
        header=header,
        header_template=template,
        fields=_fields(tags),
    )


def _dig(document: Any, path: str) -> Any:
    for part in path.split(".") if path else ():
        if not isinstance(document, dict):
            return None
        document = document.get(part)
    return document


def _key_shaped(text: str) -> bool:
    """A long token mixing letters and digits: it may be a credential, so it is never recorded."""
    return (
        len(text) >= _KEY_SHAPED_LENGTH and any(c.isalpha() for c in text) and any(c.isdigit() for c in text)
    )


def _vendor_code(content: bytes, presented_keys: Iterable[str] = ()) -> str:
    """The vendor's machine-readable error code, if it sends a plain one; never the body.

    A code that is, or contains, a key we presented, or that looks like a key, is dropped."""
    try:
        body = json.loads(content)
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    keys = [key for key in presented_keys if key]
    error = body.get("error")
    for candidate in (
        _dig(body, "error.code"),
        error if isinstance(error, str) else None,
        body.get("code"),
        body.get("errorCode"),
    ):
        if isinstance(candidate, str) and _ERROR_CODE.match(candidate):
            if _key_shaped(candidate) or any(key in candidate for key in keys):
                return ""
            return candidate
    return ""


@dataclass(frozen=True)
class _Answer:
    """A vendor's answer. For a refusal (not 2xx), only its status and error code are kept."""

    status: int
    body: Any = None
    refusal: str = ""


class _Transient(UpstreamError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _wait(state: RetryCallState) -> float:
    error = state.outcome.exception() if state.outcome else None
    if isinstance(error, _Transient) and error.retry_after is not None:
        return error.retry_after
    return float(wait_random_exponential(multiplier=0.2, max=2)(state))


class _Vendor:
    """One conversation with the vendor API: base URL, contract, a session with our CA."""

    def __init__(
        self, context: RotationContext, contract: Contract, admin_key: Callable[[bool], str] | None = None
    ) -> None:
        target = context.config.target
        self._admin_key = admin_key
        self._admin_key_value = ""
        self.contract = contract
        self.where = f"vendor API {target.host}:{target.port}"
        self.base_url = f"https://{target.host}:{target.port}/{target.database}".rstrip("/")
        self._verify: str | bool = context.settings.upstream_ca_bundle or True
        self._session = requests.Session()
        # No proxies, .netrc or CA bundle from the environment: only what the settings say.
        self._session.trust_env = False
        # Connect to the address the vendor's name was checked against (base URLs are https only).
        self._session.mount("https://", PinnedAdapter(context.settings))

    def close(self) -> None:
        self._session.close()

    def call(self, endpoint: Endpoint, key: str, *, key_id: str = "", body: Any = None) -> _Answer:
        """Send once. Transient answers (408, 429, 5xx) raise _Transient."""
        path = endpoint.path
        if "{id}" in path:
            if key_id in ("", ".", ".."):
                raise UpstreamError(f"{self.where} gave a key id that cannot be used in a path")
            path = path.replace("{id}", quote(key_id, safe=""))
        what = f"{self.where}: {endpoint.method} {endpoint.path}"
        try:
            response = self._session.request(
                endpoint.method,
                self.base_url + path,
                headers={**self.contract.auth(key), "Accept": "application/json"},
                json=body,
                timeout=_TIMEOUT,
                verify=self._verify,
                allow_redirects=False,
                stream=True,
            )
            with response:
                content = b""
                for chunk in response.iter_content(64 * 1024):
                    content += chunk
                    if len(content) > _MAX_RESPONSE:
                        raise UpstreamError(f"{what} answered with an oversized body")
        except requests.RequestException as error:
            # Only before the request was sent is a create safe to repeat.
            safe = endpoint.method != "POST" or isinstance(error, requests.ConnectTimeout)
            message = f"{what} failed: {type(error).__name__}"
            raise (_Transient(message) if safe else UpstreamError(message)) from None
        status = response.status_code
        if status in _TRANSIENT:
            raise _Transient(
                f"{what} answered {status}{self._code(content, key)}", self._retry_after(response)
            )
        if not 200 <= status < 300:
            return _Answer(status, refusal=f"{what} answered {status}{self._code(content, key)}")
        try:
            parsed = json.loads(content) if content.strip() else None
        except ValueError:
            parsed = None
        return _Answer(status, parsed)

    def admin(self, endpoint: Endpoint, *, key_id: str = "", body: Any = None) -> _Answer:
        """An admin call with bounded retries of 408/429/5xx and connection failures.

        The admin key comes from a short-lived cache: on 401/403 it is read again, once,
        in case it was rotated since."""
        if self._admin_key is None:
            raise UpstreamError(f"{self.where}: no admin key for this call")
        if not self._admin_key_value:
            self._admin_key_value = self._admin_key(False)
        answer = self._admin_call(endpoint, self._admin_key_value, key_id, body)
        if answer.status in (401, 403):
            fresh = self._admin_key(True)
            if fresh != self._admin_key_value:
                self._admin_key_value = fresh
                answer = self._admin_call(endpoint, fresh, key_id, body)
        return answer

    def call_retried(self, endpoint: Endpoint, key: str, key_id: str) -> _Answer:
        """A call presenting `key` (the secret's own, not the admin key), retried like an admin call."""
        return self._admin_call(endpoint, key, key_id, None)

    def _admin_call(self, endpoint: Endpoint, key: str, key_id: str, body: Any) -> _Answer:
        for attempt in Retrying(
            retry=retry_if_exception_type(_Transient),
            stop=stop_after_attempt(4),
            wait=_wait,
            reraise=True,
        ):
            with attempt:
                return self.call(endpoint, key, key_id=key_id, body=body)
        raise AssertionError("unreachable")  # pragma: no cover

    def _code(self, content: bytes, key: str) -> str:
        code = _vendor_code(content, (key, self._admin_key_value))
        return f" ({code})" if code else ""

    @staticmethod
    def _retry_after(response: requests.Response) -> float | None:
        try:
            return min(float(response.headers.get("Retry-After", "")), _MAX_RETRY_AFTER)
        except ValueError:
            return None


class ApiKeyRotator:
    name = "api-key"

    def validate(self, context: RotationContext) -> None:
        config = context.config
        if config.target.scheme != "https":
            raise ConfigError("rotation-target must be the vendor API's https URL")
        if any(part in (".", "..") for part in config.target.database.split("/")):
            raise ConfigError("rotation-target's path must not contain '.' or '..' segments")
        if not config.admin_secret:
            raise ConfigError("set rotation-admin-secret to the secret holding the vendor's admin key")
        parse_contract(config.tags)

    def prepare_slots(self, context: RotationContext) -> list[str]:
        self.validate(context)
        config = context.config
        with self._vendor(context) as vendor:
            keys = self._keys(vendor)
        current = [key_id for key_id, name in keys if name == config.current_slot]
        if not current:
            raise ConfigError(f"no key named {config.current_slot} (the current slot) at the vendor")
        done = [f"slot {config.current_slot} has key {', '.join(current)}"]
        other = [key_id for key_id, name in keys if name == config.inactive_slot]
        if other:
            done.append(
                f"slot {config.inactive_slot} has key {', '.join(other)}: replaced on the next rotation"
            )
        else:
            done.append(f"slot {config.inactive_slot} has no key: the first rotation issues one")
        return done

    def create(self, context: RotationContext, slot: str) -> NewCredential:
        self.validate(context)
        with self._vendor(context) as vendor:
            # The slot is inactive: nobody uses its key, and the vendor may allow only two.
            self._delete_named(vendor, slot)
            contract = vendor.contract
            body: dict[str, Any] = {}
            _put(body, contract.fields["name"], slot)
            answer = vendor.admin(contract.create, body=body)
            if answer.refusal:
                raise UpstreamError(f"creating a key for slot {slot}: {answer.refusal}")
            status = answer.status
            item = _dig(answer.body, contract.fields["item"])
            key_id, key = _dig(item, contract.fields["id"]), _dig(item, contract.fields["secret"])
            if isinstance(key_id, int) and not isinstance(key_id, bool):
                key_id = str(key_id)
            if not isinstance(key_id, str) or not key_id or len(key_id) > 200:
                raise UpstreamError(
                    f"{vendor.where} answered {status} without a key id in the expected field"
                )
            if not isinstance(key, str) or not _PRINTABLE_KEY.match(key):
                raise UpstreamError(
                    f"{vendor.where} answered {status} without a usable key in the expected field"
                )
            logger.info("%s: issued key %s on slot %s", vendor.where, key_id, slot)
            # A create repeated after a lost answer may have left a twin: one key per slot.
            self._delete_named(vendor, slot, keep=key_id)
            value = json.dumps(
                {"engine": "api-key", "base_url": vendor.base_url, "key_id": key_id, "key": key}
            )
        return NewCredential(value=value, credential_id=key_id)

    def verify(self, context: RotationContext, value: str) -> None:
        key = _key_of(value)
        with self._vendor(context, admin=False) as vendor:
            self._authenticate(vendor, vendor.contract.verify, key, _key_id_of(value))

    @staticmethod
    def slot_namespace(config: RotationConfig) -> str:
        """Key names are per vendor account, and the admin secret is the account."""
        return f"{config.target}#{(config.admin_secret or '').lower()}"

    def prove_possession(self, context: RotationContext, value: str) -> None:
        """The key authenticates, the vendor says which key it is, and the admin listing has
        that key on the current slot."""
        self.validate(context)
        slot = context.config.current_slot
        try:
            key, key_id = _key_of(value), _key_id_of(value)
        except VerificationFailed:
            raise PossessionNotProven(
                "the secret's value is not a key or the JSON this rotator writes"
            ) from None
        with self._vendor(context) as vendor:
            try:
                answer = vendor.call_retried(vendor.contract.verify, key, key_id)
            except UpstreamError as error:
                raise UpstreamError(f"cannot check the current key: {error}") from None
            if answer.refusal:
                raise PossessionNotProven(f"the secret's key does not authenticate: {answer.refusal}")
            fields = vendor.contract.fields
            named = _dig(_dig(answer.body, fields["item"]), fields["id"])
            if isinstance(named, int) and not isinstance(named, bool):
                named = str(named)
            if not isinstance(named, str) or not named:
                raise PossessionNotProven(
                    f"{vendor.where}: the answer to {vendor.contract.verify} does not say which key it is "
                    f"(where {TAG_FIELDS} says the id is)"
                )
            if key_id and named != key_id:
                raise PossessionNotProven(
                    f"{vendor.where} does not identify the secret's key as key {key_id[:80]}"
                )
            key_id = named
            on_slot = [listed for listed, name in self._keys(vendor) if name == slot]
        if key_id not in on_slot:
            raise PossessionNotProven(f"key {key_id[:80]} is not the vendor's key on slot {slot}")

    def in_use(self, context: RotationContext, slot: str) -> str:
        """The slot's key was used within ROTATION_DRAIN_QUIET, where the vendor reports last use."""
        contract = parse_contract(context.config.tags)
        path = contract.fields["last_used"]
        if not path:
            return ""
        self.validate(context)
        with self._vendor(context) as vendor:
            items = self._listed(vendor)
        now = datetime.now(UTC)
        quiet = context.settings.drain_quiet
        for item in items if isinstance(items, list) else []:
            if _dig(item, contract.fields["name"]) != slot:
                continue
            raw = _dig(item, path)
            used = _moment(raw)
            if used is None:
                if raw is not None:
                    logger.warning("%s: key of slot %s: last use unreadable: ignored", vendor.where, slot)
                continue
            if now - used < quiet:
                since = min(used, now).isoformat(timespec="seconds")
                return f"key of slot {slot} was used at {since}, within {quiet} (ROTATION_DRAIN_QUIET)"
        return ""

    def retire(self, context: RotationContext, slot: str) -> None:
        self.validate(context)
        with self._vendor(context) as vendor:
            deleted = self._delete_named(vendor, slot)
        if not deleted:
            logger.info("%s: slot %s has no key: nothing to retire", vendor.where, slot)

    # ----------------------------------------------------------------- helpers

    @retry(
        retry=retry_if_exception_type(VerificationFailed),
        stop=stop_after_attempt(5),
        wait=wait_exponential(multiplier=0.2, max=2) + wait_random(0, 0.1),
        reraise=True,
    )
    def _authenticate(self, vendor: _Vendor, endpoint: Endpoint, key: str, key_id: str) -> None:
        try:
            answer = vendor.call(endpoint, key, key_id=key_id)
        except UpstreamError as error:
            raise VerificationFailed(f"the new key could not be checked: {error}") from None
        if answer.refusal:
            raise VerificationFailed(f"the new key does not authenticate: {answer.refusal}")

    @staticmethod
    def _listed(vendor: _Vendor) -> Any:
        """The vendor's list of keys, where rotation-api-fields says it is (not checked to be one)."""
        answer = vendor.admin(vendor.contract.list)
        if answer.refusal:
            raise UpstreamError(f"listing keys: {answer.refusal}")
        return _dig(answer.body, vendor.contract.fields["list"])

    def _keys(self, vendor: _Vendor) -> list[tuple[str, str]]:
        """(id, name) of every key the vendor lists."""
        contract = vendor.contract
        items = self._listed(vendor)
        if not isinstance(items, list):
            raise UpstreamError(f"{vendor.where}: the key list is not where rotation-api-fields says")
        keys = []
        for item in items:
            key_id, name = _dig(item, contract.fields["id"]), _dig(item, contract.fields["name"])
            if isinstance(key_id, int) and not isinstance(key_id, bool):
                key_id = str(key_id)
            if isinstance(key_id, str) and isinstance(name, str):
                keys.append((key_id, name))
        return keys

    def _delete_named(self, vendor: _Vendor, slot: str, keep: str = "") -> list[str]:
        deleted = []
        for key_id, name in self._keys(vendor):
            if name != slot or key_id == keep:
                continue
            answer = vendor.admin(vendor.contract.delete, key_id=key_id)
            if answer.refusal and answer.status != 404:  # already gone is fine
                raise UpstreamError(f"deleting key {key_id[:80]} of slot {slot}: {answer.refusal}")
            logger.info("%s: deleted key %s of slot %s", vendor.where, key_id[:80], slot)
            deleted.append(key_id)
        return deleted

    @contextmanager
    def _vendor(self, context: RotationContext, *, admin: bool = True) -> Iterator[_Vendor]:
        def admin_key(fresh: bool) -> str:
            return self._admin_key(context, fresh=fresh)

        vendor = _Vendor(context, parse_contract(context.config.tags), admin_key if admin else None)
        try:
            yield vendor
        finally:
            vendor.close()

    def _admin_key(self, context: RotationContext, *, fresh: bool = False) -> str:
        name = context.config.admin_secret or ""
        try:
            raw = context.read_admin_secret(name, fresh=fresh)
        except ResourceNotFoundError:
            raise ConfigError(f"admin secret {name} does not exist") from None
        try:
            key = _key_of(raw)
        except VerificationFailed:
            raise ConfigError(
                f"admin secret {name} must hold the admin key, or JSON with a key field"
            ) from None
        return key


def _moment(raw: Any) -> datetime | None:
    """A vendor's timestamp: ISO 8601 text, or Unix seconds (milliseconds when that large)."""
    if isinstance(raw, bool):
        return None
    try:
        if isinstance(raw, int | float):
            seconds = raw / 1000 if raw > 1e11 else raw
            return datetime.fromtimestamp(seconds, UTC)
        if isinstance(raw, str) and 10 <= len(raw) <= 40:
            moment = datetime.fromisoformat(raw)
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return None


def _put(document: dict[str, Any], path: str, value: str) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        document = document.setdefault(part, {})
    document[parts[-1]] = value


def _key_of(value: str) -> str:
    """The key in a stored value: JSON with a `key` field, or the bare key."""
    key: Any = value.strip()
    if key.startswith("{"):
        try:
            key = json.loads(key).get("key")
        except (ValueError, AttributeError):
            key = None
    if not isinstance(key, str) or not _PRINTABLE_KEY.match(key):
        raise VerificationFailed("the credential is not a key or the JSON this rotator writes")
    return key


def _key_id_of(value: str) -> str:
    try:
        key_id = json.loads(value).get("key_id")
    except (ValueError, AttributeError):
        return ""
    return key_id if isinstance(key_id, str) else ""
