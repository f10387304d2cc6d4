"""A VM's bounds and its death, the pure parts: the cgroup limits from the settings and the files written (on a
tree standing in for /sys/fs/cgroup), QEMU's chroot and panic action, how an exit is described, and the watch's
verdicts on a QMP socket that answers as a panicked, a running or a silent QEMU. The kernel's side is
tests/integration/test_microvm_faults.py."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from sandtrap.config import MicroVMSettings
from sandtrap.sandbox.microvm import qemu, watch
from sandtrap.sandbox.microvm.limits import VMCgroups, vm_limits

MiB = 1 << 20


def _launch(tmp_path: Path) -> qemu.Launch:
    return qemu.Launch("sandtrap-vm-x", tmp_path, tmp_path / "disk.qcow2", tmp_path / "k", tmp_path / "i", "m", "u")


def fake_v1(root: Path) -> Path:
    for ctrl in ("memory", "pids", "cpu"):
        (root / ctrl).mkdir(parents=True)
        (root / ctrl / "cgroup.procs").write_text("")
    return root


def test_limits_are_ram_plus_tcg_cache_plus_overhead() -> None:
    settings = MicroVMSettings(memory=512 * MiB, tcg_cache=128 * MiB, memory_overhead=256 * MiB, vcpus=2)
    tcg = vm_limits(settings, tcg=True)
    assert tcg.memory == tcg.memory_swap == 896 * MiB and tcg.cpus == 2 and tcg.pids == settings.pids_max
    assert vm_limits(settings, tcg=False).memory == 768 * MiB  # no translation cache under KVM


def test_cgroups_are_made_read_back_and_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    cgroups = VMCgroups(fake_v1(tmp_path))
    assert cgroups.available, cgroups.reason
    made = cgroups.create("sandtrap-vm-abc", vm_limits(MicroVMSettings(), tcg=True))
    assert made is not None
    assert [p.relative_to(tmp_path).as_posix() for p in made.procs] == [
        f"{c}/sandtrap-vm/sandtrap-vm-abc/cgroup.procs" for c in ("memory", "pids", "cpu")
    ]
    memory = tmp_path / "memory" / "sandtrap-vm" / "sandtrap-vm-abc"
    assert int((memory / "memory.limit_in_bytes").read_text()) == made.limits.memory
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cgroups.oom_kills("sandtrap-vm-abc") == 2 and cgroups.oom_kills("sandtrap-vm-none") == 0
    # A stopped VM's cgroups go by reconciliation; a name not given (another sensor's VM) stays.
    cgroups.create("sandtrap-vm-other", vm_limits(MicroVMSettings(), tcg=True))
    for f in tmp_path.glob("*/sandtrap-vm/sandtrap-vm-abc/*"):  # a fake tree's files are not the kernel's: rmdir
        f.unlink()  # would refuse them, as the kernel refuses a cgroup with a process in it
    assert cgroups.sweep({"sandtrap-vm-abc", "sandtrap-vm-gone"}) == 1
    assert not memory.exists() and (tmp_path / "pids" / "sandtrap-vm" / "sandtrap-vm-other").exists()


def test_without_root_there_are_no_cgroups_and_it_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    cgroups = VMCgroups(fake_v1(tmp_path))
    assert cgroups.reason == "the honeypot does not run as root"
    assert cgroups.create("sandtrap-vm-abc", vm_limits(MicroVMSettings(), tcg=True)) is None


def test_qemu_is_chrooted_and_a_panic_stops_the_vm(tmp_path: Path) -> None:
    argv = qemu.qemu_argv(MicroVMSettings(), qemu.Accel("tcg", "test"), _launch(tmp_path))
    assert argv[argv.index("-chroot") + 1] == str(tmp_path / "chroot")
    assert argv[argv.index("-action") + 1] == "panic=pause" and "pvpanic-pci" in argv
    assert argv[argv.index("-machine") + 1] == "q35,memory-backend=mem0,mem-merge=on"
    assert "-chroot" not in qemu.qemu_argv(MicroVMSettings(chroot=False), qemu.Accel("tcg", "t"), _launch(tmp_path))


def test_namespace_script_joins_the_cgroups_first() -> None:
    procs = [
        Path("/sys/fs/cgroup/memory/sandtrap-vm/x/cgroup.procs"),
        Path("/sys/fs/cgroup/pids/sandtrap-vm/x/cgroup.procs"),
    ]
    script = qemu.namespace_script(qemu.GuestNet("10.20.1.1", "10.20.1.13", 24), procs)
    steps = script.split("; ")
    assert steps[:3] == ["set -e", f"echo $$ > {procs[0]}", f"echo $$ > {procs[1]}"]
    assert steps.index(f"echo $$ > {procs[1]}") < steps.index("ip tuntap add dev tap0 mode tap")


def test_exits_are_told_apart() -> None:
    assert watch.describe_exit(-signal.SIGKILL, oom_kills=1).startswith("QEMU out of memory")
    assert watch.describe_exit(-signal.SIGKILL, oom_kills=0) == "QEMU killed by SIGKILL"
    assert watch.describe_exit(-signal.SIGTERM, oom_kills=3) == "QEMU killed by SIGTERM"
    assert watch.describe_exit(0, 0) == "guest powered off (QEMU exited)"
    assert watch.describe_exit(1, 0) == "QEMU exited with status 1"


class FakeQEMU:
    """QEMU as the watch sees it: ``wait()`` ends when it exits (``exit()``), its monitor answers ``query-status``
    with ``status`` (None: never answers)."""

    def __init__(self, status: str | None) -> None:
        self.status = status
        self.pid = 4242
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def exit(self, code: int) -> None:
        if not self._exited.done():  # close() cancelled the wait
            self._exited.set_result(code)

    async def wait(self) -> int:
        return await self._exited

    async def qmp(self, path: Path, command: str, arguments: object = None) -> object:
        if self.status is None:
            await asyncio.Event().wait()
        return {"status": self.status, "running": self.status == "running"}


async def _watched(
    fake: FakeQEMU, monkeypatch: pytest.MonkeyPatch, unresponsive_s: float = 5.0, oom_kills: int = 0
) -> tuple[watch.VMWatch, list[str]]:
    monkeypatch.setattr(watch, "PROBE_INTERVAL_S", 0.001)
    monkeypatch.setattr(qemu, "qmp", fake.qmp)
    handled: list[str] = []

    async def on_failure(reason: str) -> None:
        handled.append(reason)

    w = watch.VMWatch("sandtrap-vm-t", fake, Path("qmp.sock"), unresponsive_s, lambda: oom_kills, on_failure)  # type: ignore[arg-type]
    return w, handled


async def _until_failed(w: watch.VMWatch) -> str:
    async with asyncio.timeout(10):
        while not w.failure:
            await asyncio.sleep(0.001)
    await asyncio.sleep(0)  # the handler runs
    await w.close()
    return w.failure


async def test_a_panicked_guest_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    w, handled = await _watched(FakeQEMU("guest-panicked"), monkeypatch)
    failure = await _until_failed(w)
    assert failure == "guest kernel panic (QEMU run state guest-panicked)" and handled == [failure]


async def test_a_running_guest_is_not_and_a_stop_records_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeQEMU("running")
    w, handled = await _watched(fake, monkeypatch)
    for _ in range(50):
        await asyncio.sleep(0.001)
    await w.close()  # an intended stop: QEMU's exit afterwards is no failure
    fake.exit(0)
    await asyncio.sleep(0.001)
    assert w.failure == "" and handled == []


async def test_a_silent_monitor_is_a_failure_after_unresponsive_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "QMP_TIMEOUT_S", 0.01)
    w, _ = await _watched(FakeQEMU(None), monkeypatch, unresponsive_s=0.05)
    assert (await _until_failed(w)).startswith("guest stopped answering: QEMU's monitor silent for")


async def test_an_oom_kill_is_told_from_a_kill(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeQEMU("running")
    w, handled = await _watched(fake, monkeypatch, oom_kills=1)
    fake.exit(-signal.SIGKILL)
    assert (await _until_failed(w)).startswith("QEMU out of memory") and len(handled) == 1
