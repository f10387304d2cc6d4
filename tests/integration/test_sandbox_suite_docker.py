"""The conformance suite (tests/sandbox_suite.py) on the Docker backend and the real engine, with this test's
own sensor: every box it makes is removed by label afterwards (``backend_factory``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sandtrap.config import SandboxSettings
from sandtrap.sandbox.base import ChangedFile, SandboxBackend, Snapshot, run
from sandtrap.sandbox.docker.backend import DockerBackend
from sandtrap.sandbox.docker.sandbox import DockerSandbox

from sandbox_suite import *  # noqa: F403  (the suite's tests and fixtures, collected here)
from sandbox_suite import MakeBackend


@pytest.fixture
def make_backend(
    backend_factory: Callable[[SandboxSettings], DockerBackend], sandbox_settings: Callable[..., SandboxSettings]
) -> MakeBackend:
    settings = sandbox_settings()

    def make() -> SandboxBackend:
        return backend_factory(settings)

    return make


async def test_a_snapshot_reads_the_same_on_the_host_and_through_the_engine(make_backend: MakeBackend) -> None:
    """A baseline taken one way and compared the other (the host's view refused later, say) still lists only
    what changed: both ways give each path the same state (``hostfs.meta`` prints what the in-box find does)."""
    box = await make_backend().create()
    assert isinstance(box, DockerSandbox)
    try:
        await box.put_file("/root/.pgpass", b"lure\n", 0o600)
        assert (await run(box, ["sh", "-c", "echo x >> /etc/issue && rm /etc/issue.net && echo t > /tmp/t"])).ok
        on_host = (await box.snapshot()).files
        by_engine = await box._states_by_engine()
        # The engine leaves out files only copied up (a chown, an open for writing: same content and mtime) and
        # lists directories; the host's view the other way round. Where both name a path, they agree.
        both = set(on_host) & set(by_engine)
        assert {"/root/.pgpass", "/etc/issue", "/etc/issue.net", "/tmp/t"} <= both
        assert {p: by_engine[p][2:] for p in both} == {p: on_host[p][2:] for p in both}
        assert (await run(box, ["sh", "-c", "echo y >> /tmp/t"])).ok
        changed = await box.changed_files(since=Snapshot(by_engine))
        assert [c for c in changed if c.path not in set(on_host) ^ set(by_engine)] == [ChangedFile("/tmp/t", "C")]
    finally:
        await box.remove()
