"""``personas``: the kinds of machine an attacker may land in (issue 19), each with its own hostname, packages and
lures, chosen by weight or by the service the attacker came in on (``services[].persona``).

No ``personas`` (the default) is one persona, ``default``, equal to the single box of earlier versions:
``sandbox.hostname``, ``sandbox.domain``, ``sandbox.docker.image`` and the standard honeytokens.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from sandtrap.config.values import Section

DEFAULT_PERSONA = "default"
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_HOSTNAME = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")
_DOMAIN = re.compile(r"([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)*[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")
_PATH = re.compile(r"(/[A-Za-z0-9_.@+-]+)+")
TOKEN_MARK = "{token}"


class LureFile(Section):
    """A file planted in every box of its persona and watched as a honeytoken (a read is
    ``sandtrap.honeytoken.read``, kind ``lure``). ``{token}`` in ``content`` becomes a value unique to each box
    (recorded in ``sandtrap.honeytoken.issued``)."""

    path: str = Field(description="absolute path in the box, e.g. /root/.my.cnf")
    content: str = Field(description="the file's text; {token} is replaced by a value unique to each box")
    mode: int = Field(0o600, ge=0, le=0o777, description="permission bits (YAML: 0o600 or 384)")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not _PATH.fullmatch(v) or {".", ".."} & set(v.split("/")):
            raise ValueError(f"{v!r} is not an absolute file path such as /root/.my.cnf")
        if v.split("/")[1] in {"proc", "sys", "dev"}:
            raise ValueError(f"{v}: a lure cannot live in /proc, /sys or /dev; use e.g. /root or /etc")
        return v

    @field_validator("content")
    @classmethod
    def _content(cls, v: str) -> str:
        if len(v.encode()) > 64 * 1024:
            raise ValueError("at most 64 KiB; a lure is a small credentials or config file")
        return v


class PersonaSettings(Section):
    name: str = Field(description="the persona's name, in events (persona), the API and the UI")
    weight: float = Field(1.0, ge=0, description="share of new attackers (relative to the others); 0 = by service only")
    hostname: str = Field("", description="the box's hostname; '' = sandbox.hostname")
    domain: str | None = Field(None, description="the box's domain; unset = sandbox.domain")
    extra_packages: list[str] = Field(
        default_factory=list,
        description="Debian packages on top of image.packages and image.extra_packages: this persona gets an image "
        "of its own (`sandtrap image build` builds it)",
    )
    image: str = Field(
        "",
        description="the engine's tag of this persona's image; '' = sandbox.docker.image, or with extra_packages "
        "sandtrap-target-<name>:latest",
    )
    honeytokens: bool = Field(True, description="the standard lure credentials (with sandbox.honeytokens)")
    lures: list[LureFile] = Field(default_factory=list, description="files of this persona's own, watched for reads")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.fullmatch(v):
            raise ValueError("must be 1-32 of a-z, 0-9, '_' and '-', starting with a letter or digit (e.g. db)")
        return v

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        if v and not _HOSTNAME.fullmatch(v):
            raise ValueError("must be a single DNS label (letters, digits, '-'), e.g. db-prod-01, or '' for sandbox's")
        return v

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str | None) -> str | None:
        if v and (len(v) > 200 or not _DOMAIN.fullmatch(v)):
            raise ValueError("must be a DNS domain such as corp.internal ('' for none)")
        return v

    @field_validator("extra_packages")
    @classmethod
    def _pkgs(cls, v: list[str]) -> list[str]:
        for p in v:
            if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", p):
                raise ValueError(f"{p!r} is not a Debian package name")
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if v and not re.fullmatch(r"[a-z0-9][a-z0-9._/-]{0,127}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?", v):
            raise ValueError("must be a local image tag such as sandtrap-target-db:latest")
        return v

    @model_validator(mode="after")
    def _lures(self) -> PersonaSettings:
        paths = [lure.path for lure in self.lures]
        if len(paths) != len(set(paths)):
            raise ValueError(f"persona {self.name}: two lures at one path")
        return self

    def image_tag(self, default: str) -> str:
        """The engine's tag of this persona's image (``default``: sandbox.docker.image)."""
        if self.image:
            return self.image
        return f"sandtrap-target-{self.name}:latest" if self.extra_packages else default


def check_personas(personas: list[PersonaSettings], backend: str) -> None:
    """Names unique, weights with at least one above 0, only the Docker backend for more than the default."""
    if not personas:
        return
    names: set[str] = set()
    for i, p in enumerate(personas):
        if p.name in names:
            raise ValueError(f"personas.{i}.name: a second persona named {p.name!r}; names must be unique")
        names.add(p.name)
    if not any(p.weight > 0 for p in personas):
        raise ValueError(
            "personas: every weight is 0, so a new attacker has no persona to land in; give at least one persona "
            "a weight above 0 (e.g. weight: 1)"
        )
    if backend != "docker":
        raise ValueError(
            f"personas: sandbox.backend {backend} has one image and hostname for every box; personas need "
            "sandbox.backend: docker (or remove personas)"
        )


def check_service_personas(services: list[tuple[str, str]], personas: list[str]) -> None:
    """Each ``(service name, persona)`` names a persona that exists (``personas``: their names)."""
    for i, (service, persona) in enumerate(services):
        if persona and persona not in personas:
            raise ValueError(
                f"services.{i}.persona: service {service} names persona {persona!r}, which is not configured; "
                f"use one of {', '.join(personas)} (personas[].name)"
            )
