"""Our own detection battery: what bots and careful attackers run right after login, as data.

Each check is a shell command run as an attacker would run it (an ``exec`` request, an interactive
login shell on a terminal, or ``ssh -t host command``), and a small predicate that says whether the
answer looks like a real Debian 12 server. ``expected`` is what sandtrap shows today:

* ``pass``: it must look real;
* ``container-limit``: a container cannot hide it (the shared kernel or the engine gives it away);
  ``why`` says why and ``fix`` what removes it (a VM backend, with its own kernel);
* ``known-gap``: it could look real but does not yet; ``why`` says why, ``fix`` is the proposal;
* ``host-limit``: sandtrap already asks for the real value, but this host's engine cannot grant it;
  ``host_allows`` reads the host, and where it allows, the check must pass.

``test_battery.py`` runs every check against sandtrap over SSH and against a plain hardened
container through ``docker exec``, and asserts that sandtrap's outcome matches ``expected``.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

Family = Literal["emulation", "container", "session", "network/identity", "kernel"]
Mode = Literal["exec", "pty", "exec+pty"]
Expected = Literal["pass", "container-limit", "known-gap", "host-limit"]
Outcome = Literal["pass", "fail", "n/a", "error"]

FAMILIES: tuple[Family, ...] = ("emulation", "container", "session", "network/identity", "kernel")
IP = r"\d{1,3}(?:\.\d{1,3}){3}"


@dataclass(frozen=True)
class Context:
    """What the client side knows about its connection (nothing for a box reached by ``docker exec``)."""

    client_ip: str | None = None
    client_port: int | None = None
    server_version: str | None = None
    host_key_sha256: str | None = None


@dataclass
class Result:
    out: str  # stdout (on a terminal: what the terminal showed, stderr included)
    err: str
    code: int | None
    ctx: Context
    banner: str = ""  # a login shell: what it printed before the first prompt
    other: Result | None = None  # checks run ``across`` two boxes: the second box's answer


@dataclass(frozen=True)
class Check:
    id: str
    family: Family
    mode: Mode
    command: str
    real: str  # what a real server shows
    passes: Callable[[Result], bool]
    expected: Expected = "pass"
    why: str = ""
    fix: str = ""
    box: Literal["A", "B"] = "A"  # B: a second connection, which failed one password first
    across: bool = False  # also run in box B; the predicate compares the two
    second_login: bool = False  # a second interactive login to box A (pty mode)
    needs_ssh: bool = False  # compares with what the SSH client saw: n/a through docker exec
    host_dependent: bool = False  # the box shows the host's value: on a host where it passes, so does sandtrap
    host_allows: Callable[[], bool] | None = None  # host-limit: does this host let sandtrap pass it?


# --- small parsing helpers --------------------------------------------------------------------------


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def ip_re(r: Result) -> str:
    return re.escape(r.ctx.client_ip) if r.ctx.client_ip else IP


def port_re(r: Result) -> str:
    return str(r.ctx.client_port) if r.ctx.client_port else r"\d+"


def tty_line(text: str) -> str | None:
    """The ``pts/N`` of a ``tty`` answer in the output, if any."""
    m = re.search(r"^/dev/(pts/\d+)\s*$", text, re.M)
    return m.group(1) if m else None


def unlimited(value: str) -> bool:
    """A cgroup limit that does not limit (what the root cgroup of a real machine shows)."""
    v = value.split()[0] if value.split() else ""
    return v in {"max", "-1"} or (v.isdigit() and int(v) >= 2**62)


def env_of(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", line))


# --- predicates that need more than one line --------------------------------------------------------


def _uname_consistent(r: Result) -> bool:
    v = lines(r.out)
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf", "i686": "i386"}
    return len(v) == 8 and len(set(v[0:4])) == 1 and v[4] == v[5] and arch.get(v[6]) == v[7]


def _ps_matches_proc(r: Result) -> bool:
    n = ints(r.out)
    return len(n) == 2 and n[0] > 0 and abs(n[0] - n[1]) <= 3


def _meminfo_within_limit(r: Result) -> bool:
    v = lines(r.out)
    if not v or not v[0].isdigit():
        return False
    # A real machine's root cgroup (v2) has no memory.max: no file is no limit
    return len(v) == 1 or unlimited(v[1]) or (v[1].isdigit() and int(v[0]) <= int(v[1]) * 1.05)


def _cpus_agree(r: Result) -> bool:
    v = lines(r.out)
    if len(v) < 2 or not (v[0].isdigit() and v[1].isdigit()):
        return False
    if len(v) == 2:  # a real machine's root cgroup (v2) has no cpu.max: no quota
        return v[0] == v[1]
    quota, _, period = v[2].partition(" ")
    if unlimited(quota):
        return v[0] == v[1]
    return v[0] == v[1] and period.isdigit() and int(quota) / int(period) >= int(v[0]) - 0.01


def _loadavg_agrees(r: Result) -> bool:
    v = lines(r.out)
    m = re.match(r"[\d.]+ [\d.]+ [\d.]+ (\d+)/(\d+) (\d+)$", v[0]) if v else None
    if not m or len(v) < 3 or not (v[1].isdigit() and v[2].isdigit()):
        return False
    total, last_pid, reader, threads = int(m.group(2)), int(m.group(3)), int(v[1]), int(v[2])
    return threads / 2 <= total <= threads * 2 + 5 and 0 <= last_pid - reader <= 50


def _all_caps(r: Result) -> bool:
    v = lines(r.out)
    m = re.search(r"CapEff:\s*([0-9a-f]+)", r.out)
    return bool(m) and v[-1].isdigit() and int(m.group(1), 16) == (1 << (int(v[-1]) + 1)) - 1  # type: ignore[union-attr]


def _big_pids(r: Result) -> bool:
    n = ints(r.out)
    return len(n) == 3 and n[0] >= 300 and min(n[1:]) >= 100


def _ssh_vars(r: Result) -> bool:
    v = r.out.splitlines()
    if len(v) < 2:
        return False
    client, conn = v[0].split(), v[1].split()
    addresses = {a.split("/")[0] for a in v[2:]}
    return (
        len(client) == 3
        and len(conn) == 4
        and re.fullmatch(ip_re(r), client[0]) is not None
        and re.fullmatch(port_re(r), client[1]) is not None
        and client[:2] == conn[:2]
        and client[2] == conn[3]
        and conn[2] in addresses
    )


def _session_env(r: Result, tty: bool) -> bool:
    env = env_of(r.out)
    # Debian's sshd (PAM: pam_motd sets MOTD_SHOWN, pam_mail has noenv: no MAIL), with and without a terminal
    needed = {"USER", "LOGNAME", "HOME", "SHELL", "PATH", "MOTD_SHOWN", "SSH_CLIENT", "SSH_CONNECTION"}
    needed |= {"TERM", "SSH_TTY"} if tty else set()
    stray = {"HOSTNAME", "container", "KUBERNETES_SERVICE_HOST", "DOCKER_HOST", "container_uuid", "MAIL"}
    return needed <= env.keys() and not stray & env.keys() and env.get("USER") == env.get("LOGNAME") == "root"


def _who_has_me(r: Result) -> bool:
    tty = tty_line(r.out)
    return tty is not None and re.search(rf"^root\s+{re.escape(tty)}\s.*\({ip_re(r)}\)", r.out, re.M) is not None


def _w_has_me(r: Result) -> bool:
    tty = tty_line(r.out)
    return tty is not None and re.search(rf"^root\s+{re.escape(tty)}\s+{ip_re(r)}\s", r.out, re.M) is not None


def _last_has_me(r: Result) -> bool:
    tty = tty_line(r.out)
    pattern = rf"^root\s+{re.escape(tty or '-')}\s+{ip_re(r)}\s.*still logged in"
    return tty is not None and re.search(pattern, r.out, re.M) is not None


def _wtmp_history(r: Result) -> bool:
    logins = [x for x in lines(r.out) if re.match(r"^\w+\s+pts/\d+\s", x) and not re.search(ip_re(r), x)]
    return len(logins) >= 3 and re.search(r"^reboot\s+system boot", r.out, re.M) is not None


def _accepted_here(r: Result) -> bool:
    v = r.out.splitlines()
    sshd_pids = set(v[-1].split()) if v else set()
    pat = rf"sshd\[(\d+)\]: Accepted password for root from {ip_re(r)} port {port_re(r)} ssh2$"
    return any((m := re.search(pat, x)) and m.group(1) in sshd_pids for x in v[:-1])


def _accepted_once(r: Result) -> bool:
    pat = rf"Accepted password for root from {ip_re(r)} port {port_re(r)} ssh2$"
    return len([x for x in lines(r.out) if re.search(pat, x)]) == 1


def _failed_logged(r: Result) -> bool:
    pat = rf"sshd\[\d+\]: Failed password for root from {ip_re(r)} port {port_re(r)} ssh2$"
    return any(re.search(pat, x) for x in lines(r.out))


def _parent_is_sshd_pty(r: Result) -> bool:
    tty = tty_line(r.out)
    return tty is not None and f"sshd: root@{tty}" in lines(r.out)


def _sshd_chain(r: Result) -> bool:
    v = lines(r.out)
    return len(v) == 2 and v[0] == "sshd: root [priv]" and v[1].startswith("sshd: /usr/sbin/sshd -D [listener]")


def _motd(r: Result) -> bool:
    b = r.banner
    return (
        re.search(r"^Linux \S+ \S+ #\S+", b, re.M) is not None
        and "The programs included with the Debian GNU/Linux system are free software" in b
        and "ABSOLUTELY NO WARRANTY" in b
    )


def _last_login(r: Result, from_client: bool) -> bool:
    m = re.search(r"^Last login: \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4} from (\S+)\s*$", r.banner, re.M)
    return m is not None and (not from_client or re.fullmatch(ip_re(r), m.group(1)) is not None)


def _own_connection(r: Result) -> bool:
    if r.ctx.client_port is None:
        return re.search(rf"ESTAB.*:22\s+{IP}:\d+", r.out) is not None
    return re.search(rf":22\s+{ip_re(r)}:{r.ctx.client_port}\b", r.out) is not None


def _host_key_matches(r: Result) -> bool:
    return r.ctx.host_key_sha256 is not None and r.ctx.host_key_sha256 in r.out


def _banner_matches_package(r: Result) -> bool:
    v = lines(r.out)
    m = re.fullmatch(r"(?:\d+:)?([^-]+)-(.+)", v[0]) if v else None
    if not m or r.ctx.server_version is None:
        return False
    expected = f"SSH-2.0-OpenSSH_{m.group(1)} Debian-{m.group(2)}"
    return r.ctx.server_version == expected and expected in v and any(x.startswith(expected[8:] + ",") for x in v)


def _machine_id(r: Result) -> bool:
    def ok(x: Result | None) -> bool:
        v = lines(x.out) if x else []
        return len(v) == 2 and v[0] == v[1] and re.fullmatch(r"[0-9a-f]{32}", v[0]) is not None

    return ok(r) and ok(r.other) and lines(r.out)[0] != lines(r.other.out)[0]  # type: ignore[union-attr]


def _boot_id_differs(r: Result) -> bool:
    return r.other is not None and bool(lines(r.out)) and lines(r.out) != lines(r.other.out)


def _uptime_matches_pid1(r: Result) -> bool:
    n = ints(r.out)
    return len(n) == 2 and 0 <= n[0] - n[1] <= 120


def _web_story(r: Result) -> bool:
    v = r.out.splitlines()
    return len(v) >= 2 and v[0] == "install ok installed" and v[1].strip().isdigit() and int(v[1]) >= 1


def _block_root(r: Result) -> bool:
    v = r.out.splitlines()
    if not v or not v[0].startswith("/dev/"):
        return False
    name = v[0].removeprefix("/dev/")
    return re.search(rf"\s{re.escape(name)}$", r.out, re.M) is not None and any(x.endswith(" /") for x in v)


def _dev_is_devtmpfs(r: Result) -> bool:
    v = lines(r.out)
    return len(v) >= 2 and v[0] == "devtmpfs" and v[1].isdigit() and int(v[1]) >= 100


def _kthreads(r: Result) -> bool:
    v = lines(r.out)
    return len(v) == 2 and v[0] == "kthreadd" and v[1].isdigit() and int(v[1]) >= 1


def _debian_kernel(r: Result) -> bool:
    v = lines(r.out)
    return (
        len(v) == 2
        and re.fullmatch(r"6\.1\.0-\d+-(?:cloud-)?(?:amd64|arm64)", v[0]) is not None
        and re.search(r"Debian 6\.1\.\d+", v[1]) is not None
    )


# --- the compiled binary a loader drops: a 163-byte static x86-64 ELF that prints "elf-ok", exits 7 -----


def tiny_elf() -> bytes:
    msg = b"elf-ok\n"
    code = (
        b"\xb8\x01\x00\x00\x00"  # mov eax, 1 (write)
        + b"\xbf\x01\x00\x00\x00"  # mov edi, 1
        + b"\x48\x8d\x35"
        + struct.pack("<i", 19)  # lea rsi, [rip + msg]
        + b"\xba"
        + struct.pack("<I", len(msg))  # mov edx, len
        + b"\x0f\x05"  # syscall
        + b"\xb8\x3c\x00\x00\x00"  # mov eax, 60 (exit)
        + b"\xbf\x07\x00\x00\x00"  # mov edi, 7
        + b"\x0f\x05"  # syscall
    )
    base, size = 0x400000, 64 + 56 + len(code) + len(msg)
    ehdr = b"\x7fELF\x02\x01\x01" + bytes(9)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, base + 120, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return ehdr + phdr + code + msg


ELF_COMMAND = (
    "printf '"
    + "".join(f"\\{b:03o}" for b in tiny_elf())
    + '\' > /tmp/.x && chmod +x /tmp/.x && /tmp/.x; echo "rc=$?"; rm -f /tmp/.x'
)
ZERO_MD5 = hashlib.md5(bytes(4 * 1024 * 1024)).hexdigest()

DETECT_CONTAINER = (
    # systemd-detect-virt --container where installed, else its logic (systemd 252, src/basic/virt.c).
    "if command -v systemd-detect-virt >/dev/null; then systemd-detect-virt --container; else v=none; "
    "e=$(tr '\\0' '\\n' </proc/1/environ | sed -n 's/^container=//p'); "
    "if [ -s /run/host/container-manager ]; then v=$(cat /run/host/container-manager); "
    'elif [ -s /run/systemd/container ]; then v=$(cat /run/systemd/container); elif [ -n "$e" ]; then v=$e; '
    "elif [ -e /run/.containerenv ]; then v=podman; elif [ -e /.dockerenv ]; then v=docker; "
    'elif [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then [ -e /sys/fs/cgroup/cgroup.events ] && v=container-other; '
    "elif [ -d /sys/fs/cgroup/systemd ] && [ ! -e /sys/fs/cgroup/systemd/release_agent ]; then v=container-other; fi; "
    'echo "$v"; fi'
)

# --- shared reasons -----------------------------------------------------------------------------------

VM = "A VM backend (its own kernel, disk and init) removes it."
BROKER = (
    "Set `sandbox.session_transport: init` (root on the engine's host): the box's PID 1 forks a listener titled "
    "`sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups` (`sandbox/listener.c`; it also hands TCP connections "
    "on :22 to `/usr/sbin/sshd -i`) that starts each login as `sshd: root [priv]` → `sshd: root@pts/N` (a pty "
    "opened in the box) → `-bash` and passes the pty to the honeypot (`sandbox/broker.py`). That is the default "
    "(the battery's `init` run passes both); this row is what `session_transport: exec` shows, and what a "
    "honeypot that is not root on the engine's host falls back to."
)
SESSION_TTY = (
    "`src/sandtrap/sandbox/session.c` decides both with `interactive = isatty(0) && command == NULL`; split "
    "the two ideas as sshd does: "
    "`has_tty = isatty(0)` decides the title `sshd: USER@pts/N`, `SSH_TTY`, the pty's owner/mode and the "
    "utmp/wtmp/lastlog records (sshd's monitor records every pty session, `mm_record_login`); only "
    "`has_tty && command == NULL` prints the uname line, motd and `Last login` (sshd's `check_quietlogin`)."
)
NO_SYSTEMD = (
    "Set `sandbox.init: systemd` (cgroup v1, root on the engine's host): init hands over to systemd 252 once the "
    "host has moved the box's own `name=systemd` cgroups into it (README \"systemd as PID 1\"); the battery's "
    "`systemd` run passes this check (`running`, no failed unit). Off by default while it is an experiment."
)
CGROUP_PARENT_WHY = (
    "The limits sit on the box's own cgroup, which its cgroup namespace shows as the root "
    "(memory 268435456, pids 128, cpu quota 50000/100000)."
)
CGROUP_PARENT_FIX = (
    "`sandbox/docker.py` `create_config`: per box, create a parent cgroup (cgroupfs: `/sandtrap/<box>` in the "
    "memory, cpu and pids hierarchies; systemd driver: a `sandtrap-<box>.slice` with MemoryMax/CPUQuota/TasksMax), "
    "put the memory, CPU and pids limits there instead of `Memory`/`NanoCpus`/`PidsLimit`, set "
    "`HostConfig.CgroupParent` to it, pin `CpusetCpus` to `ceil(cpus)` CPUs, and remove the parent with the box. "
    "Tried by hand on this host: the box then reads unlimited root values, lxcfs still shows 256 MiB (it walks "
    "up to the parent's limit), and `nproc` = `/proc/cpuinfo` = 1."
)
# --- the checks ---------------------------------------------------------------------------------------

CHECKS: tuple[Check, ...] = (
    # Emulation tells: a real Linux passes these by construction.
    Check(
        "yes-streams",
        "emulation",
        "exec",
        "yes | head -c 1048576 | wc -c",
        "1048576 bytes stream out of `yes`",
        lambda r: r.out.strip() == "1048576",
    ),
    Check(
        "dev-zero-streams",
        "emulation",
        "exec",
        "head -c 4194304 /dev/zero | md5sum",
        "4 MiB of zeros from /dev/zero (md5 of the real bytes)",
        lambda r: r.out.split()[:1] == [ZERO_MD5],
    ),
    Check(
        "arithmetic",
        "emulation",
        "pty",
        "echo $((6*7)) $((2**10)) $(( (17 % 5) - 3 ))",
        "shell arithmetic: 42 1024 -1",
        lambda r: lines(r.out) == ["42 1024 -1"],
    ),
    Check(
        "pid-expansion",
        "emulation",
        "pty",
        "echo $$ $BASHPID $(sh -c 'echo $$'); test -d /proc/$$ && echo live",
        "`$$` is the shell's live pid; a child shell has another",
        lambda r: (n := ints(r.out)) is not None and len(n) == 3 and n[0] == n[1] != n[2] and "live" in r.out,
    ),
    Check(
        "elf-runs",
        "emulation",
        "exec",
        ELF_COMMAND,
        "a dropped static ELF runs from /tmp (no `Exec format error`)",
        lambda r: lines(r.out) == ["elf-ok", "rc=7"],
    ),
    Check(
        "uname-consistent",
        "emulation",
        "exec",
        "uname -n; hostname; cat /etc/hostname /proc/sys/kernel/hostname; uname -r; "
        "cat /proc/sys/kernel/osrelease; uname -m; dpkg --print-architecture",
        "uname, hostname, /etc/hostname, /proc and dpkg agree",
        _uname_consistent,
    ),
    Check(
        "ps-matches-proc",
        "emulation",
        "exec",
        "ps -e --no-headers | wc -l; ls -d /proc/[0-9]* | wc -l",
        "`ps` lists what /proc holds (not canned output)",
        _ps_matches_proc,
    ),
    Check(
        "no-honeypot-defaults",
        "emulation",
        "exec",
        "hostname; getent passwd phil richard; ls /home",
        "no hostname or user from a public honeypot's defaults (svr04, phil, /home/richard)",
        lambda r: lines(r.out)[:1] not in (["svr04"], ["localhost"]) and not re.search(r"phil|richard", r.out),
    ),
    # Container tells.
    Check(
        "no-dockerenv",
        "container",
        "exec",
        "ls -a / /run | grep -xE '\\.dockerenv|\\.containerenv'",
        "no /.dockerenv or /run/.containerenv",
        lambda r: r.out.strip() == "",
    ),
    Check(
        "pid1-cgroup",
        "container",
        "exec",
        "cat /proc/1/cgroup",
        "/proc/1/cgroup names no docker/containerd/kubepods path",
        lambda r: bool(r.out.strip()) and not re.search(r"docker|containerd|kubepods|libpod|lxc", r.out),
    ),
    Check(
        "self-cgroup",
        "container",
        "exec",
        "cat /proc/self/cgroup",
        "/proc/self/cgroup names no engine path",
        lambda r: bool(r.out.strip()) and not re.search(r"docker|containerd|kubepods|libpod|lxc", r.out),
    ),
    Check(
        "session-scope",
        "container",
        "pty",
        "grep -m1 -o '/user.slice/.*' /proc/self/cgroup",
        "a login shell sits in systemd's `/user.slice/user-0.slice/session-N.scope`",
        lambda r: re.search(r"/user\.slice/user-0\.slice/session-\d+\.scope", r.out) is not None,
    ),
    Check(
        "root-fs-type",
        "container",
        "exec",
        "awk '$2 == \"/\" {print $3}' /proc/mounts; df -T / | awk 'NR == 2 {print $2}'",
        "/ is ext4 (or xfs/btrfs) in /proc/mounts and `df -T`",
        lambda r: (v := lines(r.out)) != [] and all(x in {"ext4", "xfs", "btrfs"} for x in v),
        "container-limit",
        "The root is the engine's storage-driver mount (`overlay`, with `/var/lib/docker/overlay2` paths).",
        VM + " (Within Docker only a block-device driver could, at a full copy per box.)",
    ),
    Check(
        "etc-bind-mounts",
        "container",
        "exec",
        "awk '$2 ~ \"^/etc/(hostname|hosts|resolv.conf)$\" {print $1, $2, $3}' /proc/mounts",
        "/etc/hostname, /etc/hosts, /etc/resolv.conf are plain files, not mounts",
        lambda r: r.out.strip() == "",
        "container-limit",
        "Docker always bind-mounts /etc/hostname (here from `/dev/vda`, the host's disk).",
        VM,
    ),
    Check(
        "mountinfo-overlay",
        "container",
        "exec",
        "grep -c overlay /proc/self/mountinfo",
        "no overlay mount in /proc/self/mountinfo",
        lambda r: r.out.strip() == "0",
        "container-limit",
        "Same as `root-fs-type`: the root is an overlay mount.",
        VM,
    ),
    Check(
        "proc-overmounts",
        "container",
        "exec",
        'awk \'$2 ~ "^/proc/." && $3 != "binfmt_misc" && $3 != "autofs" {print $1, $2, $3}\' /proc/mounts',
        "nothing mounted over files in /proc (binfmt_misc aside)",
        lambda r: r.out.strip() == "",
        "container-limit",
        "The engine masks host-kernel files (/proc/keys, /proc/timer_list, /proc/acpi as tmpfs; /proc/sys, "
        "/proc/irq read-only binds) and lxcfs's views are binds; a container must keep the masks.",
        VM,
    ),
    Check(
        "meminfo-vs-limit",
        "container",
        "exec",
        "awk '/^MemTotal:/ {print $2 * 1024}' /proc/meminfo; "
        "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/proc/meminfo's MemTotal is not above the memory limit",
        _meminfo_within_limit,
    ),
    Check(
        "cgroup-root-unlimited",
        "container",
        "exec",
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max "
        "/sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max "
        "/sys/fs/cgroup/cpu.max 2>/dev/null; true",
        "the root cgroup limits nothing (memory, pids, cpu quota unlimited)",
        lambda r: all(unlimited(x) for x in lines(r.out)),
    ),
    Check(
        "cpus-agree",
        "container",
        "exec",
        "nproc; grep -c ^processor /proc/cpuinfo; cat /sys/fs/cgroup/cpu.max 2>/dev/null || "
        'echo "$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"',
        "`nproc`, /proc/cpuinfo and the CPU quota agree",
        _cpus_agree,
    ),
    Check(
        "loadavg-vs-tasks",
        "container",
        "exec",
        "sh -c 'cat /proc/loadavg; echo $$'; ls -d /proc/[0-9]*/task/[0-9]* | wc -l",
        "/proc/loadavg's task count matches the tasks and its last pid is the reader's",
        _loadavg_agrees,
        # Passes with `sandtrap loadavgfs` (sandbox/loadavgfs.py) over lxcfs's file: the box's own threads, load
        # and newest pid. Without it (lxcfs's file) the last pid is the host's and a fresh box says `0/1`.
    ),
    Check(
        "pid1-name",
        "container",
        "exec",
        "cat /proc/1/comm; ps -o args= -p 1",
        "PID 1 is init/systemd, not sleep, tini or docker-init",
        lambda r: (
            lines(r.out)[:1] in (["init"], ["systemd"])
            and not re.search(r"sleep|tini|docker-init|dumb-init|catatonit", r.out)
        ),
    ),
    Check(
        "pid1-environ",
        "container",
        "exec",
        "tr '\\0' '\\n' < /proc/1/environ",
        "PID 1's environment has no engine variables (HOSTNAME=, container=)",
        lambda r: not re.search(r"^(HOSTNAME|container)=", r.out, re.M),
    ),
    Check(
        "detect-virt-container",
        "container",
        "exec",
        DETECT_CONTAINER,
        "`systemd-detect-virt --container` (or its logic) says `none`",
        lambda r: lines(r.out)[-1:] == ["none"],
    ),
    Check(
        "cap-eff-full",
        "container",
        "exec",
        "grep CapEff /proc/self/status; cat /proc/sys/kernel/cap_last_cap",
        "root's effective capabilities are the kernel's full set",
        _all_caps,
        "container-limit",
        "A box safe to hand to an attacker cannot hold every capability of the host's kernel (sandtrap "
        "keeps 9: CapEff 0x200004fb).",
        VM,
    ),
    Check(
        "seccomp-off",
        "container",
        "exec",
        "grep -E '^Seccomp(_filters)?:' /proc/self/status",
        "`Seccomp: 0` in a login shell",
        lambda r: re.search(r"^Seccomp:\s*0$", r.out, re.M) is not None,
        "container-limit",
        "Docker's seccomp filter (mode 2) shields the shared kernel's syscall surface; dropping it is unsafe.",
        VM,
    ),
    Check(
        "no-new-privs-off",
        "container",
        "exec",
        "grep NoNewPrivs /proc/self/status",
        "`NoNewPrivs: 0` in a login shell",
        lambda r: re.search(r"^NoNewPrivs:\s*0$", r.out, re.M) is not None,
    ),
    Check(
        "no-orphan-roots",
        "container",
        "exec",
        "ps -eo pid=,ppid=,args= | awk '$2 == 0 && $1 > 2'",
        "only PID 1 (and kthreadd) have parent 0",
        lambda r: r.out.strip() == "",
        "known-gap",
        "Every session is a `docker exec`, whose process has parent 0 in the box (`sshd: root@notty`).",
        BROKER,
    ),
    Check(
        "initial-namespaces",
        "container",
        "exec",
        "readlink /proc/self/ns/pid /proc/self/ns/uts /proc/self/ns/ipc /proc/self/ns/mnt",
        "pid/uts/ipc namespaces are the kernel's initial ones (inodes 4026531836/38/39)",
        lambda r: lines(r.out)[:3] == ["pid:[4026531836]", "uts:[4026531838]", "ipc:[4026531839]"],
        "container-limit",
        "Namespaces are what make a container; their inode numbers are not the fixed initial ones.",
        VM,
    ),
    Check(
        "no-user-namespace",
        "container",
        "exec",
        "cat /proc/self/uid_map",
        "uid_map is the identity `0 0 4294967295`",
        lambda r: r.out.split() == ["0", "0", "4294967295"],
    ),
    Check(
        "plausible-pids",
        "container",
        "exec",
        "echo $$; pgrep -xo cron; pgrep -xo rsyslogd",
        "daemons have pids in the hundreds, a new shell in the hundreds or more",
        _big_pids,
    ),
    Check(
        "lsm-label",
        "container",
        "exec",
        "cat /proc/self/attr/current 2>/dev/null; echo",
        "no container AppArmor/SELinux label (`unconfined` or none)",
        lambda r: r.out.strip() in {"", "unconfined"},
        "known-gap",
        "On an AppArmor host the box runs under `docker-default (enforce)`.",
        "`sandbox/docker.py`: `apparmor=unconfined` in SecurityOpt removes the label at the cost of one "
        "layer (capabilities, seccomp and no mounts remain); a profile cannot be named `unconfined`.",
        host_dependent=True,
    ),
    Check(
        "dev-is-devtmpfs",
        "container",
        "exec",
        "findmnt -no FSTYPE /dev; ls /dev | wc -l",
        "/dev is devtmpfs with the machine's devices (100+ entries)",
        _dev_is_devtmpfs,
        "container-limit",
        "/dev is a small tmpfs (15 entries); handing host device nodes to an attacker is unsafe.",
        VM,
    ),
    Check(
        "nofile-hard-limit",
        "container",
        "exec",
        "ulimit -Sn; ulimit -Hn",
        "open files: soft 1024, hard 524288 (systemd's default for sshd sessions)",
        lambda r: (n := ints(r.out)) is not None and len(n) == 2 and n[0] == 1024 and n[1] >= 65536,
        "host-limit",
        "`ulimit_nofile_hard` asks for 524288, but a box's hard limit cannot exceed the engine's own "
        "(containerd's RLIMIT_NOFILE) and raising a hard limit needs CAP_SYS_RESOURCE, which this test "
        "machine withholds even from root (every process here is capped at 20000): the backend halves "
        "the request until the engine accepts, so 16384.",
        "On the host: LimitNOFILE=infinity (1048576) for containerd and docker, as Debian's units set it and "
        "as the set-up starts dockerd where the host allows it; sandtrap then gives 524288 with no change "
        "(the battery then expects a pass).",
        host_allows=lambda: engine_nofile_hard() >= 524288,
    ),
    # Session tells: a login that did not come from sshd.
    Check(
        "who-shows-login",
        "session",
        "pty",
        "tty; who",
        "`who` lists this login: root, pts/N, (client IP)",
        _who_has_me,
    ),
    Check(
        "who-shows-login",
        "session",
        "exec+pty",
        "tty; who",
        "`ssh -t`: `who` lists this login too (sshd records every pty session)",
        _who_has_me,
    ),
    Check(
        "w-shows-login",
        "session",
        "pty",
        "tty; w -h",
        "`w` shows root on pts/N from the client IP",
        _w_has_me,
    ),
    Check(
        "last-shows-login",
        "session",
        "pty",
        "tty; last -n 5",
        "`last` shows this login `still logged in`",
        _last_has_me,
    ),
    Check(
        "wtmp-history",
        "session",
        "exec",
        "last -n 30; last -x -n 5 reboot",
        "`last` has earlier logins from other hosts and boot records",
        _wtmp_history,
    ),
    Check(
        "auth-log-accepted",
        "session",
        "exec",
        "grep -E 'sshd\\[[0-9]+\\]: Accepted password for root ' /var/log/auth.log; echo $(pgrep -x sshd)",
        "auth.log: `sshd[PID]: Accepted password for root from IP port PORT ssh2`, PID a live sshd",
        _accepted_here,
    ),
    Check(
        "auth-log-once",
        "session",
        "exec",
        "grep -E 'Accepted password for root ' /var/log/auth.log",
        "one `Accepted` line per connection, however many channels it opens",
        _accepted_once,
    ),
    Check(
        "auth-log-close-names-user",
        "session",
        "exec",
        "grep -c 'session closed for user $' /var/log/auth.log",
        "every `session closed for user` line names the user",
        lambda r: r.out.strip() == "0",
    ),
    Check(
        "auth-log-failed",
        "session",
        "exec",
        "grep -E 'Failed password for root ' /var/log/auth.log | tail -n 5",
        "the wrong password tried first on this connection is in auth.log",
        _failed_logged,
        box="B",
    ),
    Check(
        "ssh-connection-vars",
        "session",
        "exec",
        'echo "$SSH_CLIENT"; echo "$SSH_CONNECTION"; ip -o -4 addr show | awk \'{print $4}\'',
        "SSH_CLIENT/SSH_CONNECTION carry the client's address and port, and a server address of the box",
        _ssh_vars,
    ),
    Check(
        "login-environment",
        "session",
        "exec",
        "env",
        "sshd's environment (USER, LOGNAME, HOME, SHELL, PATH, MOTD_SHOWN, SSH_*), no MAIL, HOSTNAME, container",
        lambda r: _session_env(r, tty=False),
    ),
    Check(
        "login-environment",
        "session",
        "pty",
        "env",
        "the same plus TERM and SSH_TTY on a terminal",
        lambda r: _session_env(r, tty=True),
    ),
    Check(
        "pam-systemd-environment",
        "session",
        "exec",
        'echo "$XDG_SESSION_ID $XDG_RUNTIME_DIR"; test -d "$XDG_RUNTIME_DIR" && echo dir',
        "pam_systemd's XDG_SESSION_ID and XDG_RUNTIME_DIR=/run/user/0 (a directory)",
        lambda r: (
            re.fullmatch(r"\d+ /run/user/0", lines(r.out)[0] if r.out.strip() else "") is not None and "dir" in r.out
        ),
    ),
    Check("starts-in-home", "session", "exec", "pwd", "the command runs in $HOME", lambda r: r.out.strip() == "/root"),
    Check("starts-in-home", "session", "pty", "pwd", "the shell starts in $HOME", lambda r: lines(r.out) == ["/root"]),
    Check("dollar-zero", "session", "exec", "echo $0", "`$SHELL -c`: $0 is `bash`", lambda r: r.out.strip() == "bash"),
    Check(
        "dollar-zero", "session", "pty", "echo $0", "a login shell: $0 is `-bash`", lambda r: lines(r.out) == ["-bash"]
    ),
    Check("tty", "session", "exec", "tty", "no terminal: `not a tty`", lambda r: r.out.strip() == "not a tty"),
    Check("tty", "session", "pty", "tty", "a pts terminal", lambda r: tty_line(r.out) is not None),
    Check("tty", "session", "exec+pty", "tty", "`ssh -t`: a pts terminal", lambda r: tty_line(r.out) is not None),
    Check(
        "ssh-tty",
        "session",
        "exec",
        'echo "[$SSH_TTY]"',
        "SSH_TTY unset without a terminal",
        lambda r: r.out.strip() == "[]",
    ),
    Check(
        "ssh-tty",
        "session",
        "pty",
        'tty; echo "$SSH_TTY"',
        "SSH_TTY is the terminal",
        lambda r: (v := lines(r.out)) is not None and len(v) == 2 and v[0] == v[1] and v[0].startswith("/dev/pts/"),
    ),
    Check(
        "ssh-tty",
        "session",
        "exec+pty",
        'tty; echo "$SSH_TTY"',
        "`ssh -t`: SSH_TTY is the terminal",
        lambda r: (v := lines(r.out)) is not None and len(v) == 2 and v[0] == v[1] and v[0].startswith("/dev/pts/"),
    ),
    Check(
        "parent-is-sshd",
        "session",
        "exec",
        "ps -o args= -p $PPID",
        "the parent is `sshd: root@notty`",
        lambda r: r.out.strip() == "sshd: root@notty",
    ),
    Check(
        "parent-is-sshd",
        "session",
        "pty",
        "tty; ps -o args= -p $PPID",
        "the parent is `sshd: root@pts/N`",
        _parent_is_sshd_pty,
    ),
    Check(
        "parent-is-sshd",
        "session",
        "exec+pty",
        "tty; ps -o args= -p $PPID",
        "`ssh -t`: the parent is `sshd: root@pts/N`",
        _parent_is_sshd_pty,
    ),
    Check(
        "sshd-ancestry",
        "session",
        "pty",
        "p=$(ps -o ppid= -p $PPID); ps -o args= -p $p; ps -o args= -p $(ps -o ppid= -p $p)",
        "above `sshd: root@pts/N`: `sshd: root [priv]`, then the listener",
        _sshd_chain,
        "known-gap",
        "The session process's parent is outside the box (pid 0).",
        BROKER,
    ),
    Check(
        "motd",
        "session",
        "pty",
        "true",
        "the login prints the uname line and Debian's motd",
        _motd,
    ),
    Check(
        "last-login-first",
        "session",
        "pty",
        "true",
        "the first login to a lived-in box shows `Last login: … from …`",
        lambda r: _last_login(r, from_client=False),
    ),
    Check(
        "last-login-second",
        "session",
        "pty",
        "true",
        "a second login shows `Last login: … from <client IP>`",
        lambda r: _last_login(r, from_client=True),
        second_login=True,
    ),
    Check(
        "sshd-listens",
        "session",
        "exec",
        "ss -tlnp",
        "sshd listens on port 22",
        lambda r: re.search(r"LISTEN.*:22\s.*\"sshd\"", r.out) is not None,
    ),
    Check(
        "own-connection-visible",
        "session",
        "exec",
        "ss -tn state established",
        "`ss` shows this SSH connection (server :22, the client's address and port)",
        _own_connection,
        "known-gap",
        "The SSH connection ends at the honeypot; with `session_transport: exec` (each login a `docker exec`) "
        "nothing in the box holds a TCP connection to show.",
        "Set `sandbox.session_transport: init` with `sandbox.connection_in_box: true` (both the defaults): for "
        "each login the honeypot connects to the box's :22 from the client's address and port and the login's "
        "`sshd: USER [priv]` worker holds the server end while the session lasts (`sandbox/relay.py`, "
        "`sandbox/relay.h`; the battery's `init` run passes it). A client off loopback needs "
        '`network: internal` and three host rules (README "Network").',
    ),
    Check(
        "host-key-matches",
        "session",
        "exec",
        'for f in /etc/ssh/ssh_host_*_key.pub; do ssh-keygen -lf "$f"; done',
        "the host key the client saw is one of the box's /etc/ssh keys",
        _host_key_matches,
        needs_ssh=True,
    ),
    Check(
        "sshd-handshake",
        "session",
        "exec",
        "timeout 5 ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null; tail -n 3 /var/log/auth.log | grep -c 'fatal:'",
        "the box's own sshd on :22 completes a key exchange (no `fatal: chroot` in auth.log)",
        lambda r: re.search(r"^127\.0\.0\.1 ssh-ed25519 AAAA", r.out, re.M) is not None and lines(r.out)[-1:] == ["0"],
    ),
    Check(
        "banner-matches-package",
        "session",
        "exec",
        "dpkg-query -W -f='${Version}\\n' openssh-server; ssh -V 2>&1; "
        "timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/22; head -1 <&3' | tr -d '\\r'",
        "the banner the client saw = the installed openssh-server = `ssh -V` = the box's sshd on :22",
        _banner_matches_package,
        needs_ssh=True,
    ),
    # Network and identity tells.
    Check(
        "network-interfaces",
        "network/identity",
        "exec",
        "ls /sys/class/net",
        "an interface besides `lo`",
        lambda r: any(x != "lo" for x in r.out.split()),
    ),
    Check(
        "default-route",
        "network/identity",
        "exec",
        "ip route show default; awk 'NR > 1 && $2 == \"00000000\"' /proc/net/route",
        "a default route",
        lambda r: r.out.strip() != "",
    ),
    Check(
        "resolv-conf",
        "network/identity",
        "exec",
        "grep -E '^nameserver ' /etc/resolv.conf",
        "/etc/resolv.conf names a nameserver",
        lambda r: r.out.strip() != "",
    ),
    Check(
        "hostname-resolves",
        "network/identity",
        "exec",
        "hostname -f",
        "`hostname -f` gives the FQDN (from /etc/hosts)",
        lambda r: r.code == 0 and "." in r.out.strip(),
    ),
    Check(
        "hostname-not-id",
        "network/identity",
        "exec",
        "hostname",
        "a hostname, not a container id",
        lambda r: re.fullmatch(r"[0-9a-f]{12,64}|localhost", r.out.strip()) is None and r.out.strip() != "",
    ),
    Check(
        "machine-id-unique",
        "network/identity",
        "exec",
        "cat /etc/machine-id /var/lib/dbus/machine-id",
        "a machine-id (and dbus's link to it) that differs between two boxes",
        _machine_id,
        across=True,
    ),
    Check(
        "boot-id-unique",
        "network/identity",
        "exec",
        "cat /proc/sys/kernel/random/boot_id",
        "a boot_id that differs between two machines",
        _boot_id_differs,
        "container-limit",
        "boot_id is the kernel's: every box on one host shows the same.",
        VM,
        across=True,
    ),
    Check(
        "uptime-not-seconds",
        "network/identity",
        "exec",
        "cut -d' ' -f1 /proc/uptime",
        "up for more than ten minutes",
        lambda r: bool(r.out.strip()) and float(r.out.split()[0]) >= 600,
        "container-limit",
        "The box shows the host's uptime (lxcfs's /proc/uptime is left out on purpose): it passes unless "
        "the host itself booted minutes ago.",
        VM,
        host_dependent=True,
    ),
    Check(
        "uptime-matches-pid1",
        "network/identity",
        "exec",
        "cut -d. -f1 /proc/uptime; ps -o etimes= -p 1",
        "PID 1 started within two minutes of boot",
        _uptime_matches_pid1,
        "container-limit",
        "PID 1 started when the box did, long after the host's boot; only a time namespace (not offered "
        "by Docker) could shift it.",
        VM,
    ),
    Check(
        "package-count",
        "network/identity",
        "exec",
        "dpkg -l | grep -c '^ii'",
        "a server's package count (300+; a Debian 12 cloud image has about 350)",
        lambda r: r.out.strip().isdigit() and int(r.out) >= 300,
    ),
    Check(
        "cron-running",
        "network/identity",
        "exec",
        "pgrep -a cron",
        "cron runs",
        lambda r: "cron" in r.out,
    ),
    Check(
        "syslog-running",
        "network/identity",
        "exec",
        "pgrep -x rsyslogd >/dev/null && echo running; m=probe-$$; logger -p user.notice $m; "
        "for i in 1 2 3 4 5 6; do grep -q $m /var/log/syslog && echo logged && break; sleep 0.5; done",
        "rsyslogd runs and writes what `logger` sends",
        lambda r: lines(r.out) == ["running", "logged"],
    ),
    Check(
        "os-release",
        "network/identity",
        "exec",
        '. /etc/os-release; echo "$ID $VERSION_ID $VERSION_CODENAME"; cat /etc/debian_version',
        "Debian 12 (bookworm)",
        lambda r: lines(r.out)[:1] == ["debian 12 bookworm"] and lines(r.out)[1:2][0].startswith("12."),
    ),
    Check(
        "web-story-runs",
        "network/identity",
        "exec",
        "dpkg-query -W -f='${Status}' nginx 2>/dev/null; echo; ss -tln | grep -cE ':(80|443)\\s'; ls /var/log/nginx",
        "the nginx whose logs grow every day is installed and listening",
        _web_story,
    ),
    Check(
        "systemd-answers",
        "network/identity",
        "exec",
        "systemctl is-system-running",
        "`systemctl is-system-running`: running or degraded",
        lambda r: lines(r.out)[:1] in (["running"], ["degraded"]),
        "known-gap",
        "With the default `init: sandtrap` systemd is installed but not PID 1 (`System has not been booted with "
        "systemd as init system`); every Debian 12 server runs it.",
        NO_SYSTEMD,
    ),
    Check(
        "kmod-tools",
        "network/identity",
        "exec",
        "command -v lsmod modprobe",
        "`lsmod` and `modprobe` exist (kmod, priority important)",
        lambda r: len(lines(r.out)) == 2,
    ),
    # What a container cannot hide: the shared kernel.
    Check(
        "debian-kernel",
        "kernel",
        "exec",
        "uname -r; uname -v",
        "Debian 12's kernel: `6.1.0-N-amd64`, `… Debian 6.1.x-y`",
        _debian_kernel,
        "container-limit",
        "`uname` reports the host's kernel (here 6.18.44-fc-v769).",
        VM + " (A Debian 12 host running its own 6.1 kernel also passes.)",
        host_dependent=True,
    ),
    Check(
        "kernel-modules-dir",
        "kernel",
        "exec",
        "ls -d /lib/modules/$(uname -r)",
        "/lib/modules/$(uname -r) exists",
        lambda r: r.code == 0,
        "container-limit",
        "The running kernel is the host's; the image cannot ship its modules (and `dpkg -S` would own none).",
        VM,
    ),
    Check(
        "kernel-package",
        "kernel",
        "exec",
        "dpkg -S /boot/vmlinuz-$(uname -r)",
        "the running kernel's image is in /boot and owned by a linux-image package",
        lambda r: r.code == 0 and "linux-image" in r.out,
        "container-limit",
        "No kernel is installed in the box; the host's kernel is no Debian package.",
        VM,
    ),
    Check(
        "kernel-cmdline",
        "kernel",
        "exec",
        "cat /proc/cmdline",
        "a Debian boot line: `BOOT_IMAGE=/boot/vmlinuz-6.1.0-… root=UUID=…`",
        lambda r: re.search(r"BOOT_IMAGE=/boot/vmlinuz-6\.1\.0-\S+ root=", r.out) is not None,
        "container-limit",
        "/proc/cmdline is the host's boot line.",
        VM,
        host_dependent=True,
    ),
    Check(
        "kernel-threads",
        "kernel",
        "exec",
        "cat /proc/2/comm; ps -e -o comm= | grep -c '^kworker'",
        "kthreadd is PID 2 and kworker threads are visible",
        _kthreads,
        "container-limit",
        "The box's pid namespace hides the kernel's threads; sharing the host's would show the host.",
        VM,
    ),
    Check(
        "block-devices",
        "kernel",
        "exec",
        "awk '$2 == \"/\" {print $1}' /proc/mounts; tail -n +3 /proc/partitions | awk '{print \" \" $4}'; "
        "lsblk -rno NAME,MOUNTPOINT",
        "/ is on a block device listed in /proc/partitions, and lsblk shows it mounted at /",
        _block_root,
        "container-limit",
        "The root is an overlay; /proc/partitions and lsblk show the host's disks (one mounted at /etc/hostname).",
        VM,
    ),
    Check(
        "dmesg-readable",
        "kernel",
        "exec",
        "dmesg | tail -n 3",
        "root can read the kernel log",
        lambda r: r.code == 0 and r.out.strip() != "",
        "container-limit",
        "The kernel log is the host's; reading it needs CAP_SYSLOG (and Docker's seccomp blocks syslog(2)).",
        VM,
    ),
    Check(
        "cgroup2-unified",
        "kernel",
        "exec",
        "stat -fc %T /sys/fs/cgroup",
        "Debian 12 mounts cgroup v2 at /sys/fs/cgroup (`cgroup2fs`)",
        lambda r: r.out.strip() == "cgroup2fs",
        "container-limit",
        "The cgroup version is the host kernel's (this host runs cgroup v1).",
        VM + " (A cgroup v2 host also passes.)",
        host_dependent=True,
    ),
)


def key(check: Check) -> str:
    return f"{check.id} ({check.mode})"


def outcome(check: Check, result: Result | None) -> Outcome:
    """Apply the check's predicate; ``None`` means it does not apply (no SSH client behind the box)."""
    if result is None:
        return "n/a"
    try:
        return "pass" if check.passes(result) else "fail"
    except (IndexError, KeyError, ValueError, AttributeError, TypeError):
        return "fail"  # an answer too far from a real one to parse


# Pass when logins are started by the box's listener (sandbox.session_transport: init), not by docker exec.
INIT_TRANSPORT_PASSES = frozenset({"no-orphan-roots", "sshd-ancestry", "own-connection-visible"})


# Pass when systemd is the box's PID 1 (sandbox.init: systemd).
SYSTEMD_PASSES = frozenset({"systemd-answers"})


def checks_for(transport: str, init: str = "sandtrap") -> list[Check]:
    """The checks with what sandtrap must show when its logins come by ``transport`` (exec or init) and its
    boxes' PID 1 is ``init`` (sandtrap or systemd)."""
    passes = (set() if transport == "exec" else set(INIT_TRANSPORT_PASSES)) | (
        SYSTEMD_PASSES if init == "systemd" else set()
    )
    return [replace(c, expected="pass") if c.id in passes else c for c in CHECKS]


# sandbox.backend: microvm. A VM has its own kernel, so what a container cannot hide is no tell there; the guest's
# own sshd serves the logins and systemd is its PID 1. What a VM still shows, with why and the fix (keyed by the
# check's id, or by "id (mode)" for one mode of it):
_REAL_SSHD = (
    "The guest's own Debian sshd answers this way (the relay changes nothing of it): the rule was written against "
    "sandtrap's container session helper and is stricter than the real server."
)
_REAL_SSHD_FIX = "Make the rule (and the container path's session helper) what Debian's sshd shows: "
MICROVM_GAPS: dict[str, tuple[Expected, str, str]] = {
    "proc-overmounts": (
        "known-gap",
        "A VM restored from the template gets a boot_id of its own by a read-only bind mount over "
        "/proc/sys/kernel/random/boot_id (the kernel sets it once per boot): that mount shows in /proc/mounts.",
        "Give each restored VM its boot_id from the kernel (a guest module that rewrites it, or a cold boot).",
    ),
    "meminfo-vs-limit": ("pass", "", ""),  # the real server's answer, which the rule now takes
    "cpus-agree": ("pass", "", ""),  # the real server's answer, which the rule now takes
    "nofile-hard-limit": ("pass", "", ""),  # the guest's own limits, no engine in between
    "login-environment": ("pass", "", ""),  # the real server's answer, which the rule now takes
    "parent-is-sshd (exec)": (
        "known-gap",
        _REAL_SSHD + " One sshd process serves every channel of a root connection, titled by its ttys "
        "(`sshd: root@pts/0,pts/1`), so an exec after a pty shell on one connection shows `pts/0`.",
        _REAL_SSHD_FIX + "the ttys of the connection's channels, or `notty`.",
    ),
    "parent-is-sshd (exec+pty)": (
        "known-gap",
        _REAL_SSHD + " One sshd process serves every channel of a root connection, titled by its ttys "
        "(`sshd: root@pts/0,pts/1`), so an exec after a pty shell on one connection shows `pts/0`.",
        _REAL_SSHD_FIX + "the ttys of the connection's channels, or `notty`.",
    ),
    "sshd-ancestry": (
        "known-gap",
        _REAL_SSHD + " A root login has no `[priv]` process (sshd does not separate privileges after a root "
        "login): `sshd: root@pts/N` sits under the listener.",
        _REAL_SSHD_FIX + "for root, the listener right above the session.",
    ),
    "sshd-handshake": (
        "known-gap",
        "`ssh-keyscan` to the guest's own :22 got no answer within the check's 5 s here (TCG on a loaded 2-core "
        "host); not investigated further.",
        "Measure the guest's key exchange time under TCG; under KVM it is milliseconds.",
    ),
    "uptime-not-seconds": (
        "known-gap",
        "The VM booted minutes before the login (a cold-booted pool).",
        "Issue 15's snapshot pool: restore VMs from a snapshot of one booted long before, the clock stepped.",
    ),
    "uptime-matches-pid1": (
        "known-gap",
        "PID 1 started within a second of the kernel: `ps`'s etimes rounds up past /proc/uptime's truncated "
        "seconds, so uptime - etimes is -1 at times.",
        "Give the rule a second of slack.",
    ),
}


# Checks whose outcome on microvm depends on how fast the emulated guest is (TCG on a shared host): reported in the
# table, not asserted.
MICROVM_TIMING = frozenset({"sshd-handshake", "uptime-matches-pid1"})


def checks_for_microvm() -> list[Check]:
    """The checks with what sandtrap must show on ``sandbox.backend: microvm``."""
    out = []
    for c in CHECKS:
        gap = MICROVM_GAPS.get(key(c)) or MICROVM_GAPS.get(c.id)  # one mode of a check, or all of them
        if gap is not None:
            expected, why, fix = gap
            out.append(replace(c, expected=expected, why=why, fix=fix, host_dependent=False))
        elif c.expected == "container-limit" or c.id in INIT_TRANSPORT_PASSES | SYSTEMD_PASSES:
            out.append(replace(c, expected="pass"))
        else:
            out.append(c)
    return out


def engine_nofile_hard() -> int:
    """The lowest hard open-files limit of the local engine's daemons (containerd, dockerd); 0 if none found.

    A box's limits are set by the engine's runtime, which inherits them and cannot raise a hard limit
    without CAP_SYS_RESOURCE: the box can have no more than the engine has.
    """
    limits: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() not in ("dockerd", "containerd"):
                continue
            text = (proc / "limits").read_text()
        except OSError:
            continue
        m = re.search(r"^Max open files\s+\S+\s+(\S+)", text, re.M)
        if m:
            limits.append(1 << 62 if m.group(1) == "unlimited" else int(m.group(1)))
    return min(limits, default=0)


def expected_here(check: Check, plain: Outcome) -> Expected:
    """What sandtrap must show on this host: a host-dependent check passes where the host passes it, a
    host-limit check where the host allows it."""
    if check.host_dependent and plain == "pass":
        return "pass"
    if check.expected == "host-limit" and check.host_allows is not None and check.host_allows():
        return "pass"
    return check.expected


def counts(rows: list[tuple[Check, Outcome, Outcome]]) -> dict[str, int]:
    out = {"checks": len(rows), "sandtrap pass": 0, "plain pass": 0, "known-gap": 0, "container-limit": 0}
    out["host-limit"] = 0
    out["regressions"] = 0
    for check, ours, plain in rows:
        out["sandtrap pass"] += ours == "pass"
        out["plain pass"] += plain == "pass"
        if ours != "pass":
            exp = expected_here(check, plain)
            out["regressions" if exp == "pass" else exp] += 1
    return out


def markdown(rows: list[tuple[Check, Outcome, Outcome]]) -> str:
    """The comparison table, the counts, then the gaps and the container limits with their reasons."""
    mark = {"pass": "pass", "fail": "**fail**", "n/a": "n/a", "error": "**error**"}
    c = counts(rows)
    out = [
        f"{c['checks']} checks: sandtrap passes {c['sandtrap pass']}, a plain hardened container reached by "
        f"`docker exec` passes {c['plain pass']}. Of sandtrap's failures: what a container cannot hide "
        f"{c['container-limit']}, known gaps {c['known-gap']}, limits of the test host {c['host-limit']}.",
        "",
        "| check | family | mode | sandtrap | plain container | what a real server shows |",
        "|---|---|---|---|---|---|",
    ]
    for check, ours, plain in rows:
        exp = expected_here(check, plain)
        note = "" if exp == "pass" or ours == "pass" else f" ({exp})"
        out.append(
            f"| `{check.id}` | {check.family} | {check.mode} | {mark[ours]}{note} | {mark[plain]} | {check.real} |"
        )
    for title, kind in (
        ("Known gaps (fixable; proposal)", "known-gap"),
        ("What a container cannot hide", "container-limit"),
        ("Limits of the test host (sandtrap passes where the host allows)", "host-limit"),
    ):
        items: list[str] = []
        seen: set[str] = set()
        for check, ours, plain in rows:
            if ours == "pass" or expected_here(check, plain) != kind or check.id in seen:
                continue
            seen.add(check.id)
            name = key(check) if kind == "known-gap" else check.id
            items.append(f"* `{name}`: {check.why} **Fix:** {check.fix}")
        if items:
            out += ["", f"### {title}", "", *items]
    return "\n".join(out) + "\n"


def side_by_side(docker: str, microvm: str) -> str:
    """Two tables of :func:`markdown` (``sandbox.backend`` docker and microvm, same checks) as one: a column each,
    then the plain container and what a real server shows; each run's count line first."""

    def rows(text: str) -> dict[str, list[str]]:
        out = {}
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("| `") and len(cells) == 6:
                out[f"{cells[0]} {cells[2]}"] = cells
        return out

    vm = rows(microvm)
    out = [
        "docker: " + docker.splitlines()[0],
        "",
        "microvm: " + microvm.splitlines()[0],
        "",
        "| check | family | mode | docker | microvm | plain container | what a real server shows |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, cells in rows(docker).items():
        other = vm.get(name)
        out.append(
            f"| {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {other[3] if other else 'n/a'} | {cells[4]} "
            f"| {cells[5]} |"
        )
    return "\n".join(out) + "\n"
