"""The engine proxy's policy for `network: internal`: the one internal network, as sandtrap makes it."""

import json

import pytest

from sandtrap.config import Settings
from sandtrap.sandbox.docker.network import network_config
from sandtrap.sandbox.docker.proxy_policy import Policy, Refused, check_create, check_network_create
from sandtrap.sandbox.docker.spec import LABEL_MANAGED, LABEL_SENSOR, create_config


def settings(network: str) -> Settings:
    return Settings.model_validate({"network": {"mode": network}})


def policy_of(s: Settings) -> Policy:
    return Policy.from_settings(s.sandbox.docker, s.sandbox, s.sensor)


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def labels(policy: Policy) -> dict[str, str]:
    return {LABEL_MANAGED: "true", LABEL_SENSOR: policy.sensor}


def test_the_internal_network_and_boxes_on_it_pass() -> None:
    s = settings("internal")
    policy = policy_of(s)
    check_network_create(body(network_config(s.sandbox.docker.network_name, s.sandbox.network_subnet)), policy)
    config = create_config(s.sandbox.docker, s.sandbox, labels(policy), None)
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
        made = network_config(s.sandbox.docker.network_name, s.sandbox.network_subnet)
        check_network_create(body({**made, **change}), policy_of(s))


def test_without_network_internal_no_network_and_no_network_mode_pass() -> None:
    s = settings("none")
    policy = policy_of(s)
    with pytest.raises(Refused):
        internal = settings("internal").sandbox
        check_network_create(body(network_config(internal.docker.network_name, internal.network_subnet)), policy)
    internal = settings("internal").sandbox
    config = create_config(internal.docker, internal, labels(policy), None)
    with pytest.raises(Refused, match="NetworkMode"):
        check_create(body(config), policy)
    for mode in ("bridge", "host", "container:abc"):
        config["HostConfig"]["NetworkMode"] = mode
        with pytest.raises(Refused):
            check_create(body(config), policy_of(settings("internal")))
