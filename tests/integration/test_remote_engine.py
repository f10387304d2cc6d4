"""Sandboxes on a remote Docker engine over mutual TLS (issue 20, part 3): ``sandbox.docker.docker_host:
tcp://127.0.0.1:PORT`` with ``tls_ca``, ``tls_cert`` and ``tls_key``.

The test starts a second ``dockerd`` of its own: TLS on a free loopback port (``--tlsverify``, certificates it makes
with ``cryptography``), its own unix socket, data root, exec root, pid file and containerd namespace, no bridge and
no iptables rules (the main engine's networks and the host's firewall stay as they are). The sandbox image is copied
into it from the main engine (``docker save | docker load``). Everything is stopped and removed at the end, also
when a test fails. It needs root (dockerd); without it the tests skip.

The honeypot treats the engine as remote although it runs on this host: a ``tcp://`` engine is never read on this
host (no host views, no disk watch, logins by ``docker exec``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sandtrap.config import SandboxSettings
from sandtrap.errors import SandboxError
from sandtrap.events import SANDBOX_ASSIGNED, SESSION_CLOSED, SESSION_FILE_CHANGED
from sandtrap.sandbox.base import SandboxBackend
from sandtrap.sandbox.docker.backend import DockerBackend
from sandtrap.sandbox.docker.spec import LABEL_SENSOR
from tls_pki import EnginePKI, make_pki

from sandbox_suite import *  # noqa: F403  (the conformance suite, on the remote engine: make_backend below)
from sandbox_suite import MakeBackend
from sshclient import free_port, run, ssh_argv

pytestmark = [
    pytest.mark.timeout(420),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("dockerd"), reason="a second dockerd needs root"),
]


@dataclass
class TLSEngine:
    root: Path
    port: int
    pki: EnginePKI
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def tcp(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def docker(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """The docker CLI against our engine's own unix socket (the test's back door, not the honeypot's way)."""
        argv = ["docker", "-H", f"unix://{self.socket}", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)

    def docker_tls(
        self, *args: str, cert: Path | None = None, key: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """The docker CLI over the engine's TLS port, as a remote client."""
        tls = ["--tlsverify", f"--tlscacert={self.pki.ca}", f"--tlscert={cert or self.pki.client.cert}"]
        argv = ["docker", "-H", self.tcp, *tls, f"--tlskey={key or self.pki.client.key}", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    def log(self) -> str:
        return (self.root / "dockerd.log").read_text(errors="replace")[-3000:]

    def settings(self, **docker: Any) -> dict[str, Any]:
        """``sandbox.docker`` for a honeypot on this engine (``docker`` replaces any key)."""
        return {
            "docker_host": self.tcp,
            "tls_ca": str(self.pki.ca),
            "tls_cert": str(self.pki.client.cert),
            "tls_key": str(self.pki.client.key),
            "disk_quota": 0,  # a remote engine's writable layers cannot be measured here (the config refuses it)
            **docker,
        }


def _main_engine_answers() -> bool:
    done = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, timeout=30)
    return done.returncode == 0 and bool(done.stdout.strip())


def _start(root: Path, pki: EnginePKI, listener: socket.socket) -> subprocess.Popen[bytes]:
    """Our dockerd in a network namespace of its own (``unshare --net``), so nothing it does to networks reaches
    the host's: with ``--bridge=none`` dockerd deletes the ``docker0`` of its namespace, which on the host's
    would be the main engine's. Its TLS port is ``listener``, a socket on the host's loopback handed over as
    systemd does (``-H fd://``, ``LISTEN_FDS``): clients on the host reach it, nothing else of the host is seen."""
    fd = listener.fileno()
    handover = f"exec 3<&{fd}" + ("" if fd == 3 else f" {fd}<&-") + "; export LISTEN_PID=$$ LISTEN_FDS=1; "
    argv = [
        "bash", "-c", handover + 'exec unshare --net -- "$@"', "bash",  # bash: dash takes fds 0-9 only
        "dockerd",
        "--log-level=warn",
        f"--host=unix://{root / 'docker.sock'}",
        "--host=fd://",
        "--tlsverify",
        f"--tlscacert={pki.ca}",
        f"--tlscert={pki.server.cert}",
        f"--tlskey={pki.server.key}",
        f"--data-root={root / 'data'}",
        f"--exec-root={root / 'exec'}",
        f"--pidfile={root / 'docker.pid'}",
        "--containerd-namespace=sandtrap-tls-test",
        "--containerd-plugins-namespace=sandtrap-tls-test-plugins",
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-masq=false",
        "--ip-forward=false",
    ]  # fmt: skip
    with (root / "dockerd.log").open("ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=(fd,),
        )


def _host_links() -> set[str]:
    done = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in done.stdout.splitlines() if ":" in line}


def _stop(engine: TLSEngine) -> None:
    """Every container gone, then SIGTERM to our dockerd (SIGKILL after 60 s), its mounts let go, its dirs removed."""
    try:
        if engine.proc.poll() is None:
            ids = engine.docker("ps", "-aq").stdout.split()
            if ids:
                engine.docker("rm", "-f", "-v", *ids, timeout_s=120)
    finally:
        if engine.proc.poll() is None:
            engine.proc.send_signal(signal.SIGTERM)
            try:
                engine.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(engine.proc.pid, signal.SIGKILL)
                engine.proc.wait(30)
        _unmount_below(engine.root)
        shutil.rmtree(engine.root, ignore_errors=True)


def _unmount_below(root: Path) -> None:
    """Mounts our dockerd left (a crash): lazily unmounted, deepest first, so the tree can be removed."""
    prefix = str(root) + "/"
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def tls_engine(built_image: str) -> Iterator[TLSEngine]:
    assert _main_engine_answers(), "the main engine does not answer before the test"
    root = Path(tempfile.mkdtemp(prefix="sandtrap-tls-engine-", dir="/var/tmp"))
    pki = make_pki(root / "pki")
    docker0 = "docker0" in _host_links()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        engine = TLSEngine(root, listener.getsockname()[1], pki, _start(root, pki, listener))
    try:
        deadline = time.monotonic() + 90
        while engine.docker("version").returncode != 0:
            assert engine.proc.poll() is None, f"the second dockerd exited {engine.proc.returncode}:\n{engine.log()}"
            assert time.monotonic() < deadline, f"the second dockerd did not answer within 90 s:\n{engine.log()}"
            time.sleep(0.3)
        # The main engine's default bridge is where it was (a --bridge=none dockerd on the host deletes it).
        assert not docker0 or "docker0" in _host_links(), "the host's docker0 is gone"
        started = time.monotonic()
        copy = f"docker save {built_image} | docker -H unix://{engine.socket} load -q"
        done = subprocess.run(["sh", "-c", copy], capture_output=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
        print(f"\n[remote engine] {built_image} copied into the second engine in {time.monotonic() - started:.1f}s")
        yield engine
    finally:
        _stop(engine)
        assert not root.exists(), f"{root} was not removed"
        assert not docker0 or "docker0" in _host_links(), "the host's docker0 is gone"
        assert _main_engine_answers(), "the main engine does not answer after the test"


def test_second_engine_is_isolated_and_speaks_only_mutual_tls(tls_engine: TLSEngine) -> None:
    # A network namespace of its own (its TLS port a socket of the host's loopback), no bridge, its own containerd.
    assert os.readlink(f"/proc/{tls_engine.proc.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    networks = tls_engine.docker("network", "ls", "--format", "{{.Driver}}").stdout.split()
    assert "bridge" not in networks, networks
    assert _main_engine_answers()
    plain = subprocess.run(
        ["docker", "-H", tls_engine.tcp, "version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert plain.returncode != 0 and "Server:" not in plain.stdout, plain.stdout  # no TLS, no engine
    # Over TLS: our client certificate is accepted; one of another CA is not (the engine checks clients).
    assert tls_engine.docker_tls("version").returncode == 0, tls_engine.docker_tls("version").stderr
    refused = tls_engine.docker_tls(
        "version", cert=tls_engine.pki.other_client.cert, key=tls_engine.pki.other_client.key
    )
    assert refused.returncode != 0 and "Server:" not in refused.stdout, refused.stdout


async def test_honeypot_on_a_remote_tls_engine_serves_a_login_in_a_box_there(
    honeypot: Any, tls_engine: TLSEngine, built_image: str, sensor: str
) -> None:
    hp = await honeypot(
        sandbox={
            "docker": tls_engine.settings(image=built_image),
            "session_transport": "exec",  # the box's listener needs the box on this host
            "init": "sandtrap",
        },
        network={"mode": "none"},
    )
    login = await run(ssh_argv(hp.port, "echo remote-$((6*7)) && cat /etc/hostname"))
    assert login.returncode == 0, login.err
    assert login.out.split()[:1] == ["remote-42"], login.out
    # A file sent on stdin: its end reaches the box (TLS cannot half-close in asyncio: close_notify by hand), and
    # the box's change comes back through the engine (its files are not on this host).
    payload = b"payload-over-mutual-tls\n" * 4096
    upload = await run(ssh_argv(hp.port, "cat > /root/dropped.txt && wc -c < /root/dropped.txt"), stdin=payload)
    assert (upload.returncode, upload.out.strip()) == (0, str(len(payload))), upload.err
    await hp.wait_for(SESSION_CLOSED, count=2, timeout_s=60)
    changed = [e for e in hp.events(SESSION_FILE_CHANGED) if e.get("filename") == "/root/dropped.txt"]
    assert [(e.get("size"), e.get("stored")) for e in changed] == [(len(payload), True)], changed
    [assigned, *_] = await hp.wait_for(SANDBOX_ASSIGNED, timeout_s=30)
    # The box is on the second engine, none of this sensor's on the main one.
    ours = await asyncio.to_thread(
        tls_engine.docker, "ps", "-a", "--no-trunc", "--filter", f"label={LABEL_SENSOR}={sensor}", "-q"
    )
    assert assigned.get("sandbox_id") in ours.stdout.split(), (assigned, ours.stdout, ours.stderr)
    main = await asyncio.to_thread(
        subprocess.run,
        ["docker", "ps", "-aq", "--filter", f"label={LABEL_SENSOR}={sensor}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert main.stdout.split() == [], "a box of this sensor is on the main engine"


@pytest.mark.parametrize(
    ("which", "key"),
    [
        ("client certificate of another CA", "sandbox.docker.tls_cert"),
        ("CA that did not sign the engine's certificate", "sandbox.docker.tls_ca"),
    ],
)
async def test_wrong_certificate_is_a_clear_error_at_start_naming_the_key(
    honeypot: Any, tls_engine: TLSEngine, which: str, key: str
) -> None:
    pki = tls_engine.pki
    if key.endswith("tls_cert"):
        docker = tls_engine.settings(tls_cert=str(pki.other_client.cert), tls_key=str(pki.other_client.key))
    else:
        docker = tls_engine.settings(tls_ca=str(pki.other_ca))
    with pytest.raises(SandboxError) as raised:
        await honeypot(
            sandbox={"docker": docker, "session_transport": "exec", "init": "sandtrap"}, network={"mode": "none"}
        )
    print(f"\n[remote engine] {which}: {raised.value}")
    assert key in str(raised.value), raised.value


@pytest.mark.parametrize("command", [["run"], ["image", "check"], ["doctor"]], ids=" ".join)
async def test_wrong_certificate_from_the_cli_names_the_key_without_a_traceback(
    tls_engine: TLSEngine, tmp_path: Path, command: list[str]
) -> None:
    pki = tls_engine.pki
    config = tmp_path / "sandtrap.yaml"
    docker = tls_engine.settings(tls_cert=str(pki.other_client.cert), tls_key=str(pki.other_client.key))
    tree = {
        "sandbox": {"docker": docker, "session_transport": "exec"},
        "network": {"mode": "none"},
        "ssh": {"listen": f"127.0.0.1:{free_port()}"},
        "api": {"listen": f"127.0.0.1:{free_port()}"},
        "storage": {"data_dir": str(tmp_path / "data")},
    }
    config.write_text(yaml.safe_dump(tree))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandtrap.cli", *command, "-c", str(config),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "400"},
    )  # fmt: skip
    try:
        async with asyncio.timeout(120):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    text = (out + err).decode(errors="replace")
    print(
        f"\n[remote engine] sandtrap {' '.join(command)} with a client certificate of another CA: {text.strip()[-400:]}"
    )
    assert proc.returncode not in (0, None), text
    assert "sandbox.docker.tls_cert" in text and "Traceback" not in text, text


@pytest.fixture
def make_backend(
    tls_engine: TLSEngine,
    backend_factory: Callable[[SandboxSettings], DockerBackend],
    sandbox_settings: Callable[..., SandboxSettings],
) -> MakeBackend:
    """The conformance suite's backends (tests/sandbox_suite.py): boxes on the remote engine, over mutual TLS."""
    settings = sandbox_settings(docker=tls_engine.settings(), session_transport="exec", init="sandtrap")

    def make() -> SandboxBackend:
        return backend_factory(settings)

    return make
