"""What the engine proxy lets through: the routes, the request-head parser and the body checks.

Pure (no I/O): :mod:`sandtrap.sandbox.docker.proxy` does the sockets. The routes are exactly the calls
:class:`~sandtrap.sandbox.docker.DockerBackend` (pool, bridge, retention) and the image check make.
The body checks are an allow-list too: a key the policy does not know is refused, so an engine
upgrade that adds a dangerous field cannot slip through. The engine decodes JSON keys without regard
to case (Go's ``encoding/json``), so keys are compared that way and case variants of one key refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import parse_qs

from sandtrap.config import DockerSettings, SandboxSettings
from sandtrap.sandbox.docker.spec import LABEL_MANAGED, LABEL_SENSOR

MAX_HEAD = 32 * 1024  # request line and headers
MAX_HEADERS = 64
MAX_BODY = 1024 * 1024  # a create body with a custom seccomp profile is ~30 KiB

Scope = Literal["none", "list", "image", "container", "exec", "network"]


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    name: str
    scope: Scope = "none"
    body: Literal["none", "create", "exec", "network"] = "none"
    upgrade: bool = False


def _route(method: str, path: str, name: str, **kw: Any) -> Route:
    ident = r"(?P<ident>[A-Za-z0-9][A-Za-z0-9_.-]{0,127})"
    image = r"(?P<ident>[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,255})"
    return Route(method, re.compile(path.replace("{id}", ident).replace("{image}", image)), name, **kw)


ROUTES: tuple[Route, ...] = (
    _route("GET", "/version", "engine version"),
    _route("GET", "/_ping", "engine ping"),  # not used by sandtrap; lets an operator's docker CLI negotiate
    _route("HEAD", "/_ping", "engine ping"),
    _route("GET", "/images/{image}/json", "image inspect", scope="image"),
    _route("GET", "/containers/json", "container list", scope="list"),
    _route("POST", "/containers/create", "container create", body="create"),
    _route("GET", "/networks/{id}", "network inspect", scope="network"),  # only sandbox.docker.network_name
    _route("POST", "/networks/create", "network create", body="network"),  # only an internal one, checked
    _route("GET", "/containers/{id}/json", "container inspect", scope="container"),
    _route("POST", "/containers/{id}/start", "container start", scope="container"),
    _route("POST", "/containers/{id}/stop", "container stop", scope="container"),
    _route("POST", "/containers/{id}/rename", "container rename", scope="container"),
    _route("DELETE", "/containers/{id}", "container remove", scope="container"),
    _route("GET", "/containers/{id}/changes", "container changes", scope="container"),
    _route("GET", "/containers/{id}/archive", "archive get", scope="container"),
    _route("HEAD", "/containers/{id}/archive", "archive stat", scope="container"),
    _route("PUT", "/containers/{id}/archive", "archive put", scope="container"),
    _route("POST", "/containers/{id}/exec", "exec create", scope="container", body="exec"),
    _route("POST", "/exec/{id}/start", "exec start", scope="exec", upgrade=True),
    _route("POST", "/exec/{id}/resize", "exec resize", scope="exec"),
    _route("GET", "/exec/{id}/json", "exec inspect", scope="exec"),
)

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PATH = re.compile(r"/[A-Za-z0-9._:@/-]*")  # no percent-escapes: nothing to decode differently from the engine
_QUERY = re.compile(r"[\x21-\x7e]*")
_VALUE = re.compile(r"[\x20-\x7e\t]*")
_VERSION_PREFIX = re.compile(r"/v[0-9]+(?:\.[0-9]+)?(?=/)")


@dataclass
class Request:
    method: str
    target: str
    version: str
    prefix: str  # "/v1.41" or ""
    path: str  # without prefix and query
    query: str
    headers: list[tuple[str, str]]
    ident: str = ""
    ident_span: tuple[int, int] = (0, 0)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def params(self) -> dict[str, list[str]]:
        try:
            return parse_qs(self.query, keep_blank_values=True, max_num_fields=64)
        except ValueError as exc:
            raise Refused(400, f"bad query string: {exc}") from None

    def target_with(self, ident: str) -> str:
        """The target with the matched id replaced (by the full id the look-up resolved)."""
        start, end = self.ident_span
        path = self.path[:start] + ident + self.path[end:]
        return self.prefix + path + (f"?{self.query}" if self.query else "")


def parse_head(head: bytes) -> Request:
    """A strict HTTP/1.x request head: anything the engine might read differently is a 400."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise Refused(400, "request head is not ASCII") from None
    lines = text.removesuffix("\r\n\r\n").split("\r\n")
    if any("\r" in line or "\n" in line for line in lines):
        raise Refused(400, "bare CR or LF in request head")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise Refused(400, "malformed request line")
    method, target, version = parts
    if len(lines) - 1 > MAX_HEADERS:
        raise Refused(431, f"more than {MAX_HEADERS} headers")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            raise Refused(400, "malformed header line")
        headers.append((name, value.strip(" \t")))
    names = [n.lower() for n, _ in headers]
    if names.count("content-length") > 1 or names.count("transfer-encoding") > 1:
        raise Refused(400, "repeated Content-Length or Transfer-Encoding")
    if "content-length" in names and "transfer-encoding" in names:
        raise Refused(400, "both Content-Length and Transfer-Encoding")
    if "expect" in names:
        raise Refused(400, "Expect is not supported by the engine proxy")
    req_path, _, query = target.partition("?")
    if not _PATH.fullmatch(req_path) or not _QUERY.fullmatch(query) or "#" in query:
        raise Refused(400, "request target has characters the engine proxy does not pass on")
    segments = req_path.split("/")[1:]
    if any(seg in ("", ".", "..") for seg in segments[:-1]) or segments[-1] in (".", ".."):
        raise Refused(400, "request path is not in canonical form")
    m = _VERSION_PREFIX.match(req_path)
    prefix = m.group(0) if m else ""
    req = Request(method, target, version, prefix, req_path[len(prefix) :], query, headers)
    length = req.header("content-length")
    if length is not None and not length.isdigit():
        raise Refused(400, "bad Content-Length")
    encoding = req.header("transfer-encoding")
    if encoding is not None and encoding.lower() != "chunked":
        raise Refused(400, "only chunked Transfer-Encoding is supported")
    return req


def match(req: Request) -> Route:
    """The route for ``req`` (and its id captured), or 403: the call is not one the honeypot makes."""
    for route in ROUTES:
        if route.method != req.method:
            continue
        m = route.pattern.fullmatch(req.path)
        if m:
            if "ident" in m.groupdict():
                req.ident, req.ident_span = m.group("ident"), m.span("ident")
            return route
    raise Refused(403, f"{req.method} {req.path} is not an engine call sandtrap makes; the engine proxy refuses it")


@dataclass(frozen=True)
class Policy:
    sensor: str = ""  # "" = no label scoping
    images: frozenset[str] = frozenset()  # empty = any image
    cap_add: frozenset[str] = field(default_factory=lambda: frozenset(DockerSettings().cap_add))
    lxcfs_dir: str = ""
    loadavg_dir: str = ""
    host_cgroupns: bool = False
    # Upper bounds on what a create may ask for (0 = no bound): a taken-over honeypot cannot hand a
    # sandbox the host's memory, CPUs or pid space.
    max_memory: int = 0
    max_nano_cpus: int = 0
    max_pids: int = 0
    network: str = ""  # the internal network boxes may join ("" = none: `network: none`)
    network_subnet: str = ""

    @classmethod
    def from_settings(cls, d: DockerSettings, s: SandboxSettings, sensor: str) -> Policy:
        """What the honeypot with these settings asks of the engine: ``d`` is ``sandbox.docker``, ``s`` the
        ``sandbox`` section (the limits and /proc views every box gets), ``sensor`` the top-level name."""
        return cls(
            sensor=sensor,
            images=frozenset({d.image}),
            cap_add=frozenset(d.cap_add),
            lxcfs_dir=s.lxcfs_dir.rstrip("/"),
            loadavg_dir=s.loadavg_dir.rstrip("/"),
            host_cgroupns=d.cgroupns == "host",
            max_memory=max(s.memory, s.memory_swap),
            max_nano_cpus=int(s.cpus * 1e9),
            max_pids=s.pids_limit,
            network=d.network_name if s.network == "internal" else "",
            network_subnet=s.network_subnet if s.network == "internal" else "",
        )

    def with_sensor(self, sensor: str) -> Policy:
        return replace(self, sensor=sensor)

    def with_images(self, images: Iterable[str]) -> Policy:
        return replace(self, images=frozenset(images))

    def owns(self, labels: Mapping[str, Any]) -> bool:
        return labels.get(LABEL_MANAGED) == "true" and labels.get(LABEL_SENSOR) == self.sensor


# -- bodies -------------------------------------------------------------------------------------------
_CREATE_KEYS = {
    "Hostname", "Domainname", "User", "AttachStdin", "AttachStdout", "AttachStderr", "Tty", "OpenStdin",
    "StdinOnce", "Env", "Cmd", "Entrypoint", "Image", "Labels", "Volumes", "WorkingDir", "NetworkDisabled",
    "StopSignal", "StopTimeout", "HostConfig", "NetworkingConfig",
}  # fmt: skip
_HOST_KEYS = {
    "NetworkMode", "Memory", "MemorySwap", "MemoryReservation", "NanoCpus", "CpuShares", "CpuPeriod", "CpuQuota",
    "PidsLimit", "CapDrop", "CapAdd", "SecurityOpt", "Privileged", "ReadonlyRootfs", "Tmpfs", "Ulimits",
    "IpcMode", "ShmSize", "OomScoreAdj", "Init", "AutoRemove", "RestartPolicy", "LogConfig", "Binds", "Mounts",
    "Devices", "DeviceRequests", "DeviceCgroupRules", "Runtime", "CgroupnsMode", "PidMode", "UTSMode",
    "UsernsMode", "CgroupParent", "VolumesFrom", "Links", "Dns", "DnsOptions", "DnsSearch", "ExtraHosts", "GroupAdd",
    "ConsoleSize", "MemorySwappiness", "CpusetCpus",
}  # fmt: skip
_MOUNT_KEYS = {"Type", "Source", "Target", "ReadOnly", "Consistency", "BindOptions", "VolumeOptions", "TmpfsOptions"}
_EXEC_KEYS = {
    "Container", "Privileged", "Tty", "AttachStdin", "AttachStdout", "AttachStderr", "Cmd", "Env", "WorkingDir",
    "DetachKeys", "User", "ConsoleSize",
}  # fmt: skip
# Not null, even empty, these change the default (an empty MaskedPaths unmasks /proc/kcore...).
_EMPTY_MEANS_NONE = {"maskedpaths", "readonlypaths"}
_MUST_BE_EMPTY = ("Devices", "DeviceRequests", "DeviceCgroupRules", "VolumesFrom", "Links", "CgroupParent")


def _no_case_twins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen = [k.lower() for k, _ in pairs]
    if len(set(seen)) != len(seen):
        raise Refused(403, "a JSON key appears twice (the engine ignores case in keys)")
    return dict(pairs)


def _load(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body, object_pairs_hook=_no_case_twins)
    except (ValueError, RecursionError):
        raise Refused(400, "request body is not JSON") from None
    if not isinstance(data, dict):
        raise Refused(400, "request body is not a JSON object")
    return data


def _fields(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    """``obj``'s keys in their canonical spelling; a key outside ``allowed`` is refused unless it is
    empty (clients such as the docker CLI send every field, most of them null)."""
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise Refused(403, f"{where} must be an object")
    canonical = {k.lower(): k for k in allowed}
    out = {}
    for key, value in obj.items():
        if key.lower() in canonical:
            out[canonical[key.lower()]] = value
        elif key.lower() in _EMPTY_MEANS_NONE and value is not None:
            raise Refused(403, f"{where}{key} is refused: it would unmask /proc and /sys paths")
        elif value not in (None, "", False, 0, [], {}):
            raise Refused(403, f"{where}{key} is not allowed through the engine proxy")
    return out


def _cap(name: Any) -> str:
    return str(name).upper().removeprefix("CAP_")


def check_create(body: bytes, policy: Policy) -> None:
    """Refuse a container that would be weaker than create_config makes it, or not ours."""
    config = _fields(_load(body), _CREATE_KEYS, "")
    if policy.images and config.get("Image") not in policy.images:
        raise Refused(403, f"image {config.get('Image')!r} is not the sandbox image")
    if policy.sensor and not policy.owns(config.get("Labels") or {}):
        raise Refused(403, f"a container must carry the labels {LABEL_MANAGED}=true and {LABEL_SENSOR}={policy.sensor}")
    allowed_networks = {"none", policy.network} - {""}
    endpoints = _fields(config.get("NetworkingConfig"), {"EndpointsConfig"}, "NetworkingConfig.").get("EndpointsConfig")
    if endpoints and (not isinstance(endpoints, dict) or not set(endpoints) <= allowed_networks):
        raise Refused(403, "NetworkingConfig is refused: a sandbox joins no network but the internal one")
    host = _fields(config.get("HostConfig"), _HOST_KEYS, "HostConfig.")
    if host.get("Privileged"):
        raise Refused(403, "a privileged container is refused")
    if host.get("NetworkMode") not in allowed_networks:
        raise Refused(
            403, f"NetworkMode {host.get('NetworkMode')!r} is refused: only {' or '.join(sorted(allowed_networks))}"
        )
    for key in ("PidMode", "UTSMode", "UsernsMode"):
        if host.get(key):
            raise Refused(403, f"{key} {host[key]!r} is refused: the sandbox keeps its own namespace")
    if host.get("IpcMode") not in (None, "", "private", "none"):
        raise Refused(403, f"IpcMode {host['IpcMode']!r} is refused")
    if host.get("CgroupnsMode") not in (None, "", "private") and not (
        policy.host_cgroupns and host.get("CgroupnsMode") == "host"
    ):
        raise Refused(403, f"CgroupnsMode {host['CgroupnsMode']!r} is refused")
    for key in _MUST_BE_EMPTY:
        if host.get(key):
            raise Refused(403, f"HostConfig.{key} is refused")
    if "ALL" not in {_cap(c) for c in host.get("CapDrop") or []}:
        raise Refused(403, "CapDrop must contain ALL")
    extra = {_cap(c) for c in host.get("CapAdd") or []} - policy.cap_add
    if extra:
        raise Refused(403, f"CapAdd {', '.join(sorted(extra))} is outside the configured set")
    for opt in host.get("SecurityOpt") or []:
        _check_security_opt(opt)
    for bind in host.get("Binds") or []:
        _check_bind(bind, policy)
    for mount in host.get("Mounts") or []:
        _check_mount(mount)
    for key, bound in (
        ("Memory", policy.max_memory),
        ("MemorySwap", policy.max_memory),
        ("NanoCpus", policy.max_nano_cpus),
        ("PidsLimit", policy.max_pids),
    ):
        value = host.get(key)
        if not isinstance(value, int) or value <= 0:
            raise Refused(403, f"HostConfig.{key} must be a positive limit")
        if bound and value > bound:
            raise Refused(403, f"HostConfig.{key} {value} is above the configured {bound}")
    if (_fields(host.get("LogConfig"), {"Type", "Config"}, "LogConfig.").get("Type")) != "none":
        raise Refused(403, "LogConfig.Type must be 'none' (a log driver could send data off the host)")
    if _fields(host.get("RestartPolicy"), {"Name", "MaximumRetryCount"}, "RestartPolicy.").get("Name") not in (
        None,
        "",
        "no",
    ):
        raise Refused(403, "RestartPolicy must be 'no'")


def _check_security_opt(opt: Any) -> None:
    text = str(opt)
    lower = text.lower()
    if "unconfined" in lower or lower in ("label=disable", "label:disable"):
        raise Refused(403, f"SecurityOpt {text[:40]!r} is refused")
    if lower.startswith(("no-new-privileges", "apparmor=", "apparmor:")):
        return
    if lower.startswith(("seccomp=", "seccomp:")):
        try:
            profile = json.loads(text[8:])
        except ValueError:
            raise Refused(403, "a seccomp option must carry a JSON profile") from None
        action = profile.get("defaultAction") if isinstance(profile, dict) else None
        if action in (None, "SCMP_ACT_ALLOW", "SCMP_ACT_LOG"):
            raise Refused(403, f"a seccomp profile with defaultAction {action} is refused")
        return
    raise Refused(403, f"SecurityOpt {text[:40]!r} is refused")


def _check_bind(bind: Any, policy: Policy) -> None:
    """Only lxcfs's /proc views and our /proc/loadavg, read-only (create_config's proc_binds); nothing else
    of the host."""
    parts = str(bind).split(":")
    ok = (
        len(parts) == 3
        and parts[2] == "ro"
        and re.fullmatch(r"/proc/[a-z]+", parts[1]) is not None
        and (
            (bool(policy.lxcfs_dir) and parts[0] == policy.lxcfs_dir + parts[1])
            or (bool(policy.loadavg_dir) and parts[1] == "/proc/loadavg" and parts[0] == policy.loadavg_dir + parts[1])
        )
    )
    if not ok:
        raise Refused(403, f"bind mount {parts[0]!r} is refused: nothing of the host goes into a sandbox")


def _check_mount(mount: Any) -> None:
    m = _fields(mount, _MOUNT_KEYS, "Mounts.")
    kind = m.get("Type")
    if kind not in ("volume", "tmpfs") or m.get("Source") or m.get("BindOptions"):
        raise Refused(
            403, f"mount of type {kind!r} from {m.get('Source')!r} is refused: anonymous volumes and tmpfs only"
        )
    options = _fields(m.get("VolumeOptions"), {"NoCopy", "Labels", "DriverConfig"}, "VolumeOptions.")
    driver = _fields(options.get("DriverConfig"), {"Name", "Options"}, "DriverConfig.")
    if driver.get("Name") not in (None, "", "local"):
        raise Refused(403, "a volume driver other than 'local' is refused")
    opts = driver.get("Options") or {}
    if opts and not (
        isinstance(opts, dict)
        and set(opts) <= {"type", "device", "o"}
        and opts.get("type") == "tmpfs"
        and opts.get("device") == "tmpfs"
        and not {"bind", "rbind"} & set(str(opts.get("o", "")).split(","))
    ):
        raise Refused(403, "local volume options other than a sized tmpfs are refused (they can bind host paths)")


def check_network_create(body: bytes, policy: Policy) -> None:
    """Only the configured internal network, exactly as sandtrap creates it (no NAT, no ICC, no IPv6)."""
    config = _load(body)
    if not policy.network or config.get("Name") != policy.network:
        raise Refused(403, f"network {config.get('Name')!r} is not the sandbox network; the engine proxy refuses it")
    options = config.get("Options") or {}
    subnets = [c.get("Subnet") for c in (config.get("IPAM") or {}).get("Config") or [] if isinstance(c, dict)]
    if (
        config.get("Internal") is not True
        or config.get("EnableIPv6")
        or config.get("Driver") not in (None, "", "bridge")
        or not isinstance(options, dict)
        or options.get("com.docker.network.bridge.enable_icc") != "false"
        or options.get("com.docker.network.bridge.enable_ip_masquerade") != "false"
        or subnets != [policy.network_subnet]
    ):
        raise Refused(403, "a network must be internal, bridge, without IPv6, ICC or masquerading, on the subnet")


def check_exec(body: bytes, policy: Policy) -> None:
    if _fields(_load(body), _EXEC_KEYS, "").get("Privileged"):
        raise Refused(403, "a privileged exec is refused")


def check_list(req: Request, policy: Policy) -> None:
    """A container list must be filtered to this sensor's label: no other container is shown."""
    if not policy.sensor:
        return
    raw = req.params().get("filters", ["{}"])[-1]
    try:
        filters = json.loads(raw)
    except ValueError:
        raise Refused(400, "filters is not JSON") from None
    labels = filters.get("label") if isinstance(filters, dict) else None
    if isinstance(labels, dict):
        labels = [k for k, v in labels.items() if v]
    if f"{LABEL_SENSOR}={policy.sensor}" not in (labels or []):
        raise Refused(403, f"a container list must filter on label {LABEL_SENSOR}={policy.sensor}")
