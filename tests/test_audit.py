"""The audit log's chain and files (relay.audit, relay.auditchain, relay.auditcli).

Records are written by a real ``AuditLog`` into tmp files; the tests edit,
delete, reorder and tear lines the way an intruder or a crash would, and
check that ``audit verify`` names the right line and seq.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from relay.audit import AuditLog
from relay.auditchain import ZERO_HASH, canonical, rotated, verify
from relay.auditcli import format_record, since_epoch
from relay.config import AuditConfig, InvalidConfig, config_from_dict
from tests.daemon import ROOT


def audit_config(path: Path, *, rotate_size: int = 64 << 20, rotate_keep: int = 10
                 ) -> AuditConfig:
    return AuditConfig(path=path, rotate_size=rotate_size, rotate_keep=rotate_keep, syslog="",
                       syslog_ca=None, syslog_cert=None, syslog_key=None)


def write_records(path: Path, n: int, **kw: int) -> None:
    log = AuditLog(audit_config(path, **kw), fsync=False)
    log.open()
    for i in range(n):
        log.record("attempt", None, job=f"{i:012d}", queue="q", user=f"user{i % 3}",
                   destination="lpd://x/q", result="retry", reason="refused")
    log.close()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "audit", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def test_records_chain_from_64_zeros_with_the_documented_hash(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_records(path, 3)
    records = [orjson.loads(line) for line in lines(path)]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev"] == ZERO_HASH
    for before, rec in itertools.pairwise(records):
        assert rec["prev"] == before["hash"]
    # docs/audit.md: SHA-256 of orjson OPT_SORT_KEYS without "hash", UTF-8.
    rec = records[1]
    body = {k: v for k, v in rec.items() if k != "hash"}
    assert hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest() \
        == rec["hash"] == hashlib.sha256(canonical(rec)).hexdigest()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert verify(str(path)) is None


def test_an_edited_record_is_named_by_line_and_seq(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_records(path, 6)
    text = lines(path)
    text[2] = text[2].replace(b'"user":"user2"', b'"user":"mallory"')
    path.write_bytes(b"".join(text))
    bad = verify(str(path))
    assert bad is not None and (bad.line, bad.seq) == (3, 3)
    assert "edited" in bad.reason
    result = run_cli("verify", str(path))
    assert result.returncode == 1
    assert result.stdout.strip() == f"first bad record: {path} line 3 (seq 3): {bad.reason}"


def test_a_deleted_record_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_records(path, 6)
    text = lines(path)
    del text[3]                      # seq 4 gone: line 4 now holds seq 5
    path.write_bytes(b"".join(text))
    bad = verify(str(path))
    assert bad is not None and (bad.line, bad.seq) == (4, 5)
    assert "seq 5 follows seq 3" in bad.reason


def test_reordered_records_are_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_records(path, 6)
    text = lines(path)
    text[1], text[2] = text[2], text[1]
    path.write_bytes(b"".join(text))
    bad = verify(str(path))
    assert bad is not None and (bad.line, bad.seq) == (2, 3)
    assert "seq 3 follows seq 1" in bad.reason


def test_a_replaced_record_with_a_recomputed_hash_breaks_prev(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_records(path, 4)
    text = lines(path)
    forged = orjson.loads(text[1]) | {"user": "mallory"}
    forged["hash"] = hashlib.sha256(canonical(forged)).hexdigest()
    text[1] = orjson.dumps(forged, option=orjson.OPT_SORT_KEYS) + b"\n"
    path.write_bytes(b"".join(text))
    bad = verify(str(path))
    assert bad is not None and (bad.line, bad.seq) == (3, 3)
    assert "prev" in bad.reason


def test_a_torn_final_line_is_reported_and_truncated_at_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_records(path, 3)
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"event":"rec')       # a crash in the middle of a write
    bad = verify(str(path))
    assert bad is not None and bad.line == 4 and bad.reason.startswith("torn final line")
    write_records(path, 2)                           # the next writer truncates, then goes on
    assert path.read_bytes().startswith(whole)
    assert verify(str(path)) is None
    assert [orjson.loads(x)["seq"] for x in lines(path)] == [1, 2, 3, 4, 5]


def test_rotation_keeps_one_chain_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    for _ in range(41):                              # writers (restarts) in turn
        write_records(path, 5, rotate_size=4096, rotate_keep=50)
    files = rotated(str(path))
    assert len(files) > 5 and files[-1] == str(path)  # 205 records: the last file is open
    assert files[0] == f"{path}.{len(files) - 1}"
    assert verify(str(path)) is None
    first = orjson.loads(lines(Path(f"{path}.1"))[0])
    last_of_older = orjson.loads(lines(Path(f"{path}.2"))[-1])
    assert first["prev"] == last_of_older["hash"] and first["seq"] == last_of_older["seq"] + 1
    seqs = [orjson.loads(x)["seq"] for f in files for x in lines(Path(f))]
    assert seqs == list(range(1, 206))


def test_rotate_keep_drops_the_oldest_and_the_rest_still_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    for _ in range(61):
        write_records(path, 5, rotate_size=4096, rotate_keep=3)
    assert [os.path.basename(f) for f in rotated(str(path))] == \
        ["audit.log.3", "audit.log.2", "audit.log.1", "audit.log"]
    assert orjson.loads(lines(Path(f"{path}.3"))[0])["seq"] > 1
    assert verify(str(path)) is None
    # The oldest kept file's first prev is taken as given; a gap inside is not.
    os.unlink(f"{path}.2")
    bad = verify(str(path))
    assert bad is not None and bad.file == f"{path}.1" and bad.line == 1


def test_two_processes_appending_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    a = AuditLog(audit_config(path), fsync=False)
    b = AuditLog(audit_config(path), fsync=False)
    a.open()
    b.open()
    for i in range(20):               # the daemon and the CLI, one append each in turn
        writer = a if i % 2 else b
        writer.record("held", None, job=str(i), reason="test")
        writer._flush([None])
    a.close()
    b.close()
    assert verify(str(path)) is None
    assert [orjson.loads(x)["job"] for x in lines(path)] == [str(i) for i in range(20)]


def test_audit_keys_in_the_configuration() -> None:
    base = {"queues": {"*": {"destinations": ["dir:///tmp/out"]}},
            "server": {"spool_dir": "/var/spool/lpd-relay"}}
    assert config_from_dict(base, "<t>").audit is None
    on = config_from_dict({**base, "audit": {}}, "<t>").audit
    assert on is not None and str(on.path) == "/var/spool/lpd-relay/audit/audit.log"
    assert (on.rotate_size, on.rotate_keep, on.syslog) == (64 << 20, 10, "")
    full = config_from_dict({**base, "audit": {"path": "/srv/a.log", "rotate_size": "1MiB",
                                               "rotate_keep": 3,
                                               "syslog": "tls://collector:6514"}}, "<t>").audit
    assert full is not None and (str(full.path), full.rotate_size, full.syslog) == \
        ("/srv/a.log", 1 << 20, "tls://collector:6514")
    with pytest.raises(InvalidConfig, match=r"audit\.syslog"):
        config_from_dict({**base, "audit": {"syslog": "udp://x:514"}}, "<t>")


def test_show_filters_by_job_user_and_since(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_records(path, 9)
    by_user = run_cli("show", str(path), "--user", "user1")
    assert by_user.returncode == 0
    assert len(by_user.stdout.splitlines()) == 3
    assert all(" user1 " in line + " " for line in by_user.stdout.splitlines())
    by_job = run_cli("show", str(path), "--job", "4")
    assert [line.split()[3] for line in by_job.stdout.splitlines()] == ["000000000004"]
    assert run_cli("show", str(path), "--since", "1h").stdout.count("\n") == 9
    assert run_cli("show", str(path), "--since", "2999-01-01T00:00:00Z").stdout == ""
    assert run_cli("show", str(path), "--since", "yesterday-ish").returncode == 2
    ok = run_cli("verify", str(path))
    assert ok.returncode == 0 and "chain whole, 9 record(s)" in ok.stdout


def test_since_and_format() -> None:
    assert since_epoch("1h", 10_000.0) == 6400.0
    assert since_epoch("1970-01-01T01:00:00", 0.0) == 3600.0
    line = format_record({"ts": "T", "seq": 1, "event": "received", "job": "J", "queue": "q",
                          "user": "u", "files": [{"name": "dfA1h", "format": "l", "bytes": 3,
                                                  "sha256": "ab" * 32}], "hash": "h"})
    assert line.startswith("T 1 received J q u files=dfA1h(l,3B,sha256:abababab")
    assert "hash" not in line


def test_a_record_larger_than_the_tail_window_still_ends_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_records(path, 2)
    log = AuditLog(audit_config(path), fsync=False)
    log.open()
    log.record("held", None, job="big", reason="x" * 200_000)   # e.g. 1,000 data files
    log.close()
    write_records(path, 1)                          # a restart finds where the chain ends
    assert [orjson.loads(x)["seq"] for x in lines(path)] == [1, 2, 3, 4]
    assert verify(str(path)) is None
