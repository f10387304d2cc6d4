"""The lure share's pure parts: the tree and its bounds, the rate bound, the wire between daemon and honeypot
(hostile input included), the mapping of its events to guest paths, QEMU's and virtiofsd's command lines,
and the config's errors."""

from __future__ import annotations

import json
import random
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sandtrap.bridge.honeytokens import ReadWatcher, Token
from sandtrap.config import LureSettings, MicroVMSettings
from sandtrap.sandbox.microvm import lure, lureshare, qemu, virtiofs


def test_tree_serves_files_and_directories_and_hides_token_directories() -> None:
    tree = lure.LureTree(1024, mtime=1_700_000_000.0)
    tree.add("/a/b.txt", b"hello", 0o640, 1_600_000_000.5)
    tree.add("/.h1/0", b"token", 0o600, 1.0, hidden_dir=True)
    node = tree.lookup("/a/b.txt")
    assert node is not None and node.data == b"hello" and node.mode == stat.S_IFREG | 0o640
    assert node.mtime_ns == 1_600_000_000_500_000_000
    assert sorted(tree.listing("/") or []) == ["a"]  # the token's directory is found by name only
    assert tree.lookup("/.h1/0") is not None and tree.listing("/a/b.txt") is None
    assert tree.lookup("/nope") is None and tree.lookup("/a/b.txt/x") is None


@pytest.mark.parametrize("path", ["/", "", "/a/../b", "/./x", "/" + "n" * 256])
def test_tree_refuses_odd_paths(path: str) -> None:
    with pytest.raises(ValueError):
        lure.LureTree(1024).add(path, b"", 0o644, 0.0)


def test_tree_is_bounded_in_bytes_and_refuses_a_file_over_a_directory() -> None:
    tree = lure.LureTree(10)
    tree.add("/a", b"12345", 0o644, 0.0)
    tree.add("/a", b"1234567890", 0o644, 0.0)  # replacing counts only the growth
    with pytest.raises(ValueError, match="exceed"):
        tree.add("/b", b"x", 0o644, 0.0)
    tree = lure.LureTree(100)
    tree.add("/d/f", b"", 0o644, 0.0)
    with pytest.raises(ValueError, match="directory"):
        tree.add("/d", b"", 0o644, 0.0)
    with pytest.raises(ValueError, match="is a file"):
        tree.add("/d/f/g", b"", 0o644, 0.0)


def test_tree_loads_a_directory_skipping_symlinks(tmp_path: Path) -> None:
    files = lure.default_files(random.Random(7), 1_760_000_000.0)
    lure.write_tree(tmp_path, files)
    (tmp_path / "escape").symlink_to("/etc/shadow")
    tree = lure.LureTree.load(tmp_path, 1 << 20)
    assert tree.lookup("/escape") is None
    for rel, (data, mode, _mtime) in files.items():
        node = tree.lookup("/" + rel)
        assert node is not None and node.data == data and stat.S_IMODE(node.mode) == mode
    with pytest.raises(ValueError, match="exceed"):
        lure.LureTree.load(tmp_path, 100)


def test_default_tree_differs_between_vms_and_is_plausible() -> None:
    a = lure.default_files(random.Random(1), 1_760_000_000.0)
    b = lure.default_files(random.Random(2), 1_760_000_000.0)
    assert a["hr/salaries_2026.csv"][0] != b["hr/salaries_2026.csv"][0]
    assert all(mtime < 1_760_000_000.0 for _data, _mode, mtime in a.values())
    assert b"sandtrap" not in b"".join(data for data, _m, _t in a.values()).lower()


def test_rate_limit_allows_a_burst_then_the_rate_and_counts_the_rest() -> None:
    limit = lure.RateLimit(rate=10, burst=5, now=0.0)
    assert [limit.allow(0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limit.allow(0.05) is False  # half a token
    assert limit.allow(0.1) is True
    assert limit.take_suppressed() == 3 and limit.take_suppressed() == 0
    assert sum(limit.allow(1.0 + i / 1000) for i in range(1000)) <= 5 + 10 + 1  # a tight loop: one second's worth


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"[]", b'{"op":"write","path":"/x"}', b'{"op":"read","path":"x"}',
     b'{"op":"read","path":"/x","bytes":-1}', b'{"op":"read","path":"/x","offset":"0"}',
     b'{"op":"suppressed","count":-3}', b'{"op":"open","path":5}', b"\xff\xfe"],
)  # fmt: skip
def test_decode_event_refuses_what_is_not_an_event(data: bytes) -> None:
    assert lure.decode_event(data) is None


def test_decode_event_and_add_round_trip() -> None:
    assert lure.decode_event(lure.encode({"op": "read", "path": "/a\nb", "bytes": 3, "offset": 9})) == {
        "op": "read", "path": "/a\nb", "bytes": 3, "offset": 9,
    }  # fmt: skip
    assert lure.decode_add(lure.add_message("/.x/0", b"\x00\xff", 0o600, 5.5)) == ("/.x/0", b"\x00\xff", 0o600, 5.5)
    assert lure.decode_add(b'{"op":"add","path":"/x","data":"!!","mode":1,"mtime":1}') is None
    with pytest.raises(ValueError):
        lure.encode({"op": "read", "path": "/" + "x" * lure.MAX_DATAGRAM})


def _share(tmp_path: Path) -> tuple[lureshare.LureShare, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    return lureshare.LureShare(LureSettings(path="/srv/share"), tmp_path, ours, "vm"), theirs


def test_share_maps_events_to_guest_paths_and_tokens_to_their_own(tmp_path: Path) -> None:
    share, daemon = _share(tmp_path)
    seen: list[tuple[str, dict[str, Any]]] = []
    share._report = lambda path, **detail: seen.append((path, detail))
    served = share.add_token("/root/.aws/credentials", b"k", 0o600, 1.0)
    assert served.startswith("/srv/share/.") and lure.decode_add(daemon.recv(65536)) is not None
    rel = served.removeprefix("/srv/share")
    for msg in (
        {"op": "opendir", "path": "/"},
        {"op": "read", "path": "/hr/x.csv", "bytes": 10, "offset": 4096},
        {"op": "open", "path": rel},
        {"op": "read", "path": rel, "bytes": 1, "offset": 0},  # a token's reads: its open is the event
        {"op": "suppressed", "count": 7},
    ):
        share.dispatch(lure.encode(msg))
    share.dispatch(b"garbage")
    assert seen == [
        ("/srv/share", {"op": "opendir", "bytes": 0, "offset": 0}),
        ("/srv/share/hr/x.csv", {"op": "read", "bytes": 10, "offset": 4096}),
        ("/root/.aws/credentials", {}),
        ("/srv/share", {"op": "suppressed", "bytes": 7, "offset": 0}),
    ]
    assert share.suppressed == 7
    share.close()
    daemon.close()


def test_the_bridges_watcher_names_lure_files_as_such() -> None:
    reported: list[tuple[Any, ...]] = []

    class Box:
        id = "b1"

        async def watch_reads(self, paths: list[str], report: Any) -> Any:
            report("/root/.pgpass")
            report("/opt/proprietary_data/README.txt", op="open", bytes=0, offset=0)

            class W:
                def close(self) -> None:
                    pass

            return W()

    import asyncio

    watcher = ReadWatcher()
    watcher.report_to("b1", lambda kind, path, **d: reported.append((kind, path, d)))
    asyncio.run(watcher.watch(Box(), [Token("db_password", "/root/.pgpass", "v", b"")]))  # type: ignore[arg-type]
    assert reported == [
        ("db_password", "/root/.pgpass", {}),
        ("lure", "/opt/proprietary_data/README.txt", {"op": "open", "bytes": 0, "offset": 0}),
    ]


def test_qemu_has_shared_memory_and_a_hotplug_port_and_no_lure_device(tmp_path: Path) -> None:
    settings = MicroVMSettings()
    launch = qemu.Launch("n", tmp_path, tmp_path / "d", tmp_path / "k", tmp_path / "i", "52:54:00:00:00:01", "u")
    argv = qemu.qemu_argv(settings, qemu.Accel("tcg", "test"), launch)
    assert f"memory-backend-memfd,id=mem0,size={settings.memory >> 20}M,share=on" in argv
    assert "q35,memory-backend=mem0,mem-merge=on" in argv and f"-m {settings.memory >> 20}M" in " ".join(argv)
    assert any(a.startswith(f"pcie-root-port,id={qemu.HOTPLUG_PORT},") for a in argv)
    assert not any("vhost-user-fs" in a for a in argv)  # hot-plugged after boot: never in a saved state


def test_virtiofsd_is_read_only_minded_and_bounded(tmp_path: Path) -> None:
    argv = virtiofs.virtiofsd_argv(LureSettings(), tmp_path)
    options = argv[argv.index("-o") + 1]
    assert f"source={tmp_path / virtiofs.MOUNT}" in options and "cache=none" in options
    assert "sandbox=namespace" in options and "-dac_override" in options and "-setuid" in options
    assert f"--rlimit-nofile={virtiofs.VIRTIOFSD_NOFILE}" in argv


def test_guest_mount_is_read_only_and_the_tag_is_the_directory_name() -> None:
    assert virtiofs.tag_for("/opt/proprietary_data") == "proprietary_data"
    script = virtiofs.guest_mount_script("/opt/proprietary_data", "proprietary_data")
    assert "mount -t virtiofs -o ro,nosuid,nodev,noexec proprietary_data /opt/proprietary_data" in script


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"path": "relative"}, "absolute directory"),
        ({"path": "/etc/lure"}, "system directory"),
        ({"path": "/opt/a b"}, "absolute directory"),
        ({"path": "/opt/../etc"}, "absolute directory"),
        ({"source": "/nonexistent/lure"}, "not a directory"),
        ({"max_bytes": "2g"}, "between 4k and 1g"),
        ({"events_per_s": 0}, "greater than 0"),
        ({"bogus": 1}, "Extra inputs"),
    ],
)
def test_bad_lure_config_names_the_problem(value: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MicroVMSettings.model_validate({"lure": value})


def test_missing_virtiofsd_names_the_key_and_the_package() -> None:
    ok, why = virtiofs.usable(LureSettings(virtiofsd="/nonexistent/virtiofsd"))
    assert not ok and "sandbox.microvm.lure.virtiofsd" in why and "qemu-system-common" in why
    assert json.dumps(why)  # plain text


class _Fi:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.direct_io = 0
        self.keep_cache = 1


def _fs() -> tuple[Any, socket.socket]:
    lurefs = pytest.importorskip("sandtrap.sandbox.microvm.lurefs")  # loads libfuse 3
    tree = lure.LureTree(1 << 20, mtime=1.0)
    tree.add("/d/f.txt", b"0123456789", 0o640, 2.0)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    theirs.setblocking(False)
    return lurefs.LureFs(tree, theirs, rate=1000, burst=3), ours


def _events(sock: socket.socket) -> list[dict[str, Any]]:
    sock.setblocking(False)
    out = []
    while True:
        try:
            out.append(json.loads(sock.recv(65536)))
        except BlockingIOError:
            return out


def test_daemon_ops_serve_read_only_with_direct_io_and_report_each_access() -> None:
    import errno
    import os

    fs, events = _fs()
    fi = _Fi(os.O_RDONLY)
    assert fs.open("/d/f.txt", fi) == 0 and fi.direct_io == 1 and fi.keep_cache == 0
    assert fs.read("/d/f.txt", 4, 8, fi) == b"89" and fs.read("/d/f.txt", 4, 100, fi) == b""
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND):
        with pytest.raises(Exception) as refused:
            fs.open("/d/f.txt", _Fi(flags))
        assert refused.value.errno == errno.EROFS
    for op in (fs.write, fs.create, fs.unlink, fs.mkdir, fs.rename, fs.truncate, fs.setxattr):
        with pytest.raises(Exception) as refused:
            op("/d/f.txt", 0)
        assert refused.value.errno == errno.EROFS
    with pytest.raises(Exception) as missing:
        fs.getattr("/d/\udcff")  # a name that is not UTF-8 (surrogate-escaped): not there
    assert missing.value.errno == errno.ENOENT
    attrs = fs.getattr("/d/f.txt")
    assert attrs["st_size"] == 10 and attrs["st_mode"] == stat.S_IFREG | 0o640 and attrs["st_uid"] == 0
    assert fs.readdir("/d", 0) == [".", "..", "f.txt"]
    assert _events(events) == [
        {"op": "open", "path": "/d/f.txt"},
        {"op": "read", "path": "/d/f.txt", "bytes": 2, "offset": 8},
        {"op": "read", "path": "/d/f.txt", "bytes": 0, "offset": 100},
    ]
    fs.sock.close()
    events.close()


def test_daemon_bounds_its_events_and_never_blocks_on_a_full_socket() -> None:
    fs, events = _fs()
    fs.limit = lure.RateLimit(rate=1e-9, burst=3, now=time.monotonic())
    for _ in range(50):
        fs.read("/d/f.txt", 1, 0, None)
    assert len(_events(events)) == 3
    fs.report_suppressed()
    assert _events(events) == [{"op": "suppressed", "count": 47}]
    # The honeypot does not read: sends fail fast (counted), the daemon goes on.
    fs.limit = lure.RateLimit(rate=1e9, burst=10**9, now=0.0)
    for _ in range(20_000):
        fs.read("/d/f.txt", 1, 0, None)
    assert fs.dropped > 0
    fs.sock.close()
    events.close()
