"""diff_snapshots: a session's changes from two snapshots, full listings or diffs against the image alike."""

from __future__ import annotations

from sandtrap.sandbox.base import GONE, ChangedFile, Snapshot, diff_snapshots


def test_full_listings() -> None:
    before = Snapshot({"/etc/a": "A f 1 644 1 1", "/tmp/gone": "A f 1 644 1 1", "/same": "A f 1 644 1 1"})
    after = Snapshot({"/etc/a": "A f 2 644 2 2", "/tmp/new": "A f 1 644 3 3", "/same": "A f 1 644 1 1"})
    assert diff_snapshots(before, after) == [
        ChangedFile("/etc/a", "C"),
        ChangedFile("/tmp/gone", "D"),
        ChangedFile("/tmp/new", "A"),
    ]


def test_diffs_against_an_image() -> None:
    # A path missing from a snapshot is as the image has it.
    before = Snapshot({"/etc/hosts": "C f 1 644 1 1", "/root/lure": "A f 1 600 1 1", "/.dockerenv": GONE})
    after = Snapshot(
        {
            "/etc/hosts": "C f 1 644 1 1",  # the honeypot's, untouched since: not the session's
            "/root/lure": GONE,  # planted, then deleted in the session
            "/etc/issue": "C f 9 644 5 5",  # in the image, changed in the session
            "/tmp/b.sh": "A f 9 755 5 5",
            "/etc/issue.net": GONE,
        }
    )
    assert diff_snapshots(before, after) == [
        ChangedFile("/.dockerenv", "A"),  # deleted before, back as the image had it
        ChangedFile("/etc/issue", "C"),
        ChangedFile("/etc/issue.net", "D"),
        ChangedFile("/root/lure", "D"),
        ChangedFile("/tmp/b.sh", "A"),
    ]
    assert diff_snapshots(after, after) == []
