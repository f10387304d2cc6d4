"""All settings: one pydantic model per concern, defaults that run on a fresh machine.

The YAML file mirrors the tree of :class:`Settings`. A typo or a bad value becomes a
:class:`~sandtrap.errors.ConfigError` that names the key, what was given and what is allowed.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sandtrap.errors import ConfigError

# Debian bookworm's OpenSSH (the sandbox image's own sshd): the version string a scanner expects.
DEFAULT_SSH_VERSION = "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: Any) -> int:
    """Turn ``"256m"``, ``"1g"``, ``"512MiB"`` or an int into bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 256m, 1g or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_FACTORS[m.group(2).lower()])
    raise ValueError("expected a size such as 256m, 1g or a number of bytes")


ByteSize = Annotated[int, BeforeValidator(parse_size)]


def split_listen(value: str) -> tuple[str, int]:
    """Split ``"host:port"`` (IPv6 as ``"[::1]:22"``) into host and port."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
    if not m:
        raise ValueError("expected 'host:port' (IPv6 as '[::1]:2222')")
    host = m.group(1) if m.group(1) is not None else m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return host or "0.0.0.0", port


def _check_listen(value: str) -> str:
    split_listen(value)
    return value


Listen = Annotated[str, BeforeValidator(_check_listen)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True)


class SSHSettings(_Section):
    listen: Listen = "0.0.0.0:2222"
    version: str = DEFAULT_SSH_VERSION
    host_key_dir: str = Field("", description="default: <data_dir>/hostkeys")
    login_grace_time_s: float = Field(120.0, gt=0, description="OpenSSH LoginGraceTime")
    max_auth_tries: int = Field(6, ge=1, description="OpenSSH MaxAuthTries")
    advertised_port: int = Field(22, ge=1, le=65535, description="server port shown in SSH_CONNECTION")
    max_env_vars: int = Field(64, ge=0, description="client env requests kept per channel")

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not v.startswith("SSH-2.0-") or any(c in v for c in "\r\n"):
            raise ValueError("must start with 'SSH-2.0-' and be one line, e.g. " + DEFAULT_SSH_VERSION)
        return v


class Credential(_Section):
    username: str
    password: str = Field(description="'*' accepts any password for this username")


class AuthSettings(_Section):
    credentials: list[Credential] = Field(
        default_factory=lambda: [
            Credential(username="root", password="123456"),
            Credential(username="root", password="password"),
            Credential(username="admin", password="admin"),
        ]
    )
    accept_all_after: int = Field(3, ge=0, description="accept any password after N failures; 0 = never")
    remember_ip: bool = Field(False, description="count failures per source IP across connections")
    remember_ip_ttl_s: float = Field(3600.0, gt=0)
    accept_publickey: bool = False
    keyboard_interactive: bool = Field(False, description="offer keyboard-interactive (Debian's sshd does not)")
    # sshd with PAM: pam_unix delays a failure by 2 s (libpam varies it by up to 25%); a login is ~0.1 s.
    failure_delay_s: float = Field(2.0, ge=0, le=30, description="answer to a wrong password after this (±25%)")
    success_delay_s: float = Field(0.08, ge=0, le=5, description="answer to a right password after this (±25%)")


# The sandbox backends sandtrap knows; only these are built today (see app.BACKENDS).
BACKENDS = ("docker", "microvm", "nspawn")
AVAILABLE_BACKENDS = ("docker",)


class DockerSettings(_Section):
    """``sandbox.docker``: what only the Docker backend has (an engine, its image, a container's create body)."""

    docker_host: str = Field("", description="engine address; default: DOCKER_HOST or the local socket")
    image: str = Field("sandtrap-target:latest", description="the engine's tag of the box image (`sandtrap build`)")
    network_name: str = Field(
        "sandtrap-internal", description="with sandbox.network: internal: the engine network's name"
    )
    # Hardening (each item documented in README "Hardening").
    cap_add: list[str] = Field(
        default_factory=lambda: [
            "CHOWN",
            "DAC_OVERRIDE",
            "FOWNER",
            "FSETID",
            "KILL",
            "SETGID",
            "SETUID",
            "AUDIT_WRITE",
            "NET_BIND_SERVICE",  # sshd in the box listens on port 22 (its own network namespace)
            "SYS_CHROOT",  # ...and chroots its pre-auth child to /run/sshd (without it every connection dies)
        ]
    )
    no_new_privileges: bool = Field(
        False,
        description="true: setuid binaries cannot raise privileges (sudo then fails for users, a tell); inside "
        "the box that only keeps a user from the box's root, which any attacker can log in as",
    )
    seccomp_profile: str = Field(
        "sandtrap",
        description="'sandtrap' (Docker's default rules with io_uring refused, <data_dir>/seccomp/sandtrap.json, "
        "made by `make setup`), 'default' (the engine's own) or a path to a JSON profile",
    )
    read_only_root: bool = False
    writable: dict[str, ByteSize] = Field(
        default_factory=lambda: {
            "/etc": parse_size("16m"),
            "/root": parse_size("64m"),
            "/home": parse_size("64m"),
            "/var": parse_size("128m"),
            "/opt": parse_size("32m"),
            "/srv": parse_size("8m"),
            "/usr/local": parse_size("32m"),
        },
        description="with read_only_root: the places left writable, each a tmpfs of this size seeded from the "
        "image; every byte written there is charged to the box's memory",
    )
    tmpfs: dict[str, str] = Field(
        default_factory=lambda: {"/tmp": "rw,exec,nosuid,nodev,size=64m", "/run": "rw,nosuid,nodev,size=16m"}
    )
    ulimit_nofile: int = Field(1024, ge=16, description="open files: the soft limit every process starts with")
    ulimit_nofile_hard: int = Field(
        524288,
        ge=16,
        le=1048576,
        description="open files: the hard limit a process may raise its soft limit to (systemd's default); "
        "every descriptor is still charged to the box's memory cgroup",
    )
    ulimit_nproc: int = Field(512, ge=8)
    runtime: str = Field("", description="alternative OCI runtime, e.g. runsc; empty = engine default")
    # Realism (README "Realism"): what gives a container away, removed where the security cost is nil.
    cgroupns: Literal["private", "host"] = Field("private", description="private: /proc/self/cgroup shows '/'")
    limits_in_parent: bool = Field(
        True,
        description="memory/pids/CPU limits on a per-box parent cgroup, so the box's own (namespace root) cgroup "
        "reads unlimited as a real machine's does; needs cgroup v1 with the cgroupfs driver and the honeypot as "
        "root on the engine's host, else the limits stay on the container",
    )
    pin_cpus: bool = Field(
        True,
        description="pin each box to ceil(sandbox.cpus) CPUs, so nproc and /proc/cpuinfo count what its CPU quota "
        "gives",
    )
    mask_cgroupns: bool = Field(
        True,
        description="cgroup v1: a small tmpfs with the root's file names over /sys/fs/cgroup/systemd, whose "
        "namespace root lacks release_agent (how systemd-detect-virt spots a container)",
    )

    @field_validator("network_name")
    @classmethod
    def _network_name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}", v):
            raise ValueError("must be a Docker network name (letters, digits, '_', '.', '-'), e.g. sandtrap-internal")
        return v

    @field_validator("writable")
    @classmethod
    def _writable(cls, v: dict[str, int]) -> dict[str, int]:
        for path, size in v.items():
            if not re.fullmatch(r"(/[A-Za-z0-9_.-]+)+", path) or {".", ".."} & set(path.split("/")):
                raise ValueError(f"{path!r} is not an absolute directory such as /var")
            if size < 1024 * 1024:
                raise ValueError(f"{path}: a size below 1m leaves no room for the image's files")
        return v

    @field_validator("cap_add")
    @classmethod
    def _caps(cls, v: list[str]) -> list[str]:
        out = []
        for cap in v:
            name = cap.upper().removeprefix("CAP_")
            if not re.fullmatch(r"[A-Z_]+", name):
                raise ValueError(f"{cap!r} is not a capability name such as CHOWN or SETUID")
            if name in {"SYS_ADMIN", "SYS_MODULE", "SYS_RAWIO", "SYS_PTRACE", "SYS_BOOT", "ALL"}:
                raise ValueError(f"{name} would let an attacker escape the sandbox; remove it")
            out.append(name)
        return out

    @model_validator(mode="after")
    def _nofile(self) -> DockerSettings:
        if self.ulimit_nofile_hard < self.ulimit_nofile:
            raise ValueError("sandbox.docker.ulimit_nofile_hard must be at least sandbox.docker.ulimit_nofile")
        return self


# Keys of the flat ``sandbox`` section of earlier versions that now sit in ``sandbox.docker``.
MOVED_KEYS = {f"sandbox.{key}": f"sandbox.docker.{key}" for key in DockerSettings.model_fields}


class SandboxSettings(_Section):
    """``sandbox``: what every backend has (the pool, the box's name and limits, how logins reach it), and one
    section per backend with what only that backend has; ``backend`` picks the one used."""

    backend: Literal["docker", "microvm", "nspawn"] = Field(
        "docker", description="docker (microvm and nspawn are planned, not available yet)"
    )
    # The pool and who gets which box.
    pool_size: int = Field(3, ge=0, le=1000)
    max_sandboxes: int = Field(50, ge=1, description="global cap on live (running) sandboxes")
    affinity: Literal["session", "source_ip"] = "session"
    ip_ttl_s: float = Field(1800.0, gt=0)
    # Forensics retention of released (stopped) sandboxes.
    retention_keep: int = Field(20, ge=0, description="keep at most K stopped sandboxes")
    retention_hours: float = Field(72.0, ge=0, description="remove stopped sandboxes older than this")
    # The box: its name and the limits every backend enforces.
    hostname: str = "web-prod-03"
    domain: str = "corp.internal"
    memory: ByteSize = parse_size("256m")
    memory_swap: ByteSize = Field(0, description="0 = same as memory (no swap)")
    cpus: float = Field(0.5, gt=0, le=64)
    pids_limit: int = Field(128, ge=8)
    start_timeout_s: float = Field(30.0, gt=0)
    # The box's network (a top-level `network:` section later: the capture gateway's, issue 12).
    network: Literal["none", "internal"] = Field(
        "none",
        description="none: only lo; internal: an eth0 with an address and a default route on a network with no "
        "way out (README Network)",
    )
    network_subnet: str = Field("10.20.1.0/24", description="with network: internal: its subnet (gateway: .1)")
    # How the box boots and how a login reaches it.
    init: Literal["sandtrap", "systemd"] = Field(
        "sandtrap",
        description="the box's PID 1: sandtrap = our small init starts rsyslog, cron, nginx and the listener; systemd "
        "= it does the same boot work, then the host gives the box its own name=systemd cgroups and it becomes "
        "/lib/systemd/systemd, which starts them as units (the listener as ssh.service) and answers systemctl "
        "(adds CAP_SETPCAP, which units need to shrink their bounding set; needs cgroup v1, a private cgroup "
        "namespace, mask_cgroupns and the honeypot as root on the engine's host, else boxes keep sandtrap's init)",
    )
    session_transport: Literal["exec", "init"] = Field(
        "init",
        description="how a login's processes start: exec = by the backend (`docker exec`: parent pid 0 in the box); "
        "init = the box's sshd-titled listener (forked by its PID 1) starts them and hands their pty or pipes to the "
        "honeypot (needs the honeypot as root on the engine's host; any failure falls back to exec)",
    )
    connection_in_box: bool = Field(
        True,
        description="with session_transport init: each login's TCP connection shows in the box (`ss -tnp`: :22, "
        "the client's address and port, held by sshd): the honeypot connects to the box's :22 from the client's "
        "address (inside the box for a loopback client; else, with network internal, by a transparent socket on "
        'the host and three host rules that deliver the replies, README "Network")',
    )
    # What the host lends every box.
    share_host_keys: bool = Field(
        True,
        description="the box's /etc/ssh holds the sensor's host keys, so the key the client saw is the box's own "
        "sshd's (an attacker who is root in the box can read them, as on any server)",
    )
    honeytokens: bool = Field(True, description="plant lure credentials unique to each box; record reads")
    lxcfs_dir: str = Field(
        "/var/lib/lxcfs",
        description="lxcfs mount: /proc/meminfo etc. as the box's limits show them (boxes sharing the host's "
        "kernel); '' = off",
    )
    loadavg_dir: str = Field(
        "/var/lib/sandtrap-loadavg",
        description="mount of `sandtrap loadavgfs`: each box's /proc/loadavg counts its own tasks, load and newest "
        "pid (started by the set-up); '' = off, and when it is not mounted there boxes get lxcfs's loadavg",
    )
    # One section per backend.
    docker: DockerSettings = DockerSettings()

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in AVAILABLE_BACKENDS:
            raise ValueError(
                f"the {v} backend is not available yet (planned); this version has only "
                + ", ".join(AVAILABLE_BACKENDS)
                + ": set sandbox.backend: docker"
            )
        return v

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        if not re.fullmatch(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?", v):
            raise ValueError("must be a single DNS label (letters, digits, '-'), e.g. web-prod-03")
        return v

    @field_validator("lxcfs_dir", "loadavg_dir")
    @classmethod
    def _mount_dir(cls, v: str) -> str:
        if v and (not v.startswith("/") or ":" in v or "," in v or v.rstrip("/") == ""):
            raise ValueError(
                "must be an absolute directory path without ':' or ',' (or '' for off), e.g. /var/lib/sandtrap-loadavg"
            )
        return v.rstrip("/")

    @field_validator("network_subnet")
    @classmethod
    def _network_subnet(cls, v: str) -> str:
        try:
            net = ipaddress.IPv4Network(v)
        except ValueError as exc:
            raise ValueError(f"{v!r} is not an IPv4 subnet such as 10.20.1.0/24 ({exc})") from None
        if not net.is_private or net.prefixlen > 29:
            raise ValueError(f"{v!r}: use a private subnet of /29 or larger, e.g. 10.20.1.0/24")
        return str(net)

    @model_validator(mode="after")
    def _swap(self) -> SandboxSettings:
        if self.memory_swap and self.memory_swap < self.memory:
            raise ValueError("sandbox.memory_swap must be 0 (no swap) or at least sandbox.memory")
        return self


class ImageSettings(_Section):
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    packages: list[str] = Field(
        default_factory=lambda: [
            "bash",
            "coreutils",
            "procps",
            "iproute2",
            "less",
            "vim-tiny",
            "curl",
            "wget",
            "netcat-openbsd",
            "python3",
            "openssh-client",
            "openssh-sftp-server",
            "openssh-server",
            "file",
            "sudo",
            "ca-certificates",
            "iputils-ping",
            "cron",
            "rsyslog",
            "net-tools",
            "psmisc",
            "lsof",
            "nano",
            "gzip",
            "bzip2",
            "xz-utils",
            "unzip",
            "git",
            "htop",
            "dnsutils",
            "lsb-release",
            "man-db",
            "bash-completion",
            # PID 1 of `sandbox.init: systemd` (with `init: sandtrap` they stay installed but idle, as on a box
            # whose init is ours: pam_systemd does nothing without logind).
            "systemd",
            "systemd-sysv",
            "dbus",
            "libpam-systemd",
            # Debian's "important" and "standard" priorities, as a server installed from the netinst has them
            # (not udev: no devices to manage), and the web role the lived-in story tells of.
            "apt-utils",
            "cpio",
            "debconf-i18n",
            "dmidecode",
            "fdisk",
            "ifupdown",
            "isc-dhcp-client",
            "kmod",
            "logrotate",
            "nftables",
            "sensible-utils",
            "tasksel",
            "whiptail",
            "apt-listchanges",
            "bind9-host",
            "debian-faq",
            "doc-debian",
            "krb5-locales",
            "libc-l10n",
            "locales",
            "manpages",
            "ncurses-term",
            "pciutils",
            "reportbug",
            "telnet",
            "traceroute",
            "wamerican",
            "tzdata",
            "rsync",
            "openssl",
            "unattended-upgrades",
            "nginx-light",
            "python3-flask",
            "gunicorn",
            "mariadb-client",
            "info",
            "bsdextrautils",
            "sysstat",
            "screen",
            "tmux",
            "strace",
            "tcpdump",
            "ethtool",
            "iptables",
        ]
    )
    extra_packages: list[str] = Field(default_factory=list)
    cache_dir: str = Field("", description="default: <data_dir>/cache")

    @field_validator("packages", "extra_packages")
    @classmethod
    def _pkgs(cls, v: list[str]) -> list[str]:
        for p in v:
            if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", p):
                raise ValueError(f"{p!r} is not a Debian package name")
        return v


class LimitsSettings(_Section):
    max_sessions: int = Field(100, ge=1, description="concurrent connections overall")
    max_sessions_per_ip: int = Field(5, ge=1, description="concurrent connections per source IP")
    idle_timeout_s: float = Field(600.0, gt=0, description="no input or output for this long ends the session")
    max_duration_s: float = Field(3600.0, gt=0, description="a session ends after this long")
    max_bytes_in: ByteSize = Field(parse_size("256m"), description="bytes from the attacker per session")
    max_bytes_out: ByteSize = Field(parse_size("1g"), description="bytes to the attacker per session")


class StorageSettings(_Section):
    data_dir: str = "./data"
    database_url: str = Field("", description="default: sqlite:///<data_dir>/sandtrap.db")
    buffer_events: int = Field(100_000, ge=100, description="events held in memory while the database is down")


class RecordingSettings(_Section):
    jsonlog: bool = True
    jsonlog_rotate_bytes: ByteSize = parse_size("100m")
    jsonlog_rotate_daily: bool = True
    casts: bool = True
    cast_flush_interval_s: float = Field(0.5, gt=0, le=1.0, description="SIGKILL loses at most this much")
    max_cast_bytes: ByteSize = Field(parse_size("64m"), description="per channel; later output is counted only")
    artifact_max_file_bytes: ByteSize = parse_size("20m")
    artifact_max_session_bytes: ByteSize = parse_size("100m")
    artifact_max_total_bytes: ByteSize = parse_size("5g")
    changed_metadata_only: list[str] = Field(
        default_factory=lambda: [
            "/var/log/auth.log",
            "/var/log/syslog",
            "/var/log/wtmp",
            "/var/log/btmp",
            "/var/log/lastlog",
            "/run/utmp",
            "/run/crond.pid",
            "/run/crond.reboot",
            "/etc/shadow-",
            "/etc/passwd-",
            "/etc/group-",
            "/etc/gshadow-",
        ],
        description="changed files reported without storing their content (written by every login)",
    )


class APISettings(_Section):
    listen: Listen = "127.0.0.1:8080"
    token: str = ""


class Settings(_Section):
    sensor: str = Field(default_factory=socket.gethostname)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    ssh: SSHSettings = SSHSettings()
    auth: AuthSettings = AuthSettings()
    sandbox: SandboxSettings = SandboxSettings()
    image: ImageSettings = ImageSettings()
    limits: LimitsSettings = LimitsSettings()
    recording: RecordingSettings = RecordingSettings()
    storage: StorageSettings = StorageSettings()
    api: APISettings = APISettings()

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir).expanduser().resolve()

    @property
    def database_url(self) -> str:
        return self.storage.database_url or f"sqlite:///{self.data_dir / 'sandtrap.db'}"

    def api_is_loopback(self) -> bool:
        host, _ = split_listen(self.api.listen)
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def _describe(err: Any) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        if key in MOVED_KEYS:
            new, name = MOVED_KEYS[key], key.rsplit(".", 1)[1]
            return f"{key}: moved to {new}; write it as `{name}:` in a `docker:` section inside `sandbox:`"
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


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Load settings from a YAML file (or defaults when ``path`` is None), applying ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (ssh:, auth:, sandbox:, ...)")
        data = loaded
    if overrides:
        data = merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
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
