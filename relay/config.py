"""Configuration: one TOML file read into frozen records, validated before anything starts.

SPEC §3.  Each section is a table mapping key -> (converter, default), so the
loader is data, not a chain of ifs: unknown keys are found by set difference,
defaults go through the same converter as user values (a default can never be
of the wrong type), and a converter's ``ValueError`` becomes one
``(key path, expectation)`` problem.  Every problem in the file is collected
and raised together as ``InvalidConfig``, because an admin fixing a config
over SSH should not have to run ``check-config`` once per typo.

This module is the configuration's face: the entry points, and the records
the relay reads (defined in ``relay.configrecords``; import them from here).
The key tables and the checks of each section are ``relay.configsections``
(a new key: a line in its table, a field in its record); the converters and
the table walker are ``relay.configschema``, which knows no key.

Entry points: ``load_config`` (a file), ``config_from_toml`` (text),
``config_from_dict`` (already-parsed data) and ``embedded_default`` (SPEC
§3.1, used when ``serve`` gets no ``-c``).  ``docs/configuration.md`` lists
every key.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from urllib.parse import quote

from relay.configrecords import (
    AuditConfig,
    Config,
    Listen,
    LogConfig,
    MetricsConfig,
    OriginPortsConfig,
    PrivacyConfig,
    QueueConfig,
    RetentionConfig,
    RetryConfig,
    ServerConfig,
    TlsConfig,
)
from relay.configschema import CATCH_ALL, Network, key_path, section, unknown_key
from relay.configsections import (
    BOUNDS,
    SECTIONS,
    check_unique,
    read_audit,
    read_queues,
    read_tls,
)
from relay.errors import ConfigError
from relay.spoolpgconfig import check_spool

__all__ = [
    "CATCH_ALL", "AuditConfig", "Config", "InvalidConfig", "Listen", "LogConfig",
    "MetricsConfig", "Network", "OriginPortsConfig", "PrivacyConfig", "QueueConfig",
    "RetentionConfig", "RetryConfig", "ServerConfig", "TlsConfig",
    "choose_default_port", "config_from_dict", "config_from_toml", "embedded_default",
    "load_config",
]


class InvalidConfig(ConfigError):
    """Every problem found in one configuration; the message is one "path: problem" a line."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("", "\n".join(f"{path}: {msg}" if path else msg
                                       for path, msg in problems))
        self.path = problems[0][0] if problems else ""
        self.problems = problems


def config_from_dict(data: Mapping[str, object], source: str,
                     *, base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Validate parsed TOML data; raise ``InvalidConfig`` listing every problem.

    A relative ``spool_dir`` is taken relative to ``base_dir`` (the config
    file's folder for ``load_config``; the current directory when None).
    """
    problems: list[tuple[str, str]] = []
    problems.extend((key_path("", k), unknown_key(k, SECTIONS))
                    for k in data if k not in SECTIONS)
    sections = {name: section(data.get(name, {}), name, schema, problems,
                              bounds=BOUNDS.get(name))
                for name, schema in SECTIONS.items() if name != "queues"}
    queues, names = read_queues(data.get("queues", {}), sections, problems)
    check_unique(names, sections["server"].get("queue_names") != "exact", problems)
    base = Path(base_dir or Path.cwd())
    tls = read_tls(sections["tls"], bool(sections["server"].get("listen_tls")), base, problems)
    if sections["server"].get("proxy_protocol") and not sections["server"].get("proxy_trusted"):
        problems.append(("server.proxy_trusted", "missing; proxy_protocol needs the "
                                                 "balancers' networks"))
    spool = check_spool(sections["spool"], problems)
    if problems:
        raise InvalidConfig(problems)
    server = dict(sections["server"], tls=tls)
    server["spool_dir"] = base.joinpath(server["spool_dir"]).absolute()
    low, high = sections["origin_ports"].pop("range")
    raw_ports = data.get("origin_ports", {})
    range_text = str(raw_ports.get("range", "721-731")) if isinstance(raw_ports, dict) \
        else "721-731"
    return Config(
        server=ServerConfig(**server),
        metrics=MetricsConfig(**sections["metrics"]),
        log=LogConfig(**sections["log"]),
        origin_ports=OriginPortsConfig(low=low, high=high, range_text=range_text,
                                       **sections["origin_ports"]),
        retry=RetryConfig(**sections["retry"]),
        queues=MappingProxyType(queues),
        source=source,
        retention=RetentionConfig(**sections["retention"]),
        privacy=PrivacyConfig(**sections["privacy"]),
        audit=read_audit(sections["audit"], base, server["spool_dir"]) if "audit" in data else None,
        spool=spool,
    )


def config_from_toml(text: str, source: str = "<string>",
                     *, base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Parse and validate TOML text; a syntax error is an ``InvalidConfig`` with its line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidConfig([(source, f"TOML syntax error: {exc}")]) from None
    except RecursionError:
        # tomllib recurses per nesting level; a file nested this deep is no config.
        raise InvalidConfig([(source, "TOML error: arrays or tables nested too deeply")]
                            ) from None
    except ValueError:  # int()'s guard against integers of 4300+ digits
        raise InvalidConfig([(source, f"TOML error: {_long_number(text)} has more than "
                                      "4300 digits")]) from None
    return config_from_dict(data, source, base_dir=base_dir)


def _long_number(text: str) -> str:
    """Where the first over-long run of digits is, as "line L, column C"."""
    match = re.search(r"[0-9_]{4300,}", text)
    if match is None:
        return "a number"
    line = text.count("\n", 0, match.start()) + 1
    column = match.start() - (text.rfind("\n", 0, match.start()) + 1) + 1
    return f"number at line {line}, column {column}"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a configuration file; raise ``InvalidConfig`` on any problem."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidConfig([(source, f"cannot read the file: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise InvalidConfig([(source, f"not UTF-8 text: {exc}")]) from None
    return config_from_toml(text, source, base_dir=Path(source).absolute().parent)


def embedded_default(*, port: int) -> Config:
    """The configuration ``serve`` uses without ``-c`` (SPEC §3.1).

    Any queue name is accepted (catch-all "*") and delivered into the hot
    folder ./lpd-relay-out/<queue>/; the spool is ./lpd-relay-spool.  Both
    are resolved against the current directory now, so a later chdir cannot
    move them.  Logs are text: whoever runs it without a config is most
    likely reading a terminal, not feeding a log pipeline.
    """
    out_dir = quote(str(Path("lpd-relay-out").absolute()), safe="/")
    data: dict[str, object] = {
        "server": {"listen": [f"0.0.0.0:{port}"],
                   "spool_dir": str(Path("lpd-relay-spool").absolute())},
        "metrics": {"listen": "127.0.0.1:9515"},
        "log": {"format": "text", "level": "info"},
        "queues": {CATCH_ALL: {"destinations": [f"dir://{out_dir}"]}},
    }
    return config_from_dict(data, "<embedded default>")


def choose_default_port() -> int:
    """515 if this process may bind it now (root or CAP_NET_BIND_SERVICE, port free), else 5515."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # The server sets SO_REUSEADDR too, so old TIME_WAIT sockets on 515
        # must not make us fall back when the real bind would succeed.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", 515))
        except OSError:
            return 5515
    return 515
