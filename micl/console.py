"""What a run shows on the console: its own lines and live progress, once each.

Ray forwards every worker's stdout and stderr to the driver, Ray's internals included, so a
default run keeps that channel shut (`ray.init(log_to_driver=False)`: the output stays in
Ray's log files) and the lines a user needs travel through one small actor instead:

    training worker (rank 0)  --Console-->  the fit's epoch clock  --watch()-->  driver console

The driver draws them: a progress bar per epoch on a terminal (tqdm), one line every few
seconds otherwise (`ray job submit` logs, CI), where a bar's carriage returns would make noise.
`set_verbose(True)` (the pipelines' --verbose) opens Ray's channel and MLflow's info logs again.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

import ray

from micl.data.clock import epoch_clock, find_clock, new_clock_name

_VERBOSE = False


def set_verbose(verbose: bool) -> None:
    """Show Ray's worker output and MLflow's and Ray Data's info logs on the console too (the
    pipelines' --verbose); quiet (the default) takes effect here and again when Ray starts."""
    global _VERBOSE
    _VERBOSE = verbose
    quiet_driver_logs()


def verbose() -> bool:
    return _VERBOSE


def quiet_driver_logs() -> None:
    """Keep library chatter off this process's console (it still reaches the log files):
    MLflow's info lines and Ray Data's console handler (execution plans, 'progress bars
    disabled', a spurious 'no available CPUs' warning at start-up). Errors still show."""
    if _VERBOSE:
        return
    import mlflow  # noqa: F401 — importing it configures its loggers: set the level after

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and \
                type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.ERROR)


@dataclass
class Progress:
    """Where a phase (an epoch, a feature pass) stands, as measured where it runs."""

    phase: str  # "epoch 2/6", "kNN features"
    done: int
    total: int | None  # None: not known in advance
    unit: str  # "steps", "images"
    elapsed_s: float  # since the phase began (the worker's clock: no skew across nodes)
    loss: float | None = None
    images_per_s: float | None = None
    # The part of elapsed_s spent before the first unit of work (a stream's start): not a
    # cost each later unit pays again, so the time left is extrapolated without it.
    ramp_s: float = 0.0

    def seconds_left(self) -> float | None:
        if not self.total or not self.done:
            return None
        return (self.elapsed_s - self.ramp_s) * (self.total - self.done) / self.done


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def progress_line(p: Progress) -> str:
    """One line for logs: `[micl] epoch 2/6  47% 110/235 steps  loss 4.21  598 img/s  1m40s
    left`."""
    parts = [f"[micl] {p.phase}"]
    if p.total:
        parts.append(f"{100 * p.done // p.total:3d}% {p.done}/{p.total} {p.unit}")
    else:
        parts.append(f"{p.done} {p.unit}")
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4g}")
    if p.images_per_s is not None:
        parts.append(f"{p.images_per_s:.0f} img/s")
    left = p.seconds_left()
    if left is not None:
        parts.append(f"{format_duration(left)} left")
    return "  ".join(parts)


class ProgressView:
    """Draws lines and progress on the driver: a tqdm bar per phase on a terminal, else one
    progress line every `every_s` seconds of a phase (none for a phase that is over)."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None,
                 every_s: float = 10.0) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self._bar: Any = None
        self._phase: str | None = None
        self._shown_at = 0.0  # the phase's elapsed_s at its last progress line
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.write(text, file=self.stream)  # above the bar, which stays
            else:
                print(text, file=self.stream, flush=True)

    def progress(self, p: Progress) -> None:
        with self._lock:
            if self.tty:
                self._draw_bar(p)
                return
            if p.phase != self._phase:
                self._phase, self._shown_at = p.phase, 0.0
            # Timed by the phase's own clock: a phase shorter than every_s prints nothing,
            # and one that is over leaves its line to the summary that follows.
            if p.elapsed_s - self._shown_at >= self.every_s and \
                    (p.total is None or p.done < p.total):
                print(progress_line(p), file=self.stream, flush=True)
                self._shown_at = p.elapsed_s

    def _draw_bar(self, p: Progress) -> None:
        from tqdm import tqdm

        if p.phase != self._phase:
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=p.total, desc=f"[micl] {p.phase}", unit=p.unit.rstrip("s"),
                             file=self.stream, dynamic_ncols=True, leave=True)
            self._phase = p.phase
        if self._bar is None:  # this phase's bar is already complete
            return
        post = {}
        if p.loss is not None:
            post["loss"] = f"{p.loss:.4g}"
        if p.images_per_s is not None:
            post["img/s"] = f"{p.images_per_s:.0f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(p.done - self._bar.n)
        if p.total is not None and p.done >= p.total:  # the phase is over: the bar stays
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar, self._phase = None, None


class Console:
    """Where a loop's user-facing output goes: `sink(kind, payload)` with kind "line" or
    "progress". Progress is throttled here, at the source, to one report every `every_s`."""

    def __init__(self, sink: Callable[[str, Any], None], every_s: float = 1.0) -> None:
        self.sink, self.every_s = sink, every_s
        self._last = -math.inf  # monotonic() counts from boot: the first call is always due

    def line(self, text: str) -> None:
        self.sink("line", text)

    def due(self) -> bool:
        """True at most once every `every_s` seconds: build a report only when it is due
        (reading a loss off the GPU is a host sync)."""
        now = time.monotonic()
        if now - self._last < self.every_s:
            return False
        self._last = now
        return True

    def progress(self, p: Progress) -> None:
        self.sink("progress", p)

    def track(self, items: Iterable[Any], phase: str, size: Callable[[Any], int]
              ) -> Iterator[Any]:
        """Yield `items` (batches), reporting how many images (`size(item)`) went by and how
        fast; the total is not known in advance."""
        t0, done = time.perf_counter(), 0
        for item in items:
            yield item
            done += size(item)
            if self.due():
                elapsed = time.perf_counter() - t0
                self.progress(Progress(phase, done, None, "images", elapsed,
                                       images_per_s=done / max(elapsed, 1e-9)))


def printing_console() -> Console:
    """Lines printed where this process prints (a Tune trial's log); no progress."""
    return Console(lambda kind, payload: print(payload, flush=True) if kind == "line" else None)


def silent_console() -> Console:
    return Console(lambda kind, payload: None)


def view_console(view: ProgressView) -> Console:
    """A console drawn in this process (driver-side work such as `evaluate_run`)."""
    return Console(lambda kind, payload: getattr(view, kind)(payload))


def relay_console(relay_name: str, every_s: float = 1.0) -> Console:
    """A worker's console: everything goes to the driver's relay (fire and forget; Ray keeps
    one caller's calls to an actor in order), progress at most every `every_s` seconds."""
    relay = find_clock(relay_name)
    return Console(lambda kind, payload: getattr(relay, kind).remote(payload), every_s)


def relay_warnings(console: Console) -> None:
    """Show this worker process's warnings on the driver's console, one line each (with Ray's
    channel shut they would reach only the log file). Best effort for library warnings: Ray
    Data's batch threads wrap each tensor conversion in `warnings.catch_warnings()` +
    "ignore", which is process-wide and not thread-safe, so a warning raised meanwhile (or
    after two such blocks interleave) is dropped. micl's own warnings in a worker (the
    tracking store's) go to the console directly for that reason."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        console.line(f"[micl] warning: {message}")

    warnings.showwarning = show


@contextmanager
def watch(view: ProgressView | None = None, poll_s: float = 0.5) -> Iterator[str]:
    """The epoch clock of one fit, whose console events are drawn on `view` until the block
    ends (then drained once more, so no line is lost); yields the clock's name, which the fit
    uses as its clock and the workers look up to print. The block owns it."""
    view = view or ProgressView()
    relay_name = new_clock_name("console")
    relay = epoch_clock(relay_name)
    stop = threading.Event()

    def drain() -> None:
        for kind, payload in ray.get(relay.take.remote()):
            getattr(view, kind)(payload)

    def loop() -> None:
        while not stop.wait(poll_s):
            try:
                drain()
            except Exception:  # noqa: BLE001 — the console must never take the run down
                return

    thread = threading.Thread(target=loop, name="micl-console", daemon=True)
    thread.start()
    try:
        yield relay_name
    finally:
        stop.set()
        thread.join()
        try:
            drain()
        finally:
            view.close()
            relay.close()
