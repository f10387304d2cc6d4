"""Config: defaults that run, errors that name the key and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import BaseModel

from sandtrap.app import BACKENDS
from sandtrap.config import (
    AVAILABLE_BACKENDS,
    MOVED_KEYS,
    DockerSettings,
    SandboxSettings,
    Settings,
    load_settings,
    parse_size,
    settings_as_yaml,
    split_listen,
)
from sandtrap.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sandtrap.yaml"
    p.write_text(text)
    return p


def test_defaults_run() -> None:
    s = load_settings(None)
    assert s.ssh.listen == "0.0.0.0:2222"
    assert s.api.listen == "127.0.0.1:8080" and s.api_is_loopback()
    assert s.sandbox.backend == "docker" and s.network.mode == s.sandbox.network == "capture"
    assert s.network.egress.fetch is False and s.network.egress.allow == []
    assert s.sandbox.memory == 256 * 2**20
    assert s.storage.data_dir == "./data"
    assert s.ssh.version.startswith("SSH-2.0-OpenSSH_9.2p1 Debian")


def test_yaml_round_trip_of_effective_config(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "sandbox:\n  pool_size: 7\n  memory: 1g\n"))
    dumped = yaml.safe_load(settings_as_yaml(s))
    assert dumped["sandbox"]["pool_size"] == 7 and dumped["sandbox"]["memory"] == 2**30
    assert Settings.model_validate(dumped) == s


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("sandbox:\n  pool_sz: 3\n", "sandbox.pool_sz: unknown key"),
        ("sandbox:\n  backend: lxc\n", "sandbox.backend: must be 'docker', 'microvm' or 'nspawn'"),
        ("sandbox:\n  memory: lots\n", "sandbox.memory: expected a size"),
        ("ssh:\n  listen: nope\n", "ssh.listen: expected 'host:port'"),
        ("ssh:\n  listen: '1.2.3.4:99999'\n", "out of range"),
        ("auth:\n  accept_all_after: -1\n", "auth.accept_all_after"),
        ("auth:\n  credentials:\n    - {username: root}\n", "auth.credentials.0.password"),
        (
            "sandbox:\n  docker:\n    cap_add: [SYS_ADMIN]\n",
            "sandbox.docker.cap_add: SYS_ADMIN would let an attacker escape",
        ),
        ("sandbox:\n  hostname: 'bad host'\n", "sandbox.hostname"),
        ("sandbox:\n  affinity: random\n", "'session' or 'source_ip'"),
        ("sandbox:\n  memory: 256m\n  memory_swap: 1m\n", "memory_swap"),
        (
            "sandbox:\n  docker: {ulimit_nofile: 4096, ulimit_nofile_hard: 2048}\n",
            "ulimit_nofile_hard must be at least",
        ),
        ("sandbox:\n  docker:\n    ulimit_nofile_hard: 2000000\n", "sandbox.docker.ulimit_nofile_hard"),
        ("sandbox:\n  docker:\n    network_name: 'a b'\n", "sandbox.docker.network_name: must be a Docker network"),
        ("sandbox:\n  docker:\n    writable: {/var: 10k}\n", "sandbox.docker.writable: /var: a size below 1m"),
        ("sandbox:\n  docker:\n    image_tag: x\n", "sandbox.docker.image_tag: unknown key"),
        ("network:\n  subnet: 8.8.8.0/24\n", "network.subnet: '8.8.8.0/24': use a private subnet"),
        ("sandbox:\n  network: internal\n", "sandbox.network: moved to network.mode; write it as `mode:`"),
        ("sandbox:\n  network_subnet: 10.9.0.0/24\n", "sandbox.network_subnet: moved to network.subnet"),
        ("image:\n  packages: ['rm -rf']\n", "not a Debian package name"),
        ("sandbox:\n  loadavg_dir: var/lib/x\n", "sandbox.loadavg_dir: must be an absolute directory"),
        ("sandbox:\n  lxcfs_dir: '/a:b'\n", "sandbox.lxcfs_dir"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("ssh: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_names_key_and_fix(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text))
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("sandbox:\n  nspawn:\n    disk_size: 1m\n", "sandbox.nspawn.disk_size: must be between 16m and 64g"),
        ("sandbox:\n  nspawn:\n    cap_add: [SYS_ADMIN]\n", "sandbox.nspawn.cap_add: SYS_ADMIN would let a box reach"),
        ("sandbox:\n  nspawn:\n    cap_add: ['chown;rm']\n", "sandbox.nspawn.cap_add: 'chown;rm' is not a capability"),
        ("sandbox:\n  nspawn:\n    private_users: true\n", "sandbox.nspawn.private_users: unknown key"),
    ],
)
def test_nspawn_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, "sandbox:\n  backend: nspawn\n" + text.removeprefix("sandbox:\n")))
    assert needle in str(err.value)


def test_nspawn_is_available_and_keeps_dockers_capabilities_by_default(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "sandbox:\n  backend: nspawn\n  nspawn:\n    disk_size: 1g\n"))
    assert (s.sandbox.backend, s.sandbox.nspawn.disk_size) == ("nspawn", 1 << 30)
    assert s.sandbox.nspawn.cap_add == s.sandbox.docker.cap_add


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "sandbox:\n  microvm:\n    memory: 64m\n",
            "sandbox.microvm.memory: Debian's kernel and systemd need at least",
        ),
        ("sandbox:\n  microvm:\n    disk_size: 1g\n", "sandbox.microvm.disk_size: the image (kernel included) needs"),
        ("sandbox:\n  microvm:\n    accel: hvf\n", "sandbox.microvm.accel: must be 'auto', 'kvm' or 'tcg'"),
        ("sandbox:\n  microvm:\n    kernel_cmdline_extra: 'a,b'\n", "sandbox.microvm.kernel_cmdline_extra: must be"),
        ("sandbox:\n  microvm:\n    vcpus: 0\n", "sandbox.microvm.vcpus"),
    ],
)
def test_microvm_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, "sandbox:\n  backend: microvm\n" + text.removeprefix("sandbox:\n")))
    assert needle in str(err.value)


def test_microvm_is_available(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "sandbox:\n  backend: microvm\n  microvm:\n    memory: 1g\n    vcpus: 2\n"))
    assert s.sandbox.backend == "microvm"
    assert (s.sandbox.microvm.memory, s.sandbox.microvm.vcpus, s.sandbox.microvm.accel) == (1 << 30, 2, "auto")


def test_every_available_backend_has_a_builder() -> None:
    assert set(AVAILABLE_BACKENDS) == set(BACKENDS), "config.AVAILABLE_BACKENDS and app.BACKENDS must agree"
    assert set(AVAILABLE_BACKENDS) <= set(get_args(SandboxSettings.model_fields["backend"].annotation))


@pytest.mark.parametrize(
    ("old", "value"),
    [
        ("docker_host", "unix:///run/sandtrap/engine.sock"),
        ("image", "mine:1"),
        ("seccomp_profile", "default"),
        ("cap_add", "[CHOWN]"),
        ("read_only_root", "true"),
        ("ulimit_nofile_hard", "4096"),
        ("network_name", "x"),
        ("limits_in_parent", "false"),
        ("cgroupns", "host"),
        ("runtime", "runsc"),
    ],
)
def test_key_moved_to_the_docker_section_names_its_new_place(tmp_path: Path, old: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, f"sandbox:\n  {old}: {value}\n"))
    message = str(err.value)
    assert f"sandbox.{old}: moved to sandbox.docker.{old}" in message
    assert f"as `{old}:` in a `docker:` section inside `sandbox:`" in message
    assert "unknown key" not in message
    # ...and the value is taken where it is now.
    load_settings(write(tmp_path, f"sandbox:\n  docker:\n    {old}: {value}\n"))


def test_every_docker_key_that_was_flat_is_a_moved_key() -> None:
    assert set(MOVED_KEYS) == {f"sandbox.{k}" for k in DockerSettings.model_fields}
    assert not set(DockerSettings.model_fields) & set(SandboxSettings.model_fields), "a key lives in one place"


def test_several_moved_keys_each_get_a_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, "sandbox:\n  docker_host: ''\n  image: x\n  pool_sz: 1\n"))
    lines = str(err.value).splitlines()
    assert any(line.strip().startswith("sandbox.docker_host: moved to sandbox.docker.docker_host") for line in lines)
    assert any(line.strip().startswith("sandbox.image: moved to sandbox.docker.image") for line in lines)
    assert any(line.strip().startswith("sandbox.pool_sz: unknown key") for line in lines)


def test_common_key_in_the_docker_section_names_its_place(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, "sandbox:\n  docker:\n    memory: 1g\n"))
    assert "sandbox.docker.memory: not a Docker-only key; every backend has it: write it as sandbox.memory" in str(
        err.value
    )


def test_moved_key_in_overrides_names_its_new_place() -> None:
    with pytest.raises(ConfigError, match=r"sandbox\.tmpfs: moved to sandbox\.docker\.tmpfs"):
        load_settings(None, {"sandbox": {"tmpfs": {}}})


def test_docker_section_defaults_and_overrides(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "sandbox:\n  memory: 1g\n  docker:\n    image: mine:2\n"))
    assert s.sandbox.memory == 2**30 and s.sandbox.docker.image == "mine:2"
    assert s.sandbox.docker.seccomp_profile == "sandtrap" and s.sandbox.docker.cap_add == DockerSettings().cap_add


def test_config_show_prints_the_tree() -> None:
    dumped = yaml.safe_load(settings_as_yaml(load_settings(None)))
    assert dumped["sandbox"]["backend"] == "docker"
    assert dumped["sandbox"]["docker"]["docker_host"] == "" and "docker_host" not in dumped["sandbox"]
    assert dumped["sandbox"]["docker"]["image"] == "sandtrap-target:latest"
    keys = list(dumped["sandbox"])
    assert keys[0] == "backend" and keys[-3:] == ["docker", "microvm", "nspawn"]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.yaml")


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")) == load_settings(None)


def test_example_config_is_valid_and_documents_every_key() -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "sandtrap.example.yaml"
    text = example.read_text()
    documented = load_settings(example).model_dump(exclude={"sensor"})
    assert documented == load_settings(None).model_dump(exclude={"sensor"}), "the example must show the defaults"

    def keys(model: BaseModel, prefix: str = "") -> list[str]:
        out = []
        for name, info in type(model).model_fields.items():
            if info.exclude:  # set from another section (sandbox.network from network.mode)
                continue
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                out += keys(value, f"{prefix}{name}.")
            else:
                out.append(f"{prefix}{name}")
        return out

    # Every key is written out, at its place in the tree (not only defaulted).
    tree = yaml.safe_load(text)
    for dotted in keys(load_settings(None)):
        if dotted == "sensor":
            assert "sensor:" in text, "config/sandtrap.example.yaml does not document sensor"
            continue
        node = tree
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, f"config/sandtrap.example.yaml does not document {dotted}"
            node = node[part]


@pytest.mark.parametrize(
    ("value", "expected"), [("256m", 256 * 2**20), ("1g", 2**30), ("512MiB", 512 * 2**20), (1024, 1024), ("10k", 10240)]
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"), [("0.0.0.0:2222", ("0.0.0.0", 2222)), ("[::1]:22", ("::1", 22)), (":80", ("0.0.0.0", 80))]
)
def test_split_listen(value: str, expected: tuple[str, int]) -> None:
    assert split_listen(value) == expected


def test_non_loopback_api() -> None:
    s = load_settings(None, {"api": {"listen": "0.0.0.0:8080"}})
    assert not s.api_is_loopback()


def test_api_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDTRAP_TEST_API_TOKEN", "s3cret")
    s = load_settings(None, {"api": {"listen": "0.0.0.0:8080", "token_env": "SANDTRAP_TEST_API_TOKEN"}})
    assert s.api.token == "s3cret"
    monkeypatch.delenv("SANDTRAP_TEST_API_TOKEN")  # unset: no token (the engine proxy reads the same file)
    assert load_settings(None, {"api": {"token_env": "SANDTRAP_TEST_API_TOKEN"}}).api.token == ""
    with pytest.raises(ConfigError, match=r"api\.token or api\.token_env"):
        load_settings(None, {"api": {"token": "a", "token_env": "SANDTRAP_TEST_API_TOKEN"}})
    with pytest.raises(ConfigError, match="token_env"):
        load_settings(None, {"api": {"token_env": "not a name"}})
