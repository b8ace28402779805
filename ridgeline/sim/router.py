"""Routing an arriving request to a replica of a pool.

Load is the number of requests a replica holds and has not finished (waiting, running, or
for a decode replica its incoming KV too): what a front-end router sees without asking the
engines for more. Ties go round-robin so an idle fleet fills evenly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Hashable, Protocol, Sequence

ROUTERS = ("round-robin", "least-loaded", "prefix-aware")


class HasLoad(Protocol):
    load: int


class Router(ABC):
    """Picks the replica of an arriving request; subclasses are the routing policies."""
    name = ""

    def __init__(self, replicas: Sequence[HasLoad]):
        self.replicas = list(replicas)
        self._next = 0

    @abstractmethod
    def choose(self, key: Hashable | None = None) -> int:
        """Index into the pool."""

    def _least_loaded(self) -> int:
        loads = [r.load for r in self.replicas]
        m = min(loads)
        start = self._next
        try:
            i = loads.index(m, start)
        except ValueError:
            i = loads.index(m)
        self._next = (i + 1) % len(loads)
        return i


class RoundRobin(Router):
    name = "round-robin"

    def choose(self, key: Hashable | None = None) -> int:
        i = self._next
        self._next = (i + 1) % len(self.replicas)
        return i


class LeastLoaded(Router):
    name = "least-loaded"

    def choose(self, key: Hashable | None = None) -> int:
        return self._least_loaded()


class PrefixAware(Router):
    """Requests with the same prefix key go where that prefix was sent before (its KV is likely
    cached there), unless that replica's load exceeds the least loaded one's by more than
    `slack` requests plus `slack_ratio` of it; then the least loaded replica takes the request
    and joins the prefix's replicas. Requests without a key go to the least loaded."""
    name = "prefix-aware"

    def __init__(self, replicas: Sequence[HasLoad], slack: int = 4, slack_ratio: float = 0.25):
        super().__init__(replicas)
        self.slack = slack
        self.slack_ratio = slack_ratio
        self.homes: dict[Hashable, list[int]] = {}

    def choose(self, key: Hashable | None = None) -> int:
        if key is None:
            return self._least_loaded()
        homes = self.homes.get(key)
        reps = self.replicas
        m = min(r.load for r in reps)
        if homes:
            best = min(homes, key=lambda i: reps[i].load)
            if reps[best].load <= m + self.slack + self.slack_ratio * m:
                return best
        i = self._least_loaded()
        if homes is None:
            self.homes[key] = [i]
        elif i not in homes:
            homes.append(i)
        return i


def make_router(name: str, replicas: Sequence[HasLoad]) -> Router:
    if name == "round-robin":
        return RoundRobin(replicas)
    if name == "least-loaded":
        return LeastLoaded(replicas)
    if name == "prefix-aware":
        return PrefixAware(replicas)
    raise ValueError(f"--router must be one of {', '.join(ROUTERS)}, got {name!r}")
