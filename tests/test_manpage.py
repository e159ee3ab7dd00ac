"""Man pages, --help texts and shell completion, all generated from the code
(relay/manpage.py, relay/cli.py): complete, rendered by the real groff/man, and
completion loaded by a real bash."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay import configschema, configsections, manpage, uri
from relay.cli import build_parser, subcommands, walk_actions

# Pointers an admin with only the installed program cannot follow.
PRIVATE_DOCS = re.compile(r"SPEC|§|FIELD-NOTES|STYLE\.md")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_every_option_has_a_help_line_without_private_references() -> None:
    parser = build_parser()
    actions = walk_actions(parser)
    assert len(actions) > 30   # the walk really reaches every subcommand
    for action in actions:
        if isinstance(action, argparse._HelpAction):
            continue
        where = action.option_strings or [action.dest]
        assert action.help and action.help.strip(), f"{where} has no help line"
        assert not PRIVATE_DOCS.search(action.help), f"{where}: {action.help}"
    for name, sub in subcommands(parser).items():
        assert sub.description and not PRIVATE_DOCS.search(sub.description), name


def test_help_output_of_every_command_is_clean() -> None:
    for name in subcommands(build_parser()):
        result = cli(name, "--help")
        assert result.returncode == 0, name
        assert not PRIVATE_DOCS.search(result.stdout), f"{name}: {result.stdout}"


def test_command_page_lists_every_subcommand_and_option() -> None:
    page = manpage.command_page()
    parser = build_parser()
    for name, sub in subcommands(parser).items():
        assert f".SS {manpage.roff(name)}\n" in page, name
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert manpage._bold(option) in page, f"{name} {option}"
            if not action.option_strings and action.help:
                assert manpage.roff(action.help) in page, f"{name} {action.dest}"
    assert manpage._bold("--version") in page


def test_config_page_lists_every_key_with_its_default() -> None:
    page = manpage.config_page()
    for section, schema in manpage.sections().items():
        block = page.split(f".SH [{manpage.roff(section)}]\n", 1)
        assert len(block) == 2, section
        body = block[1].split("\n.SH ", 1)[0]
        for key, (_, default) in schema.items():
            entry = body.split(manpage._bold(key), 1)
            assert len(entry) == 2, f"{section}.{key}"
            assert f"Default: {manpage._bold(manpage.toml_value(default))}." in entry[1], key
    for option in uri._OPTIONS:
        assert manpage._bold(option) in page, option
    # Every section of the loader is covered, queues through their own table.
    assert set(configsections.SECTIONS) - {"queues"} <= set(manpage.sections())


def test_config_page_follows_the_key_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Generated, not copied: a key added to a table appears with its default and type."""
    server = {**configsections.SERVER, "brand_new_key": (configschema.to_duration, "42s")}
    monkeypatch.setattr(configsections, "SECTIONS", {**configsections.SECTIONS, "server": server})
    page = manpage.config_page()
    assert manpage._bold("brand_new_key") + " (duration)" in page
    assert "Default: " + manpage._bold('"42s"') in page


def test_config_page_takes_meanings_from_the_docs() -> None:
    page = manpage.config_page()
    assert "Where accepted jobs are stored until delivered" in page
    no_docs = manpage.config_page(docs_text="")
    assert "Where accepted jobs are stored" not in no_docs
    assert manpage._bold("spool_dir") + " (path)" in no_docs


def render(path: Path, width: int) -> subprocess.CompletedProcess[str]:
    man = shutil.which("man")
    if man is None:
        pytest.skip("man not installed (Debian package man-db)")
    env = {**os.environ, "MANWIDTH": str(width), "LC_ALL": "C.UTF-8", "MAN_KEEP_STDERR": "1"}
    return subprocess.run([man, "--warnings", "-l", str(path)], capture_output=True, text=True,
                          timeout=60, env=env, check=False)


def test_pages_render_without_warnings(tmp_path: Path) -> None:
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff not installed (Debian package groff-base)")
    assert manpage.main([str(tmp_path)]) == 0
    pages = [tmp_path / "lpd-relay.8", tmp_path / "lpd-relay.toml.5"]
    for page in pages:
        assert page.read_text().isascii()
        result = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(page)],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0 and not result.stderr, result.stderr
        for width in (60, 80, 132):
            shown = render(page, width)
            assert shown.returncode == 0 and not shown.stderr.strip(), shown.stderr
    assert "lpd-relay import-printcap" in render(pages[0], 80).stdout
    assert "max_connections" in render(pages[1], 80).stdout


def test_groff_warns_on_a_broken_page(tmp_path: Path) -> None:
    """The check above can fail: an undefined macro is reported."""
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff not installed (Debian package groff-base)")
    page = tmp_path / "bad.8"
    page.write_text(manpage.command_page() + ".BOGUS\n")
    result = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(page)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.stderr


def test_bash_completion_loads_and_completes(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not installed")
    result = cli("completion", "bash")
    assert result.returncode == 0, result.stderr
    script = tmp_path / "lpd-relay.bash"
    script.write_text(result.stdout)
    shown = subprocess.run([bash, "--norc", "-c", f"source {script} && complete -p lpd-relay"],
                           capture_output=True, text=True, timeout=30, check=False)
    assert shown.returncode == 0, shown.stderr
    match = re.search(r"-F (\S+) lpd-relay$", shown.stdout.strip())
    assert match, shown.stdout
    func = match.group(1)

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        program = (f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
                   f"COMP_LINE='{line}'; COMP_POINT={len(line)}; {func}; "
                   'printf "%s\\n" "${COMPREPLY[@]}"')
        out = subprocess.run([bash, "--norc", "-c", program], capture_output=True, text=True,
                             timeout=30, check=False)
        return out.stdout.split()

    assert {"serve", "send"} <= set(complete("lpd-relay", "se"))
    assert "import-printcap" in complete("lpd-relay", "im")
    assert "--concurrency" in complete("lpd-relay", "loadgen", "--con")
    assert {"list", "purge"} <= set(complete("lpd-relay", "spool", ""))


def test_zsh_completion_is_generated() -> None:
    result = cli("completion", "zsh")
    assert result.returncode == 0
    assert result.stdout.startswith("#compdef lpd-relay")
    for name in subcommands(build_parser()):
        assert name in result.stdout
    zsh = shutil.which("zsh")
    if zsh is not None:
        checked = subprocess.run([zsh, "-n"], input=result.stdout, capture_output=True,
                                 text=True, timeout=30, check=False)
        assert checked.returncode == 0, checked.stderr
