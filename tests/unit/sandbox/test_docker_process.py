"""A process dropped without wait() or kill() gives its engine connection back when collected, silently."""

import gc
import warnings
from typing import Any

from sandtrap.sandbox.docker.process import DockerProcess


class FakeResponse:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeStream:
    def __init__(self) -> None:
        self._resp = FakeResponse()
        self._closed = False


def test_a_dropped_process_closes_its_stream() -> None:
    stream = FakeStream()
    proc = DockerProcess(Any, stream, tty=False)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del proc
        gc.collect()
    assert stream._closed and stream._resp.closed
