"""A fit's epoch clock (which also relays its console), and where it runs.

The clocks of every fit a process drives live in one actor, that process's `EpochClocks`:
an actor is a process of its own (about a CPU-second to start), so a process that fits one
run after another (a notebook, a Tune trial process that Tune reuses, the test session)
starts it once. A clock's name is "<that actor's name>/<the fit's key>".

A module of its own that imports only Ray: every actor is a process of its own, which starts
by importing the module that defines its class. The clock would otherwise import Ray Data, PIL
and pyarrow with the stream, about a CPU-second per fit, for nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

NAMESPACE = "micl"
# This process's EpochClocks actor (created with its first clock).
_OWN_CLOCKS = f"micl-clocks-{uuid.uuid4().hex[:12]}"
_OWN_HANDLES: dict[str, Any] = {}  # Ray job -> the handle that keeps it up


def on_this_node() -> dict[str, Any]:
    """Actor options that keep a driver's helper actor (the epoch clock, which also counts
    restarts and relays the console) on the driver's own node. Unpinned, a 0-CPU actor may land
    on any node, and losing a training node would then take the run's bookkeeping with it."""
    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


class EpochClock:
    """A fit's bookkeeping, held by the driver so it outlives failed worker groups: the
    current epoch for the map tasks of a re-executed training stream, the undecodable files
    they skip per epoch (exact, unlike a column that the trainer's drop_last or an equal split
    may cut off), and how many times the training loop has started (restarts). It is the
    fit's console relay too (micl.console.watch). Kept in its process's EpochClocks actor."""

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


@ray.remote(num_cpus=0)
class EpochClocks:
    """The epoch clocks of the fits one process drives, each under its fit's key."""

    def __init__(self) -> None:
        self._clocks: dict[str, EpochClock] = {}

    def call(self, fit: str, method: str, *args: Any) -> Any:
        clock = self._clocks.setdefault(fit, EpochClock())
        return getattr(clock, method)(*args)

    def forget(self, fit: str) -> None:
        self._clocks.pop(fit, None)

    def fits(self) -> list[str]:
        return sorted(self._clocks)


class ClockRef:
    """One fit's clock, called as if it were an actor of its own:
    `ray.get(clock.set.remote(epoch, attempt))`."""

    def __init__(self, clocks: Any, fit: str) -> None:
        self.clocks, self.fit = clocks, fit

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)
        return _ClockMethod(self.clocks, self.fit, method)

    def close(self) -> None:
        """Drop the fit's clock (fire and forget): its fit is over."""
        self.clocks.forget.remote(self.fit)


class _ClockMethod:
    def __init__(self, clocks: Any, fit: str, method: str) -> None:
        self.clocks, self.fit, self.method = clocks, fit, method

    def remote(self, *args: Any) -> ray.ObjectRef:
        return self.clocks.call.remote(self.fit, self.method, *args)


def new_clock_name(label: str) -> str:
    """A fresh clock's name, kept by this process's EpochClocks actor."""
    return f"{_OWN_CLOCKS}/{label}-{uuid.uuid4().hex[:8]}"


def epoch_clock(name: str) -> ClockRef:
    """Get or create the named clock (see `new_clock_name`). Its EpochClocks actor (namespace
    "micl", on the node of the process that created it) lives as long as that process; map
    tasks and workers look it up by name."""
    clocks, fit = split_clock_name(name)
    handle = EpochClocks.options(name=clocks, namespace=NAMESPACE, get_if_exists=True,
                                 **on_this_node()).remote()
    if clocks == _OWN_CLOCKS:
        # Ray ends an actor once its creator holds no handle to it: keep the first, per Ray
        # job (a process that starts Ray again gets a new one).
        _OWN_HANDLES.setdefault(ray.get_runtime_context().get_job_id(), handle)
    return ClockRef(handle, fit)


def find_clock(name: str) -> ClockRef:
    """The named clock, which must exist (ValueError if its EpochClocks actor does not)."""
    clocks, fit = split_clock_name(name)
    return ClockRef(ray.get_actor(clocks, namespace=NAMESPACE), fit)


def held_clocks() -> list[str]:
    """The keys of the fits whose clocks this process's EpochClocks actor holds now (none
    before its first clock). A fit drops its clock as it ends."""
    try:
        clocks = ray.get_actor(_OWN_CLOCKS, namespace=NAMESPACE)
    except ValueError:
        return []
    return ray.get(clocks.fits.remote())


def split_clock_name(name: str) -> tuple[str, str]:
    """(the EpochClocks actor's name, the fit's key) of a clock's name."""
    clocks, slash, fit = name.partition("/")
    if not slash or not fit:
        raise ValueError(f"not an epoch clock's name (<clocks>/<fit>): {name!r}")
    return clocks, fit
