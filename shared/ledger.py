"""The rotation ledger on Azure Table Storage: workflow state and history.

One state row per managed secret (PartitionKey = vault host, RowKey = secret
name) and one history row per rotation attempt. Writes to a state row are
conditional on its ETag, which is how a rotation claims a secret: of two
concurrent claims exactly one succeeds. The ledger never holds a secret value.
"""

import hashlib
import json
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableClient, TableServiceClient, UpdateMode

from shared.retry import call_with_retry

IDLE = "idle"
ROTATING = "rotating"
OVERLAP = "overlap"
FAILED = "failed"


class ConcurrentUpdate(Exception):
    """Another writer changed the row since it was read: the claim is lost."""


def vault_key(vault_url: str) -> str:
    """The vault's host (and port), a valid PartitionKey."""
    return urlsplit(vault_url).netloc.lower()


def secret_key(name: str) -> str:
    """Key Vault names are case-insensitive: `CASE-DB` and `case-db` are one secret, one row."""
    return name.lower()


def _history_partition(vault_url: str, name: str) -> str:
    return f"{vault_key(vault_url)}|{secret_key(name)}"


def _is_conflict(error: HttpResponseError) -> bool:
    return isinstance(error, ResourceModifiedError | ResourceExistsError) or error.status_code in (409, 412)


def _write_if_unchanged(
    table: TableClient, entity: dict[str, Any], etag: str | None, *, what: tuple[str, str], conflict: str
) -> dict[str, Any]:
    """Create the row (no `etag`) or replace it if it still has `etag`; ConcurrentUpdate if
    another writer got there first. `what` names the create and the replace for the retries."""
    try:
        if etag is None:
            return call_with_retry(lambda: table.create_entity(entity), what=what[0])
        return call_with_retry(
            lambda: table.update_entity(
                entity, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
            ),
            what=what[1],
        )
    except HttpResponseError as error:
        if _is_conflict(error):
            raise ConcurrentUpdate(conflict) from None
        raise


@dataclass
class SecretState:
    """Where one managed secret stands. Field names are the table's column names."""

    vault_url: str
    name: str
    state: str = IDLE
    step: str = ""
    rotation_id: str = ""
    trigger: str = ""
    requested_by: str = ""
    reason: str = ""
    emergency: bool = False
    dry_run: bool = False
    lease_until: datetime | None = None
    started_on: datetime | None = None
    from_version: str = ""
    from_slot: str = ""
    to_slot: str = ""
    new_version: str = ""
    pending_credential: str = ""
    retire_slot: str = ""
    retire_version: str = ""
    retire_after: datetime | None = None
    current_version: str = ""
    current_slot: str = ""
    expires_on: datetime | None = None
    attempts: int = 0
    last_outcome: str = ""
    last_error: str = ""
    last_attempt_on: datetime | None = None
    last_rotated_on: datetime | None = None
    history_key: str = ""
    step_timings: str = "{}"
    # The upstream identity an operator bound (JSON of the bound tags), who bound it and when.
    binding: str = ""
    bound_by: str = ""
    bound_on: datetime | None = None
    # `<version>:<fingerprint>` of the refusal last reported, so it is reported once per version.
    refused: str = ""
    # Where each declared consumer stood when last asked (JSON), and a retirement waiting on them.
    consumers: str = ""
    held_since: datetime | None = None
    held_reason: str = ""
    etag: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.name = secret_key(self.name)

    @property
    def legacy(self) -> bool:
        """Managed before bindings existed: rotated by this service, never bound."""
        return not self.binding and bool(self.last_rotated_on or self.current_version)

    def lease_held(self, now: datetime) -> bool:
        """A live run holds this row: a rotation, or the retirement of an overlap."""
        return self.state in (ROTATING, OVERLAP) and self.lease_until is not None and self.lease_until > now

    def record_timing(self, step: str, milliseconds: float) -> None:
        timings = json.loads(self.step_timings or "{}")
        timings[step] = round(timings.get(step, 0) + milliseconds, 1)
        self.step_timings = json.dumps(timings, sort_keys=True)


@dataclass
class HistoryRecord:
    """One rotation attempt, as an operator reads it afterwards."""

    vault_url: str
    name: str
    rotation_id: str
    trigger: str
    requested_by: str = ""
    reason: str = ""
    emergency: bool = False
    dry_run: bool = False
    started_on: datetime | None = None
    ended_on: datetime | None = None
    retired_on: datetime | None = None
    outcome: str = "in_progress"
    from_version: str = ""
    new_version: str = ""
    from_slot: str = ""
    to_slot: str = ""
    attempts: int = 1
    error: str = ""
    step_timings: str = "{}"


def history_key(started_on: datetime, rotation_id: str) -> str:
    """RowKey that sorts newest first."""
    inverted = 10**11 - int(started_on.timestamp())
    return f"{inverted:011d}-{rotation_id}"


def _to_entity(record: Any, partition: str, row: str) -> dict[str, Any]:
    """Only the fields that differ from their defaults: rows are replaced whole, and reading
    fills the defaults back in. Fewer properties are cheaper to serialize on every write."""
    entity: dict[str, Any] = {"PartitionKey": partition, "RowKey": row}
    for item in fields(record):
        if item.name == "etag":
            continue
        value = getattr(record, item.name)
        if value is not None and value != item.default:
            entity[item.name] = value
    return entity


def _from_entity(cls: type[Any], entity: Any) -> Any:
    known = {item.name for item in fields(cls)}
    values = {key: value for key, value in entity.items() if key in known}
    for key, value in values.items():
        if isinstance(value, datetime) and value.tzinfo is None:
            values[key] = value.replace(tzinfo=UTC)
        elif isinstance(value, datetime):
            values[key] = datetime.fromtimestamp(value.timestamp(), tz=UTC)
    record = cls(**values)
    if "etag" in known:
        record.etag = entity.metadata.get("etag")
    return record


@dataclass
class InventoryItem:
    """A managed secret as the vault listed it: what GET /rotations shows besides the state."""

    vault_url: str
    name: str
    rotator: str = ""
    enabled: bool = True
    expires_on: datetime | None = None


# The inventory packs a vault's managed secrets, as JSON, into parts of at most _PART_CHARS
# (a Table storage string property holds 32K characters), plus one row saying when the
# vault was listed and into how many parts: 10,000 secrets are about 70 rows, written in one
# transaction (at most 100 operations and 4 MiB) and read in one query.
_LISTING = "listing"
# A state-table partition no vault host can be (a host has no '~'): the ledger's own markers.
_META = "~meta"
_NAMES_MIGRATED = "names-migrated"
_PART_CHARS = 30_000
_BATCH = 100
# Vault posture (shared/posture.py): the latest reading is the row `posture` of the vault's
# inventory partition, a change is a history row under `<vault>|~posture` (no secret name has '~').
_POSTURE = "posture"
_POSTURE_HISTORY = "~posture"


@dataclass
class PostureRecord:
    """A vault's posture as read at `checked_on`: `checks` is the JSON list of its rows."""

    vault_url: str
    checked_on: datetime
    checks: str = "[]"
    resource_id: str = ""
    changes: str = "[]"
    etag: str | None = field(default=None, compare=False)


class Ledger:
    def __init__(
        self,
        state_table: TableClient,
        history_table: TableClient,
        inventory_table: TableClient,
        slots_table: TableClient,
    ) -> None:
        self._state = state_table
        self._history = history_table
        self._inventory = inventory_table
        self._slots = slots_table

    @classmethod
    def from_service(cls, service: TableServiceClient, prefix: str = "rotation") -> "Ledger":
        return cls(
            service.get_table_client(f"{prefix}state"),
            service.get_table_client(f"{prefix}history"),
            service.get_table_client(f"{prefix}inventory"),
            service.get_table_client(f"{prefix}slots"),
        )

    def ensure_tables(self) -> None:
        for table in (self._state, self._history, self._inventory, self._slots):
            with suppress(ResourceExistsError):
                call_with_retry(table.create_table, what="create ledger table")

    def get(self, vault_url: str, name: str) -> SecretState | None:
        try:
            entity = call_with_retry(
                lambda: self._state.get_entity(vault_key(vault_url), secret_key(name)),
                what="read ledger row",
            )
        except ResourceNotFoundError:
            return None
        state: SecretState = _from_entity(SecretState, entity)
        return state

    def save(self, state: SecretState) -> SecretState:
        """Write the row if nobody changed it since it was read; raise ConcurrentUpdate otherwise."""
        entity = _to_entity(state, vault_key(state.vault_url), secret_key(state.name))
        meta = _write_if_unchanged(
            self._state,
            entity,
            state.etag,
            what=("create ledger row", "update ledger row"),
            conflict=f"ledger row of {state.name} changed concurrently",
        )
        state.etag = meta.get("etag")
        return state

    def states(self, vault_url: str | None = None) -> Iterator[SecretState]:
        if vault_url:
            query = self._state.query_entities("PartitionKey eq @pk", parameters={"pk": vault_key(vault_url)})
        else:
            query = self._state.list_entities()
        for entity in query:
            if entity["PartitionKey"] != _META:
                yield _from_entity(SecretState, entity)

    def claim_slots(self, upstream: str, slots: tuple[str, ...], owner: str) -> str:
        """Record that `owner` (`vault|secret`) holds these slots of `upstream`; a slot already
        held by another owner is not taken. Returns that other owner, or "" when all are held."""
        partition = _slot_partition(upstream)
        taken: list[str] = []
        for slot in slots:
            row = {"PartitionKey": partition, "RowKey": slot, "owner": owner, "upstream": upstream[:500]}
            try:
                call_with_retry(partial(self._slots.create_entity, row), what="claim slot")
                taken.append(slot)
            except ResourceExistsError:
                held = call_with_retry(
                    partial(self._slots.get_entity, partition, slot), what="read slot claim"
                )
                if held.get("owner") != owner:
                    self.release_slots(upstream, tuple(taken), owner)
                    return str(held.get("owner", "?"))
        return ""

    def release_slots(self, upstream: str, slots: tuple[str, ...], owner: str) -> None:
        """Give up `owner`'s claims on these slots (a re-bind to other slots)."""
        partition = _slot_partition(upstream)
        for slot in slots:
            with suppress(ResourceNotFoundError):
                held = self._slots.get_entity(partition, slot)
                if held.get("owner") == owner:
                    self._slots.delete_entity(
                        partition,
                        slot,
                        etag=held.metadata["etag"],
                        match_condition=MatchConditions.IfNotModified,
                    )

    def migrate_names(self) -> int:
        """Rows written before names were compared case-insensitively get their lower-case key,
        once (a marker row says it was done). Where both spellings have a row, the one with a
        rotation or an overlap open wins. Returns how many rows moved."""
        with suppress(ResourceNotFoundError):
            self._state.get_entity(_META, _NAMES_MIGRATED)
            return 0
        moved = 0
        for entity in list(self._state.list_entities()):
            row = entity["RowKey"]
            if entity["PartitionKey"] == _META or row == secret_key(row):
                continue
            old: SecretState = _from_entity(SecretState, entity)
            keep = self.get(old.vault_url or "https://" + entity["PartitionKey"], row)
            if keep is None or (keep.state not in (ROTATING, OVERLAP) and old.state in (ROTATING, OVERLAP)):
                target = _to_entity(old, entity["PartitionKey"], secret_key(row))
                call_with_retry(
                    partial(self._state.upsert_entity, target, mode=UpdateMode.REPLACE),
                    what="migrate ledger row",
                )
            self._move_history(
                f"{entity['PartitionKey']}|{row}", f"{entity['PartitionKey']}|{secret_key(row)}"
            )
            call_with_retry(
                partial(self._state.delete_entity, entity["PartitionKey"], row),
                what="remove migrated ledger row",
            )
            moved += 1
        marker = {"PartitionKey": _META, "RowKey": _NAMES_MIGRATED}
        call_with_retry(lambda: self._state.upsert_entity(marker), what="mark names migrated")
        return moved

    def _move_history(self, old_partition: str, new_partition: str) -> None:
        query = self._history.query_entities("PartitionKey eq @pk", parameters={"pk": old_partition})
        for entity in list(query):
            copy = {**entity, "PartitionKey": new_partition}
            call_with_retry(partial(self._history.upsert_entity, copy), what="migrate history")
            call_with_retry(
                partial(self._history.delete_entity, old_partition, entity["RowKey"]),
                what="remove migrated history",
            )

    def write_history(self, record: HistoryRecord, row_key: str) -> None:
        entity = _to_entity(record, _history_partition(record.vault_url, record.name), row_key)
        call_with_retry(
            lambda: self._history.upsert_entity(entity, mode=UpdateMode.REPLACE), what="write history"
        )

    def history(self, vault_url: str, name: str, limit: int = 20) -> list[HistoryRecord]:
        query = self._history.query_entities(
            "PartitionKey eq @pk",
            parameters={"pk": _history_partition(vault_url, name)},
            results_per_page=limit,
        )
        records: list[HistoryRecord] = []
        for entity in query:
            records.append(_from_entity(HistoryRecord, entity))
            if len(records) >= limit:
                break
        return records

    def rotations(self, vault_url: str, name: str, limit: int = 20) -> list[HistoryRecord]:
        """The history without the operator's bindings: rotation attempts only."""
        return [record for record in self.history(vault_url, name, limit) if record.trigger != "bind"]

    def inventory(self, vault_url: str) -> tuple[datetime | None, list[InventoryItem]]:
        """When the vault was last listed (None: never), and the managed secrets it then held."""
        partition = vault_key(vault_url)
        query = self._inventory.query_entities("PartitionKey eq @pk", parameters={"pk": partition})
        rows = {entity["RowKey"]: entity for entity in query}
        listing = rows.get(_LISTING)
        if listing is None:
            return None, []
        listed_on = _from_entity(_Listing, listing).listed_on
        items = []
        for index in range(int(listing.get("parts", 0))):
            part = rows.get(_part(index))
            for name, rotator, enabled, expires in json.loads(part["secrets"] if part else "[]"):
                expires_on = None if expires is None else datetime.fromtimestamp(expires, tz=UTC)
                items.append(InventoryItem(vault_url, name, rotator, enabled, expires_on))
        return listed_on, items

    def replace_inventory(
        self,
        vault_url: str,
        items: list[InventoryItem],
        listed_on: datetime,
        *,
        stored: list[InventoryItem] | None = None,
    ) -> None:
        """Make `items` the vault's inventory as listed at `listed_on`. If they are what it holds
        already, only the listing time is written. `stored` is the inventory as the caller has
        just read it, saving a second read."""
        partition = vault_key(vault_url)
        if stored is None:
            stored = self.inventory(vault_url)[1]
        parts = _pack(items)
        listing = _to_entity(_Listing(listed_on, len(parts)), partition, _LISTING)
        replace = {"mode": UpdateMode.REPLACE}
        operations: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        old_parts = _pack(stored)
        if parts != old_parts:
            for index, part in enumerate(parts):
                row = {"PartitionKey": partition, "RowKey": _part(index), "secrets": part}
                operations.append(("upsert", row, replace))
            for index in range(len(parts), len(old_parts)):
                operations.append(("delete", {"PartitionKey": partition, "RowKey": _part(index)}, {}))
        operations.append(("upsert", listing, replace))  # last: a reader sees the parts it names
        for start in range(0, len(operations), _BATCH):
            batch = partial(self._inventory.submit_transaction, operations[start : start + _BATCH])
            call_with_retry(batch, what="write inventory")

    def add_to_inventory(self, item: InventoryItem) -> None:
        """One secret just put under rotation, listed from now on (the vault's listing time stays)."""
        listed_on, items = self.inventory(item.vault_url)
        if listed_on is not None:
            others = [known for known in items if known.name != item.name]
            self.replace_inventory(item.vault_url, [*others, item], listed_on, stored=items)

    def posture(self, vault_url: str) -> PostureRecord | None:
        try:
            entity = call_with_retry(
                lambda: self._inventory.get_entity(vault_key(vault_url), _POSTURE), what="read posture"
            )
        except ResourceNotFoundError:
            return None
        record: PostureRecord = _from_entity(PostureRecord, entity)
        return record

    def save_posture(
        self,
        vault_url: str,
        resource_id: str,
        checked_on: datetime,
        checks: str,
        stored: PostureRecord | None,
    ) -> None:
        """Replace the vault's posture if it is still `stored` (as read); ConcurrentUpdate otherwise."""
        record = PostureRecord(vault_url, checked_on, checks, resource_id)
        entity = _to_entity(record, vault_key(vault_url), _POSTURE)
        _write_if_unchanged(
            self._inventory,
            entity,
            stored.etag if stored is not None else None,
            what=("record posture", "record posture"),
            conflict=f"posture of {vault_url} recorded concurrently",
        )

    def write_posture_history(
        self, vault_url: str, checked_on: datetime, checks: str, changes: list[str]
    ) -> None:
        record = PostureRecord(vault_url, checked_on, checks, changes=json.dumps(changes))
        inverted = 10**14 - int(checked_on.timestamp() * 1000)
        entity = _to_entity(record, f"{vault_key(vault_url)}|{_POSTURE_HISTORY}", f"{inverted:014d}")
        call_with_retry(
            lambda: self._history.upsert_entity(entity, mode=UpdateMode.REPLACE), what="write posture history"
        )

    def posture_history(self, vault_url: str, limit: int = 20) -> list[PostureRecord]:
        """The vault's posture changes, newest first."""
        query = self._history.query_entities(
            "PartitionKey eq @pk",
            parameters={"pk": f"{vault_key(vault_url)}|{_POSTURE_HISTORY}"},
            results_per_page=limit,
        )
        records: list[PostureRecord] = []
        for entity in query:
            records.append(_from_entity(PostureRecord, entity))
            if len(records) >= limit:
                break
        return records


@dataclass
class _Listing:
    listed_on: datetime
    parts: int = 0


def _slot_partition(upstream: str) -> str:
    """A valid PartitionKey for any upstream name (they hold '/' and '#', which keys may not)."""
    return hashlib.sha256(upstream.encode()).hexdigest()[:32]


def _part(index: int) -> str:
    return f"part-{index:05d}"


def _pack(items: list[InventoryItem]) -> list[str]:
    """JSON arrays of [name, rotator, enabled, expiry as epoch seconds], each under _PART_CHARS."""
    parts: list[str] = []
    entries: list[str] = []
    size = 2
    for item in sorted(items, key=lambda item: item.name):
        expires = None if item.expires_on is None else int(item.expires_on.timestamp())
        entry = json.dumps([item.name, item.rotator, item.enabled, expires])
        if entries and size + len(entry) + 1 > _PART_CHARS:
            parts.append(f"[{','.join(entries)}]")
            entries, size = [], 2
        entries.append(entry)
        size += len(entry) + 1
    if entries:
        parts.append(f"[{','.join(entries)}]")
    return parts


def as_dict(record: SecretState | HistoryRecord) -> dict[str, Any]:
    """JSON-ready view of a ledger record (for status output and logs)."""
    data = asdict(record)
    data.pop("etag", None)
    for key, value in data.items():
        if isinstance(value, datetime):
            data[key] = value.isoformat()
    if isinstance(data.get("step_timings"), str):
        data["step_timings"] = json.loads(data["step_timings"] or "{}")
    return data
