from datetime import timedelta

import pytest

from shared.config import (
    TAG_CURRENT_SLOT,
    TAG_ROTATION_ID,
    parse_config,
    parse_target,
    validate_secret_name,
)
from shared.durations import format_duration, parse_duration
from shared.errors import ConfigError, NotManaged, TargetNotAllowed
from shared.settings import Settings, normalize_vault_url

SETTINGS = Settings(
    allowed_vaults=frozenset({"https://kv.vault.azure.net"}),
    allowed_targets=("db.internal:5432", "*.postgres.database.azure.com:5432", "app.internal"),
)


def tags(**overrides: str) -> dict[str, str]:
    base = {
        "rotation-rotator": "postgres",
        "rotation-target": "db.internal:5432/appdb",
        "rotation-slots": "app_blue,app_green",
        "rotation-current-slot": "app_blue",
        "rotation-validity": "P30D",
        "rotation-overlap": "PT12H",
        "rotation-pg-group": "app",
        "rotation-admin-secret": "db-admin",
    }
    base.update(overrides)
    return base


def test_full_tag_set_parses() -> None:
    config = parse_config(tags(), SETTINGS)
    assert config.rotator == "postgres"
    assert str(config.target) == "db.internal:5432/appdb"
    assert config.slots == ("app_blue", "app_green")
    assert config.inactive_slot == "app_green"
    assert config.validity == timedelta(days=30)
    assert config.overlap == timedelta(hours=12)
    new_tags = config.tags_for_new_version("app_green", "r1")
    assert new_tags[TAG_CURRENT_SLOT] == "app_green"
    assert new_tags[TAG_ROTATION_ID] == "r1"
    assert new_tags["rotation-pg-group"] == "app"


def test_untagged_secret_is_not_managed() -> None:
    with pytest.raises(NotManaged):
        parse_config({"owner": "team-a"}, SETTINGS)


def test_microsoft_sample_tags_are_accepted() -> None:
    config = parse_config(
        {
            "CredentialId": "app_green",
            "ProviderAddress": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.DBforPostgreSQL/"
            "flexibleServers/mydb",
            "ValidityPeriodDays": "60",
            "rotation-slots": "app_blue,app_green",
        },
        SETTINGS,
    )
    assert config.rotator == "postgres"
    assert config.target.host == "mydb.postgres.database.azure.com"
    assert config.current_slot == "app_green"
    assert config.validity == timedelta(days=60)
    assert config.tags_for_new_version("app_blue", "r2")["CredentialId"] == "app_blue"


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            {"rotation-target": "evil.example.com:5432/appdb"},
            TargetNotAllowed,
            "not in ROTATION_ALLOWED_TARGETS",
        ),
        ({"rotation-target": "db.internal:6543/appdb"}, TargetNotAllowed, "not in ROTATION_ALLOWED_TARGETS"),
        ({"rotation-target": "db.internal:99999/appdb"}, ConfigError, "port"),
        ({"rotation-target": "db internal/appdb"}, ConfigError, "host"),
        ({"rotation-target": "db.internal:5432/app;drop"}, ConfigError, "database"),
        ({"rotation-slots": "app_blue"}, ConfigError, "two different slots"),
        ({"rotation-slots": "app_blue,app_blue"}, ConfigError, "two different slots"),
        ({"rotation-slots": 'app_blue,x"; DROP ROLE postgres; --'}, ConfigError, "two different slots"),
        ({"rotation-current-slot": "someone_else"}, ConfigError, "not one of"),
        ({"rotation-validity": "P1Y"}, ConfigError, "years and months"),
        ({"rotation-validity": "PT5M"}, ConfigError, "between 1 hour and 5 years"),
        ({"rotation-overlap": "P31D"}, ConfigError, "shorter than validity"),
        ({"rotation-probes": "https://evil.example.com/health"}, TargetNotAllowed, "probe host"),
        ({"rotation-probes": "file:///etc/passwd"}, ConfigError, "http"),
        ({"rotation-rotator": "Robert'); DROP"}, ConfigError, "rotation-rotator"),
        ({"rotation-admin-secret": "../admin"}, ConfigError, "admin-secret"),
    ],
)
def test_hostile_or_invalid_tags_are_refused(overrides: dict[str, str], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        parse_config(tags(**overrides), SETTINGS)


def test_probe_on_allowed_host_is_accepted() -> None:
    config = parse_config(tags(**{"rotation-probes": "http://app.internal:8080/health"}), SETTINGS)
    assert config.probes == ("http://app.internal:8080/health",)


@pytest.mark.parametrize("name", ["", "a" * 128, "../etc", "name with space", "ünïcode", "a/b"])
def test_invalid_secret_names(name: str) -> None:
    with pytest.raises(ConfigError):
        validate_secret_name(name)


def test_durations_round_trip() -> None:
    for text, seconds in [("P90D", 90 * 86400), ("PT12H", 43200), ("P1W", 604800), ("P1DT6H30M", 109800)]:
        assert parse_duration(text).total_seconds() == seconds
        assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)
    for bad in ("P", "PT", "90D", "P1M", "-P1D", "P1DT"):
        with pytest.raises(ConfigError):
            parse_duration(bad)


def test_target_and_vault_normalisation() -> None:
    assert parse_target("DB.Internal/appdb").port == 5432
    assert normalize_vault_url("MyVault") == "https://myvault.vault.azure.net"
    assert normalize_vault_url("https://MyVault.vault.azure.net/") == "https://myvault.vault.azure.net"
    assert normalize_vault_url("https://127.0.0.1:8443") == "https://127.0.0.1:8443"
    with pytest.raises(ConfigError):
        normalize_vault_url("http://myvault.vault.azure.net")


def test_settings_from_environment() -> None:
    settings = Settings.from_env(
        {
            "ROTATION_ALLOWED_VAULTS": "kv1, https://kv2.vault.azure.net/",
            "ROTATION_ALLOWED_TARGETS": "db.internal:5432;*.example.net",
            "ROTATION_DEFAULT_OVERLAP": "PT2H",
            "AzureWebJobsStorage__accountName": "ledgeracct",
        }
    )
    assert settings.allowed_vaults == {"https://kv1.vault.azure.net", "https://kv2.vault.azure.net"}
    assert settings.target_allowed("db.internal", 5432)
    assert not settings.target_allowed("db.internal", 5433)
    assert settings.target_allowed("x.example.net", 1234)
    assert settings.default_overlap == timedelta(hours=2)
    assert settings.ledger_table_endpoint == "https://ledgeracct.table.core.windows.net"


def test_targets_as_urls_and_resource_ids() -> None:
    url = parse_target("https://API.vendor.example/v1/keys")
    assert (url.host, url.port, url.database, url.scheme) == ("api.vendor.example", 443, "v1/keys", "https")
    assert str(url) == "https://api.vendor.example:443/v1/keys"
    storage = parse_target(
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/ordersdata"
    )
    assert (storage.host, storage.port, storage.resource_name) == (
        "ordersdata.blob.core.windows.net",
        443,
        "ordersdata",
    )
    for bad in (
        "https://user@api.vendor.example/",
        "https://api.vendor.example/?x=1",
        "https://api.vendor.example:99999/",
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Evil/things/x",
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/UPPER_bad!",
    ):
        with pytest.raises(ConfigError):
            parse_target(bad)


def test_a_wildcard_matches_one_whole_label() -> None:
    settings = Settings.from_env({"ROTATION_ALLOWED_TARGETS": "*.blob.core.windows.net:443"})
    assert settings.target_allowed("acct.blob.core.windows.net", 443)
    assert settings.target_allowed("ACCT.blob.core.windows.net.", 443)
    assert not settings.target_allowed("a.b.blob.core.windows.net", 443)
    assert not settings.target_allowed("blob.core.windows.net", 443)
    assert not settings.target_allowed("acct.blob.core.windows.net.evil.com", 443)
    assert not settings.target_allowed("acctblob.core.windows.net", 443)
    assert not settings.target_allowed("acct.blob.core.windows.net", 80)


@pytest.mark.parametrize(
    "entry",
    ["app*.example.com", "*foo.example.com", "db.*.internal", "*.com", "a b.example.com", "x.net:99999"],
)
def test_a_partial_wildcard_or_bad_entry_is_refused_at_load(entry: str) -> None:
    with pytest.raises(ConfigError, match="allow-list entry") as refused:
        Settings.from_env({"ROTATION_ALLOWED_TARGETS": f"db.internal:5432,{entry}"})
    assert entry.partition(":")[0] in str(refused.value)
    if " " not in entry:  # there, a space separates two entries
        with pytest.raises(ConfigError):
            Settings.from_env({"ROTATION_VAULT_TARGETS": f"kv1={entry}"})


def test_per_vault_allow_lists() -> None:
    settings = Settings.from_env(
        {
            "ROTATION_ALLOWED_TARGETS": "shared.internal:5432",
            "ROTATION_VAULT_TARGETS": "teama=a.internal:5432 *.a.example.net;"
            "https://TeamB.vault.azure.net/=b.internal:5432",
        }
    )
    vault_a, vault_b = "https://teama.vault.azure.net", "https://teamb.vault.azure.net"
    assert settings.target_allowed("a.internal", 5432, vault_a)
    assert settings.target_allowed("x.a.example.net", 443, vault_a)
    assert not settings.target_allowed("b.internal", 5432, vault_a)
    assert not settings.target_allowed("shared.internal", 5432, vault_a)
    assert settings.target_allowed("b.internal", 5432, vault_b)
    # An unlisted vault (or no vault) uses ROTATION_ALLOWED_TARGETS.
    assert settings.target_allowed("shared.internal", 5432, "https://other.vault.azure.net")
    assert not settings.target_allowed("a.internal", 5432)

    to_b = tags(**{"rotation-target": "b.internal:5432/appdb"})
    assert parse_config(to_b, settings, vault_url=vault_b).target.host == "b.internal"
    with pytest.raises(TargetNotAllowed, match="ROTATION_VAULT_TARGETS"):
        parse_config(to_b, settings, vault_url=vault_a)
    probe_to_b = tags(
        **{"rotation-target": "a.internal:5432/appdb", "rotation-probes": "https://b.internal:5432/"}
    )
    with pytest.raises(TargetNotAllowed, match="consumer probe"):
        parse_config(probe_to_b, settings, vault_url=vault_a)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ROTATION_VAULT_TARGETS", "teama"),
        ("ROTATION_VAULT_TARGETS", "teama="),
        ("ROTATION_VAULT_TARGETS", "bad.name=a.internal"),
        ("ROTATION_ALLOWED_NETWORKS", "10.0.0.0/33"),
        ("ROTATION_ALLOWED_NETWORKS", "10.0.0.1/8"),
        ("ROTATION_MAX_ATTEMPTS", "٣"),
        ("ROTATION_MAX_ATTEMPTS", "0"),
        ("ROTATION_SWEEP_CONCURRENCY", "99999999999"),
        ("ROTATION_POSTGRES_SSLMODE", "require"),
        ("ROTATION_POSTGRES_SSLMODE", "disable"),
        ("ROTATION_POSTGRES_SSLMODE", "prefer"),
    ],
)
def test_bad_settings_are_refused_at_load(name: str, value: str) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env({name: value})


def test_postgres_tls_defaults_verify_the_server() -> None:
    settings = Settings.from_env({})
    assert (settings.postgres_sslmode, settings.postgres_ca_bundle) == ("verify-full", "system")
    assert Settings.from_env({"ROTATION_POSTGRES_SSLMODE": "verify-ca"}).postgres_sslmode == "verify-ca"


def test_allowed_networks_are_parsed() -> None:
    settings = Settings.from_env({"ROTATION_ALLOWED_NETWORKS": "127.0.0.0/8, 10.1.0.0/16,fd00::/8"})
    assert [str(n) for n in settings.allowed_networks] == ["127.0.0.0/8", "10.1.0.0/16", "fd00::/8"]
