"""Config in TOML as in YAML, and the services list (issue 17): the issue's example, the seed's, the errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sandtrap.config import load_settings, settings_as_yaml
from sandtrap.errors import ConfigError

CONFIG = Path(__file__).resolve().parents[2] / "config"

ISSUE_EXAMPLE = """
[[service]]
name = "ssh"
protocol = "ssh"
listen = "0.0.0.0:2222"

[[service]]
name = "telnet"
protocol = "telnet"
listen = "0.0.0.0:2323"

[[service]]
name = "http"
protocol = "tcp"
listen = "0.0.0.0:8081"
target_port = 80                    # the port in the attacker's box
capture = { pcap = true, metadata = true }
session = { timeout_seconds = 600, max_bytes = 10485760 }
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_issue_example_loads_and_means_what_it_says(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "s.toml", ISSUE_EXAMPLE))
    ssh, telnet, http = s.listeners()
    assert (ssh.protocol, ssh.address) == ("ssh", "0.0.0.0:2222") and s.ssh.listen == "0.0.0.0:2222"
    assert (telnet.protocol, telnet.address) == ("telnet", "0.0.0.0:2323")
    assert (http.protocol, http.address, http.target_port) == ("tcp", "0.0.0.0:8081", 80)
    assert http.capture.pcap and http.capture.metadata
    assert http.session.timeout_seconds == 600 and http.session.max_bytes == 10 * 2**20


def test_same_tree_in_yaml_and_toml(tmp_path: Path) -> None:
    toml = load_settings(write(tmp_path, "s.toml", ISSUE_EXAMPLE))
    as_yaml = write(tmp_path, "s.yaml", settings_as_yaml(toml))
    assert load_settings(as_yaml).model_dump(exclude={"sensor"}) == toml.model_dump(exclude={"sensor"})


def test_defaults_keep_the_single_ssh_listener() -> None:
    s = load_settings(None)
    assert s.services == []
    [only] = s.listeners()
    assert (only.protocol, only.address) == ("ssh", s.ssh.listen)


@pytest.mark.parametrize("name", ["sandtrap.example.toml", "seed.example.toml", "sandtrap.example.yaml"])
def test_shipped_examples_load(name: str) -> None:
    s = load_settings(CONFIG / name)
    assert s.listeners()[0].protocol == "ssh"


def test_seed_example_maps_global() -> None:
    s = load_settings(CONFIG / "seed.example.toml")
    assert s.sensor == "seed-sensor" and s.log_level == "INFO" and s.limits.max_sessions_per_ip == 5
    assert s.ssh.listen == "0.0.0.0:22"
    http = s.listeners()[1]
    assert (http.protocol, http.port, http.target_port) == ("tcp", 80, 80)


def test_toml_example_documents_the_yaml_examples_services() -> None:
    tree = yaml.safe_load((CONFIG / "sandtrap.example.yaml").read_text())
    assert tree["services"] == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[ssh]\nlisten = "1.2.3.4:22"\n', "ssh.listen (1.2.3.4:22) and service ssh's listen"),
        ('[[service]]\nname = "x"\nprotocol = "gopher"\nport = 1\n', "services.3.protocol: must be 'ssh'"),
        ('[[service]]\nname = "web"\nprotocol = "http"\nport = 1\n', 'write protocol = "tcp"'),
        ('[[service]]\nname = "web"\nprotocol = "tcp"\nport = 1\n', "needs target_port"),
        (
            '[[service]]\nname = "web"\nprotocol = "tcp"\nport = 1\nlisten = "0.0.0.0:1"\ntarget_port = 1\n',
            "exactly one",
        ),
        ('[[service]]\nname = "http"\nprotocol = "udp"\nport = 1\ntarget_port = 1\n', "second service named 'http'"),
        ('[[service]]\nname = "t2"\nprotocol = "telnet"\nlisten = "0.0.0.0:2323"\n', "both listen on tcp"),
        ('[[service]]\nname = "s2"\nprotocol = "ssh"\nport = 22\n', "a second ssh service"),
        ('[[service]]\nname = "t2"\nprotocol = "telnet"\nport = 23\ntarget_port = 23\n', "target_port is for tcp/udp"),
        ('[[service]]\nname = "t2"\nprotocol = "telnet"\nport = 23\nbogus = 1\n', "services.3.bogus: unknown key"),
        ('[[service]]\nname = "t2"\nprotocol = "telnet"\nport = 23\nsession = {max_bytes = "lots"}\n', "max_bytes"),
        ('[[service]]\nname = "t2"\nprotocol = "telnet"\nport = 23\npersona = "router"\n', "services.3.persona: "),
        (
            '[[service]]\nname = "t2"\nprotocol = "telnet"\nport = 23\nimage = "x:1"\n',
            "services.3.image: a service has no image of its own",
        ),
        ('[global]\ncolour = "red"\n', "global.colour: unknown key"),
        ('[global]\ndata_dir = "/a"\n[storage]\ndata_dir = "/b"\n', "global.data_dir and storage.data_dir"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, extra: str, message: str) -> None:
    # [global]/[ssh] tables must come before the array of tables in TOML: put extras first when they are tables
    text = extra + ISSUE_EXAMPLE if extra.startswith(("[ssh]", "[global]")) else ISSUE_EXAMPLE + extra
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, "s.toml", text))
    assert message in str(err.value)


def test_bad_toml_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings(write(tmp_path, "s.toml", "[ssh\n"))


def test_ssh_service_with_the_same_listen_is_no_conflict(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "s.toml", '[ssh]\nlisten = "0.0.0.0:2222"\n' + ISSUE_EXAMPLE))
    assert s.ssh.listen == "0.0.0.0:2222"
