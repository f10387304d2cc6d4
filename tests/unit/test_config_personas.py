"""personas and services[].persona: the default is today's box, and every mistake is an error naming its key."""

from __future__ import annotations

from typing import Any

import pytest

from sandtrap.app import box_persona
from sandtrap.config import load_settings
from sandtrap.errors import ConfigError


def test_no_personas_is_one_equal_to_the_sandbox_section() -> None:
    s = load_settings(None)
    (only,) = s.effective_personas()
    assert only.name == "default" and only.weight > 0
    box = box_persona(s, only)
    assert (box.hostname, box.domain, box.image) == ("web-prod-03", "corp.internal", "sandtrap-target:latest")
    assert s.persona_images() == []


def test_a_persona_overrides_hostname_domain_and_image() -> None:
    s = load_settings(
        overrides={
            "personas": [
                {"name": "web", "weight": 3},
                {"name": "db", "hostname": "db-prod-01", "domain": "", "extra_packages": ["mariadb-server"]},
                {"name": "gw", "weight": 0, "hostname": "gw-01", "image": "router:1"},
            ],
            "services": [{"name": "ssh", "protocol": "ssh", "port": 2222}, {"name": "t", "protocol": "telnet",
                                                                              "port": 2323, "persona": "gw"}],
        }
    )  # fmt: skip
    web, db, gw = (box_persona(s, p) for p in s.effective_personas())
    assert (web.hostname, web.image) == ("web-prod-03", "sandtrap-target:latest")
    assert (db.hostname, db.domain, db.image) == ("db-prod-01", "", "sandtrap-target-db:latest")
    assert (gw.hostname, gw.image) == ("gw-01", "router:1")
    ((name, tag, image),) = s.persona_images()  # only db's packages make an image of its own
    assert (name, tag) == ("db", "sandtrap-target-db:latest") and image.extra_packages == ["mariadb-server"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"personas": [{"name": "a", "weight": -1}]}, "personas.0.weight: Input should be greater than or equal"),
        ({"personas": [{"name": "a", "weight": 0}, {"name": "b", "weight": 0}]}, "personas: every weight is 0"),
        ({"personas": [{"name": "a"}, {"name": "a"}]}, "personas.1.name: a second persona named 'a'"),
        ({"personas": [{"name": "A b"}]}, "personas.0.name: must be 1-32 of a-z"),
        ({"personas": [{"name": "a", "hostname": "x.y"}]}, "personas.0.hostname: must be a single DNS label"),
        ({"personas": [{"name": "a", "extra_packages": ["rm -rf"]}]}, "personas.0.extra_packages"),
        ({"personas": [{"name": "a", "wieght": 1}]}, "personas.0.wieght: unknown key"),
        ({"personas": [{"name": "a", "lures": [{"path": "/proc/x", "content": "x"}]}]}, "personas.0.lures.0.path"),
        ({"personas": [{"name": "a", "lures": [{"path": "rel", "content": "x"}]}]}, "not an absolute file path"),
        (
            {"personas": [{"name": "a"}], "sandbox": {"backend": "nspawn"}},
            "personas: sandbox.backend nspawn has one image and hostname",
        ),
        (
            {"personas": [{"name": "a"}], "services": [{"name": "ssh", "protocol": "ssh", "port": 22, "persona": "b"}]},
            "services.0.persona: service ssh names persona 'b', which is not configured; use one of a",
        ),
        (
            {"services": [{"name": "ssh", "protocol": "ssh", "port": 22, "persona": "db"}]},
            "services.0.persona: service ssh names persona 'db', which is not configured; use one of default",
        ),
    ],
)
def test_errors_name_the_key(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(overrides=overrides)
    assert message in str(err.value)


def test_a_service_may_name_the_default_persona() -> None:
    s = load_settings(overrides={"services": [{"name": "ssh", "protocol": "ssh", "port": 22, "persona": "default"}]})
    assert s.services[0].persona == "default"
