"""`sandtrap doctor`: is this machine ready to run the honeypot? One row per check."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sandtrap.config import DockerSettings, ImageSettings, Settings, split_listen
from sandtrap.errors import SandtrapError
from sandtrap.sandbox.docker import engine, seccomp
from sandtrap.sandbox.docker.image import check_image
from sandtrap.sandbox.docker.mtls import EngineTLSFailed
from sandtrap.sandbox.host.cgroups import ParentCgroups
from sandtrap.sandbox.microvm import qemu, virtiofs
from sandtrap.sandbox.microvm.backend import MicroVMBackend
from sandtrap.sandbox.nspawn.image import find_tree, tree_inputs
from sandtrap.ssh.hostkeys import box_host_key_files, host_key_dir


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


async def run_checks(settings: Settings) -> list[Check]:
    checks = []
    if settings.sandbox.backend == "docker":
        docker = settings.sandbox.docker
        checks.append(await _engine(docker))
        checks.append(await _image(settings.image, docker))
        for name, tag, image in settings.persona_images():  # each persona's own image (extra_packages)
            checks.append(await _image(image, docker.model_copy(update={"image": tag}), f"persona {name} image"))
        checks.append(_seccomp(docker, settings.data_dir))
    if settings.sandbox.backend == "microvm":
        checks.extend(_microvm(settings))
        checks.append(await _engine(settings.sandbox.docker))  # `sandtrap image build` starts from the Docker base
    if settings.sandbox.backend == "nspawn":
        checks.extend(_nspawn(settings))
        checks.append(await _engine(settings.sandbox.docker))  # `sandtrap image build` unpacks the Docker image
    checks.append(_data_dir(settings))
    checks.append(_port("ssh port free", settings.ssh.listen))
    checks.append(_port("api port free", settings.api.listen))
    return checks


async def _engine(docker: DockerSettings) -> Check:
    try:
        async with engine.engine(docker) as client:
            v = await engine.call("version", client.version(), 5)
    except EngineTLSFailed as exc:  # names the sandbox.docker.tls_* key to fix
        return Check("docker engine", False, str(exc))
    except SandtrapError as exc:
        return Check("docker engine", False, f"{exc} (run 'make run' or start dockerd)")
    return Check("docker engine", True, f"{v.get('Version')} (API {v.get('ApiVersion')})")


async def _image(image: ImageSettings, docker: DockerSettings, name: str = "sandbox image") -> Check:
    tag = docker.image
    try:
        result = await check_image(image, tag, docker)
    except SandtrapError as exc:
        return Check(name, False, str(exc))
    if not result.present:
        return Check(name, False, f"{tag} missing: run 'sandtrap image build'")
    if not result.current:
        return Check(name, False, f"{tag} is out of date: run 'sandtrap image build'")
    return Check(name, True, f"{tag} current ({result.expected[:12]})")


def _seccomp(docker: DockerSettings, data_dir: Path) -> Check:
    setting = docker.seccomp_profile
    try:
        text = seccomp.resolve(setting, data_dir)
    except SandtrapError as exc:
        return Check("seccomp profile", False, str(exc))
    if text is None:
        return Check("seccomp profile", True, "the engine's own (io_uring allowed before Docker 25)")
    where = seccomp.find(data_dir) if setting == seccomp.SANDTRAP else setting
    return Check("seccomp profile", True, f"{setting}: {where}")


def _microvm(settings: Settings) -> list[Check]:
    vm = settings.sandbox.microvm
    checks = []
    for name, tool, package in (("qemu", vm.qemu, "qemu-system-x86"), ("qemu-img", "qemu-img", "qemu-utils")):
        where = shutil.which(tool)
        checks.append(Check(name, where is not None, where or f"{tool} missing: apt-get install {package}"))
    usable, why = qemu.probe_kvm()
    if usable:
        checks.append(Check("KVM", True, why))
    else:  # TCG works, slowly; only a forced accel: kvm makes this a failure
        checks.append(Check("KVM", vm.accel != "kvm", f"not usable: {why}; VMs run under TCG (software, slow)"))
    if vm.lure.enabled:  # the lure share: virtiofsd and /dev/fuse (the backend refuses to start without them)
        ok, why = virtiofs.usable(vm.lure)
        checks.append(Check("lure share", ok, why))
    else:
        checks.append(
            Check("lure share", True, "off (sandbox.microvm.lure.enabled: false): no honeytoken reads in VMs")
        )
    cache = Path(settings.image.cache_dir) if settings.image.cache_dir else settings.data_dir / "cache"
    keys = host_key_dir(settings.ssh.host_key_dir, settings.data_dir)
    planted = None
    if settings.sandbox.share_host_keys and (keys / "ssh_host_ed25519_key").exists():
        planted = box_host_key_files(keys, settings.sandbox.hostname)
    try:
        backend = MicroVMBackend(vm, settings.sandbox, settings.image, cache, settings.data_dir / "microvm", planted)
        image = backend.image()
    except SandtrapError as exc:
        checks.append(Check("VM image", False, str(exc)))
    else:
        checks.append(Check("VM image", True, f"{image.directory} (kernel {image.release}, {backend.accel.name})"))
    return checks


def _nspawn(settings: Settings) -> list[Check]:
    """What sandbox.backend: nspawn needs: root, systemd-nspawn, nsenter, overlayfs, cgroup v1 parents, the tree, and
    the tools of network.mode capture (internal is refused)."""
    ns = settings.sandbox.nspawn
    checks = [Check("running as root", os.geteuid() == 0, "mounts and namespaces need root")]
    for name, tool, package in (
        ("systemd-nspawn", ns.nspawn, "systemd-container"),
        ("nsenter", "nsenter", "util-linux"),
    ):
        where = shutil.which(tool)
        checks.append(Check(name, where is not None, where or f"{tool} missing: apt-get install {package}"))
    try:
        overlay = "overlay" in Path("/proc/filesystems").read_text()
    except OSError:
        overlay = False
    checks.append(Check("overlayfs", overlay, "in /proc/filesystems" if overlay else "not available: modprobe overlay"))
    why = ParentCgroups().available()
    checks.append(Check("box limits (cgroup v1)", not why, why or "memory, pids and cpu hierarchies writable"))
    if settings.sandbox.init == "systemd":  # its cgroups are handed over from the name=systemd v1 hierarchy
        hierarchy = Path("/sys/fs/cgroup/systemd")
        v1 = (hierarchy / "cgroup.procs").exists()
        checks.append(Check("init: systemd (name=systemd v1 hierarchy)", v1 and not why,
                            str(hierarchy) if v1 and not why else why or f"no cgroup v1 hierarchy at {hierarchy}: "
                            "boxes keep sandtrap's init (set sandbox.init: sandtrap)"))  # fmt: skip
    cache = Path(settings.image.cache_dir) if settings.image.cache_dir else settings.data_dir / "cache"
    inputs = tree_inputs(settings.image)
    tree = find_tree(cache, inputs)
    detail = str(tree) if tree else f"nspawn-{inputs[:16]} missing in {cache}: run 'sandtrap image build'"
    checks.append(Check("nspawn tree", tree is not None, detail))
    mode = settings.network.mode
    if mode == "internal":
        checks.append(Check("network.mode", False, "internal is Docker's engine network: set capture or none"))
    elif mode == "capture":  # the capture gateway's namespace and each box's veth (network/namespace.py)
        for tool in ("ip", "iptables"):
            where = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
            checks.append(Check(f"network.mode capture: {tool}", where is not None,
                                where or f"{tool} missing: apt-get install iproute2 iptables"))  # fmt: skip
    return checks


def _data_dir(settings: Settings) -> Check:
    path = settings.data_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check("data dir writable", False, f"{path}: {exc.strerror}")
    st = os.statvfs(path)
    free_mb = st.f_bavail * st.f_frsize // 2**20
    return Check("data dir writable", free_mb > 100, f"{path} ({free_mb} MiB free)")


def _port(name: str, listen: str) -> Check:
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        why = "in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        return Check(name, False, f"{listen}: {why}")
    return Check(name, True, listen)
