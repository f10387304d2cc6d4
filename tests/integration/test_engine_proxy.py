"""The engine proxy (least privilege for the honeypot): what it lets through is enough, the rest is refused.

A whole honeypot session runs with ``sandbox.docker.docker_host`` pointed at the proxy (pool warm-up, acquire,
exec and PTY, SFTP, changed files and artifacts, stop) and nothing it asks for is refused. Then every
call an attacker who took over the honeypot would want is tried through it and answered 403, and the
engine is checked from the outside (the real socket) to be unchanged.

Nothing here can reach outside the host: calls that would (a pull) are not tried, and the destructive
ones (prune, image delete) are aimed at labels and tags this test made, so even a broken proxy could
not remove anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiodocker
import asyncssh
import pytest

from sandtrap.config import DockerSettings, SandboxSettings
from sandtrap.events import (
    SANDBOX_ASSIGNED,
    SESSION_CLOSED,
    SESSION_FILE_CHANGED,
    SESSION_FILE_UPLOAD,
)
from sandtrap.sandbox.docker import engine
from sandtrap.sandbox.docker.proxy import EngineProxy
from sandtrap.sandbox.docker.proxy_policy import MAX_HEAD, ROUTES, Policy
from sandtrap.sandbox.docker.spec import LABEL_MANAGED, LABEL_SENSOR, create_config

from helpers import remove_sensor_containers, seccomp_profile

pytestmark = pytest.mark.timeout(180)

Honeypot = Callable[..., Any]


def upstream_socket() -> Path:
    host = os.environ.get("DOCKER_HOST", "")
    return Path(host.removeprefix("unix://")) if host.startswith("unix://") else Path("/var/run/docker.sock")


def report(request: pytest.FixtureRequest, output_dir: Path, name: str, text: str) -> None:
    """Print the figures past pytest's capture (they belong in the test output) and keep a copy."""
    (output_dir / name).write_text(text + "\n", encoding="utf-8")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n" + text, flush=True)


@pytest.fixture
async def engine_proxy(sensor: str, built_image: str) -> AsyncIterator[EngineProxy]:
    """The proxy in this process, on a short socket path (sun_path holds 108 bytes), scoped to ``sensor``."""
    directory = Path(tempfile.mkdtemp(prefix="st-proxy-"))
    policy = Policy.from_settings(DockerSettings(image=built_image), SandboxSettings(), sensor)
    proxy = EngineProxy(directory / "engine.sock", upstream_socket(), policy)
    try:
        async with proxy:
            yield proxy
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def client(proxy: EngineProxy) -> AsyncIterator[aiodocker.Docker]:
    docker = aiodocker.Docker(url=f"unix://{proxy.listen}")
    try:
        yield docker
    finally:
        await docker.close()


async def raw(sock: Path, data: bytes) -> tuple[int, bytes]:
    """One raw request to the proxy; the status code and the body of its answer."""
    async with asyncio.timeout(15):
        reader, writer = await asyncio.open_unix_connection(str(sock))
        try:
            writer.write(data)
            await writer.drain()
            # Half-close: the proxy reads what a refused client still sends (up to 5 s) before it closes; EOF
            # ends that at once, and the answer is read to the proxy's close as before.
            writer.write_eof()
            answer = await reader.read()
        finally:
            writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# -- what the honeypot needs goes through -----------------------------------------------------------------
async def test_a_whole_honeypot_session_runs_through_the_proxy(
    engine_proxy: EngineProxy,  # first: torn down after the honeypot, which still stops its boxes through it
    honeypot: Honeypot,
    request: pytest.FixtureRequest,
    output_dir: Path,
) -> None:
    # limits_in_parent off: behind the proxy the honeypot is meant to run unprivileged, where it cannot
    # make parent cgroups (the proxy refuses CgroupParent; as root the backend would fall back after one refusal).
    hp = await honeypot(sandbox={"docker": {"docker_host": f"unix://{engine_proxy.listen}", "limits_in_parent": False}})
    options: dict[str, Any] = {"known_hosts": None, "username": "root", "password": "hunter2", "client_keys": None}
    options |= {"agent_path": None, "config": [], "preferred_auth": "password"}
    async with asyncio.timeout(90):
        async with asyncssh.connect("127.0.0.1", hp.port, **options) as conn:
            port = conn.get_extra_info("sockname")[1]
            result = await conn.run("echo via-proxy > /root/proof.txt && cat /root/proof.txt && exit 3")
            assert (result.exit_status, result.stdout) == (3, "via-proxy\n")

            result = await conn.run("cat", input="stdin reaches the box\n")  # half-close: EOF on stdin
            assert (result.exit_status, result.stdout) == (0, "stdin reaches the box\n")

            shell = await conn.create_process(term_type="xterm", term_size=(100, 30))
            shell.stdin.write("stty size; exit 5\n")
            out = await shell.stdout.read()
            assert (await shell.wait()).exit_status == 5
            assert "30 100" in out

            async with conn.start_sftp_client() as sftp:
                async with sftp.open("/root/uploaded.bin", "wb") as f:
                    await f.write(b"\x00sftp through the proxy\n")

        closed = await hp.wait_for(SESSION_CLOSED, src_port=port, timeout_s=60)
    session = closed[0].session
    sandbox_id = hp.events(SANDBOX_ASSIGNED, session=session)[0].get("sandbox_id")

    changed = {e.get("filename"): e for e in hp.events(SESSION_FILE_CHANGED, session=session)}
    assert changed["/root/proof.txt"].get("size") == len("via-proxy\n")
    uploads = {e.get("destfile"): e for e in hp.events(SESSION_FILE_UPLOAD, session=session)}
    assert uploads["/root/uploaded.bin"].get("stored") is True

    async with engine.engine() as direct, asyncio.timeout(30):  # from the outside: stopped (kept), not removed
        while (await direct.containers.container(sandbox_id).show())["State"]["Running"]:
            await asyncio.sleep(0.2)

    assert list(engine_proxy.refused) == []
    # Changed files and uploads are read on the host here (root, same host: /proc/<pid>/root); a honeypot
    # that cannot (another user, another host) asks the engine: container changes, archive stat and get.
    needed = {
        "engine version", "container list", "container create", "container start", "container rename",
        "exec create", "exec start", "exec inspect", "container inspect", "container stop",
    }  # fmt: skip
    assert needed <= set(engine_proxy.allowed), needed - set(engine_proxy.allowed)
    assert set(engine_proxy.allowed) <= {r.name for r in ROUTES}

    lines = ["engine proxy: one honeypot session through the allow-list (calls per route, 0 refused)"]
    lines += [f"  {name:<18} {count:>4}" for name, count in sorted(engine_proxy.allowed.items())]
    report(request, output_dir, "engine-proxy-allowed.txt", "\n".join(lines))


# -- what an attacker holding the honeypot's socket would want is refused ----------------------------------
def good_body(image: str, sensor: str) -> dict[str, Any]:
    """Exactly what DockerBackend sends: the control that proves each refusal is the mutation's doing."""
    # The open-files hard limit at the soft one: any engine grants that (DockerBackend learns what it may ask).
    docker = DockerSettings(image=image, ulimit_nofile_hard=DockerSettings().ulimit_nofile)
    return create_config(docker, SandboxSettings(), {LABEL_MANAGED: "true", LABEL_SENSOR: sensor}, seccomp_profile())


def mutated(image: str, sensor: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    body = good_body(image, sensor)
    change(body)
    return body


def host(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda body: body["HostConfig"].update(values)


CREATE_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("privileged container", host(Privileged=True), "privileged container is refused"),
    ("bind mount of /", host(Binds=["/:/host"]), "bind mount '/' is refused"),
    ("docker.sock bind", host(Binds=["/var/run/docker.sock:/var/run/docker.sock"]), "bind mount"),
    ("lxcfs-looking bind, writable", host(Binds=["/var/lib/lxcfs/proc/meminfo:/proc/meminfo"]), "bind mount"),
    ("host file as a /proc view", host(Binds=["/etc/shadow:/proc/meminfo:ro"]), "bind mount"),
    ("Mounts: bind of /", host(Mounts=[{"Type": "bind", "Source": "/", "Target": "/host"}]), "type 'bind'"),
    (
        "Mounts: volume that binds /",
        host(
            Mounts=[
                {
                    "Type": "volume",
                    "Target": "/host",
                    "VolumeOptions": {
                        "DriverConfig": {"Name": "local", "Options": {"type": "none", "o": "bind", "device": "/"}}
                    },
                }
            ]
        ),
        "local volume options",
    ),
    ("Mounts: named volume", host(Mounts=[{"Type": "volume", "Source": "x", "Target": "/x"}]), "anonymous"),
    ("host network", host(NetworkMode="host"), "NetworkMode 'host'"),
    ("bridge network (egress)", host(NetworkMode="bridge"), "NetworkMode 'bridge'"),
    ("host pid namespace", host(PidMode="host"), "PidMode 'host'"),
    ("host ipc namespace", host(IpcMode="host"), "IpcMode 'host'"),
    ("host user namespace", host(UsernsMode="host"), "UsernsMode 'host'"),
    ("host uts namespace", host(UTSMode="host"), "UTSMode 'host'"),
    ("CapAdd SYS_ADMIN", host(CapAdd=["SYS_ADMIN"]), "SYS_ADMIN is outside"),
    ("CapAdd ALL", host(CapAdd=["ALL"]), "ALL is outside"),
    ("no CapDrop ALL", host(CapDrop=[]), "CapDrop must contain ALL"),
    ("device /dev/vda", host(Devices=[{"PathOnHost": "/dev/vda", "PathInContainer": "/dev/vda"}]), "Devices"),
    ("seccomp=unconfined", host(SecurityOpt=["seccomp=unconfined"]), "seccomp=unconfined"),
    ("allow-all seccomp profile", host(SecurityOpt=['seccomp={"defaultAction":"SCMP_ACT_ALLOW"}']), "SCMP_ACT_ALLOW"),
    ("apparmor=unconfined", host(SecurityOpt=["apparmor=unconfined"]), "apparmor=unconfined"),
    ("label=disable", host(SecurityOpt=["label=disable"]), "label=disable"),
    ("MaskedPaths [] (unmask /proc)", host(MaskedPaths=[]), "unmask"),
    ("cgroup parent /", host(CgroupParent="/"), "CgroupParent"),
    ("sysctls", host(Sysctls={"net.ipv4.ip_forward": "1"}), "Sysctls"),
    ("no memory limit", host(Memory=0), "Memory must be a positive limit"),
    ("unlimited pids", host(PidsLimit=-1), "PidsLimit must be a positive limit"),
    ("more memory than configured", host(Memory=64 << 30, MemorySwap=64 << 30), "above the configured"),
    ("more CPUs than configured", host(NanoCpus=64 * 10**9), "above the configured"),
    ("log driver other than none", host(LogConfig={"Type": "syslog", "Config": {}}), "LogConfig.Type"),
    ("restart always", host(RestartPolicy={"Name": "always"}), "RestartPolicy"),
    ("Privileged hidden in a case twin", host(privileged=True), "appears twice"),
    ("labels of another sensor", lambda b: b["Labels"].update({LABEL_SENSOR: "someone-else"}), "must carry"),
    ("another image", lambda b: b.update(Image="debian:bookworm"), "not the sandbox image"),
]


async def test_forbidden_calls_are_refused(
    engine_proxy: EngineProxy,
    built_image: str,
    sensor: str,
    request: pytest.FixtureRequest,
    output_dir: Path,
) -> None:
    sock = engine_proxy.listen
    rows: list[tuple[str, int, str]] = []
    throwaway_tag = f"sandtrap-proxy-test:{sensor}"
    foreign: list[str] = []

    async def refused(what: str, call: Awaitable[Any], status: int = 403, text: str = "") -> None:
        with pytest.raises(aiodocker.DockerError) as err:
            await call
        assert err.value.status == status, (what, err.value.message)
        assert text in err.value.message, (what, err.value.message)
        rows.append((what, err.value.status, err.value.message))

    async with engine.engine() as direct, client(engine_proxy) as docker:
        try:
            # The control: DockerBackend's own body is accepted (and removed again, through the proxy).
            ours = await docker.containers.create(good_body(built_image, sensor), name=f"{sensor}-control")
            await ours.start()

            for what, change, text in CREATE_CASES:
                body = mutated(built_image, sensor, change)
                await refused(f"create: {what}", docker.containers.create(body), text=text)

            await refused("exec create, Privileged", ours.exec(cmd=["id"], privileged=True), text="privileged exec")
            for what, method, path in [
                ("container update (raise limits)", "POST", f"containers/{ours.id}/update"),
                ("container kill", "POST", f"containers/{ours.id}/kill"),
                ("container attach", "POST", f"containers/{ours.id}/attach"),
                ("container logs", "GET", f"containers/{ours.id}/logs"),
                ("container export", "GET", f"containers/{ours.id}/export"),
                ("container top", "GET", f"containers/{ours.id}/top"),
                ("commit a container", "POST", f"commit?container={ours.id}&repo={throwaway_tag.split(':')[0]}"),
                ("engine info", "GET", "info"),
                ("image list", "GET", "images/json"),
                ("volume list", "GET", "volumes"),
                ("network list", "GET", "networks"),
            ]:
                await refused(what, docker._query_json(path, method=method), text="not an engine call")

            # Image delete: aimed at a tag of our own, so even a broken proxy could remove nothing else.
            await direct.images.tag(built_image, repo=throwaway_tag.split(":")[0], tag=sensor)
            await refused("image delete", docker.images.delete(throwaway_tag, force=True), text="not an engine call")
            assert (await direct.images.inspect(throwaway_tag))["Id"]

            net = f"sandtrap-proxy-test-{sensor}"
            await refused("network create", docker.networks.create({"Name": net}), text="not the sandbox network")
            assert not [n for n in await direct.networks.list() if n["Name"] == net]
            volume = docker.volumes.create({"Name": net})  # type: ignore[no-untyped-call]
            await refused("volume create", volume, text="not an engine call")
            # `docker system prune` is these calls; filtered to a label nothing carries, in case.
            nothing = json.dumps({"label": [f"sandtrap.proxy-test={sensor}"]})
            for kind in ("containers", "images", "volumes", "networks", "build"):
                await refused(
                    f"{kind} prune (system prune)",
                    docker._query_json(f"{kind}/prune", method="POST", params={"filters": nothing}),
                    text="not an engine call",
                )
            await refused("list of every container", docker.containers.list(all=True), text="must filter")

            # A container that is not this sensor's, made behind the proxy's back.
            other = await direct.containers.create(
                mutated(built_image, sensor, lambda b: b["Labels"].update({LABEL_SENSOR: f"{sensor}-other"})),
                name=f"{sensor}-other",
            )
            foreign.append(other.id)
            await other.start()
            theirs = docker.containers.container(other.id)
            scoped = f"not labelled for sensor {sensor}"
            await refused("inspect a foreign container", theirs.show(), text=scoped)
            await refused("exec into a foreign container", theirs.exec(cmd=["id"]), text=scoped)
            await refused("read a foreign container's files", theirs.get_archive("/etc/shadow"), text=scoped)
            await refused("stop a foreign container", theirs.stop(t=1), text=scoped)
            await refused("remove a foreign container", theirs.delete(force=True), text=scoped)
            by_name = docker.containers.container(f"{sensor}-other")
            await refused("exec into it by name", by_name.exec(cmd=["id"]), text=scoped)
            foreign_exec = await direct.containers.container(other.id).exec(cmd=["id"])
            await refused(
                "start an exec made on it",
                docker._query_json(f"exec/{foreign_exec.id}/start", method="POST", data=json.dumps({"Detach": True})),
                text=scoped,
            )
            await refused("inspect that exec", docker._query_json(f"exec/{foreign_exec.id}/json"), text=scoped)
            assert (await direct.containers.container(other.id).show())["State"]["Running"] is True

            await ours.delete(force=True)  # allowed: it is ours
        finally:
            for cid in foreign:
                with contextlib.suppress(aiodocker.DockerError):
                    await direct.containers.container(cid).delete(force=True)
            with contextlib.suppress(aiodocker.DockerError):
                await direct.images.delete(throwaway_tag)
            leftovers = await direct.containers.list(all=True, filters={"label": [f"{LABEL_SENSOR}={sensor}"]})
            await remove_sensor_containers(sensor)
        # Nothing was created behind the refusals: only the control existed, and it is gone.
        assert leftovers == []

    # The protocol itself: anything the engine might read differently from the proxy is refused.
    big = b"GET /version HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (MAX_HEAD + 1024) + b"\r\n\r\n"
    for what, data, status in [
        ("path with ..", b"GET /v1.41/containers/x/../../images/json HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("percent-encoded path", b"GET /containers/%2e%2e/images/json HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("double slash", b"DELETE //images/x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("bare LF in head", b"GET /version HTTP/1.1\nX: y\r\nHost: x\r\n\r\n", 400),
        ("CL and TE together", b"POST /containers/create HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("head over the bound", big, 431),
        ("lower-case method", b"delete /images/x HTTP/1.1\r\nHost: x\r\n\r\n", 403),
    ]:  # fmt: skip
        got, answer = await raw(sock, data)
        assert got == status, (what, answer)
        rows.append((what, got, json.loads(answer)["message"]))

    assert len(engine_proxy.refused) == len(rows)
    # Forwarded to the engine: only aiodocker's version check and the control container's life.
    assert dict(engine_proxy.allowed) == {
        "engine version": 1, "container create": 1, "container start": 1, "container remove": 1,
    }  # fmt: skip
    lines = [f"engine proxy: {len(rows)} forbidden calls, {len(rows)} refused, 0 reached the engine"]
    lines += [
        f"  {status}  {what:<38} {re.sub('[0-9a-f]{64}', lambda m: m[0][:12], message)[:100]}"
        for what, status, message in rows
    ]
    report(request, output_dir, "engine-proxy-refused.txt", "\n".join(lines))


async def test_command_line_entry_point(sensor: str, built_image: str) -> None:
    """``python -m sandtrap.sandbox.docker.proxy``: serves, refuses, and on SIGTERM leaves and removes its socket."""
    directory = Path(tempfile.mkdtemp(prefix="st-proxy-"))
    sock = directory / "engine.sock"
    argv = [
        sys.executable,
        "-m",
        "sandtrap.sandbox.docker.proxy",
        "--listen",
        str(sock),
        "--upstream",
        str(upstream_socket()),
    ]
    argv += ["--sensor", sensor, "--image", built_image, "--mode", "600"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(20):
            while not sock.exists():
                assert proc.returncode is None, await proc.stderr.read() if proc.stderr else b""
                await asyncio.sleep(0.05)
        assert sock.stat().st_mode & 0o777 == 0o600
        status, body = await raw(sock, b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and "ApiVersion" in json.loads(body)
        status, body = await raw(sock, f"DELETE /v1.41/images/{built_image} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status == 403 and "not an engine call" in json.loads(body)["message"]
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            _, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert b"refused DELETE" in err
        assert not sock.exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        shutil.rmtree(directory, ignore_errors=True)
