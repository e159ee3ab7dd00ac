"""The spooler-command sink, with real scripts and (when installed) LPRng's lpr."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from relay import client
from relay.errors import SinkRejected, SinkUnavailable, SpoolFileMissing
from relay.sinks import Sink, SinkContext, destination_problem, make_sink
from relay.sinks.cmd import DEFAULT_RUN_TIMEOUT, CmdSink
from relay.uri import parse_destination
from tests.daemon import DaemonThread, relay_config
from tests.peers import (
    RecordingLpdServer,
    namespace_argv,
    require_binary,
    require_namespaces,
    write_private_etc,
)
from tests.sinkjobs import Job, job_bytes, make_job

# Records stdin, the LPD_* environment and its arguments into the folder $1.
RECORD = """#!/bin/sh
out="$1"; shift
cat > "$out/stdin"
env | grep '^LPD_' | sort > "$out/env"
for arg in "$@"; do printf '%s\\n' "$arg"; done > "$out/argv"
"""


def script(tmp_path: Path, name: str, body: str, *, executable: bool = True) -> Path:
    path = tmp_path / name
    path.write_text(body if body.startswith("#!") else "#!/bin/sh\n" + body)
    path.chmod(0o755 if executable else 0o644)
    return path


def command_sink(*argv: str | Path, run_timeout: float = DEFAULT_RUN_TIMEOUT) -> Sink:
    destination = parse_destination("cmd:" + shlex.join(map(str, argv)))
    if run_timeout == DEFAULT_RUN_TIMEOUT:
        return make_sink(destination, SinkContext())
    return CmdSink(destination, SinkContext(), run_timeout=run_timeout)


def deliver(sink: Sink, job: Job, limit: float = 20.0) -> None:
    async def main() -> None:
        with trio.fail_after(limit):
            await sink.deliver(job)
    trio.run(main)


def recorded_env(out: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (out / "env").read_text().splitlines())


def is_gone(pid: int, wait: float = 5.0) -> bool:
    """True once ``pid`` has exited (a zombie counts: it runs no more)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def kill_quietly(*pids: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_describe_shows_the_command() -> None:
    sink = command_sink("lp", "-d", "ward 3", "-o", "raw")
    assert sink.describe() == "command lp -d 'ward 3' -o raw (job on stdin)"


def test_one_file_on_stdin_facts_in_env_arguments_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    job = make_job(tmp_path, [bytes(range(256)) * 40], formats="o", title="Befund $HOME `id`")
    deliver(command_sink(script(tmp_path, "record", RECORD), out, "a b", "$HOME", "*", ";"), job)

    assert (out / "stdin").read_bytes() == job_bytes(job)
    # No shell ran: quoting only grouped the words; nothing was expanded.
    assert (out / "argv").read_text().splitlines() == ["a b", "$HOME", "*", ";"]
    env = recorded_env(out)
    assert env["LPD_JOB_ID"] == job.id
    assert (env["LPD_QUEUE"], env["LPD_USER"], env["LPD_HOST"]) == ("ward3", "alice", "ward3-pc")
    assert env["LPD_TITLE"] == "Befund $HOME `id`"
    assert env["LPD_FORMAT"] == "o"
    assert (env["LPD_FILES"], env["LPD_BYTES"]) == ("1", str(256 * 40))


def test_several_files_are_concatenated_through_a_pipe(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    job = make_job(tmp_path, [b"\x1b%-12345X", 5 * 1024 * 1024 + 3, b"", b"\x0c"],
                   formats="lfll")
    deliver(command_sink(script(tmp_path, "record", RECORD), out), job)
    assert (out / "stdin").read_bytes() == job_bytes(job)
    assert recorded_env(out)["LPD_FORMAT"] == "l"


def test_job_without_data_gets_empty_stdin(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    deliver(command_sink(script(tmp_path, "record", RECORD), out), make_job(tmp_path, []))
    assert (out / "stdin").read_bytes() == b""
    assert recorded_env(out)["LPD_FORMAT"] == ""


def test_program_that_ignores_stdin_still_decides_by_exit_code(tmp_path: Path) -> None:
    quiet = script(tmp_path, "quiet", "exit 0\n")
    deliver(command_sink(quiet), make_job(tmp_path, [8 * 1024 * 1024, 8 * 1024 * 1024]))


def test_exit_75_means_retry(tmp_path: Path) -> None:
    busy = script(tmp_path, "busy", "cat >/dev/null; echo 'printer paused' >&2; exit 75\n")
    with pytest.raises(SinkUnavailable, match=r"exited 75 \(temporary failure\): printer paused"):
        deliver(command_sink(busy), make_job(tmp_path, [b"x"]))


def test_other_exit_holds_the_job_with_the_stderr_tail(tmp_path: Path) -> None:
    # 10 KiB of noise, a byte that is not UTF-8, then the line that matters.
    failing = script(tmp_path, "failing", (
        "cat >/dev/null\n"
        "i=0; while [ $i -lt 160 ]; do echo 'noise noise noise noise noise noise noise' >&2; "
        "i=$((i+1)); done\n"
        "printf 'bad byte \\377\\n' >&2\n"
        "echo 'lp: error - unknown destination \"ward3\"' >&2\n"
        "exit 3\n"))
    with pytest.raises(SinkRejected) as caught:
        deliver(command_sink(failing), make_job(tmp_path, [b"x"]))
    message = str(caught.value)
    assert message.startswith(f"cmd: {tmp_path}/failing exited 3: ")
    assert message.endswith('lp: error - unknown destination "ward3"')
    assert "bad byte \ufffd" in message
    assert len(message) < 2048 + 200


def test_missing_program_means_retry(tmp_path: Path) -> None:
    # The admin may install it: retried (and failed over), never held.
    with pytest.raises(SinkUnavailable, match="program 'no-such-lp' not found on PATH") as caught:
        deliver(command_sink("no-such-lp", "-d", "x"), make_job(tmp_path, [b"x"]))
    assert caught.value.reason == "unavailable"
    with pytest.raises(SinkUnavailable, match=f"program '{tmp_path}/nope' not found$"):
        deliver(command_sink(tmp_path / "nope"), make_job(tmp_path, [b"x"]))


def test_program_that_is_not_executable_means_retry(tmp_path: Path) -> None:
    plain = script(tmp_path, "plain", "exit 0\n", executable=False)
    with pytest.raises(SinkUnavailable, match="is not executable"):
        deliver(command_sink(plain), make_job(tmp_path, [b"x", b"y"]))


def test_program_problem_is_known_before_any_attempt(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    script(tmp_path, "lp", "exit 0\n")
    plain = script(tmp_path, "plain", "exit 0\n", executable=False)
    problems = {argv: destination_problem(parse_destination(f"cmd:{argv} -d x"))
                for argv in ("lp", "no-such-lp", str(plain), str(tmp_path / "nope"), "plain")}
    assert problems == {
        "lp": None,
        "no-such-lp": 'program "no-such-lp" not found on PATH',
        str(plain): f'program "{plain}" is not executable',
        str(tmp_path / "nope"): f'program "{tmp_path}/nope" not found',
        "plain": 'program "plain" not found on PATH',     # which() wants it executable
    }


def test_missing_spool_file_is_spool_file_missing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    job = make_job(tmp_path, [b"x", b"y"])
    os.unlink(job.files[1].path)
    with pytest.raises(SpoolFileMissing) as caught:
        deliver(command_sink(script(tmp_path, "record", RECORD), out), job)
    assert caught.value.path == job.files[1].path
    assert not (out / "stdin").exists()     # the program never ran


def test_killed_by_a_signal_means_retry(tmp_path: Path) -> None:
    crash = script(tmp_path, "crash", "kill -TERM $$\n")
    with pytest.raises(SinkUnavailable, match="was killed by SIGTERM"):
        deliver(command_sink(crash), make_job(tmp_path, [b"x"]))


def test_run_over_the_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    hang = script(tmp_path, "hang", f"sleep 300 & echo $$ $! > {pids}\nwait\n")
    started = time.monotonic()
    try:
        with pytest.raises(SinkUnavailable, match=r"ran longer than 0\.5s and was killed") as e:
            deliver(command_sink(hang, run_timeout=0.5), make_job(tmp_path, [b"x", b"y"]))
        assert e.value.reason == "timeout"
        assert time.monotonic() - started < 5
        shell, sleeper = map(int, pids.read_text().split())
        assert is_gone(shell) and is_gone(sleeper)
    finally:
        if pids.exists():
            kill_quietly(*map(int, pids.read_text().split()))


def test_cancelled_delivery_leaves_nothing_running(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    hang = script(tmp_path, "hang", f"sleep 300 & echo $$ $! > {pids}\nwait\n")
    sink = command_sink(hang)
    job = make_job(tmp_path, [b"x"])

    async def main() -> None:
        with trio.move_on_after(0.5):
            await sink.deliver(job)

    try:
        trio.run(main)
        shell, sleeper = map(int, pids.read_text().split())
        assert is_gone(shell) and is_gone(sleeper)
    finally:
        if pids.exists():
            kill_quietly(*map(int, pids.read_text().split()))


def test_background_child_holding_stderr_does_not_block_delivery(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    forker = script(tmp_path, "forker", f"cat >/dev/null\nsleep 300 & echo $! > {pidfile}\n")
    started = time.monotonic()
    try:
        deliver(command_sink(forker), make_job(tmp_path, [b"x"]))
        assert time.monotonic() - started < 5
    finally:
        if pidfile.exists():
            kill_quietly(int(pidfile.read_text()))


@pytest.mark.peers
@pytest.mark.root
def test_lprng_lpr_as_the_spooler_command(tmp_path: Path) -> None:
    # A real spooler client behind cmd:, sending to a recording LPD receiver.
    lpr = require_binary("lpr")
    require_namespaces()
    conf = tmp_path / "lprng"
    conf.mkdir()
    (conf / "printcap").write_text("")
    (conf / "lpd.conf").write_text(
        "printcap_path=/etc/lprng/printcap\nlpr_send_try=1\noriginate_port=\n")
    binds: dict[str, Path | str] = {"/etc/lprng": conf, **write_private_etc(tmp_path / "etc")}
    job = make_job(tmp_path, [b"%!PS\n", 200_000, b"showpage\n"])
    with RecordingLpdServer() as receiver:
        # The private /etc for lpr needs a mount namespace: a wrapper script sets
        # it up, so the destination itself stays a plain "cmd:PROGRAM ARG...".
        wrapper = script(tmp_path, "lpr-ns", f"exec {shlex.join(namespace_argv([lpr], binds))}"
                                             ' "$@"\n')
        deliver(command_sink(wrapper, "-P", f"ward3@127.0.0.1%{receiver.port}"), job, limit=30)
        [received] = receiver.wait_jobs(1)
    assert received.queue == "ward3"
    assert received.data == job_bytes(job)


def test_check_config_warns_about_a_program_not_on_path(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    # max_connections well inside any fd limit: only the program warning is expected.
    config.write_text(f'[server]\nspool_dir = "{tmp_path / "spool"}"\nmax_connections = 100\n'
                      f'[queues.ward3]\ndestinations = ["dir://{tmp_path / "out"}", '
                      '"cmd:no-such-lp -d ward3"]\n'
                      '[queues.lab]\ndestinations = ["cmd:sh -c true"]\n')
    result = subprocess.run([sys.executable, "-m", "relay", "check-config", "-c", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        'warning: queues.ward3.destinations[1]: program "no-such-lp" not found on PATH']
    assert result.stdout.startswith(f"{config}: ok")


def test_daemon_shows_a_missing_program_down_and_fails_over(tmp_path: Path) -> None:
    out = tmp_path / "out"
    missing = "cmd:no-such-lp-for-tests -d ward3"
    config = relay_config(tmp_path, queues={"ward3": {
        "destinations": [missing, f"dir://{out}"], "failover_after": 1,
        "retry": {"initial": "100ms", "max": "200ms"}}})

    async def lpq(port: int) -> str:
        ch = await client.open_channel("127.0.0.1", port, io_timeout=5)
        try:
            return await client.query(ch, "ward3", long=False)
        finally:
            await ch.aclose()

    async def send(port: int) -> None:
        page = client.OutFile(name="page.txt", size=5, data=b"page\n")
        cf_name, control, files = client.build_job([page], user="alice", title="t",
                                                   host="client", number=1)
        ch = await client.open_channel("127.0.0.1", port, io_timeout=5)
        try:
            await client.send_job(ch, queue="ward3", cf_name=cf_name, control=control,
                                  files=files)
        finally:
            await ch.aclose()

    with DaemonThread(config) as relay:
        assert relay.bound is not None
        assert ('warning: queues.ward3.destinations[0]: program "no-such-lp-for-tests" '
                "not found on PATH") in relay.bound.banner
        before = trio.run(lpq, relay.port)
        assert relay.metric("lpdrelay_destination_up", destination=missing) == 0
        assert relay.metric("lpdrelay_destination_up", destination=f"dir://{out}") == 1
        trio.run(send, relay.port)
        deadline = time.monotonic() + 10
        while not list((out / "ward3").glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        # The job's files are in the hot folder before its delivery is recorded
        # (the sink's sync, then the scheduler): lpq says "up" once it is.
        after = trio.run(lpq, relay.port)
        while "up (active)" not in after and time.monotonic() < deadline:
            time.sleep(0.05)
            after = trio.run(lpq, relay.port)
    assert (f'destination {missing} DOWN (active): program "no-such-lp-for-tests" '
            "not found on PATH") in before
    assert f"destination dir://{out} not tried yet" in before
    assert len(list((out / "ward3").glob("*.json"))) == 1
    assert f"destination {missing} DOWN: cmd: program 'no-such-lp-for-tests'" in after
    assert f"destination dir://{out} up (active)" in after
