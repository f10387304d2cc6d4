"""All settings: one pydantic model per concern, defaults that run on a fresh machine.

The file mirrors the tree of :class:`Settings`, in YAML or TOML (``.toml``, read by ``tomllib``). A typo or a bad value becomes a
:class:`~sandtrap.errors.ConfigError` that names the key, what was given and what is allowed.
A component gets only its section (``settings.sandbox.docker`` for the Docker backend).
"""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from sandtrap.config.alerts import AlertRule, AlertSettings, AlertTarget
from sandtrap.config.engine import EngineSettings, is_loopback_host
from sandtrap.config.image import ImageSettings
from sandtrap.config.network import MOVED_NETWORK_KEYS, DnsSettings, EgressSettings, NetworkSettings, PcapSettings
from sandtrap.config.personas import (
    DEFAULT_PERSONA,
    LureFile,
    PersonaSettings,
    check_personas,
    check_service_personas,
)
from sandtrap.config.sandbox import (
    AVAILABLE_BACKENDS,
    MOVED_KEYS,
    DockerSettings,
    LureSettings,
    MicroVMSettings,
    NspawnSettings,
    SandboxSettings,
)
from sandtrap.config.sections import (
    DEFAULT_SSH_VERSION,
    APISettings,
    AuthSettings,
    Credential,
    LimitsSettings,
    RecordingSettings,
    SSHSettings,
    StorageSettings,
    TelnetSettings,
)
from sandtrap.config.services import (
    CaptureSettings,
    ServiceSessionSettings,
    ServiceSettings,
    check_services,
    map_seed_keys,
)
from sandtrap.config.values import ByteSize, Listen, Section, parse_size, split_listen
from sandtrap.errors import ConfigError

__all__ = [
    "AVAILABLE_BACKENDS",
    "DEFAULT_PERSONA",
    "DEFAULT_SSH_VERSION",
    "MOVED_KEYS",
    "APISettings",
    "AlertRule",
    "AlertSettings",
    "AlertTarget",
    "AuthSettings",
    "ByteSize",
    "CaptureSettings",
    "Credential",
    "DnsSettings",
    "DockerSettings",
    "EgressSettings",
    "EngineSettings",
    "ImageSettings",
    "LimitsSettings",
    "Listen",
    "LureFile",
    "LureSettings",
    "MicroVMSettings",
    "NetworkSettings",
    "NspawnSettings",
    "PcapSettings",
    "PersonaSettings",
    "RecordingSettings",
    "SSHSettings",
    "SandboxSettings",
    "Section",
    "ServiceSessionSettings",
    "ServiceSettings",
    "Settings",
    "StorageSettings",
    "TelnetSettings",
    "load_settings",
    "merge",
    "parse_size",
    "settings_as_yaml",
    "split_listen",
]


class Settings(Section):
    sensor: str = Field(default_factory=socket.gethostname)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    ssh: SSHSettings = SSHSettings()
    telnet: TelnetSettings = TelnetSettings()
    auth: AuthSettings = AuthSettings()
    sandbox: SandboxSettings = SandboxSettings()
    image: ImageSettings = ImageSettings()
    network: NetworkSettings = NetworkSettings()
    limits: LimitsSettings = LimitsSettings()
    recording: RecordingSettings = RecordingSettings()
    storage: StorageSettings = StorageSettings()
    api: APISettings = APISettings()
    alerts: AlertSettings = AlertSettings()
    services: list[ServiceSettings] = Field(
        default_factory=list, description="the listeners (TOML [[service]]); empty = one SSH listener at ssh.listen"
    )
    personas: list[PersonaSettings] = Field(
        default_factory=list,
        description="the kinds of box attackers land in, by weight or by service (TOML [[personas]]); empty = one, "
        "'default', the sandbox section's box",
    )

    @model_validator(mode="after")
    def _personas(self) -> Settings:
        check_personas(self.personas, self.sandbox.backend)
        names = [p.name for p in self.effective_personas()]
        check_service_personas([(s.name, s.persona) for s in self.services], names)
        return self

    def persona_images(self) -> list[tuple[str, str, ImageSettings]]:
        """The personas with an image of their own to build (extra_packages): (name, engine tag, its packages)."""
        out = []
        for p in self.effective_personas():
            if p.extra_packages:
                image = self.image.model_copy(
                    update={"extra_packages": [*self.image.extra_packages, *p.extra_packages]}
                )
                out.append((p.name, p.image_tag(self.sandbox.docker.image), image))
        return out

    def effective_personas(self) -> list[PersonaSettings]:
        """The personas boxes are made as: those configured, or the one equal to the sandbox section's box."""
        return list(self.personas) or [PersonaSettings(name=DEFAULT_PERSONA)]

    @model_validator(mode="after")
    def _services(self) -> Settings:
        check_services(self.services)
        ssh = next((s for s in self.services if s.protocol == "ssh"), None)
        if ssh is not None and ssh.address != self.ssh.listen:
            if "listen" in self.ssh.model_fields_set:
                raise ValueError(
                    f"ssh.listen ({self.ssh.listen}) and service {ssh.name}'s listen ({ssh.address}) both say where "
                    "SSH listens; keep one (the service's is mapped onto ssh.listen)"
                )
            # The ssh service's address is ssh.listen: one value, shown once by `config show`.
            object.__setattr__(self, "ssh", self.ssh.model_copy(update={"listen": ssh.address}))
        return self

    def listeners(self) -> list[ServiceSettings]:
        """Every listener to start: the services, or (none configured) today's single SSH listener."""
        if self.services:
            return list(self.services)
        return [ServiceSettings(name="ssh", protocol="ssh", listen=self.ssh.listen)]

    @model_validator(mode="after")
    def _network_to_sandbox(self) -> Settings:
        """The backend reads the box's network from its own section: ``sandbox`` gets ``network.mode`` and
        ``network.subnet``, and whether a telnet service is configured (a copy: the default section is shared)."""
        net = self.network
        telnet = any(s.protocol == "telnet" for s in self.services)  # boxes then show inetd on :23 (box/inetd.c)
        if (self.sandbox.network, self.sandbox.network_subnet, self.sandbox.telnet_in_box) != (
            net.mode,
            net.subnet,
            telnet,
        ):
            update = {"network": net.mode, "network_subnet": net.subnet, "telnet_in_box": telnet}
            object.__setattr__(self, "sandbox", self.sandbox.model_copy(update=update))
        return self

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir).expanduser().resolve()

    @property
    def database_url(self) -> str:
        return self.storage.database_url or f"sqlite:///{self.data_dir / 'sandtrap.db'}"

    def api_is_loopback(self) -> bool:
        host, _ = split_listen(self.api.listen)
        return is_loopback_host(host)


def _describe(err: Any) -> str:
    key = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    text = str(err["msg"]).removeprefix("Value error, ")
    if not key or text.startswith(key + "."):  # a check across keys or sections: its message names the keys
        return text
    if kind == "extra_forbidden":
        if key in MOVED_KEYS:
            new, name = MOVED_KEYS[key], key.rsplit(".", 1)[1]
            return f"{key}: moved to {new}; write it as `{name}:` in a `docker:` section inside `sandbox:`"
        leaf = key.removeprefix("sandbox.docker.")
        if leaf != key and leaf in SandboxSettings.model_fields:
            return f"{key}: not a Docker-only key; every backend has it: write it as sandbox.{leaf}"
        return f"{key}: unknown key; remove it or check its spelling (see config/sandtrap.example.yaml)"
    given = err.get("input")
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")
    if kind == "literal_error":
        msg = "must be " + msg.removeprefix("Input should be ")
    shown = repr(given)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{key}: {msg} (given: {shown})"


def _read(p: Path) -> dict[str, Any]:
    """The file's tree: TOML (``.toml``) or YAML (anything else), the same tree either way."""
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from exc
    if p.suffix.lower() == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (ssh:, auth:, sandbox:, ...)")
    return loaded


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Load settings from a TOML (``.toml``) or YAML file (or defaults when ``path`` is None), applying
    ``overrides``. The Architecture seed's ``[global]`` and ``[[service]]`` are mapped (config/services.py)."""
    data: dict[str, Any] = {}
    where = f" in {path}" if path else ""
    if path is not None:
        data = _read(Path(path))
    if overrides:
        data = merge(data, overrides)
    where = f" in {path}" if path else ""
    sandbox = data.get("sandbox")
    moved = [k for k in MOVED_NETWORK_KEYS if isinstance(sandbox, dict) and k.split(".", 1)[1] in sandbox]
    if moved:
        lines = [
            f"{k}: moved to {MOVED_NETWORK_KEYS[k]}; write it as `{MOVED_NETWORK_KEYS[k].split('.')[1]}:` in a "
            "top-level `network:` section (README Network)"
            for k in moved
        ]
        raise ConfigError(f"invalid configuration{where}:\n  " + "\n  ".join(lines))
    try:
        data = map_seed_keys(data)
    except ValueError as exc:
        raise ConfigError(f"invalid configuration{where}:\n  {exc}") from None
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"invalid configuration{where}:\n  " + "\n  ".join(lines)) from None


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def settings_as_yaml(settings: Settings) -> str:
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False, default_flow_style=False)
