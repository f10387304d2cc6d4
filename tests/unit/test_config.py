"""Config: defaults that run, errors that name the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from sandtrap.config import Settings, load_settings, parse_size, settings_as_yaml, split_listen
from sandtrap.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sandtrap.yaml"
    p.write_text(text)
    return p


def test_defaults_run() -> None:
    s = load_settings(None)
    assert s.ssh.listen == "0.0.0.0:2222"
    assert s.api.listen == "127.0.0.1:8080" and s.api_is_loopback()
    assert s.sandbox.backend == "docker" and s.sandbox.network == "none"
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
        ("sandbox:\n  backend: lxc\n", "sandbox.backend: must be 'docker'"),
        ("sandbox:\n  memory: lots\n", "sandbox.memory: expected a size"),
        ("ssh:\n  listen: nope\n", "ssh.listen: expected 'host:port'"),
        ("ssh:\n  listen: '1.2.3.4:99999'\n", "out of range"),
        ("auth:\n  accept_all_after: -1\n", "auth.accept_all_after"),
        ("auth:\n  credentials:\n    - {username: root}\n", "auth.credentials.0.password"),
        ("sandbox:\n  cap_add: [SYS_ADMIN]\n", "SYS_ADMIN would let an attacker escape"),
        ("sandbox:\n  hostname: 'bad host'\n", "sandbox.hostname"),
        ("sandbox:\n  affinity: random\n", "'session' or 'source_ip'"),
        ("sandbox:\n  memory: 256m\n  memory_swap: 1m\n", "memory_swap"),
        ("sandbox:\n  ulimit_nofile: 4096\n  ulimit_nofile_hard: 2048\n", "ulimit_nofile_hard must be at least"),
        ("sandbox:\n  ulimit_nofile_hard: 2000000\n", "sandbox.ulimit_nofile_hard"),
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
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                out += keys(value, f"{prefix}{name}.")
            else:
                out.append(f"{prefix}{name}")
        return out

    for dotted in keys(load_settings(None)):
        leaf = dotted.rsplit(".", 1)[-1]
        assert f"{leaf}:" in text, f"config/sandtrap.example.yaml does not document {dotted}"


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
