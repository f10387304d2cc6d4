"""Personas as the pool and the bridge see them: what a box is made as (name, hostname, domain, image), how a new
attacker's persona is chosen (by weight, with an injectable random source), and how the warm pool's floor and
ceiling are split between personas. Pure: no I/O.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Persona:
    """What a box is made as. ``image``: the engine's tag ('' = the backend's own, ``sandbox.docker.image``)."""

    name: str
    hostname: str
    domain: str
    image: str = ""


class Random(Protocol):
    """What the choice needs of a random source (``random.Random``; a test gives its own)."""

    def random(self) -> float: ...


class PersonaChoice:
    """A new attacker's persona: by weight, or the service's; with ``remember`` an address keeps the persona it
    first got (at most ``max_remembered`` addresses, the least recently seen forgotten first)."""

    def __init__(
        self, weights: Sequence[tuple[str, float]], rng: Random | None = None, max_remembered: int = 65536
    ) -> None:
        if not weights:
            raise ValueError("no personas")
        if any(w < 0 for _, w in weights) or not any(w > 0 for _, w in weights):
            raise ValueError("weights must be non-negative with at least one above 0")
        self.names = [name for name, _ in weights]
        positive = [(name, w) for name, w in weights if w > 0]
        self._picked = [name for name, _ in positive]
        self._cumulative = list(itertools.accumulate(w for _, w in positive))
        self._rng: Random = rng if rng is not None else random.Random()
        self._by_ip: OrderedDict[str, str] = OrderedDict()
        self._max_remembered = max_remembered

    @property
    def default(self) -> str:
        return self.names[0]

    def pick(self) -> str:
        """A persona drawn by weight: ``rng.random()`` in [0, 1) scaled onto the cumulative weights."""
        x = self._rng.random() * self._cumulative[-1]
        i = bisect.bisect_right(self._cumulative, x)
        return self._picked[min(i, len(self._picked) - 1)]

    def choose(self, src_ip: str, bound: str = "", remember: bool = True) -> str:
        """The persona for a new connection from ``src_ip``: the service's (``bound``), else the one the address
        got before (``remember``), else one drawn by weight (remembered for the address)."""
        if bound:
            return bound
        if not remember:
            return self.pick()
        known = self._by_ip.get(src_ip)
        if known is not None:
            self._by_ip.move_to_end(src_ip)
            return known
        name = self.pick()
        self._by_ip[src_ip] = name
        if len(self._by_ip) > self._max_remembered:
            self._by_ip.popitem(last=False)
        return name


def split(total: int, weights: Sequence[tuple[str, float]], pinned: Sequence[str] = ()) -> dict[str, int]:
    """``total`` warm boxes shared by weight (largest remainders; a persona with weight above 0 gets at least one
    while ``total`` allows). A persona of weight 0 that a service names (``pinned``) gets, on top, what the least
    weighted persona's share would be beside the others, and at least one (when ``total`` > 0)."""
    out = {name: 0 for name, _ in weights}
    if total <= 0:
        return out
    positive = [(name, w) for name, w in weights if w > 0]
    whole = sum(w for _, w in positive)
    shares = {name: total * w / whole for name, w in positive}
    for name, share in shares.items():
        out[name] = math.floor(share)
    left = total - sum(out.values())
    for name, _ in sorted(shares.items(), key=lambda kv: (-(kv[1] - math.floor(kv[1])), kv[0]))[:left]:
        out[name] += 1
    for name, _ in positive:  # a persona nobody can get warm is slow for every attacker it gets
        if out[name] == 0:
            donor = max(out, key=lambda n: out[n])
            if out[donor] > 1:
                out[donor] -= 1
                out[name] = 1
    least = min(w for _, w in positive)
    for name in pinned:
        if name in out and out[name] == 0:
            out[name] = max(1, math.floor(total * least / (whole + least)))
    return out
