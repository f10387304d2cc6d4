"""sandtrap's seccomp profile: derived from the engine's default one, io_uring refused (pure logic, a small fixture)."""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from sandtrap.config import Settings
from sandtrap.sandbox.docker import seccomp
from sandtrap.sandbox.docker.proxy_policy import Policy, check_create
from sandtrap.sandbox.docker.spec import LABEL_MANAGED, LABEL_SENSOR, create_config


def engine_default() -> dict[str, Any]:
    """The shape of Docker 20.10's default.json, cut down: io_uring sits in the big allow rule."""
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}],
        "syscalls": [
            {
                "names": ["read", "io_uring_enter", "write", "io_uring_register", "io_uring_setup", "openat"],
                "action": "SCMP_ACT_ALLOW",
                "args": [],
                "comment": "",
                "includes": {},
                "excludes": {},
            },
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}],
                "comment": "",
                "includes": {},
                "excludes": {},
            },
            {
                "names": ["clone3"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": 38,
                "args": [],
                "comment": "ENOSYS for clone3",
                "includes": {},
                "excludes": {"caps": ["CAP_SYS_ADMIN"]},
            },
        ],
    }


def test_derive_takes_io_uring_out_of_every_rule_and_answers_enosys() -> None:
    source = engine_default()
    before = copy.deepcopy(source)
    profile = seccomp.derive(source)

    assert source == before  # the input is not touched
    assert profile["syscalls"][0]["names"] == ["read", "write", "openat"]
    assert profile["syscalls"][1:3] == before["syscalls"][1:3]  # every other rule as it was, in order
    assert {k: v for k, v in profile.items() if k != "syscalls"} == {k: v for k, v in before.items() if k != "syscalls"}
    rule = profile["syscalls"][-1]
    assert rule["names"] == list(seccomp.IO_URING)
    assert (rule["action"], rule["errnoRet"]) == ("SCMP_ACT_ERRNO", 38)
    assert seccomp.allowed_io_uring(profile) == []
    assert seccomp.allowed_io_uring(seccomp.check_shape(before)) == list(seccomp.IO_URING)


def test_derive_drops_a_rule_left_without_names_and_handles_the_single_name_form() -> None:
    source = engine_default()
    source["syscalls"] += [
        {"names": ["io_uring_setup"], "action": "SCMP_ACT_ALLOW", "args": [], "includes": {}, "excludes": {}},
        {"name": "io_uring_enter", "action": "SCMP_ACT_LOG", "args": [], "includes": {}, "excludes": {}},
    ]
    profile = seccomp.derive(source)
    assert len(profile["syscalls"]) == 4  # the two io_uring-only rules gone, ours added
    assert all("io_uring" not in " ".join(seccomp._names(r)) for r in profile["syscalls"][:-1])


def test_derive_is_idempotent() -> None:
    once = seccomp.derive(engine_default())
    assert seccomp.derive(once) == once


def test_allowed_io_uring_judges_every_rule_and_the_default_action() -> None:
    profile = seccomp.derive(engine_default())
    profile["syscalls"].append({"names": ["io_uring_enter"], "action": "SCMP_ACT_TRACE"})
    assert seccomp.allowed_io_uring(profile) == ["io_uring_enter"]
    named_nowhere = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}
    assert seccomp.allowed_io_uring(named_nowhere) == []  # the default action refuses them


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ([], "JSON object"),
        ({"syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}, "defaultAction"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["x"], "action": "SCMP_ACT_ERRNO"}]}, "shields"),
        ({"defaultAction": "SCMP_ACT_LOG", "syscalls": [{"names": ["x"], "action": "SCMP_ACT_ERRNO"}]}, "shields"),
        ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}, "non-empty syscalls"),
        ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": {"read": 1}}, "non-empty syscalls"),
        ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"]}]}, r"syscalls\[0\] is not"),
        ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": "read", "action": "A"}]}, "list of syscall"),
        ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": [], "action": "A"}]}, "names no syscall"),
    ],
)
def test_a_profile_of_the_wrong_shape_is_refused(profile: Any, message: str) -> None:
    with pytest.raises(seccomp.ProfileError, match=message):
        seccomp.derive(profile)


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the set-up installs sandtrap's profile for every data dir, in this test (nothing there yet)."""
    path = tmp_path / "prefix" / "share" / "sandtrap" / "seccomp" / "sandtrap.json"
    monkeypatch.setattr(seccomp, "installed_path", lambda: path)
    return path


def test_build_writes_once_then_reports_up_to_date(tmp_path: Path) -> None:
    source = tmp_path / "default.json"
    source.write_text(json.dumps(engine_default()), encoding="utf-8")
    target = tmp_path / "share" / "seccomp" / "sandtrap.json"
    path, changed = seccomp.build(source, target)
    assert changed and path == target
    assert json.loads(path.read_text(encoding="utf-8")) == seccomp.derive(engine_default())
    assert path.stat().st_mode & 0o777 == 0o644
    assert seccomp.build(source, target) == (path, False)
    assert seccomp.build(path, target) == (path, False)  # a derived profile as the source: the same text
    assert [p.name for p in path.parent.iterdir()] == ["sandtrap.json"]  # no temporary file left


def test_the_installed_profile_sits_under_the_installations_prefix() -> None:
    assert seccomp.installed_path() == Path(sys.prefix) / "share" / "sandtrap" / "seccomp" / "sandtrap.json"


def test_build_names_a_bad_source(tmp_path: Path) -> None:
    with pytest.raises(seccomp.ProfileError, match="cannot read"):
        seccomp.build(tmp_path / "missing.json", tmp_path / "out.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(seccomp.ProfileError, match=r"bad\.json is not JSON"):
        seccomp.build(bad, tmp_path / "out.json")


def test_resolve_sandtrap_reads_the_data_dirs_profile(tmp_path: Path, installed: Path) -> None:
    path = seccomp.profile_path(tmp_path)
    path.parent.mkdir()
    path.write_text(seccomp.render(seccomp.derive(engine_default())), encoding="utf-8")
    text = seccomp.resolve("sandtrap", tmp_path)
    assert text is not None and seccomp.allowed_io_uring(json.loads(text)) == []
    assert seccomp.find(tmp_path) == path and seccomp.find(None) == installed


def test_resolve_sandtrap_falls_back_to_the_installed_profile_for_any_data_dir(tmp_path: Path, installed: Path) -> None:
    source = tmp_path / "default.json"
    source.write_text(json.dumps(engine_default()), encoding="utf-8")
    seccomp.build(source, installed)
    fresh = tmp_path / "new" / "data"  # not even there yet
    assert seccomp.find(fresh) == installed
    assert seccomp.resolve("sandtrap", fresh) == installed.read_text(encoding="utf-8")
    assert seccomp.resolve("sandtrap", None) == installed.read_text(encoding="utf-8")
    assert not fresh.exists()  # found, not copied


def test_resolve_sandtrap_missing_names_the_key_and_the_fix(tmp_path: Path, installed: Path) -> None:
    with pytest.raises(seccomp.ProfileError) as info:
        seccomp.resolve("sandtrap", tmp_path)
    message = str(info.value)
    assert message.startswith("sandbox.docker.seccomp_profile: ")
    assert str(seccomp.profile_path(tmp_path)) in message and str(installed) in message
    assert "make setup" in message and "seccomp build --from" in message
    with pytest.raises(seccomp.ProfileError, match=f"not at {installed}"):
        seccomp.resolve("sandtrap", None)


def test_resolve_sandtrap_refuses_a_profile_that_allows_io_uring(tmp_path: Path, installed: Path) -> None:
    path = seccomp.profile_path(tmp_path)
    path.parent.mkdir()
    path.write_text(json.dumps(engine_default()), encoding="utf-8")
    with pytest.raises(seccomp.ProfileError, match="allows io_uring_setup, io_uring_enter, io_uring_register"):
        seccomp.resolve("sandtrap", tmp_path)
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(seccomp.ProfileError, match="make setup") as info:
        seccomp.resolve("sandtrap", tmp_path)
    assert f"or remove {path}" in str(info.value)  # a data dir's own bad copy shadows the installed one
    installed.parent.mkdir(parents=True)
    installed.write_text(json.dumps(engine_default()), encoding="utf-8")
    with pytest.raises(seccomp.ProfileError, match="allows io_uring_setup") as info:
        seccomp.resolve("sandtrap", None)
    assert "or remove" not in str(info.value)


def test_resolve_default_and_a_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert seccomp.resolve("default", tmp_path) is None
    assert "allows io_uring" in caplog.text
    own = tmp_path / "own.json"
    own.write_text(json.dumps(engine_default()), encoding="utf-8")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert seccomp.resolve(str(own), tmp_path) == own.read_text(encoding="utf-8")  # used, with a warning
    assert "allows io_uring_setup" in caplog.text
    with pytest.raises(seccomp.ProfileError, match=r"sandbox\.docker\.seccomp_profile: .*nope\.json does not exist"):
        seccomp.resolve(str(tmp_path / "nope.json"), tmp_path)


def test_the_defaults_block_io_uring_without_no_new_privs() -> None:
    s = Settings().sandbox.docker
    assert s.seccomp_profile == "sandtrap" and s.no_new_privileges is False


def test_the_create_body_carries_the_profile_and_passes_the_engine_proxy() -> None:
    settings = Settings(sensor="unit")
    text = seccomp.render(seccomp.derive(engine_default()))
    config = create_config(
        settings.sandbox.docker, settings.sandbox, {LABEL_MANAGED: "true", LABEL_SENSOR: "unit"}, text
    )
    assert config["HostConfig"]["SecurityOpt"] == ["seccomp=" + text]  # no no-new-privileges by default
    check_create(
        json.dumps(config).encode(), Policy.from_settings(settings.sandbox.docker, settings.sandbox, settings.sensor)
    )
    assert create_config(settings.sandbox.docker, settings.sandbox, {}, None)["HostConfig"]["SecurityOpt"] == []
