"""Each box's /proc/loadavg: the kernel's load-average arithmetic, hostile /proc files, a fake host's /proc."""

import math
import os
from pathlib import Path

import pytest

from sandtrap.sandbox.host import loadavg
from sandtrap.sandbox.host.loadavg import (
    EXP,
    FIXED_1,
    CgroupLayout,
    LoadavgView,
    box_cgroup,
    calc_load,
    calc_load_n,
    format_load,
    parse_cgroup,
    parse_layout,
    parse_status,
    parse_tasks,
    render,
)


def test_one_busy_task_climbs_towards_one_like_the_kernel() -> None:
    load = [0, 0, 0]
    for _ in range(12):  # one minute of 5-second samples with one runnable task
        load = [calc_load(x, e, 1 * FIXED_1) for x, e in zip(load, EXP, strict=True)]
    # The kernel's 1-minute average after a minute at 1 is 1 - 1/e (0.63); the longer ones lag behind.
    one, five, fifteen = (x / FIXED_1 for x in load)
    assert one == pytest.approx(1 - math.exp(-1), abs=0.01)
    assert five == pytest.approx(1 - math.exp(-1 / 5), abs=0.01)
    assert fifteen == pytest.approx(1 - math.exp(-1 / 15), abs=0.01)
    assert render(load, 1, 7, 42) == b"0.63 0.18 0.06 1/7 42\n"


def test_an_idle_box_decays_to_zero_and_stays_there() -> None:
    load = 3 * FIXED_1
    for _ in range(400):
        load = calc_load(load, EXP[0], 0)
    assert load == 0
    assert calc_load(0, EXP[0], 0) == 0


def test_catching_up_n_periods_matches_n_single_steps() -> None:
    for exp in EXP:
        step = 5 * FIXED_1
        for _ in range(6):
            step = calc_load(step, exp, 2 * FIXED_1)
        # The kernel's catch-up rounds once instead of six times: within a hundredth of a task.
        assert abs(calc_load_n(5 * FIXED_1, exp, 2 * FIXED_1, 6) - step) < FIXED_1 // 100
    assert calc_load_n(1234, EXP[0], 0, 0) == calc_load(1234, FIXED_1, 0)


def test_format_rounds_to_the_hundredth_as_proc_loadavg_does() -> None:
    assert format_load(0) == "0.00"
    assert format_load(FIXED_1) == "1.00"
    assert format_load(FIXED_1 // 2) == "0.50"
    assert format_load(FIXED_1 * 12 + FIXED_1 * 999 // 1000) == "13.00"  # 12.999 shows as 13.00


STATUS = (
    b"Name:\tbash\nUmask:\t0022\nState:\tR (running)\nTgid:\t4242\nNgid:\t0\nPid:\t4242\nPPid:\t4200\n"
    b"Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nFDSize:\t256\nGroups:\t0 \nNStgid:\t4242\t17\nNSpid:\t4242\t17\n"
    b"NSpgid:\t4242\t17\nNSsid:\t4200\t1\n"
)


def test_status_gives_state_and_the_pid_in_each_namespace() -> None:
    assert parse_status(STATUS) == loadavg.TaskStatus("R", (4242, 17))
    sleeping = STATUS.replace(b"R (running)", b"D (disk sleep)")
    assert parse_status(sleeping) == loadavg.TaskStatus("D", (4242, 17))


@pytest.mark.parametrize(
    "name",
    [
        b"State:\tR",  # a name that looks like a field
        b"x\nState:\tR (running)\nNSpid:\t1\t999999",  # should the kernel ever pass a newline through
        b"\xff\xfe) Z 1 1",
        b"NSpid:\t99999999999999999999999",
    ],
)
def test_a_hostile_name_neither_sets_the_state_nor_the_pids(name: bytes) -> None:
    data = STATUS.replace(b"bash", name).replace(b"R (running)", b"S (sleeping)")
    assert parse_status(data) == loadavg.TaskStatus("S", (4242, 17))


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 100, b"Name:\tx\nState:\t\n", b"Name:\tx\nState:\t9\nNSpid:\t1\t2\n", b"garbage"],
)
def test_unusable_status_is_none(data: bytes) -> None:
    assert parse_status(data) is None


def test_status_without_nspid_still_counts_its_state() -> None:
    data = b"Name:\tx\nState:\tR (running)\nNSpid:\t1\tnot-a-number\n"
    assert parse_status(data) == loadavg.TaskStatus("R", ())


CGROUP_V1 = (
    b"9:name=systemd:/docker/abc\n8:pids:/sandtrap-s1/r4nd/abc\n4:memory:/sandtrap-s1/r4nd/abc\n0::/docker/abc\n"
)


def test_cgroup_v1_pids_and_v2_unified_paths() -> None:
    assert parse_cgroup(CGROUP_V1, "pids") == "/sandtrap-s1/r4nd/abc"
    assert parse_cgroup(CGROUP_V1, "") == "/docker/abc"
    assert parse_cgroup(b"0::/system.slice/docker-abc.scope\n", "") == "/system.slice/docker-abc.scope"
    assert parse_cgroup(b"0::/x\n", "pids") is None


@pytest.mark.parametrize("path", [b"/a/../../etc", b"relative", b"/a//b", b"/a/./b", b"/a\x00b", b"/\xff"])
def test_a_cgroup_path_that_is_not_normal_is_refused(path: bytes) -> None:
    assert parse_cgroup(b"8:pids:" + path + b"\n", "pids") is None


def test_tasks_keep_only_numbers() -> None:
    assert parse_tasks(b"12\n13\n\nx\n-4\n99999999999999\n14\n") == [12, 13, 14]


MOUNTINFO = """\
25 1 0:22 / / rw,relatime - overlay overlay rw
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw
38 30 0:33 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 30 0:35 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_layout_prefers_the_v1_pids_hierarchy_then_v2() -> None:
    assert parse_layout(MOUNTINFO) == CgroupLayout("pids", "/sys/fs/cgroup/pids", "/", "tasks")
    v2 = "\n".join(line for line in MOUNTINFO.splitlines() if "pids" not in line)
    assert parse_layout(v2) == CgroupLayout("", "/sys/fs/cgroup/unified", "/", "cgroup.threads")
    assert parse_layout("nonsense\n") is None
    spaced = r"38 30 0:33 / /mnt/cg\040x rw - cgroup cgroup rw,pids"
    assert parse_layout(spaced) == CgroupLayout("pids", "/mnt/cg x", "/", "tasks")


def test_a_cgroup_dir_stays_below_the_mount_root() -> None:
    layout = CgroupLayout("pids", "/cg", "/docker/host", "tasks")
    assert layout.dir_path("/docker/host/box") == "/cg/box"
    assert layout.dir_path("/docker/hostile/box") is None
    assert CgroupLayout("pids", "/cg", "/", "tasks").dir_path("/a/b") == "/cg/a/b"


BOX_MOUNTINFO = b"""\
900 800 0:50 / / rw - overlay overlay rw
910 900 0:33 /sandtrap-s1/r4nd/abc /sys/fs/cgroup/pids ro,nosuid - cgroup cgroup rw,pids
911 900 0:35 /sandtrap-s1/r4nd/abc /sys/fs/cgroup/unified ro - cgroup2 cgroup2 rw
"""


def test_the_box_cgroup_is_its_cgroup_mounts_root() -> None:
    v1 = CgroupLayout("pids", "/sys/fs/cgroup/pids", "/", "tasks")
    v2 = CgroupLayout("", "/sys/fs/cgroup", "/", "cgroup.threads")
    assert box_cgroup(BOX_MOUNTINFO, v1) == "/sandtrap-s1/r4nd/abc"
    assert box_cgroup(BOX_MOUNTINFO, v2) == "/sandtrap-s1/r4nd/abc"
    # A whole hierarchy (a host's, or a box given one) or a path that is not normal is no box.
    assert box_cgroup(BOX_MOUNTINFO.replace(b"/sandtrap-s1/r4nd/abc /sys/fs/cgroup/pids", b"/ /x"), v1) is None
    assert box_cgroup(BOX_MOUNTINFO.replace(b"r4nd/abc /sys/fs/cgroup/pids", b"../x /y"), v1) is None
    assert box_cgroup(b"\xff\xfe garbage\n", v1) is None


class FakeHost:
    """A host's /proc and pids hierarchy in a directory: the box's tasks, each with a status file."""

    def __init__(self, root: Path):
        self.proc = root / "proc"
        self.cg = root / "cg"
        (self.proc / "self" / "ns").mkdir(parents=True)
        os.symlink("pid:[4026531836]", self.proc / "self" / "ns" / "pid")
        (self.proc / "loadavg").write_text("9.99 9.99 9.99 3/900 31337\n")
        self.layout = CgroupLayout("pids", str(self.cg), "/", "tasks")
        self.now = 1000.0

    def task(
        self, host_pid: int, box_pid: int | None, state: str = "S", cgroup: str = "/box1", scope: str = ""
    ) -> None:
        """A thread of the box whose cgroup (namespace root) is ``cgroup``, in ``scope`` below it."""
        d = self.proc / str(host_pid)
        (d / "ns").mkdir(parents=True, exist_ok=True)
        ns = "pid:[4026531836]" if box_pid is None else f"pid:[40265{cgroup[-1]}]"
        if not (d / "ns" / "pid").is_symlink():
            os.symlink(ns, d / "ns" / "pid")
        pids = f"{host_pid}" if box_pid is None else f"{host_pid}\t{box_pid}"
        (d / "status").write_text(f"Name:\tt\nState:\t{state} (x)\nNSpid:\t{pids}\n")
        (d / "cgroup").write_text(f"8:pids:{cgroup}{scope}\n")
        (d / "mountinfo").write_text(f"910 900 0:33 {cgroup} /sys/fs/cgroup/pids ro - cgroup cgroup rw,pids\n")
        tasks = self.cg / (cgroup + scope).lstrip("/") / "tasks"
        tasks.parent.mkdir(parents=True, exist_ok=True)
        with tasks.open("a") as f:
            f.write(f"{host_pid}\n")

    def exit(self, host_pid: int, cgroup: str = "/box1") -> None:
        tasks = self.cg / cgroup.lstrip("/") / "tasks"
        tasks.write_text("".join(f"{t}\n" for t in tasks.read_text().split() if t != str(host_pid)))
        for f in (self.proc / str(host_pid)).iterdir():
            if f.is_file() and not f.is_symlink():
                f.unlink()

    def view(self) -> LoadavgView:
        return LoadavgView(self.layout, proc=str(self.proc), clock=lambda: self.now)


def test_a_box_reads_its_own_tasks_and_pids_from_its_first_read(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.task(5001, 1)
    host.task(5002, 2, "R")
    host.task(5003, 3)
    host.task(5009, 7)  # the reader
    view = host.view()
    assert view.read(5009) == b"0.00 0.00 0.00 1/4 7\n"  # never 0/1; newest pid is the box's own
    assert view.read(4242) == b"9.99 9.99 9.99 3/900 31337\n"  # gone or unknown: the host's file
    host.task(777, None)
    assert view.read(777) == b"9.99 9.99 9.99 3/900 31337\n"  # the host itself


def test_load_is_sampled_every_five_seconds_per_box(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.task(5001, 1, "R")
    host.task(5002, 2, "D")
    host.task(6001, 1, "S", cgroup="/box2")
    view = host.view()
    view.read(5001)
    view.read(6001)
    for _ in range(12):
        host.now += 5
        assert view.sample() == pytest.approx(5)
    busy, idle = view.read(5001), view.read(6001)
    assert busy.startswith(b"1.27 0.37 0.13 1/2 ")  # two active for a minute: 2 * (1 - 1/e), rounded up
    assert idle.startswith(b"0.00 0.00 0.00 1/1 ")
    host.now += 17  # the daemon was stalled: three periods caught up at once
    assert view.sample() == pytest.approx(3)
    assert view.read(5001).startswith(b"1.43 ")  # 2 - (2 - 1.26) * exp(-15 / 60)


def test_counts_are_cached_a_second_but_the_total_is_current(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.task(5001, 1, "R")
    view = host.view()
    assert view.read(5001) == b"0.00 0.00 0.00 1/1 1\n"
    host.task(5002, 2, "R")
    host.task(5003, 3, "R")
    host.now += 0.5
    assert view.read(5003) == b"0.00 0.00 0.00 1/3 3\n"  # states from the cache, the total and reader now
    host.now += 0.6
    assert view.read(5002) == b"0.00 0.00 0.00 3/3 3\n"
    host.exit(5003)
    host.exit(5002)
    host.now += 1.1
    assert view.read(5001) == b"0.00 0.00 0.00 1/1 3\n"  # the newest pid stays, as the kernel's last_pid


def test_a_removed_box_is_forgotten_and_an_unread_one_after_an_hour(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.task(5001, 1)
    host.task(6001, 1, cgroup="/box2")
    view = host.view()
    view.read(5001)
    view.read(6001)
    assert set(view.boxes) == {"/box1", "/box2"}
    (host.cg / "box2" / "tasks").unlink()
    host.now += 5
    view.sample()
    assert set(view.boxes) == {"/box1"}
    host.now += 3601
    view.sample()
    assert view.boxes == {}


def test_tracked_boxes_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadavg, "MAX_BOXES", 2)
    host = FakeHost(tmp_path)
    for n in range(1, 4):
        host.task(5000 + n, 1, cgroup=f"/box{n}")
    view = host.view()
    for n in range(1, 4):
        host.now += 1
        view.read(5000 + n)
    assert set(view.boxes) == {"/box2", "/box3"}


def test_tasks_read_per_refresh_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadavg, "MAX_TASKS", 3)
    host = FakeHost(tmp_path)
    for n in range(1, 7):
        host.task(5000 + n, n, "R")
    read: list[str] = []
    real = loadavg.read_bounded

    def counting(path: str, limit: int) -> bytes | None:
        read.append(path)
        return real(path, limit)

    monkeypatch.setattr(loadavg, "read_bounded", counting)
    assert host.view().read(5006) == b"0.00 0.00 0.00 3/6 6\n"
    assert sum(p.endswith("/status") for p in read) == 3 + 1  # three tasks and the reader


def test_a_login_in_a_session_scope_counts_the_whole_box(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.task(5001, 1)  # init, at the box's root
    host.task(5002, 2, "R")
    scope = "/user.slice/user-0.slice/session-3.scope"
    host.task(5040, 40, "R", scope=scope)
    host.task(5041, 41, scope=scope)  # the reader
    view = host.view()
    assert view.read(5041) == b"0.00 0.00 0.00 2/4 41\n"
    assert set(view.boxes) == {"/box1"}
    # Without a cgroup mount to tell the box's root, the reader's own cgroup is all it can be.
    (host.proc / "5041" / "mountinfo").write_text("")
    host.now += 1.1
    assert host.view().read(5041) == b"0.00 0.00 0.00 1/2 41\n"


def test_the_total_comes_from_pids_current_between_counts(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.task(5001, 1, "R")
    host.task(5002, 2)
    view = host.view()
    view.read(5001)
    (host.cg / "box1" / "pids.current").write_text("37\n")
    host.now += 0.5
    assert view.read(5002) == b"0.00 0.00 0.00 1/37 2\n"


def test_a_process_reading_in_a_loop_gets_its_answer_of_the_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = FakeHost(tmp_path)
    host.task(5001, 1, "R")
    view = host.view()
    first = view.read(5001)
    read: list[str] = []
    monkeypatch.setattr(loadavg, "read_bounded", lambda path, limit: read.append(path))
    for _ in range(1000):
        assert view.read(5001) == first
    assert read == []  # no file of the host read again, only the reader's pid namespace looked at
    host.now += 1
    view.read(5001)
    assert read
