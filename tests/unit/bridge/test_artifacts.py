"""Artifacts from the fake box: changed files (added, changed, deleted) and uploads, stored by sha256 within
the caps; a file over a cap is reported as metadata only."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sandtrap.bridge.artifacts import ArtifactStore, SessionArtifacts, take_baseline
from sandtrap.bridge.origin import LoginFacts
from sandtrap.config import RecordingSettings
from sandtrap.sandbox.base import Sandbox, run


class Reports:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def __call__(self, **fields: Any) -> None:
        self.rows.append(fields)

    def by(self, key: str) -> dict[str, dict[str, Any]]:
        return {row[key]: row for row in self.rows}


def artifacts(tmp_path: Path, **settings: Any) -> SessionArtifacts:
    store = ArtifactStore(tmp_path / "data" / "artifacts", max_total_bytes=settings.pop("max_total", 1 << 30))
    return SessionArtifacts(store, RecordingSettings(**settings))


async def test_changed_files_are_collected_added_changed_and_deleted(box: Sandbox, tmp_path: Path) -> None:
    script = (
        "printf 'payload' > /root/dropper.sh && chmod 755 /root/dropper.sh && echo pwned >> /etc/issue && "
        "rm /etc/issue.net && mkdir -p /var/log && echo 'sshd: login' > /var/log/auth.log"
    )
    assert (await run(box, ["sh", "-c", script])).ok
    session = artifacts(tmp_path)
    reports = Reports()
    await session.collect_changes(box, reports)
    rows = reports.by("filename")
    added = rows["/root/dropper.sh"]
    assert (added["kind"], added["mode"], added["size"], added["stored"]) == ("A", "0755", 7, True)
    assert added["shasum"] == hashlib.sha256(b"payload").hexdigest()
    stored = tmp_path / "data" / added["outfile"]
    assert stored.read_bytes() == b"payload" and stored.stat().st_mode & 0o777 == 0o440  # never executable
    changed = rows["/etc/issue"]
    assert changed["kind"] == "C" and changed["stored"]
    assert (tmp_path / "data" / changed["outfile"]).read_bytes().endswith(b"pwned\n")
    assert rows["/etc/issue.net"] == {
        "filename": "/etc/issue.net",
        "kind": "D",
        "origin": "attacker",
        "shasum": "",
        "size": 0,
        "mode": 0,
        "outfile": "",
        "stored": False,
    }
    log = rows["/var/log/auth.log"]  # written by every login: metadata only
    assert log["kind"] == "A" and not log["stored"] and log["shasum"] == "" and log["size"] == 12
    assert log["origin"] == "login"
    assert session.stored_bytes == 7 + changed["size"]


async def test_changes_since_the_baseline_only_with_their_origin(box: Sandbox, tmp_path: Path) -> None:
    # The honeypot's own work before the session: a lure planted, a password line set for the login.
    await box.put_file("/root/.pgpass", b"db:5432:app:app:lure\n", mode=0o600)
    await box.put_file("/etc/shadow", b"root:$6$old:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n", 0o640)
    baseline = await take_baseline(box)
    await box.put_file("/etc/shadow", b"root:$6$new:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n", 0o640)
    script = "mkdir -p /var/log && echo 'Accepted password for root' >> /var/log/auth.log && echo x > /tmp/b.sh"
    assert (await run(box, ["sh", "-c", script])).ok
    reports = Reports()
    await artifacts(tmp_path).collect_changes(box, reports, baseline, LoginFacts(users=["root"]))
    origins = {row["filename"]: row["origin"] for row in reports.rows}
    assert origins == {"/etc/shadow": "login", "/var/log/auth.log": "login", "/tmp/b.sh": "attacker"}
    stored = {row["filename"]: row["stored"] for row in reports.rows}
    assert stored == {"/etc/shadow": True, "/var/log/auth.log": False, "/tmp/b.sh": True}  # records: metadata
    # A line other than the login's changed too: the attacker's.
    await box.put_file("/etc/shadow", b"root:$6$new:19000:0:99999:7:::\ndaemon:$6$owned:19000:0:99999:7:::\n")
    reports = Reports()
    await artifacts(tmp_path).collect_changes(box, reports, baseline, LoginFacts(users=["root"]))
    assert reports.by("filename")["/etc/shadow"]["origin"] == "attacker"


async def test_uploads_are_stored_once_and_duplicates_named(box: Sandbox, tmp_path: Path) -> None:
    await box.put_file("/root/a.bin", b"\x7fELF same bytes", mode=0o700)
    await box.put_file("/tmp/b.bin", b"\x7fELF same bytes")
    session = artifacts(tmp_path)
    session.note_upload("a.bin", "scp", "/root")
    session.note_upload("../tmp/./b.bin", "sftp", "/root")
    session.note_upload("missing", "scp", "/root")
    reports = Reports()
    await session.collect_uploads(box, reports)
    rows = reports.by("destfile")
    assert set(rows) == {"/root/a.bin", "/tmp/b.bin"}  # a file that is not there is not reported
    first, second = rows["/root/a.bin"], rows["/tmp/b.bin"]
    assert (first["filename"], first["via"], first["stored"], first["duplicate"]) == ("a.bin", "scp", True, False)
    assert (second["via"], second["stored"], second["duplicate"]) == ("sftp", True, True)
    assert first["shasum"] == second["shasum"] and first["outfile"] == second["outfile"]
    assert session.stored_bytes == len(b"\x7fELF same bytes") and session.seen == {"/root/a.bin", "/tmp/b.bin"}
    await session.collect_uploads(box, reports)  # nothing new: nothing reported again
    assert len(reports.rows) == 2


async def test_files_over_the_caps_are_reported_as_metadata_only(box: Sandbox, tmp_path: Path) -> None:
    await box.put_file("/root/big", b"b" * 5000)
    await box.put_file("/root/one", b"1" * 600)
    await box.put_file("/root/two", b"2" * 600)
    session = artifacts(tmp_path, artifact_max_file_bytes=4096, artifact_max_session_bytes=1000)
    for name in ("big", "one", "two"):
        session.note_upload(name, "scp", "/root")
    reports = Reports()
    await session.collect_uploads(box, reports)
    rows = reports.by("filename")
    assert (rows["big"]["size"], rows["big"]["stored"], rows["big"]["shasum"]) == (5000, False, "")  # per file
    assert rows["one"]["stored"]
    assert not rows["two"]["stored"] and rows["two"]["shasum"]  # the session's cap: hashed, not kept
    assert session.stored_bytes == 600


async def test_the_total_cap_holds_across_sessions(box: Sandbox, tmp_path: Path) -> None:
    await box.put_file("/root/x", b"x" * 800)
    await box.put_file("/root/y", b"y" * 800)
    first = artifacts(tmp_path, max_total=1000)
    first.note_upload("/root/x", "scp", "/")
    second = SessionArtifacts(first.store, RecordingSettings())
    second.note_upload("/root/y", "scp", "/")
    reports = Reports()
    await first.collect_uploads(box, reports)
    await second.collect_uploads(box, reports)
    assert [r["stored"] for r in reports.rows] == [True, False]
    assert first.store.total_bytes == 800


async def test_a_stopped_box_still_gives_its_changes(box: Sandbox, tmp_path: Path) -> None:
    assert (await run(box, ["sh", "-c", "echo left > /root/left-behind"])).ok
    await box.stop()
    reports = Reports()
    await artifacts(tmp_path).collect_changes(box, reports)
    row = reports.by("filename")["/root/left-behind"]
    assert row["kind"] == "A" and row["stored"]
