"""A fit's epoch clock (which also relays its console), and where it runs.

A module of its own that imports only Ray: every actor is a process of its own, which starts
by importing the module that defines its class. The clock would otherwise import Ray Data, PIL
and pyarrow with the stream, about a CPU-second per fit, for nothing.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

NAMESPACE = "micl"


def on_this_node() -> dict[str, Any]:
    """Actor options that keep a driver's helper actor (the epoch clock, which also counts
    restarts and relays the console) on the driver's own node. Unpinned, a 0-CPU actor may land
    on any node, and losing a training node would then take the run's bookkeeping with it."""
    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


@ray.remote(num_cpus=0)
class EpochClock:
    """A fit's bookkeeping, held by the driver so it outlives failed worker groups: the
    current epoch for the map tasks of a re-executed training stream, the undecodable files
    they skip per epoch (exact, unlike a column that the trainer's drop_last or an equal split
    may cut off), and how many times the training loop has started (restarts). It is the
    fit's console relay too (micl.console.watch): one helper process per fit, not two."""

    def __init__(self) -> None:
        self._events: list[tuple[str, Any]] = []  # console events the driver has not taken
        self._starts = 0
        self._epoch = 0
        self._skipped: dict[int, int] = {}
        self._attempt: dict[int, int] = {}  # epoch -> the loop start that counted it
        self._examples: list[str] = []

    def set(self, epoch: int, attempt: int = 0) -> None:
        """Every worker calls this as it starts an epoch. `attempt` counts the loop's starts
        (restarts after a worker failure): an epoch that a restart streams again is counted
        afresh, not on top of the attempt that died in it."""
        self._epoch = int(epoch)
        if attempt > self._attempt.setdefault(self._epoch, attempt):
            self._skipped.pop(self._epoch, None)
            self._attempt[self._epoch] = attempt

    def get(self) -> int:
        return self._epoch

    def count_start(self) -> int:
        """Rank 0 calls this as the loop starts: 0 the first time, >= 1 after a restart."""
        self._starts += 1
        return self._starts - 1

    def add_skipped(self, epoch: int, count: int, paths: list[str]) -> None:
        self._skipped[epoch] = self._skipped.get(epoch, 0) + count
        self._examples = (self._examples + [p for p in paths if p not in self._examples])[:10]

    def skipped(self, epoch: int) -> tuple[int, list[str]]:
        """(files skipped in that epoch, up to 10 example paths)."""
        return self._skipped.get(epoch, 0), list(self._examples)

    # The console relay: the workers' lines in order, with only the newest progress report
    # among them, until the driver takes them.

    def line(self, text: str) -> None:
        self._events.append(("line", text))

    def progress(self, report: Any) -> None:  # a micl.console.Progress
        if self._events and self._events[-1][0] == "progress":
            self._events.pop()  # superseded before anyone drew it
        self._events.append(("progress", report))

    def take(self) -> list[tuple[str, Any]]:
        events, self._events = self._events, []
        return events


def epoch_clock(name: str) -> Any:
    """Get or create the named EpochClock (namespace "micl"). It lives as long as the process
    that created it; map tasks look it up by name."""
    return EpochClock.options(name=name, namespace=NAMESPACE, get_if_exists=True,
                              **on_this_node()).remote()
