"""Configuration loading and validation (SPEC §3, §3.1, §3.2): real files in tmp_path."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import (
    Config,
    InvalidConfig,
    Listen,
    choose_default_port,
    config_from_dict,
    config_from_toml,
    embedded_default,
    load_config,
)
from relay.errors import ConfigError, LpdError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "relay.toml"
QUEUE = '\n[queues.q]\ndestinations = ["socket://127.0.0.1"]\n'

SPEC_EXAMPLE = """
[server]
listen = ["0.0.0.0:515", "[::]:515"]
spool_dir = "/var/spool/lpd-relay"
max_connections = 10000
max_connections_per_host = 200
idle_timeout = "60s"
max_job_size = "4GiB"
min_free_disk = "512MiB"
fsync = "always"
allow = ["10.0.0.0/8", "127.0.0.0/8"]
require_reserved_port = false
queue_names = "case-insensitive"

[metrics]
listen = "127.0.0.1:9515"

[log]
format = "json"
level = "info"

[origin_ports]
range = "721-731"
reuse_addr = true
linger = "5s"

[retry]
initial = "1s"
max = "5m"
give_up_after = "24h"

[queues.ward3]
aliases = ["Ward3", "HP_Ward3"]
destinations = ["lpd://laptop-ward3.vpn/Ward3?mode=count", "socket://10.1.2.3:9100"]
concurrency = 1
failover_after = 3

[queues."*"]
destinations = ["dir:///var/spool/lpd-relay-out"]
"""


def _load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "relay.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def _problems(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    with pytest.raises(InvalidConfig) as info:
        _load(tmp_path, text)
    return info.value.problems


# ---- defaults and the SPEC example ----

def test_defaults_for_every_key(tmp_path: Path) -> None:
    config = _load(tmp_path, QUEUE)
    server = config.server
    assert server.listen == (Listen(host="0.0.0.0", port=515),)
    assert server.spool_dir == Path("/var/spool/lpd-relay")
    assert (server.max_connections, server.max_connections_per_host) == (10000, 200)
    assert server.idle_timeout == 60.0
    assert (server.max_job_size, server.max_control_size) == (4 * 2**30, 64 * 2**10)
    assert server.min_free_disk == 512 * 2**20
    assert server.fsync is True
    assert server.allow == ()
    assert server.require_reserved_port is False
    assert server.queue_names == "case-insensitive"
    assert server.graceful_timeout == 10.0
    assert config.metrics.listen == Listen(host="127.0.0.1", port=9515)
    assert (config.log.format, config.log.level) == ("json", "info")
    ports = config.origin_ports
    assert (ports.low, ports.high, ports.reuse_addr, ports.linger) == (721, 731, True, 5.0)
    assert (config.retry.initial, config.retry.max, config.retry.give_up_after) == (
        1.0, 300.0, 86400.0)
    queue = config.queues["q"]
    assert (queue.aliases, queue.concurrency, queue.failover_after) == ((), 1, 3)
    assert queue.retry == config.retry
    assert config.source == str(tmp_path / "relay.toml")


def test_spec_example_validates(tmp_path: Path) -> None:
    config = _load(tmp_path, SPEC_EXAMPLE)
    assert config.server.listen == (Listen(host="0.0.0.0", port=515), Listen(host="::", port=515))
    assert config.server.allow == (ipaddress.ip_network("10.0.0.0/8"),
                                   ipaddress.ip_network("127.0.0.0/8"))
    assert list(config.queues) == ["ward3", "*"]
    ward3 = config.queues["ward3"]
    assert ward3.aliases == ("Ward3", "HP_Ward3")
    assert [d.scheme for d in ward3.destinations] == ["lpd", "socket"]
    assert config.queues["*"].destinations[0].path == "/var/spool/lpd-relay-out"


def test_example_file_validates() -> None:
    config = load_config(EXAMPLE)
    assert config.source == str(EXAMPLE)
    assert config.queues, "the example should show at least one queue"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = _load(tmp_path, QUEUE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.source = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.queues["new"] = config.queues["q"]  # type: ignore[index]


# ---- every key: valid forms ----

@pytest.mark.parametrize(("toml", "attribute", "expected"), [
    ('[server]\nlisten = ["127.0.0.1:0"]', "server.listen", (Listen(host="127.0.0.1", port=0),)),
    ('[server]\nlisten = "[::1]:5515"', "server.listen", (Listen(host="::1", port=5515),)),
    ('[server]\nlisten = ["localhost:65535"]', "server.listen",
     (Listen(host="localhost", port=65535),)),
    ('[server]\nspool_dir = "/srv/spool"', "server.spool_dir", Path("/srv/spool")),
    ("[server]\nmax_connections = 1", "server.max_connections", 1),
    ("[server]\nmax_connections_per_host = 5", "server.max_connections_per_host", 5),
    ('[server]\nidle_timeout = "250ms"', "server.idle_timeout", 0.25),
    ('[server]\nmax_job_size = "1MB"', "server.max_job_size", 10**6),
    ("[server]\nmax_job_size = 4096", "server.max_job_size", 4096),
    ('[server]\nmax_control_size = "1KiB"', "server.max_control_size", 1024),
    ('[server]\nmin_free_disk = "0"', "server.min_free_disk", 0),
    ('[server]\nfsync = "never"', "server.fsync", False),
    ('[server]\nallow = ["10.1.2.3", "2001:db8::/32", "192.168.1.7/24"]', "server.allow",
     (ipaddress.ip_network("10.1.2.3/32"), ipaddress.ip_network("2001:db8::/32"),
      ipaddress.ip_network("192.168.1.0/24"))),
    ("[server]\nrequire_reserved_port = true", "server.require_reserved_port", True),
    ('[server]\nqueue_names = "exact"', "server.queue_names", "exact"),
    ('[server]\ngraceful_timeout = "0s"', "server.graceful_timeout", 0.0),
    ('[metrics]\nlisten = ""', "metrics.listen", None),
    ('[metrics]\nlisten = "[::1]:0"', "metrics.listen", Listen(host="::1", port=0)),
    ('[log]\nformat = "text"', "log.format", "text"),
    ('[log]\nlevel = "debug"', "log.level", "debug"),
    ('[log]\nlevel = "error"', "log.level", "error"),
    ('[origin_ports]\nrange = "512-1023"', "origin_ports.low", 512),
    ('[origin_ports]\nrange = "any"', "origin_ports.low", 1),     # CUPS: 1-1023
    ('[origin_ports]\nrange = "any"', "origin_ports.high", 1023),
    ('[origin_ports]\nrange = "none"', "origin_ports.high", None),
    ('[origin_ports]\nrange = "rfc1179"', "origin_ports.low", 721),
    ("[origin_ports]\nreuse_addr = false", "origin_ports.reuse_addr", False),
    ('[origin_ports]\nlinger = "0s"', "origin_ports.linger", 0.0),
    ('[retry]\ninitial = "500ms"', "retry.initial", 0.5),
    ('[retry]\nmax = "1h"', "retry.max", 3600.0),
    ('[retry]\ngive_up_after = "7d"', "retry.give_up_after", 7 * 86400.0),
])
def test_valid_values(tmp_path: Path, toml: str, attribute: str, expected: object) -> None:
    value: object = _load(tmp_path, toml + "\n" + QUEUE)
    for part in attribute.split("."):
        value = getattr(value, part)
    assert value == expected


def test_queue_keys(tmp_path: Path) -> None:
    config = _load(tmp_path, """
[retry]
initial = "2s"
give_up_after = "1h"
[queues.ward3]
aliases = ["W3"]
destinations = ["lpd://h/q", "cmd:lp -d ward3", "usb:///dev/usb/lp0"]
concurrency = 4
failover_after = 1
retry = { max = "30s", give_up_after = "0s" }
""")
    queue = config.queues["ward3"]
    assert (queue.name, queue.aliases, queue.concurrency, queue.failover_after) == (
        "ward3", ("W3",), 4, 1)
    assert [d.uri for d in queue.destinations] == [
        "lpd://h/q", "cmd:lp -d ward3", "usb:///dev/usb/lp0"]
    # Each per-queue retry key overrides [retry]; the others come from [retry].
    assert (queue.retry.initial, queue.retry.max, queue.retry.give_up_after) == (2.0, 30.0, 0.0)


def test_relative_spool_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    config = _load(tmp_path, '[server]\nspool_dir = "spool/here"\n' + QUEUE)
    assert config.server.spool_dir == tmp_path / "spool" / "here"


def test_relative_spool_dir_from_text_uses_base_dir(tmp_path: Path) -> None:
    config = config_from_toml('[server]\nspool_dir = "s"\n' + QUEUE, base_dir=tmp_path)
    assert config.server.spool_dir == tmp_path / "s"
    assert config.source == "<string>"


def test_no_queues_is_valid_and_refuses_everything(tmp_path: Path) -> None:
    assert dict(_load(tmp_path, "").queues) == {}


# ---- every key: invalid forms, reported at their exact path ----

@pytest.mark.parametrize(("toml", "path", "fragment"), [
    ("[server]\nlisten = []", "server.listen", "expected at least 1"),
    ("[server]\nlisten = 515", "server.listen", "expected an array"),
    ('[server]\nlisten = ["0.0.0.0"]', "server.listen[0]", '"host:port"'),
    ('[server]\nlisten = ["localhost:1", "0.0.0.0:65536"]', "server.listen[1]", "0..65535"),
    ('[server]\nlisten = ["0.0.0.0 :515"]', "server.listen[0]", "not a valid host name"),
    ('[server]\nlisten = ["0.0.0.0:-1"]', "server.listen[0]", "port must be 0..65535"),
    ('[server]\nlisten = ["::1:515"]', "server.listen[0]", '"[ipv6]:port"'),
    ('[server]\nlisten = ["[1.2.3.4]:515"]', "server.listen[0]", "not a bracketed IPv6 address"),
    ('[server]\nlisten = [":515"]', "server.listen[0]", '"host:port"'),
    ("[server]\nspool_dir = 5", "server.spool_dir", "expected a directory path"),
    ('[server]\nspool_dir = ""', "server.spool_dir", "expected a directory path"),
    ("[server]\nmax_connections = 0", "server.max_connections", "1 or more, got integer 0"),
    ('[server]\nmax_connections = "10"', "server.max_connections", 'got string "10"'),
    ("[server]\nmax_connections = true", "server.max_connections", "got boolean True"),
    ("[server]\nmax_connections_per_host = 1.5", "server.max_connections_per_host",
     "got float 1.5"),
    ("[server]\nidle_timeout = 60", "server.idle_timeout", "a duration string"),
    ('[server]\nidle_timeout = "0s"', "server.idle_timeout", "more than 0s"),
    ('[server]\nidle_timeout = "-1s"', "server.idle_timeout", "negative"),
    ('[server]\nmax_job_size = "4G"', "server.max_job_size", "expected a size"),
    ("[server]\nmax_job_size = 0", "server.max_job_size", "more than 0 bytes"),
    ("[server]\nmax_job_size = -5", "server.max_job_size", "negative"),
    ('[server]\nmax_control_size = "0B"', "server.max_control_size", "more than 0 bytes"),
    ('[server]\nmin_free_disk = "lots"', "server.min_free_disk", "expected a size"),
    ("[server]\nfsync = true", "server.fsync", '"always" or "never"'),
    ('[server]\nfsync = "sometimes"', "server.fsync", 'got string "sometimes"'),
    ('[server]\nallow = "10.0.0.0/8"', "server.allow", "expected an array of networks"),
    ('[server]\nallow = ["10.0.0.0/8", "10.0.0.0/33"]', "server.allow[1]", "a network"),
    ('[server]\nallow = ["intranet"]', "server.allow[0]", 'got "intranet"'),
    ('[server]\nrequire_reserved_port = "yes"', "server.require_reserved_port", "true or false"),
    ('[server]\nqueue_names = "Exact"', "server.queue_names", '"case-insensitive" or "exact"'),
    ('[server]\ngraceful_timeout = "soon"', "server.graceful_timeout", "duration"),
    ("[metrics]\nlisten = false", "metrics.listen", "expected an address"),
    ('[metrics]\nlisten = "9515"', "metrics.listen", '"host:port"'),
    ('[log]\nformat = "xml"', "log.format", '"json" or "text"'),
    ('[log]\nlevel = "verbose"', "log.level", '"debug" or "info" or "warning" or "error"'),
    ('[origin_ports]\nrange = "731-721"', "origin_ports.range", '"LOW-HIGH"'),
    ('[origin_ports]\nrange = "0-10"', "origin_ports.range", "1..65535"),
    ('[origin_ports]\nrange = "1-65536"', "origin_ports.range", "1..65535"),
    ('[origin_ports]\nrange = "721"', "origin_ports.range", '"any"'),
    ("[origin_ports]\nrange = 721", "origin_ports.range", "got integer 721"),
    ("[origin_ports]\nreuse_addr = 1", "origin_ports.reuse_addr", "true or false"),
    ('[origin_ports]\nlinger = "5"', "origin_ports.linger", "duration"),
    ('[retry]\ninitial = "0s"', "retry.initial", "more than 0s"),
    ('[retry]\nmax = "forever"', "retry.max", "duration"),
    ("[retry]\ngive_up_after = 86400", "retry.give_up_after", "a duration string"),
    ("server = 1", "server", "expected a table, got integer 1"),
    ('log = "json"', "log", "expected a table"),
])
def test_invalid_values(tmp_path: Path, toml: str, path: str, fragment: str) -> None:
    problems = _problems(tmp_path, toml + "\n" + QUEUE)
    assert [p for p, _ in problems] == [path]
    assert fragment in problems[0][1]


@pytest.mark.parametrize(("toml", "path", "fragment"), [
    ('[queues.a]\naliases = ["x"]', "queues.a.destinations", "missing; expected an array"),
    ("[queues.a]\ndestinations = []", "queues.a.destinations", "expected at least 1"),
    ('[queues.a]\ndestinations = "socket://h"', "queues.a.destinations", "expected an array"),
    ('[queues.a]\ndestinations = ["socket://h", "ftp://h"]', "queues.a.destinations[1]",
     "unknown destination 'ftp://h'"),
    ('[queues.a]\ndestinations = ["lpd://h/q?mode=raw"]', "queues.a.destinations[0]",
     "option mode"),
    ("[queues.a]\ndestinations = [5]", "queues.a.destinations[0]", "got integer 5"),
    ('[queues.a]\ndestinations = ["socket://h"]\nconcurrency = 0', "queues.a.concurrency",
     "1 or more"),
    ('[queues.a]\ndestinations = ["socket://h"]\nfailover_after = -1',
     "queues.a.failover_after", "1 or more"),
    ('[queues.a]\ndestinations = ["socket://h"]\naliases = "b"', "queues.a.aliases",
     "expected an array"),
    ('[queues.a]\ndestinations = ["socket://h"]\naliases = ["b c"]', "queues.a.aliases[0]",
     "without spaces"),
    ('[queues.a]\ndestinations = ["socket://h"]\naliases = ["*"]', "queues.a.aliases[0]",
     "catch-all"),
    ('[queues.a]\ndestinations = ["socket://h"]\nretry = "fast"', "queues.a.retry",
     "expected a table"),
    ('[queues.a]\ndestinations = ["socket://h"]\nretry = { initial = "0s" }',
     "queues.a.retry.initial", "more than 0s"),
    ('[queues."my queue"]\ndestinations = ["socket://h"]', 'queues."my queue"',
     "without spaces"),
    ('[queues.""]\ndestinations = ["socket://h"]', 'queues.""', "non-empty"),
    ('[queues."*"]\ndestinations = ["socket://h"]\naliases = ["any"]', 'queues."*".aliases',
     'catch-all queue "*" cannot have aliases'),
    ("queues = 3", "queues", "expected a table of queues"),
    ("[queues]\na = 3", "queues.a", "expected a table"),
])
def test_invalid_queues(tmp_path: Path, toml: str, path: str, fragment: str) -> None:
    problems = _problems(tmp_path, toml)
    assert [p for p, _ in problems] == [path]
    assert fragment in problems[0][1]


# ---- unknown keys, several problems at once, the error object ----

@pytest.mark.parametrize(("toml", "path", "hint"), [
    ("[server]\nlistn = []", "server.listn", "did you mean 'listen'?"),
    ("[servr]\n", "servr", "did you mean 'server'?"),
    ("[metrics]\nport = 9515", "metrics.port", "unknown key"),
    ("[log]\nformatt = 'json'", "log.formatt", "did you mean 'format'?"),
    ("[origin_ports]\nranges = 'any'", "origin_ports.ranges", "did you mean 'range'?"),
    ("[retry]\ngiveup = '1h'", "retry.giveup", "unknown key"),
    ("[queues.q2]\ndestinations = ['socket://h']\nconcurency = 2", "queues.q2.concurency",
     "did you mean 'concurrency'?"),
    ("[queues.q2]\ndestinations = ['socket://h']\nretry = { jitter = 1 }",
     "queues.q2.retry.jitter", "expected one of: initial, max, give_up_after"),
    ("zzz = 1", "zzz", "expected one of: server, metrics, log, origin_ports, retry, tls, queues"),
])
def test_unknown_keys_are_errors(tmp_path: Path, toml: str, path: str, hint: str) -> None:
    problems = _problems(tmp_path, toml + "\n" + QUEUE)
    assert [p for p, _ in problems] == [path]
    assert problems[0][1].startswith("unknown key") and hint in problems[0][1]


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    text = """
[server]
listn = ["0.0.0.0:515"]
max_job_size = "huge"
allow = ["10.0.0.0/8", "nope", "also nope"]
[log]
level = "loud"
[queues.ward3]
destinations = ["lpd://h/q?colour=red", "socket://h"]
[queues.lab]
"""
    with pytest.raises(InvalidConfig) as info:
        _load(tmp_path, text)
    paths = [p for p, _ in info.value.problems]
    assert sorted(paths) == sorted([
        "server.listn", "server.max_job_size", "server.allow[1]", "server.allow[2]",
        "log.level", "queues.ward3.destinations[0]", "queues.lab.destinations"])
    lines = str(info.value).splitlines()
    assert lines == [f"{p}: {m}" for p, m in info.value.problems]
    assert isinstance(info.value, ConfigError) and isinstance(info.value, LpdError)
    assert info.value.path == info.value.problems[0][0]


def test_problem_messages_are_single_printable_lines(tmp_path: Path) -> None:
    problems = _problems(tmp_path, '[queues."a\\u0001\\nb"]\ndestinations = ["socket://h"]\n')
    assert problems[0][0] == 'queues."a\\u0001\\nb"'
    assert all(part.isprintable() for problem in problems for part in problem)


# ---- name uniqueness ----

def test_names_and_aliases_unique_across_queues(tmp_path: Path) -> None:
    problems = _problems(tmp_path, """
[queues.ward3]
aliases = ["Ward3", "HP_Ward3"]
destinations = ["socket://h"]
[queues.hp_ward3]
destinations = ["socket://h"]
[queues.lab]
aliases = ["WARD3"]
destinations = ["socket://h"]
""")
    assert problems == [
        ("queues.hp_ward3",
         "'hp_ward3' is already used by queue 'ward3' (queue names are case-insensitive)"),
        ("queues.lab.aliases[0]",
         "'WARD3' is already used by queue 'ward3' (queue names are case-insensitive)"),
    ]


def test_case_variants_are_distinct_queues_when_exact(tmp_path: Path) -> None:
    config = _load(tmp_path, """
[server]
queue_names = "exact"
[queues.ward3]
destinations = ["socket://h"]
[queues.Ward3]
destinations = ["socket://h"]
""")
    assert list(config.queues) == ["ward3", "Ward3"]


def test_exact_duplicates_are_still_errors(tmp_path: Path) -> None:
    problems = _problems(tmp_path, """
[server]
queue_names = "exact"
[queues.a]
aliases = ["x"]
destinations = ["socket://h"]
[queues.b]
aliases = ["x", "X"]
destinations = ["socket://h"]
""")
    assert problems == [("queues.b.aliases[0]", "'x' is already used by queue 'a'")]


def test_uniqueness_is_checked_even_when_queues_have_other_problems(tmp_path: Path) -> None:
    problems = _problems(tmp_path, """
[queues.a]
aliases = ["b"]
destinations = ["nonsense"]
[queues.b]
concurrency = 0
""")
    paths = [p for p, _ in problems]
    assert "queues.b" in paths and "queues.a.destinations[0]" in paths


# ---- files: syntax, unreadable, encoding ----

def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    problems = _problems(tmp_path, '[server]\nmax_connections = = 5\n')
    assert problems[0][0] == str(tmp_path / "relay.toml")
    assert "TOML syntax error" in problems[0][1] and "line 2" in problems[0][1]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig) as info:
        load_config(tmp_path / "absent.toml")
    assert info.value.problems[0][0] == str(tmp_path / "absent.toml")
    assert errno.errorcode[errno.ENOENT] in str(info.value) or "No such file" in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig, match="cannot read the file"):
        load_config(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_bytes(b'[log]\nlevel = "\xff"\n')
    with pytest.raises(InvalidConfig, match="not UTF-8"):
        load_config(path)


def test_config_from_dict_reports_like_files() -> None:
    with pytest.raises(InvalidConfig) as info:
        config_from_dict({"server": {"max_connections": -1}}, "<test>")
    assert info.value.problems[0][0] == "server.max_connections"


# ---- the embedded default (SPEC §3.1) ----

def test_embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = embedded_default(port=5515)
    assert config.source == "<embedded default>"
    assert config.server.listen == (Listen(host="0.0.0.0", port=5515),)
    assert config.server.spool_dir == tmp_path / "lpd-relay-spool"
    assert config.metrics.listen == Listen(host="127.0.0.1", port=9515)
    assert config.log.format == "text"
    assert list(config.queues) == ["*"]
    (dest,) = config.queues["*"].destinations
    assert (dest.scheme, dest.path) == ("dir", str(tmp_path / "lpd-relay-out"))


def test_embedded_default_in_an_awkward_directory(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    odd = tmp_path / "print jobs #1 100%?"
    odd.mkdir()
    monkeypatch.chdir(odd)
    (dest,) = embedded_default(port=0).queues["*"].destinations
    assert dest.path == str(odd / "lpd-relay-out")


def test_choose_default_port_falls_back_when_515_is_taken() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            holder.bind(("0.0.0.0", 515))
            holder.listen(1)
        except OSError:
            pass  # no privilege or already in use: either way 515 is not ours to take
        assert choose_default_port() == 5515
    finally:
        holder.close()


def test_choose_default_port_answers_one_of_two() -> None:
    assert choose_default_port() in (515, 5515)


# ---- hostile or random input never escapes as anything but InvalidConfig ----

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                     st.sampled_from(["0.0.0.0:0", "30s", "4GiB", "any", "exact", "socket://h",
                                      "dir:///x", "10.0.0.0/8", "721-731", "always"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["listen", "destinations", "aliases", "range", "x", "*",
                                     "retry", "initial"]), inner, max_size=3)), max_leaves=8)
_SECTION_NAMES = st.sampled_from(["server", "metrics", "log", "origin_ports", "retry", "queues",
                                  "bogus"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_SECTION_NAMES, _VALUES, max_size=4))
def test_random_documents_give_a_config_or_invalid_config(data: dict[str, object]) -> None:
    try:
        config = config_from_dict(data, "<fuzz>", base_dir="/srv")
    except InvalidConfig as exc:
        assert (exc.problems and all(p and m for p, m in exc.problems)) or exc.problems
        assert str(exc).count("\n") == len(exc.problems) - 1
    else:
        assert isinstance(config, Config)


def test_huge_values_are_quoted_briefly(tmp_path: Path) -> None:
    problems = _problems(tmp_path, f"[server]\nmax_connections = [{', '.join(['1'] * 5000)}]\n")
    assert problems[0][0] == "server.max_connections"
    assert len(problems[0][1]) < 200


# ---- every value is range-checked; the file's own errors name their place ----

@pytest.mark.parametrize(("toml", "path", "fragment"), [
    ('[server]\nlisten = ["999.1.1.1:30090"]', "server.listen[0]", "not an IPv4 address"),
    ('[server]\nlisten = ["127.0.0.1:0", "no-such-host.invalid:515"]', "server.listen[1]",
     "nor a name that resolves"),
    ('[metrics]\nlisten = "256.0.0.1:9515"', "metrics.listen", "not an IPv4 address"),
    ("[server]\nmax_connections = 99999999999999999999", "server.max_connections",
     "expected 1 to 1000000, got 99999999999999999999"),
    ("[server]\nmax_connections = 1000001", "server.max_connections", "1 to 1000000"),
    ("[server]\nmax_connections_per_host = 10000000", "server.max_connections_per_host",
     "1 to 1000000"),
    ('[server]\nidle_timeout = "2d"', "server.idle_timeout", "1ms to 1d"),
    ('[server]\nidle_timeout = "' + "9" * 100 + 's"', "server.idle_timeout", "too large"),
    ('[server]\nmax_job_size = "17TiB"', "server.max_job_size", "1B to 16TiB"),
    ("[server]\nmax_job_size = 99999999999999999999", "server.max_job_size", "1B to 16TiB"),
    ('[server]\nmax_job_size = "' + "9" * 100 + '"', "server.max_job_size", "too large"),
    ('[server]\nmax_control_size = "1GiB"', "server.max_control_size", "1B to 16MiB"),
    ('[server]\nmin_free_disk = "2048TiB"', "server.min_free_disk", "at most 1PiB"),
    ('[server]\ngraceful_timeout = "2h"', "server.graceful_timeout", "0s to 1h"),
    ('[origin_ports]\nlinger = "2h"', "origin_ports.linger", "0s to 1h"),
    ('[retry]\ninitial = "2d"', "retry.initial", "1ms to 1d"),
    ('[retry]\nmax = "8d"', "retry.max", "1ms to 7d"),
    ('[retry]\ngive_up_after = "400d"', "retry.give_up_after", "0s to 365d"),
    ('[retry]\ngive_up_after = "3660d"', "retry.give_up_after", "at most 10 years"),
])
def test_out_of_range_values(tmp_path: Path, toml: str, path: str, fragment: str) -> None:
    problems = _problems(tmp_path, toml + "\n" + QUEUE)
    assert [p for p, _ in problems] == [path]
    assert fragment in problems[0][1], problems


@pytest.mark.parametrize(("key", "path", "fragment"), [
    ("concurrency = 10001", "queues.a.concurrency", "1 to 10000"),
    ("failover_after = 99999999999999999999", "queues.a.failover_after", "1 to 1000"),
    ('retry = { max = "30d" }', "queues.a.retry.max", "1ms to 7d"),
    ('destinations = ["lpd://h/q?batch=99999999999999999999"]', "queues.a.destinations[0]",
     "option batch: expected 1 to 1000"),
    ('destinations = ["socket://h?timeout=400d"]', "queues.a.destinations[0]",
     "option timeout: expected 1ms to 1d"),
])
def test_out_of_range_queue_values(tmp_path: Path, key: str, path: str, fragment: str) -> None:
    body = key if key.startswith("destinations") else f'destinations = ["socket://h"]\n{key}'
    problems = _problems(tmp_path, f"[queues.a]\n{body}\n")
    assert [p for p, _ in problems] == [path]
    assert fragment in problems[0][1], problems


def test_the_largest_values_in_range_are_accepted(tmp_path: Path) -> None:
    config = _load(tmp_path, '[server]\nmax_connections = 1000000\nmax_job_size = "16TiB"\n'
                             'idle_timeout = "24h"\n' + QUEUE)
    assert (config.server.max_connections, config.server.max_job_size) == (10**6, 2**44)


@pytest.mark.parametrize(("text", "fragment"), [
    ("a = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ("[server]\nmax_connections = " + "9" * 5000, "line 2, column 19 has more than 4300 digits"),
    ("[server]\nmax_connections = 1\nidle_timeout = 30s", "line 3"),
])
def test_toml_errors_name_the_file_and_place(tmp_path: Path, text: str, fragment: str) -> None:
    problems = _problems(tmp_path, text)
    assert len(problems) == 1 and problems[0][0] == str(tmp_path / "relay.toml")
    assert fragment in problems[0][1], problems
