"""Micro-VM bench (issue 15): what a QEMU VM per attacker costs next to a Docker box, through the honeypot.

    python -m bench.microvm [--quick] [--no-docker] [--no-ksm]

Runs two honeypots in this process on 127.0.0.1 (random ports): one with ``sandbox.backend: microvm`` (under
KVM where the probe finds it usable, else TCG: the table says which) and, for the side-by-side figures, one
with the Docker backend and the image ``make setup`` built. Measures:

- boot: each VM's cold start, QEMU's start to the guest agent answering and sshd up (``boot_s``), and the
  warm baseline listing after it;
- snapshot restore and warm acquire: read from the sandboxes (``restore_s``) and the honeypot's own
  ``acquire_ms`` (``sandtrap.sandbox.assigned``) where the build has them; this bench does not restore itself;
- login -> first output: TCP connect, key exchange, password, PTY shell, until the first byte of shell output
  (each sample takes a fresh warm VM; the harness waits for the pool's refill between samples);
- keystroke echo: ``x`` typed into an idle shell until its echo arrives, rotating over the two honeypots;
- QEMU's RSS and PSS per idle VM (``/proc/PID/smaps_rollup``), its cgroup's charge, and an idle Docker box's
  cgroup charge; from those, how many idle VMs or boxes fit in 24 GiB;
- KSM (``/sys/kernel/mm/ksm``): whether the kernel has it; with ``--ksm`` (default) it is switched on for the
  run (QEMU marks guest RAM mergeable: ``-machine mem-merge=on``), the pages it shares are counted, PSS is taken
  again, and the previous setting is restored at the end.

Needs root (a VM's namespace, tap and cgroups) and QEMU; otherwise it says why and exits 0 (``make bench`` goes
on). The VM image is built once for the bench's data dir (cached in ``data/cache`` by its inputs).
Writes bench/results/microvm.md and microvm.json (--quick: bench/.work/quick/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
from rich.console import Console

from bench.client import Screen, ScreenSession, ends_with_prompt, options, received_more
from bench.machine import facts
from bench.measures.latency import keystroke_echo, rotated
from bench.services import pct
from bench.stats import clean
from sandtrap.app import Services, cache_dir, running, vm_planted_files
from sandtrap.config import Settings, load_settings
from sandtrap.events import SANDBOX_ASSIGNED, CaptureSink
from sandtrap.sandbox.docker import seccomp
from sandtrap.sandbox.microvm.backend import MicroVMBackend, access_key_path, guest_files
from sandtrap.sandbox.microvm.guest import load_access_key
from sandtrap.sandbox.microvm.image import build_vm_image

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work"
KSM = Path("/sys/kernel/mm/ksm")
PASSWORD = "bench-" + os.urandom(6).hex()
BUDGET = 24 << 30  # the goal: >= 40 idle VMs in 24 GiB under KVM
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _settings(backend: str, data: Path, pool: int) -> Settings:
    sandbox: dict[str, Any] = {"backend": backend, "pool_size": pool}
    if backend == "microvm":
        sandbox["microvm"] = {"memory": "512m", "vcpus": 1, "boot_timeout_s": 1200}  # TCG on a busy host: minutes
    return load_settings(
        None,
        {
            "sensor": f"bench-{backend}-{os.urandom(3).hex()}",
            "ssh": {"listen": "127.0.0.1:0"},
            "api": {"listen": "127.0.0.1:0"},
            "sandbox": sandbox,
            "storage": {"data_dir": str(data)},
            "image": {"cache_dir": str(ROOT / "data" / "cache")},
            "auth": {"credentials": [{"username": "root", "password": PASSWORD}], "accept_all_after": 0,
                     "failure_delay_s": 0, "success_delay_s": 0},
        },
    )  # fmt: skip


def why_not() -> str:
    if os.geteuid() != 0:
        return "not root (a VM's network namespace, tap and cgroups need root)"
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils")):
        if shutil.which(tool) is None:
            return f"{tool} missing (apt-get install {package})"
    return ""


async def ensure_image(settings: Settings) -> None:
    key = load_access_key(access_key_path(settings.data_dir / "microvm"))
    guest = guest_files(
        settings.sandbox, key, vm_planted_files(settings)
    )  # the capture CA too (the backend bakes it in)
    _, built = await build_vm_image(settings.image, guest, cache_dir(settings), console=Console(stderr=True))
    log("VM image " + ("built" if built else "reused"))


# -- memory ---------------------------------------------------------------------------------------------------
def rollup_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                out[key] = int(rest.split()[0])
    return out


def cgroup_bytes(path: Path) -> int | None:
    try:
        return int((path / "memory.usage_in_bytes").read_text())
    except (OSError, ValueError):
        return None


def ksm_read() -> dict[str, int]:
    out = {}
    for name in ("run", "pages_to_scan", "sleep_millisecs", "pages_shared", "pages_sharing", "full_scans"):
        with contextlib.suppress(OSError, ValueError):
            out[name] = int((KSM / name).read_text())
    return out


def ksm_write(values: dict[str, int]) -> None:
    for name in ("pages_to_scan", "sleep_millisecs", "run"):
        if name in values:
            (KSM / name).write_text(str(values[name]))


async def vms(svc: Services) -> list[Any]:
    backend = svc.backend
    assert isinstance(backend, MicroVMBackend)
    return [backend.sandbox(i.id, i.name) for i in await backend.list_managed() if i.state == "warm"]


async def idle_memory(svc: Services) -> list[dict[str, Any]]:
    rows = []
    for vm in await vms(svc):
        roll = rollup_kib(vm.record.pid)
        rows.append({
            "vm": vm.name, "rss_mib": roll.get("Rss", 0) / 1024, "pss_mib": roll.get("Pss", 0) / 1024,
            "cgroup_mib": (cgroup_bytes(Path("/sys/fs/cgroup/memory/sandtrap-vm") / vm.name) or 0) / MiB,
        })  # fmt: skip
    return rows


async def docker_box_memory(svc: Services) -> dict[str, Any]:
    """An idle warm Docker box of the pool: its cgroup's charge (every process in the box, page cache too)."""
    infos = [i for i in await svc.backend.list_managed() if i.state == "warm"]
    for info in infos:
        if found := await asyncio.to_thread(_box_cgroup, info.id):
            return found
    return {}


def _box_cgroup(container_id: str) -> dict[str, Any]:
    for path in Path("/sys/fs/cgroup/memory").glob(f"**/{container_id}*"):
        used = cgroup_bytes(path)
        if used is not None:
            stat = dict(ln.split() for ln in (path / "memory.stat").read_text().splitlines())
            return {"cgroup_mib": used / MiB, "rss_mib": int(stat.get("total_rss", 0)) / MiB}
    return {}


# -- latency --------------------------------------------------------------------------------------------------
async def first_output(port: int) -> dict[str, float]:
    t0 = time.perf_counter()
    conn = await asyncssh.connect("127.0.0.1", port, username="root", password=PASSWORD, **options())
    try:
        screen = Screen()
        await conn.create_session(lambda: ScreenSession(screen), term_type="xterm", term_size=(80, 24), encoding=None)
        first = await screen.wait(received_more(0), 300)
        prompt = await screen.wait(ends_with_prompt, 300)
    finally:
        conn.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(30):
                await conn.wait_closed()
    return {"first_output_ms": (first - t0) * 1000, "prompt_ms": (prompt - t0) * 1000}


class Term:
    def __init__(self, conn: asyncssh.SSHClientConnection, chan: Any, screen: Screen) -> None:
        self.conn, self.chan, self.screen = conn, chan, screen

    def send(self, data: bytes) -> None:
        self.chan.write(data)


@contextlib.asynccontextmanager
async def terminal(port: int) -> AsyncIterator[Term]:
    conn = await asyncssh.connect("127.0.0.1", port, username="root", password=PASSWORD, **options())
    screen = Screen()
    chan, _ = await conn.create_session(
        lambda: ScreenSession(screen), term_type="xterm", term_size=(80, 24), encoding=None
    )
    try:
        yield Term(conn, chan, screen)
    finally:
        conn.close()


async def refilled(svc: Services, timeout_s: float) -> bool:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await svc.pool.wait_refilled()
            return True
    return False


# -- the run --------------------------------------------------------------------------------------------------
async def main(quick: bool, docker: bool, ksm: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"quick": quick, "machine": facts(), "budget_gib": BUDGET >> 30}
    vm_pool, logins, keystrokes, ksm_wait_s = (1, 1, 20, 45) if quick else (3, 5, 200, 120)
    data = WORK / "microvm-data"
    vm_settings = _settings("microvm", data, vm_pool)
    await ensure_image(vm_settings)
    shutil.rmtree(data / "microvm" / "vms", ignore_errors=True)
    ksm_before = ksm_read()
    res["ksm_available"] = bool(ksm_before)
    async with contextlib.AsyncExitStack() as stack:
        capture = CaptureSink()
        t0 = time.monotonic()
        vm_svc = await stack.enter_async_context(running(vm_settings, sinks=[capture]))
        backend = vm_svc.backend
        assert isinstance(backend, MicroVMBackend)
        res["accel"], res["accel_reason"] = backend.accel.name, backend.accel.reason
        log(f"microvm honeypot: {backend.accel.name}; waiting for a pool of {vm_pool} VMs")
        await refilled(vm_svc, vm_settings.sandbox.microvm.boot_timeout_s * vm_pool)
        res["pool_warm_s"] = time.monotonic() - t0
        warm = await vms(vm_svc)
        res["boot_s"] = [vm.boot_s for vm in warm if vm.boot_s is not None]
        res["baseline_s"] = [vm.baseline_s for vm in warm if vm.baseline_s is not None]
        res["restore_s"] = [r for vm in warm if (r := getattr(vm, "restore_s", None)) is not None]
        log(f"  boot to sshd: {res['boot_s']} s; pool warm after {res['pool_warm_s']:.0f}s")

        dk_svc: Services | None = None
        if docker:
            dk_settings = _settings("docker", Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-vm-dk-{os.getpid()}", 1)
            made = seccomp.profile_path(ROOT / "data")
            if made.exists():
                seccomp.profile_path(dk_settings.data_dir).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(made, seccomp.profile_path(dk_settings.data_dir))
            dk_svc = await stack.enter_async_context(running(dk_settings))
            await refilled(dk_svc, 120)

        log("idle 20 s, then memory per idle VM")
        await asyncio.sleep(20)
        res["idle"] = await idle_memory(vm_svc)
        if dk_svc is not None:
            res["docker_idle"] = await docker_box_memory(dk_svc)
        if ksm and ksm_before:
            try:
                ksm_write({"pages_to_scan": 1000, "sleep_millisecs": 20, "run": 1})  # ~200 MB/s scanned
                log(f"KSM on for {ksm_wait_s}s (was run={ksm_before.get('run')})")
                await asyncio.sleep(ksm_wait_s)
                res["ksm"] = ksm_read()
                res["idle_ksm"] = await idle_memory(vm_svc)
            except OSError as exc:
                res["ksm_error"] = str(exc)
            finally:
                with contextlib.suppress(OSError):
                    ksm_write({k: ksm_before[k] for k in ("pages_to_scan", "sleep_millisecs", "run")})

        ports = {"microvm": vm_svc.ssh.port, **({"docker": dk_svc.ssh.port} if dk_svc else {})}
        services = {"microvm": vm_svc, **({"docker": dk_svc} if dk_svc else {})}
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in ports}
        for i in range(logins - 1):  # each sample takes a fresh VM: the pool's refill is awaited after it
            for name in rotated(list(ports), i):
                async with asyncio.timeout(1800):
                    samples[name].append(await first_output(ports[name]))
                await refilled(services[name], 1800)
            log(f"  login -> first output {i + 1}/{logins}")
        async with contextlib.AsyncExitStack() as terms_stack:
            terms: dict[str, Term] = {}
            for name in rotated(list(ports), logins):  # the last sample's session is the keystroke session
                t0 = time.perf_counter()
                term = await terms_stack.enter_async_context(terminal(ports[name]))
                first = await term.screen.wait(received_more(0), 1800)
                prompt = await term.screen.wait(ends_with_prompt, 1800)
                samples[name].append({"first_output_ms": (first - t0) * 1000, "prompt_ms": (prompt - t0) * 1000})
                terms[name] = term
            log(f"  login -> first output {logins}/{logins}: {samples}")
            res["echo"] = await keystroke_echo(terms, keystrokes, log)  # type: ignore[arg-type]
        res["login"] = samples
        res["acquire_ms"] = [float(e.get("acquire_ms")) for e in capture.events if e.eventid == SANDBOX_ASSIGNED]
    if ksm_before:
        res["ksm_restored"] = ksm_read().get("run") == ksm_before.get("run")
    return res


def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _fmt(x: float | None, unit: str, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f} {unit}"


def table(res: dict[str, Any]) -> str:
    accel = res.get("accel", "?")
    rows = [f"| measure ({accel.upper()} here) | microvm | docker |", "|---|---|---|"]

    def row(name: str, vm: str, dk: str = "") -> None:
        rows.append(f"| {name} | {vm} | {dk} |")

    boot = res.get("boot_s", [])
    row("boot: QEMU start to the guest's sshd (median, n)", f"{_fmt(_med(boot), 's')} (n={len(boot)})")
    row("warm baseline listing after boot", _fmt(_med(res.get("baseline_s", [])), "s"))
    restore = res.get("restore_s", [])
    row("snapshot restore", _fmt(_med(restore), "s") if restore else "not in this build (restore work)")
    acq = res.get("acquire_ms", [])
    row("acquire from the warm pool (p50, all assigned)", _fmt(_med(acq), "ms") if acq else "—")
    for key, label in (("first_output_ms", "login -> first output"), ("prompt_ms", "login -> prompt")):
        vals = {n: [s[key] for s in res.get("login", {}).get(n, [])] for n in ("microvm", "docker")}
        row(f"{label} (median)", _fmt(_med(vals["microvm"]), "ms", 0), _fmt(_med(vals["docker"]), "ms", 0))
    echo = res.get("echo", {}).get("samples", {})
    vm_e, dk_e = echo.get("microvm", []), echo.get("docker", [])
    row("keystroke echo (p50 / p95)", f"{_fmt(_med(vm_e), 'ms', 2)} / {_fmt(pct(vm_e, 95) if vm_e else None, 'ms', 2)}",
        f"{_fmt(_med(dk_e), 'ms', 2)} / {_fmt(pct(dk_e, 95) if dk_e else None, 'ms', 2)}")  # fmt: skip
    idle = res.get("idle", [])
    rss, pss = _med([r["rss_mib"] for r in idle]), _med([r["pss_mib"] for r in idle])
    cg = _med([r["cgroup_mib"] for r in idle])
    dk = res.get("docker_idle", {})
    row("idle: QEMU RSS / PSS per VM", f"{_fmt(rss, 'MiB', 0)} / {_fmt(pss, 'MiB', 0)}")
    row("idle: cgroup charge per VM / per box", _fmt(cg, "MiB", 0), _fmt(dk.get("cgroup_mib"), "MiB", 0))
    budget = res.get("budget_gib", 24) * 1024
    fits_vm = int(budget // pss) if pss else None
    fits_dk = int(budget // dk["cgroup_mib"]) if dk.get("cgroup_mib") else None
    row(f"idle VMs / boxes held in {res.get('budget_gib', 24)} GiB (by PSS; box: cgroup)",
        str(fits_vm or "—"), str(fits_dk or "—"))  # fmt: skip
    ksm = res.get("ksm")
    if ksm:
        after = _med([r["pss_mib"] for r in res.get("idle_ksm", [])])
        row("KSM on: pages shared / sharing; PSS per VM after",
            f"{ksm.get('pages_shared', 0)} / {ksm.get('pages_sharing', 0)} "
            f"({ksm.get('pages_sharing', 0) * PAGE / MiB:.0f} MiB saved); {_fmt(after, 'MiB', 0)}")  # fmt: skip
    else:
        row("KSM", "available, not switched on" if res.get("ksm_available") else "not in this kernel")
    return "\n".join(rows)


def cli() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.microvm", description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-docker", action="store_true", help="the microvm figures alone")
    ap.add_argument("--no-ksm", action="store_true", help="leave /sys/kernel/mm/ksm alone")
    args, _ = ap.parse_known_args()  # make bench passes BENCH_ARGS meant for python -m bench too
    if reason := why_not():
        print(f"bench.microvm skipped: {reason}")
        return 0
    started = time.time()
    res = asyncio.run(main(args.quick, not args.no_docker, not args.no_ksm))
    res["duration_s"] = time.time() - started
    out = WORK / "quick" if args.quick else ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "microvm.json").write_text(json.dumps(clean(res), indent=1) + "\n")
    text = table(res)
    (out / "microvm.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
