"""nspawn's ``network.mode``: what it refuses at start, naming the key and the fix (the boxes' network itself is
tested on the real nspawn: tests/integration/test_nspawn_capture.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandtrap import doctor
from sandtrap.app import build_backend
from sandtrap.config import SandboxSettings, Settings
from sandtrap.errors import ConfigError
from sandtrap.sandbox.nspawn import launch
from sandtrap.sandbox.nspawn.backend import check_network


def test_internal_is_refused_naming_the_key_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^network\.mode: internal .*Fix: set network\.mode: capture"):
        check_network("internal", True)
    settings = Settings(
        sandbox={"backend": "nspawn"}, network={"mode": "internal"}, storage={"data_dir": str(tmp_path)}
    )
    with pytest.raises(ConfigError, match=r"^network\.mode: internal"):
        build_backend(settings, None)


def test_capture_needs_the_gateway_and_none_does_not() -> None:
    with pytest.raises(ConfigError, match=r"^network\.mode: capture.*or set network\.mode: none"):
        check_network("capture", False)
    check_network("capture", True)
    check_network("none", False)


@pytest.mark.parametrize("mode", ["none", "capture"])
def test_the_box_gets_a_network_namespace_of_its_own_in_both_modes(mode: str) -> None:
    # capture: eth0 is added to that namespace by the gateway; nspawn's own veth would sit in the host's namespace
    args = launch.network_args(SandboxSettings(backend="nspawn", network=mode))
    assert args == ["--private-network"]


def test_doctor_names_network_mode_for_nspawn(tmp_path: Path) -> None:
    def checks(mode: str) -> dict[str, bool]:
        settings = Settings(sandbox={"backend": "nspawn"}, network={"mode": mode}, storage={"data_dir": str(tmp_path)})
        return {c.name: c.ok for c in doctor._nspawn(settings)}

    assert checks("internal")["network.mode"] is False
    assert "network.mode capture: iptables" in checks("capture")
    assert not any(name.startswith("network.mode") for name in checks("none"))
