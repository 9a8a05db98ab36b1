"""Ledger rows written before names were compared case-insensitively are migrated once."""

from datetime import UTC, datetime

from azure.data.tables import TableServiceClient

from devstack.stack import LocalStack
from shared.ledger import OVERLAP, HistoryRecord, Ledger, SecretState


def test_rows_under_another_case_move_to_one_lower_case_row(stack: LocalStack, unique: str) -> None:
    tables = TableServiceClient.from_connection_string(stack.azurite.connection_string)
    ledger = Ledger.from_service(tables, prefix=f"names{unique[1:]}")
    ledger.ensure_tables()
    state_table = tables.get_table_client(f"names{unique[1:]}state")
    history_table = tables.get_table_client(f"names{unique[1:]}history")
    vault = "https://myvault.vault.azure.net"
    # As an older version wrote them: the name as the caller spelled it, in both keys.
    state_table.create_entity(
        {"PartitionKey": "myvault.vault.azure.net", "RowKey": "CASE-DB", "vault_url": vault,
         "name": "CASE-DB", "state": OVERLAP, "retire_slot": "app_blue"}
    )  # fmt: skip
    state_table.create_entity(
        {"PartitionKey": "myvault.vault.azure.net", "RowKey": "Other", "vault_url": vault, "name": "Other"}
    )
    history_table.create_entity(
        {"PartitionKey": "myvault.vault.azure.net|CASE-DB", "RowKey": "0001-r1", "vault_url": vault,
         "name": "CASE-DB", "rotation_id": "r1", "trigger": "event", "outcome": "rotated"}
    )  # fmt: skip

    assert ledger.migrate_names() == 2
    assert ledger.migrate_names() == 0  # once: the marker row says so

    moved = ledger.get(vault, "case-db")
    assert moved is not None and (moved.name, moved.state, moved.retire_slot) == (
        "case-db",
        OVERLAP,
        "app_blue",
    )
    assert ledger.get(vault, "CASE-DB") == moved  # any spelling reads the one row
    assert sorted(state.name for state in ledger.states()) == ["case-db", "other"]
    assert [record.rotation_id for record in ledger.history(vault, "Case-Db")] == ["r1"]
    # And new writes under any spelling land on the same row.
    state = SecretState(vault_url=vault, name="OTHER")
    assert state.name == "other"
    ledger.write_history(
        HistoryRecord(vault_url=vault, name="OTHER", rotation_id="r2", trigger="manual",
                      started_on=datetime.now(UTC)), "0002-r2"
    )  # fmt: skip
    assert [record.rotation_id for record in ledger.history(vault, "other")] == ["r2"]
