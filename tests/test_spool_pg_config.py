"""``[spool]`` (SPEC §10): the backend keys, their ranges, and no password anywhere."""

from __future__ import annotations

import pytest

from relay.config import InvalidConfig, config_from_dict
from relay.spoolpgconfig import redact_dsn

pytest.importorskip("psycopg", reason="psycopg not installed (pip install -e '.[test]')")


def _spool(**keys: object) -> dict[str, object]:
    return {"spool": keys}


def test_local_is_the_default() -> None:
    config = config_from_dict({}, "x")
    assert config.spool.backend == "local" and config.spool.lease_time == 30.0


def test_postgresql_keys_are_converted() -> None:
    spool = config_from_dict(_spool(
        backend="postgresql", dsn="postgresql://relay@db.example.org:5433/lpd",
        lease_time="10s", pool_size=4, chunk_size="256KiB", db_timeout="2s", node="n1"),
        "x").spool
    assert (spool.lease_time, spool.pool_size, spool.chunk_size, spool.db_timeout) == \
        (10.0, 4, 256 << 10, 2.0)
    assert spool.node_name() == "n1"


def test_postgresql_needs_a_dsn() -> None:
    with pytest.raises(InvalidConfig, match=r"spool\.dsn: missing"):
        config_from_dict(_spool(backend="postgresql"), "x")


@pytest.mark.parametrize("dsn", ["postgresql://relay:s3cret@db/lpd",
                                 "host=db user=relay password=s3cret dbname=lpd",
                                 "postgresql://relay@db/lpd?password=s3cret"])
def test_a_dsn_with_a_password_is_refused_without_showing_it(dsn: str) -> None:
    with pytest.raises(InvalidConfig) as info:
        config_from_dict(_spool(backend="postgresql", dsn=dsn), "x")
    text = str(info.value)
    assert "spool.dsn" in text and "passfile" in text and "s3cret" not in text
    assert "missing" not in text   # one problem, the real one


def test_an_unparsable_dsn_is_not_quoted_back() -> None:
    with pytest.raises(InvalidConfig) as info:
        config_from_dict(_spool(backend="postgresql", dsn="host='s3cret"), "x")
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(("key", "value"), [("lease_time", "0s"), ("lease_time", "2h"),
                                            ("pool_size", 1), ("pool_size", 101),
                                            ("chunk_size", "1KiB"), ("db_timeout", "10m"),
                                            ("backend", "sqlite")])
def test_out_of_range_values_are_refused(key: str, value: object) -> None:
    with pytest.raises(InvalidConfig, match=rf"spool\.{key}"):
        config_from_dict(_spool(**{key: value}), "x")


def test_redacted_dsn_keeps_only_where() -> None:
    assert redact_dsn("postgresql://relay@db.example.org:5433/lpd?sslmode=require") == \
        "postgresql://relay@db.example.org:5433/lpd"
    assert "s3cret" not in redact_dsn("host=db password=s3cret dbname=lpd")
