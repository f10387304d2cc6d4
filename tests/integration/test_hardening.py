"""Every hardening item, proved from both sides against the real engine.

Outside: what ``docker inspect`` says the engine was told. Inside: what a process in the sandbox
actually gets (interfaces, routes, capabilities, cgroup limits, file systems). No traffic is sent
anywhere: isolation is shown by inspecting interfaces, routes and settings.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sandtrap.config import DockerSettings, SandboxSettings, merge
from sandtrap.errors import SandboxError
from sandtrap.sandbox.docker import engine
from sandtrap.sandbox.docker.backend import DockerBackend
from sandtrap.sandbox.docker.sandbox import DockerSandbox
from sandtrap.sandbox.docker.spec import LABEL_CREATED, LABEL_MANAGED, LABEL_SENSOR
from sandtrap.sandbox.host.procviews import LOADAVG_FILE, LXCFS_FILES, lxcfs_binds
from sandtrap.ssh.hostkeys import box_host_key_files, load_host_keys

from helpers import counter_total, limit_files, run, seccomp_profile

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024

# Linux capability bit numbers (include/uapi/linux/capability.h).
CAP_BITS = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "DAC_READ_SEARCH": 2,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "SETPCAP": 8,
    "LINUX_IMMUTABLE": 9,
    "NET_BIND_SERVICE": 10,
    "NET_BROADCAST": 11,
    "NET_ADMIN": 12,
    "NET_RAW": 13,
    "IPC_LOCK": 14,
    "IPC_OWNER": 15,
    "SYS_MODULE": 16,
    "SYS_RAWIO": 17,
    "SYS_CHROOT": 18,
    "SYS_PTRACE": 19,
    "SYS_PACCT": 20,
    "SYS_ADMIN": 21,
    "SYS_BOOT": 22,
    "SYS_NICE": 23,
    "SYS_RESOURCE": 24,
    "SYS_TIME": 25,
    "SYS_TTY_CONFIG": 26,
    "MKNOD": 27,
    "LEASE": 28,
    "AUDIT_WRITE": 29,
    "AUDIT_CONTROL": 30,
    "SETFCAP": 31,
    "MAC_OVERRIDE": 32,
    "MAC_ADMIN": 33,
    "SYSLOG": 34,
    "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36,
    "AUDIT_READ": 37,
    "PERFMON": 38,
    "BPF": 39,
    "CHECKPOINT_RESTORE": 40,
}
CAP_NAMES = {bit: name for name, bit in CAP_BITS.items()}


def for_init(settings: SandboxSettings) -> set[str]:
    """What systemd as PID 1 adds (SANDTRAP_TEST_INIT=systemd): units drop from their own bounding set."""
    return {"SETPCAP"} if settings.init == "systemd" else set()


DEFAULT_CAPS = {
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "AUDIT_WRITE",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
}


def decode_caps(mask_hex: str) -> set[str]:
    """A /proc/<pid>/status capability mask as names; an unknown bit shows as ``bit<N>`` so it cannot hide."""
    mask = int(mask_hex, 16)
    return {CAP_NAMES.get(bit, f"bit{bit}") for bit in range(mask.bit_length()) if mask >> bit & 1}


def status_fields(text: str) -> dict[str, str]:
    """``Key:\\tvalue`` lines of /proc/<pid>/status as a dict."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


async def create_sandbox(backend: DockerBackend) -> DockerSandbox:
    return await backend.create()


async def inspect(sandbox: DockerSandbox) -> dict[str, Any]:
    async with engine.engine() as client:
        info: dict[str, Any] = await client.containers.container(sandbox.id).show()
        return info


async def sh(sandbox: DockerSandbox, cmd: str, timeout_s: int = 20) -> tuple[int, str, str]:
    """Run ``cmd`` in the sandbox under ``timeout`` (and a bound on our side too)."""
    async with asyncio.timeout(timeout_s + 30):
        return await run(sandbox, f"timeout {timeout_s} sh -c {shlex.quote(cmd)}")


async def effective_limits(sandbox: DockerSandbox) -> dict[str, int]:
    """The limits the kernel enforces on a box, read on the host (its parent cgroup or its own)."""
    mem = await limit_files(sandbox.id, "memory", "memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
    cpu = await limit_files(sandbox.id, "cpu", "cpu.cfs_period_us", "cpu.cfs_quota_us")
    pids = await limit_files(sandbox.id, "pids", "pids.max")
    return {
        "pids": int(pids["pids.max"]),
        "memory": int(mem["memory.limit_in_bytes"]),
        "swap": int(mem["memory.memsw.limit_in_bytes"]),
        "period": int(cpu["cpu.cfs_period_us"]),
        "quota": int(cpu["cpu.cfs_quota_us"]),
    }


async def cat(sandbox: DockerSandbox, path: str) -> str:
    code, out, err = await sh(sandbox, f"cat {path}")
    assert code == 0, f"cat {path}: {err}"
    return out


def test_decoder_reads_dockers_well_known_default_set() -> None:
    # CapEff of a plain `docker run` (Docker's 14 default capabilities): 00000000a80425fb.
    assert decode_caps("00000000a80425fb") == {
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "NET_RAW",
        "SYS_CHROOT",
        "MKNOD",
        "AUDIT_WRITE",
        "SETFCAP",
    }
    assert decode_caps("0000000000000000") == set()
    assert decode_caps("0000020000000000") == {"bit41"}


# --- Outside: what the engine was told ------------------------------------------------------------


async def test_inspect_shows_every_hardening_item(backend: DockerBackend, sensor: str) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    sandbox = await create_sandbox(backend)
    info = await inspect(sandbox)
    host = info["HostConfig"]

    assert info["State"]["Running"] is True
    assert host["NetworkMode"] == "none"
    assert info["Config"]["NetworkDisabled"] is True
    if backend.parents is not None:  # limits_in_parent: on the box's parent cgroup, none on the container
        assert host["CgroupParent"] == f"/{backend.parents.prefix}/{sandbox.cgroup}"
        assert not any(host.get(k) for k in ("Memory", "MemorySwap", "NanoCpus", "PidsLimit"))
    else:
        assert host["Memory"] == 256 * MiB
        assert host["MemorySwap"] == 256 * MiB  # equal to Memory: no swap at all
        assert host["NanoCpus"] == 500_000_000
        assert host["PidsLimit"] == 128
    assert await effective_limits(sandbox) == {
        "pids": 128,
        "memory": 256 * MiB,
        "swap": 256 * MiB,  # equal to memory: no swap at all
        "period": 100_000,
        "quota": 50_000,
    }
    assert host["CpusetCpus"] and len(host["CpusetCpus"].split(",")) == 1  # ceil(0.5 CPU) = one CPU
    assert host["CapDrop"] == ["ALL"]
    assert sorted(c.removeprefix("CAP_") for c in host["CapAdd"]) == sorted(DEFAULT_CAPS | for_init(backend.box))
    # sandtrap's seccomp profile (Docker's default rules, io_uring refused); no no-new-privileges.
    assert host["SecurityOpt"] == ["seccomp=" + str(seccomp_profile())]
    assert host["Privileged"] is False
    assert host["ReadonlyRootfs"] is False
    # The only binds: lxcfs's read-only views of /proc files and our /proc/loadavg (realism), never anything
    # writable of the host.
    ours = f"{SandboxSettings().loadavg_dir}/{LOADAVG_FILE}"
    binds = host["Binds"] or []
    assert all(b.startswith(("/var/lib/lxcfs/proc/", ours + ":")) and b.endswith(":ro") for b in binds), binds
    assert {b.split(":")[1] for b in binds} <= {f"/{n}" for n in LXCFS_FILES}
    assert [b.split(":")[1] for b in binds].count("/proc/loadavg") <= 1
    assert not host.get("Mounts")
    assert not host["Devices"]
    # Mounted into the box: only those /proc views, read-only.
    assert all(
        m["Type"] == "bind" and not m["RW"] and m["Source"].startswith(("/var/lib/lxcfs/", ours))
        for m in info["Mounts"]
    )
    assert host["Tmpfs"]["/tmp"] == "rw,exec,nosuid,nodev,size=64m"
    # systemd as PID 1 needs 16 MiB free in /run to reload: 20% of memory (see docker.run_for_systemd).
    run = "rw,nosuid,nodev,size=52428k" if backend.box.init == "systemd" else "rw,nosuid,nodev,size=16m"
    assert host["Tmpfs"]["/run"] == run
    assert {u["Name"]: (u["Soft"], u["Hard"]) for u in host["Ulimits"]} == {
        "nofile": (1024, backend.nofile_hard),  # ulimit_nofile_hard, or what the engine can grant
        "nproc": (512, 512),
    }
    assert host["LogConfig"] == {"Type": "none", "Config": {}}

    labels = info["Config"]["Labels"]
    assert labels[LABEL_MANAGED] == "true"
    assert labels[LABEL_SENSOR] == sensor
    created = datetime.fromisoformat(labels[LABEL_CREATED])
    assert before <= created <= datetime.now(UTC) + timedelta(seconds=1)

    # The engine applies seccomp profiles (its own default is the one sandtrap's is derived from).
    async with engine.engine() as client:
        engine_info = await client.system.info()
    assert "name=seccomp,profile=default" in engine_info["SecurityOptions"]


async def test_unknown_runtime_is_a_clear_sandbox_error(
    backend_factory: Callable[[SandboxSettings], DockerBackend],
    sandbox_settings: Callable[..., SandboxSettings],
) -> None:
    backend = backend_factory(sandbox_settings(docker={"runtime": "no-such-runtime"}))
    with pytest.raises(SandboxError, match="no-such-runtime"):
        await create_sandbox(backend)
    assert await backend.list_managed() == []  # nothing half-made left behind
    await backend.ping()  # the client is still usable


# --- Inside: what a process in the sandbox gets ----------------------------------------------------


async def test_only_loopback_and_no_route(backend: DockerBackend) -> None:
    sandbox = await create_sandbox(backend)

    code, out, _ = await sh(sandbox, "ls /sys/class/net")
    assert code == 0 and out.split() == ["lo"]

    route = await cat(sandbox, "/proc/net/route")
    assert route.splitlines()[0].startswith("Iface")
    assert route.splitlines()[1:] == []

    dev = await cat(sandbox, "/proc/net/dev")
    assert [line.split(":")[0].strip() for line in dev.splitlines()[2:]] == ["lo"]

    code, out, err = await sh(sandbox, "ip route")
    assert (code, out, err) == (0, "", "")
    code, out, _ = await sh(sandbox, "ip -6 route")
    assert code == 0 and "default" not in out


@pytest.mark.parametrize(
    ("cap_add", "expected"),
    [
        (None, DEFAULT_CAPS),
        (["NET_BIND_SERVICE", "CAP_KILL"], {"NET_BIND_SERVICE", "KILL"}),
        ([], set()),
    ],
    ids=["default", "custom", "none"],
)
async def test_capabilities_are_exactly_the_configured_set(
    backend_factory: Callable[[SandboxSettings], DockerBackend],
    sandbox_settings: Callable[..., SandboxSettings],
    cap_add: list[str] | None,
    expected: set[str],
) -> None:
    settings = sandbox_settings() if cap_add is None else sandbox_settings(docker={"cap_add": cap_add})
    sandbox = await create_sandbox(backend_factory(settings))
    expected = set(expected) | for_init(settings)

    host = (await inspect(sandbox))["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert sorted(c.removeprefix("CAP_") for c in host["CapAdd"] or []) == sorted(expected)

    status = status_fields(await cat(sandbox, "/proc/self/status"))
    assert decode_caps(status["CapEff"]) == expected
    assert decode_caps(status["CapPrm"]) == expected
    assert decode_caps(status["CapBnd"]) == expected
    assert decode_caps(status["CapInh"]) == set()
    assert decode_caps(status["CapAmb"]) == set()

    # A dropped capability really is missing: MKNOD is never granted.
    code, _, err = await sh(sandbox, "mknod /tmp/null-copy c 1 3")
    assert code != 0 and "Operation not permitted" in err


IO_URING_PROBE = (
    "import ctypes, errno\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "ctypes.set_errno(0)\n"
    "r = libc.syscall(425, 4, ctypes.create_string_buffer(120))\n"  # io_uring_setup, x86-64
    "print('OK' if r >= 0 else errno.errorcode[ctypes.get_errno()])\n"
)


async def test_seccomp_filter_without_no_new_privs(backend: DockerBackend) -> None:
    sandbox = await create_sandbox(backend)
    status = status_fields(await cat(sandbox, "/proc/self/status"))
    assert status["NoNewPrivs"] == "0"  # as in a real login shell
    assert status["Seccomp"] == "2"  # SECCOMP_MODE_FILTER: sandtrap's profile, applied by the engine
    assert status["Seccomp_filters"] == "1"  # the engine's, nothing stacked in the box
    code, out, err = await run(sandbox, "python3 -", stdin=IO_URING_PROBE.encode())
    assert (code, out) == (0, "ENOSYS\n"), err  # any exec, not only sessions: the engine's profile refuses it


async def test_the_engines_own_profile_is_an_option_and_allows_io_uring(
    backend_factory: Callable[[SandboxSettings], DockerBackend],
    sandbox_settings: Callable[..., SandboxSettings],
) -> None:
    # Why sandtrap's profile is the default: Docker 20.10's own lets io_uring through (Docker 25 refuses it).
    sandbox = await create_sandbox(backend_factory(sandbox_settings(docker={"seccomp_profile": "default"})))
    host = (await inspect(sandbox))["HostConfig"]
    assert not any(opt.startswith("seccomp") for opt in host["SecurityOpt"] or [])
    assert status_fields(await cat(sandbox, "/proc/self/status"))["Seccomp"] == "2"
    code, out, err = await run(sandbox, "python3 -", stdin=IO_URING_PROBE.encode())
    assert code == 0 and out in ("OK\n", "EPERM\n"), (out, err)  # EPERM: Docker 25+'s profile


async def test_no_new_privileges_true_is_honoured(
    backend_factory: Callable[[SandboxSettings], DockerBackend],
    sandbox_settings: Callable[..., SandboxSettings],
) -> None:
    sandbox = await create_sandbox(backend_factory(sandbox_settings(docker={"no_new_privileges": True})))
    host = (await inspect(sandbox))["HostConfig"]
    assert "no-new-privileges:true" in host["SecurityOpt"]

    status = status_fields(await cat(sandbox, "/proc/self/status"))
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # the seccomp filter does not depend on the flag


async def test_no_docker_socket(backend: DockerBackend) -> None:
    sandbox = await create_sandbox(backend)
    for path in ("/var/run/docker.sock", "/run/docker.sock"):
        code, _, _ = await sh(sandbox, f"test -e {path}")
        assert code == 1, f"{path} exists in the sandbox"
    mounts = await cat(sandbox, "/proc/mounts")
    assert "docker.sock" not in mounts


async def test_ulimits(backend: DockerBackend) -> None:
    sandbox = await create_sandbox(backend)
    # PID 1's, as the engine's spec gives them (an engine exec sometimes starts with its soft limit raised to
    # the hard one; the session helper puts a login back on PID 1's, see test_ssh_*).
    code, out, err = await sh(sandbox, "grep 'Max open files' /proc/1/limits")
    assert code == 0, err
    # Hard: systemd's 524288, or the largest half of it the engine can grant (its own limit is the cap). systemd
    # as PID 1 (SANDTRAP_TEST_INIT=systemd) raises its own soft limit to the hard one, as on any machine.
    soft = backend.nofile_hard if backend.box.init == "systemd" else 1024
    assert out.split()[3:5] == [str(soft), str(backend.nofile_hard)], out
    assert backend.nofile_hard in {524288 >> n for n in range(10)}
    code, out, err = await sh(sandbox, "exec bash -c 'ulimit -Su; ulimit -Hu'")
    assert code == 0, err
    assert out.split() == ["512", "512"]


async def test_tmp_is_a_small_tmpfs_that_fills_up(backend: DockerBackend) -> None:
    sandbox = await create_sandbox(backend)
    tmp = [line.split() for line in (await cat(sandbox, "/proc/mounts")).splitlines() if line.split()[1] == "/tmp"]
    assert len(tmp) == 1
    _, _, fstype, options, *_ = tmp[0]
    assert fstype == "tmpfs"
    assert "size=65536k" in options.split(",")
    assert "noexec" not in options.split(",") and "nosuid" in options.split(",")
    # The attacker's classic move works: drop a binary in /tmp and run it.
    code, out, err = await sh(sandbox, "cp /bin/echo /tmp/e && chmod +x /tmp/e && /tmp/e ran")
    assert (code, out) == (0, "ran\n"), err

    code, _, err = await sh(sandbox, "dd if=/dev/zero of=/tmp/fill bs=1M count=100")
    assert code != 0
    assert "No space left" in err
    code, out, _ = await sh(sandbox, "stat -c %s /tmp/fill")
    assert code == 0 and 60 * MiB <= int(out) <= 64 * MiB

    code, out, err = await sh(sandbox, "rm /tmp/fill && echo small > /tmp/small && cat /tmp/small")
    assert (code, out) == (0, "small\n"), err


async def test_read_only_root(
    backend_factory: Callable[[SandboxSettings], DockerBackend],
    sandbox_settings: Callable[..., SandboxSettings],
) -> None:
    sandbox = await create_sandbox(backend_factory(sandbox_settings(docker={"read_only_root": True})))
    info = await inspect(sandbox)
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    assert {m["Destination"] for m in info["Mounts"] if m["Type"] == "volume"} == set(DockerSettings().writable)

    for path in ("/usr/sandtrap-probe", "/usr/bin/sandtrap-probe", "/sandtrap-probe"):
        code, _, err = await sh(sandbox, f"echo x > {path}")
        assert code != 0 and "Read-only file system" in err, (path, err)
    for path in ("/root/sandtrap-probe", "/etc/sandtrap-probe", "/var/tmp/sandtrap-probe", "/tmp/sandtrap-probe"):
        code, out, err = await sh(sandbox, f"echo written > {path} && cat {path}")
        assert (code, out) == (0, "written\n"), (path, err)


async def test_parent_cgroups_go_with_their_boxes(backend: DockerBackend) -> None:
    """limits_in_parent: a box's parent cgroup is removed from every hierarchy when the box is stopped (kept
    for forensics) or removed, and the backend's close leaves no directory of the sensor behind."""
    if backend.parents is None:
        await create_sandbox(backend)  # decides the placement
    if backend.parents is None:
        pytest.skip("limits_in_parent is not possible on this host")
    hierarchies = [h for h in Path("/sys/fs/cgroup").iterdir() if h.is_dir() and not h.is_symlink()]
    stopped, removed = await create_sandbox(backend), await create_sandbox(backend)
    names = [stopped.cgroup, removed.cgroup]
    assert all(any((h / backend.parents.prefix / n).is_dir() for h in hierarchies) for n in names)
    await stopped.stop()
    await removed.remove()
    assert not [h for h in hierarchies for n in names if (h / backend.parents.prefix / n).exists()]


async def test_systemd_cgroup_root_is_masked_and_the_rest_untouched(backend: DockerBackend) -> None:
    """mask_cgroupns: /sys/fs/cgroup/systemd is a small tmpfs with the root's file names (release_agent
    included); every other hierarchy is still the engine's read-only cgroup mount."""
    if not Path("/sys/fs/cgroup/systemd").is_dir():
        pytest.skip("this host has no cgroup v1 systemd hierarchy to mask")
    sandbox = await create_sandbox(backend)
    assert (await inspect(sandbox))["HostConfig"]["Tmpfs"]["/sys/fs/cgroup/systemd"].startswith("rw,nosuid,nodev")
    code, out, err = await sh(
        sandbox, "ls /sys/fs/cgroup/systemd; awk '$2 ~ \"^/sys/fs/cgroup/\" {print $2, $3, $4}' /proc/mounts"
    )
    assert code == 0, err
    assert {"release_agent", "cgroup.procs", "tasks"} <= set(out.split())
    mounts = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("/")}
    assert mounts["/sys/fs/cgroup/systemd"][0] == "tmpfs"
    assert mounts["/sys/fs/cgroup/memory"][0] == "cgroup" and mounts["/sys/fs/cgroup/memory"][1].startswith("ro,")
    # The kernel's view of the box's cgroups is unchanged: its own namespace root.
    assert "name=systemd:/\n" in await cat(sandbox, "/proc/self/cgroup")


@pytest.mark.parametrize("read_only_root", [False, True])
async def test_planted_host_keys_are_what_the_box_sshd_serves(
    backend_factory: Callable[..., DockerBackend],
    sandbox_settings: Callable[..., SandboxSettings],
    tmp_path: Path,
    read_only_root: bool,
) -> None:
    """sandbox.share_host_keys: the sensor's keys replace the image's in /etc/ssh (in the writable mounts too)
    before init starts the box's sshd, so the key a client saw is the one the box's own sshd on :22 serves."""
    load_host_keys(tmp_path)
    files = box_host_key_files(tmp_path, "web-prod-03")
    sandbox = await create_sandbox(backend_factory(sandbox_settings(docker={"read_only_root": read_only_root}), files))
    pub = files["etc/ssh/ssh_host_ed25519_key.pub"][0].decode()
    assert pub.endswith(" root@web-prod-03\n")
    assert await cat(sandbox, "/etc/ssh/ssh_host_ed25519_key.pub") == pub
    code, out, err = await sh(sandbox, "stat -c '%a %U %n' /etc/ssh/ssh_host_*")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]  # mode, owner, path
    assert len(rows) == 6 and all(
        (mode, owner) == ("644" if path.endswith(".pub") else "600", "root") for mode, owner, path in rows
    ), out
    # The box's own sshd (started by init after the files were in place) offers that key.
    code, out, err = await sh(
        sandbox, "for i in $(seq 50); do ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null && break; sleep 0.2; done"
    )
    assert code == 0 and pub.split()[1] in out, (out, err)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {},
            {
                "pids": 128,
                "memory": 256 * MiB,
                "swap": 256 * MiB,
                "nano_cpus": 500_000_000,
                "quota": 50_000,
                "nofile": 1024,
            },
        ),
        (
            {"pids_limit": 64, "memory": "128m", "memory_swap": "192m", "cpus": 0.25, "docker": {"ulimit_nofile": 256}},
            {
                "pids": 64,
                "memory": 128 * MiB,
                "swap": 192 * MiB,
                "nano_cpus": 250_000_000,
                "quota": 25_000,
                "nofile": 256,
            },
        ),
    ],
    ids=["default", "custom"],
)
@pytest.mark.parametrize("in_parent", [True, False], ids=["parent", "own"])
async def test_limits_in_engine_and_cgroup_match_settings(
    backend_factory: Callable[[SandboxSettings], DockerBackend],
    sandbox_settings: Callable[..., SandboxSettings],
    overrides: dict[str, Any],
    expected: dict[str, int],
    in_parent: bool,
) -> None:
    backend = backend_factory(sandbox_settings(**merge({"docker": {"limits_in_parent": in_parent}}, overrides)))
    sandbox = await create_sandbox(backend)
    host = (await inspect(sandbox))["HostConfig"]
    assert {u["Name"]: u["Soft"] for u in host["Ulimits"]}["nofile"] == expected["nofile"]
    want = {k: expected[k] for k in ("pids", "memory", "swap", "quota")} | {"period": 100_000}
    # What the kernel enforces, read on the host where the limits are.
    assert await effective_limits(sandbox) == want

    # What the box sees at its cgroup root: nothing limited (as on a real machine) when the limits sit on
    # the parent, the limits themselves when they sit on the box's own cgroup.
    cg = "/sys/fs/cgroup"
    code, out, err = await sh(
        sandbox,
        f"cat {cg}/pids/pids.max {cg}/memory/memory.limit_in_bytes {cg}/memory/memory.memsw.limit_in_bytes "
        f"{cg}/cpu/cpu.cfs_period_us {cg}/cpu/cpu.cfs_quota_us",
    )
    assert code == 0, err
    seen = out.split()
    if backend.parents is not None:
        assert in_parent and seen[0] == "max" and int(seen[1]) >= 2**62 and int(seen[2]) >= 2**62, seen
        assert seen[4] == "-1", seen
        assert not any(host.get(k) for k in ("Memory", "MemorySwap", "NanoCpus", "PidsLimit"))
        # /proc/meminfo (lxcfs) still shows the box's memory: lxcfs takes the lowest limit up the tree.
        code, out, _ = await sh(sandbox, "awk '/^MemTotal:/ {print $2 * 1024}' /proc/meminfo")
        assert not lxcfs_binds(sandbox_settings().lxcfs_dir) or int(out) == expected["memory"], out
    else:
        assert [int(x) if x != "max" else -1 for x in seen] == [
            expected["pids"],
            expected["memory"],
            expected["swap"],
            100_000,
            expected["quota"],
        ]
        assert host["PidsLimit"] == expected["pids"]
        assert host["Memory"] == expected["memory"]
        assert host["MemorySwap"] == expected["swap"]
        assert host["NanoCpus"] == expected["nano_cpus"]
    # systemd as PID 1 (see test_ulimits); init: systemd without parents keeps sandtrap's init (its warning)
    code, out, _ = await sh(sandbox, "cat /proc/1/comm; grep 'Max open files' /proc/1/limits")
    comm, limits = out.split("\n", 1)
    soft = int(limits.split()[4]) if comm == "systemd" else expected["nofile"]
    assert code == 0 and int(limits.split()[3]) == soft, out
    code, out, _ = await sh(sandbox, "nproc; grep -c ^processor /proc/cpuinfo")
    assert out.split() == ["1", "1"], out  # ceil(cpus) CPUs, and lxcfs's cpuinfo counts the same


async def test_fork_loop_is_stopped_by_pids_limit(backend: DockerBackend) -> None:
    limit = backend.box.pids_limit
    sandbox = await create_sandbox(backend)
    peak = 0
    stop = asyncio.Event()

    async def watch() -> None:
        # `docker top` lists the processes from the host side: it needs no free pid in the box.
        nonlocal peak
        async with engine.engine() as client:
            container = client.containers.container(sandbox.id)
            while not stop.is_set():
                top = await container.top()
                peak = max(peak, len(top.get("Processes") or []))
                await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    try:
        code, _, err = await sh(sandbox, "bash -c 'for i in $(seq 1 2000); do sleep 30 & done; wait'", timeout_s=10)
        assert code == 124  # still forking (and failing) when `timeout` ended it
        assert "fork" in err and "Resource temporarily unavailable" in err

        # `timeout` killed its whole process group, sleeps included: the box answers again.
        async with asyncio.timeout(30):
            while (answer := await run(sandbox, "echo alive"))[0] != 0:
                await asyncio.sleep(0.5)
        assert answer[1] == "alive\n"
        stop.set()
        await watcher

        assert limit - 10 <= peak <= limit  # it reached the limit and never went past it
        # pids.events counts refused forks in the cgroup that forked: summed over the box's cgroups.
        assert await counter_total(sandbox.id, "pids", "pids.events", "max") > 0  # refused at pids.max
    finally:
        stop.set()
        await watcher
        await sandbox.stop()
    assert await sandbox.is_running() is False


async def test_memory_hog_is_oom_killed_and_others_keep_working(backend: DockerBackend) -> None:
    hog_box = await create_sandbox(backend)
    bystander = await create_sandbox(backend)

    hog = "python3 -c 'import itertools; hog = [b\"x\" * (16 << 20) for _ in itertools.count()]'"
    code, _, _ = await sh(hog_box, hog, timeout_s=60)
    assert code == 137  # SIGKILL from the OOM killer, not 124 from `timeout`

    mem = await limit_files(hog_box.id, "memory", "memory.max_usage_in_bytes")
    # The kill is counted in the victim's cgroup: summed over the box's cgroups.
    assert await counter_total(hog_box.id, "memory", "memory.oom_control", "oom_kill") >= 1
    assert int(mem["memory.max_usage_in_bytes"]) <= 256 * MiB

    # Only the hog died: its box, an unrelated box, the engine and this process all carry on.
    assert (await inspect(hog_box))["State"]["Running"] is True
    assert await sh(hog_box, "echo still here") == (0, "still here\n", "")
    assert await sh(bystander, "echo fine") == (0, "fine\n", "")
    assert (await inspect(bystander))["State"]["OOMKilled"] is False
    await backend.ping()
