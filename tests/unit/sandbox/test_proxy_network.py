"""The engine proxy's policy for `network: internal`: the one internal network, as sandtrap makes it."""

import json

import pytest

from sandtrap.config import Settings
from sandtrap.sandbox.docker.network import network_config
from sandtrap.sandbox.docker.proxy_policy import Policy, Refused, check_create, check_network_create
from sandtrap.sandbox.docker.spec import LABEL_MANAGED, LABEL_SENSOR, create_config


def settings(network: str) -> Settings:
    return Settings.model_validate({"sandbox": {"network": network}})


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def labels(policy: Policy) -> dict[str, str]:
    return {LABEL_MANAGED: "true", LABEL_SENSOR: policy.sensor}


def test_the_internal_network_and_boxes_on_it_pass() -> None:
    s = settings("internal")
    policy = Policy.from_settings(s)
    check_network_create(body(network_config(s.sandbox)), policy)
    config = create_config(s.sandbox, labels(policy), None)
    check_create(body(config), policy)


@pytest.mark.parametrize(
    "change",
    [
        {"Internal": False},
        {"Name": "bridge"},
        {"EnableIPv6": True},
        {"Driver": "macvlan"},
        {"IPAM": {"Config": [{"Subnet": "192.168.0.0/16"}]}},
        {"Options": {"com.docker.network.bridge.enable_icc": "true"}},
    ],
)
def test_any_other_network_is_refused(change: dict[str, object]) -> None:
    s = settings("internal")
    with pytest.raises(Refused):
        check_network_create(body({**network_config(s.sandbox), **change}), Policy.from_settings(s))


def test_without_network_internal_no_network_and_no_network_mode_pass() -> None:
    s = settings("none")
    policy = Policy.from_settings(s)
    with pytest.raises(Refused):
        check_network_create(body(network_config(settings("internal").sandbox)), policy)
    config = create_config(settings("internal").sandbox, labels(policy), None)
    with pytest.raises(Refused, match="NetworkMode"):
        check_create(body(config), policy)
    for mode in ("bridge", "host", "container:abc"):
        config["HostConfig"]["NetworkMode"] = mode
        with pytest.raises(Refused):
            check_create(body(config), Policy.from_settings(settings("internal")))
