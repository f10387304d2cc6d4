"""The command line without an engine: ``--config`` before or after the command, read commands on a fresh data
dir, and where ``sandtrap seccomp`` finds and installs sandtrap's profile (issue 14, item 6)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner, Result

from sandtrap import __version__
from sandtrap import events as ev
from sandtrap.cli import app
from sandtrap.cli_config import ENV
from sandtrap.outputs.database import DatabaseSink
from sandtrap.sandbox.docker import seccomp
from sandtrap.storage.migrate import upgrade

SESSION = "0123456789ab"
# A profile of the shape Docker's default.json has, cut down (tests/unit/sandbox/test_seccomp.py has a fuller one).
ENGINE_DEFAULT = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "syscalls": [{"names": ["read", "io_uring_setup", "write"], "action": "SCMP_ACT_ALLOW"}],
}


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def said(result: Result) -> str:
    """stdout and stderr, whitespace folded (rich may wrap a table or a long line)."""
    return " ".join(result.output.split())


def config(tmp_path: Path, name: str = "sandtrap.yaml", **sections: object) -> Path:
    """A config whose data dir is ``<tmp_path>/<stem>-data`` (not created), plus ``sections``."""
    path = tmp_path / name
    data = {"storage": {"data_dir": str(tmp_path / f"{path.stem}-data")}, **sections}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def data_dir_of(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return str(yaml.safe_load(result.stdout)["storage"]["data_dir"])


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where sandtrap's profile is installed for every data dir, in this test (nothing there yet)."""
    path = tmp_path / "prefix" / "share" / "sandtrap" / "seccomp" / "sandtrap.json"
    monkeypatch.setattr(seccomp, "installed_path", lambda: path)
    return path


# -- --config before or after the command -------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["-c", "{F}", "config", "show"],
        ["--config", "{F}", "config", "show"],
        ["config", "show", "-c", "{F}"],
        ["config", "show", "--config", "{F}"],
        ["config", "show", "--config={F}"],
    ],
)
def test_config_is_read_before_or_after_the_command(tmp_path: Path, argv: list[str]) -> None:
    f = config(tmp_path)
    result = invoke(*(a.replace("{F}", str(f)) for a in argv))
    assert data_dir_of(result) == str(tmp_path / "sandtrap-data")
    assert "warning" not in result.stderr


def test_the_value_nearest_the_command_wins_and_a_disagreement_is_said(tmp_path: Path) -> None:
    before, after = config(tmp_path, "before.yaml"), config(tmp_path, "after.yaml")
    result = invoke("-c", str(before), "config", "show", "-c", str(after))
    assert data_dir_of(result) == str(tmp_path / "after-data")
    warning = " ".join(result.stderr.split())
    assert f"--config given more than once: using {after}" in warning and str(before) in warning
    # The same file twice (as another spelling of its path) agrees: nothing to say.
    same = invoke("-c", str(after), "config", "show", "-c", str(tmp_path / "." / "after.yaml"))
    assert data_dir_of(same) == str(tmp_path / "after-data") and same.stderr == ""


def test_sandtrap_config_is_the_default_and_an_option_wins_over_it(tmp_path: Path) -> None:
    from_env, given = config(tmp_path, "env.yaml"), config(tmp_path, "given.yaml")
    assert data_dir_of(invoke("config", "show", env={ENV: str(from_env)})) == str(tmp_path / "env-data")
    for argv in (["config", "show", "-c", str(given)], ["-c", str(given), "config", "show"]):
        assert data_dir_of(invoke(*argv, env={ENV: str(from_env)})) == str(tmp_path / "given-data")


def commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command below ``group`` (typer's click commands), as its words and itself."""
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


ROOT = typer.main.get_command(app)
NO_CONFIG = {("seccomp", "build")}  # installs the profile for every data dir: reads no config
READING = [path for path, _ in commands(ROOT) if path not in NO_CONFIG]
ARGS: dict[tuple[str, ...], list[str]] = {
    ("sessions", "show"): [SESSION],
    ("sessions", "replay"): [SESSION],
    ("sessions", "export"): [SESSION],
}


def test_every_command_but_seccomp_build_takes_the_option() -> None:
    found = {path: {opt for p in cmd.params for opt in p.opts} for path, cmd in commands(ROOT)}
    assert {"run", "doctor", "stats", "api", "loadavgfs"} <= {p[-1] for p in READING}
    assert {("sessions", "list"), ("config", "show"), ("seccomp", "check")} <= set(READING)
    for path in READING:
        assert {"--config", "-c"} <= found[path], path
    assert "--config" not in found[("seccomp", "build")]


@pytest.mark.parametrize("path", READING, ids=" ".join)
@pytest.mark.parametrize("where", ["before", "after"])
def test_every_command_reads_the_config_given_before_or_after_it(
    tmp_path: Path, path: tuple[str, ...], where: str
) -> None:
    """A config with a typo: each command stops on it (exit 2, the key named) before doing anything."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("sandbox:\n  pool_sz: 3\n", encoding="utf-8")
    argv = [*path, *ARGS.get(path, [])]
    result = invoke(*(["-c", str(bad), *argv] if where == "before" else [*argv, "-c", str(bad)]))
    assert result.exit_code == 2, result.output
    assert "sandbox.pool_sz: unknown key" in said(result)
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback


def test_the_sessions_group_takes_it_too(tmp_path: Path) -> None:
    group, command = config(tmp_path, "group.yaml"), config(tmp_path, "command.yaml")
    result = invoke("sessions", "-c", str(group), "list")
    assert result.exit_code == 0 and str(tmp_path / "group-data") in said(result)
    result = invoke("sessions", "-c", str(group), "list", "-c", str(command))
    assert result.exit_code == 0 and str(tmp_path / "command-data") in said(result)
    assert "--config given more than once" in result.stderr


def test_version_alone_prints_the_version() -> None:
    result = invoke("--version")
    assert (result.exit_code, result.stdout.strip()) == (0, __version__)


# -- read commands on a fresh data dir ----------------------------------------------------------------------
def test_sessions_list_on_a_fresh_data_dir_says_there_are_none(tmp_path: Path) -> None:
    f = config(tmp_path)
    result = invoke("sessions", "list", "-c", str(f))
    assert result.exit_code == 0, result.output
    assert f"no sessions: nothing recorded yet in sqlite:///{tmp_path / 'sandtrap-data' / 'sandtrap.db'}" in said(
        result
    )
    assert "Error" not in result.output and result.exception is None
    as_json = invoke("sessions", "list", "--json", "-c", str(f))
    assert (as_json.exit_code, as_json.stdout) == (0, "")  # no JSON lines; the note goes to stderr
    assert "no sessions" in as_json.stderr
    assert not (tmp_path / "sandtrap-data").exists()  # a read creates nothing


def test_an_empty_database_lists_no_sessions(tmp_path: Path) -> None:
    f = config(tmp_path)
    upgrade(f"sqlite:///{tmp_path / 'sandtrap-data' / 'sandtrap.db'}")
    result = invoke("sessions", "list", "-c", str(f))
    assert result.exit_code == 0 and "sessions (0)" in said(result)
    assert invoke("sessions", "list", "--json", "-c", str(f)).stdout == ""
    assert said(invoke("stats", "-c", str(f))).startswith("0 sessions, 0 login attempts")


def test_sessions_show_lists_the_bookkeeping_apart(tmp_path: Path) -> None:
    f = config(tmp_path)
    url = f"sqlite:///{tmp_path / 'sandtrap-data' / 'sandtrap.db'}"
    (tmp_path / "sandtrap-data").mkdir()
    upgrade(url)

    def c(eventid: str, **fields: Any) -> ev.Event:
        when = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
        return ev.Event(eventid=eventid, timestamp=when, session=SESSION, src_ip="203.0.113.7", sensor="s", **fields)

    changed = {"kind": "C", "shasum": "", "size": 1, "mode": "0644", "outfile": "", "stored": False}
    sink = DatabaseSink(url)
    try:
        sink.write(c(ev.SESSION_CONNECT))
        sink.write(c(ev.SESSION_FILE_CHANGED, filename="/tmp/b.sh", origin="attacker", **changed))
        sink.write(c(ev.SESSION_FILE_CHANGED, filename="/var/log/wtmp", origin="login", **changed))
        assert sink.flush(30), sink.status()
    finally:
        sink.close(5)
    out = said(invoke("sessions", "show", SESSION, "-c", str(f)))
    mine, _, rest = out.partition("login bookkeeping and the box's daemons (1)")
    assert "artifacts (1)" in mine and "/tmp/b.sh" in mine and "/var/log/wtmp" not in mine
    assert "/var/log/wtmp" in rest and "(C, login)" in rest


def test_sessions_list_and_stats_by_sensor(tmp_path: Path) -> None:
    f = config(tmp_path)
    url = f"sqlite:///{tmp_path / 'sandtrap-data' / 'sandtrap.db'}"
    (tmp_path / "sandtrap-data").mkdir()
    upgrade(url)
    when = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
    sink = DatabaseSink(url)
    try:
        for session, sensor in (("0000000000a1", "eu-1"), ("0000000000a2", "us-1"), ("0000000000a3", "us-1")):
            sink.write(ev.Event(eventid=ev.SESSION_CONNECT, timestamp=when, session=session, sensor=sensor))
        assert sink.flush(30), sink.status()
    finally:
        sink.close(5)
    wide = {"COLUMNS": "200"}
    everyone = said(invoke("sessions", "list", "-c", str(f), env=wide))
    assert "sessions (3)" in everyone and "sensor" in everyone and "eu-1" in everyone
    us = said(invoke("sessions", "list", "--sensor", "us-1", "-c", str(f), env=wide))
    assert "sessions (2)" in us and "eu-1" not in us and "sensor" not in us  # one sensor's rows: no column
    rows = invoke("sessions", "list", "--sensor", "us-1", "--json", "-c", str(f)).stdout.splitlines()
    assert sorted(json.loads(r)["id"] for r in rows) == ["0000000000a2", "0000000000a3"]
    assert said(invoke("stats", "--sensor", "eu-1", "-c", str(f))).startswith("1 sessions,")


@pytest.mark.parametrize("command", ["show", "replay", "export"])
def test_one_session_on_a_fresh_data_dir_is_not_found_without_a_traceback(tmp_path: Path, command: str) -> None:
    result = invoke("sessions", command, SESSION, "-c", str(config(tmp_path)))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"error: no session {SESSION}: nothing recorded yet in sqlite:///" in said(result)
    assert not (tmp_path / "sandtrap-data").exists()


def test_stats_and_config_on_a_fresh_data_dir(tmp_path: Path) -> None:
    f = config(tmp_path)
    stats = invoke("stats", "-c", str(f))
    assert stats.exit_code == 0 and said(stats).startswith("0 sessions: nothing recorded yet in sqlite:///")
    shown = invoke("config", "show", "--json", "-c", str(f))
    assert shown.exit_code == 0 and json.loads(shown.stdout)["storage"]["data_dir"] == str(tmp_path / "sandtrap-data")


# -- sandtrap's seccomp profile, for any data dir ---------------------------------------------------------------
def test_seccomp_build_installs_the_profile_for_every_data_dir(tmp_path: Path, installed: Path) -> None:
    source = tmp_path / "default.json"
    source.write_text(json.dumps(ENGINE_DEFAULT), encoding="utf-8")
    built = invoke("seccomp", "build", "--from", str(source))
    assert built.exit_code == 0, built.output
    assert f"seccomp profile {installed} written" in said(built)
    assert seccomp.allowed_io_uring(json.loads(installed.read_text(encoding="utf-8"))) == []
    assert "up to date" in said(invoke("seccomp", "build", "--from", str(source)))
    # Any config, its data dir new and empty, finds it; the data dir is left as it was.
    for name in ("one.yaml", "two.yaml"):
        checked = invoke("seccomp", "check", "-c", str(config(tmp_path, name)))
        assert checked.exit_code == 0, checked.output
        assert f"sandbox.docker.seccomp_profile: sandtrap ({installed}) usable" in said(checked)
    assert not (tmp_path / "one-data").exists()
    # `make setup` installs a profile an earlier set-up left in a data dir by building from it (same text).
    again = tmp_path / "again.json"
    again.write_text(installed.read_text(encoding="utf-8"), encoding="utf-8")
    assert "up to date" in said(invoke("seccomp", "build", "--from", str(again)))


def test_seccomp_check_without_a_profile_names_the_key_both_places_and_the_fix(tmp_path: Path, installed: Path) -> None:
    f = config(tmp_path)
    result = invoke("seccomp", "check", "-c", str(f))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    message = said(result)
    assert message.startswith("error: sandbox.docker.seccomp_profile: sandtrap's profile is missing")
    assert str(seccomp.profile_path(tmp_path / "sandtrap-data")) in message and str(installed) in message
    assert "make setup" in message and "sandtrap seccomp build --from" in message and "'default'" in message


def test_a_data_dirs_own_profile_is_used_first_and_check_installed_ignores_it(tmp_path: Path, installed: Path) -> None:
    f = config(tmp_path)
    own = seccomp.profile_path(tmp_path / "sandtrap-data")
    own.parent.mkdir(parents=True)
    own.write_text(seccomp.render(seccomp.derive(ENGINE_DEFAULT)), encoding="utf-8")
    assert f"({own}) usable" in said(invoke("seccomp", "check", "-c", str(f)))
    result = invoke("seccomp", "check", "--installed", "-c", str(f))
    assert result.exit_code == 1 and f"not at {installed}" in said(result)


# -- config show on TOML (issue 17) -----------------------------------------------------------------------------
def test_config_show_reads_toml_and_its_output_loads_again(tmp_path: Path) -> None:
    f = tmp_path / "sandtrap.toml"
    f.write_text(
        '[storage]\ndata_dir = "/tmp/x"\n[[service]]\nname = "ssh"\nprotocol = "ssh"\nport = 2200\n'
        '[[service]]\nname = "http"\nprotocol = "tcp"\nport = 8081\ntarget_port = 80\n'
    )
    result = invoke("config", "show", "-c", str(f))
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["ssh"]["listen"] == "0.0.0.0:2200"
    assert [s["name"] for s in shown["services"]] == ["ssh", "http"]
    again = tmp_path / "shown.yaml"
    again.write_text(result.stdout)
    assert invoke("config", "show", "-c", str(again)).stdout == result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[[service]]\nname = "web"\nprotocol = "tcp"\nport = 1\n')
    refused = invoke("config", "show", "-c", str(bad))
    assert refused.exit_code != 0 and "needs target_port" in said(refused)
