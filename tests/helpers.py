"""What several test modules reuse: a real ImageFolder tree with good and bad files, fault
injection hooks, a loopback gate that cuts a server off, ranks of a process group, MLflow
stores that start from an empty one made once, a run's metric by step."""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import pathlib
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch.multiprocessing as mp
from PIL import Image

BAD_FILES = 3  # a corrupt JPEG, a zero-byte file and a text file (hidden files don't count)


def make_image_folder(root: str | pathlib.Path, n_per_class: int = 4,
                      classes: Sequence[str] = ("cat", "dog", "fish"), size: int = 24,
                      bad_files: bool = True, split: str | None = "train") -> dict:
    """Write `<root>/<split>/<class>/img_<i>.{jpg,png}` (`<root>/<class>/...` if split is None).

    Images alternate JPEG/PNG and RGB/grayscale-ish sizes around `size` (non-square), with a
    class colour plus noise. With bad_files, class folders also get `corrupt.jpg` (a JPEG cut
    short after its header), `empty.jpg` (0 bytes) and `notes.txt`, all of which a loader must
    skip and count, and a hidden `.DS_Store` it must ignore.

    Returns {"root": dataset root (str), "split_root": str, "classes": sorted names,
    "good": number of good images, "good_paths" and "bad": their and the bad files' paths
    relative to split_root}.
    """
    root = pathlib.Path(root)
    split_root = root / split if split else root
    rng = np.random.default_rng(0)
    names = sorted(classes)
    good: list[str] = []  # relative to the split root
    for c, name in enumerate(names):
        d = split_root / name
        d.mkdir(parents=True, exist_ok=True)
        colour = np.array([(60 + 80 * c) % 256, (200 - 50 * c) % 256, (30 * c) % 256])
        for i in range(n_per_class):
            h, w = size + 3 * (i % 2), size + 2 * (i % 3)
            img = np.clip(colour + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            file = f"img_{i}.png" if i % 2 else f"img_{i}.jpg"
            Image.fromarray(img).save(d / file, **({} if i % 2 else {"quality": 90}))
            good.append(f"{name}/{file}")
    bad: list[str] = []
    if bad_files:
        first, second, last = names[0], names[1 % len(names)], names[-1]
        jpeg = (split_root / first / "img_0.jpg").read_bytes()
        (split_root / first / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 3])
        (split_root / second / "empty.jpg").write_bytes(b"")
        (split_root / last / "notes.txt").write_text("not an image\n")
        (split_root / first / ".DS_Store").write_bytes(b"\x00\x01junk")
        bad = [f"{first}/corrupt.jpg", f"{second}/empty.jpg", f"{last}/notes.txt"]
    return {"root": str(root), "split_root": str(split_root), "classes": names,
            "good": len(good), "good_paths": good, "bad": bad}


class KillOnce:
    """A step hook (micl.train.StepHook) that kills its worker process hard at one optimizer
    step, once per marker directory (the restarted worker finds the marker and lives), the
    way a preempted node or an OOM kill would. Workers import it from tests/ (on their path)."""

    def __init__(self, rank: int, step: int, marker_dir: str | pathlib.Path) -> None:
        self.rank, self.step, self.marker_dir = rank, step, str(marker_dir)

    def marker(self) -> pathlib.Path:
        return pathlib.Path(self.marker_dir) / f"killed-{self.rank}-{self.step}"

    def __call__(self, info) -> None:
        if (info.rank, info.step) != (self.rank, self.step) or self.marker().exists():
            return
        self.marker().parent.mkdir(parents=True, exist_ok=True)
        self.marker().touch()
        print(f"[test] killing rank {info.rank} at step {info.step}", flush=True)
        os._exit(1)


class LoopbackGate:
    """A TCP relay on a loopback port in front of a real server: `close()` refuses new
    connections and cuts the open ones, as the server's process stopping would; `open()`
    listens again on the same port. One server start serves a whole outage."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the blocked accept(); close alone
                self._listener.shutdown(socket.SHUT_RDWR)  # would leave it listening
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


# What a rank imports before it runs: the forkserver imports it once and forks every rank from
# itself, where spawning started Python afresh for each rank and imported torch, timm and micl
# again (about 4 CPU-seconds a rank on the 2-core VM). A fork server holds no threads, so the
# forks are safe where forking the test process (Ray's and torch's threads) is not.
RANK_PRELOAD = ["torch.distributed", "micl.driver", "micl.objectives"]


def run_ranks(fn: Callable, args: tuple, nprocs: int = 2) -> None:
    """fn(rank, *args) in `nprocs` processes at once, as torch.multiprocessing.spawn runs it
    (an error in a rank is raised here), forked from one fork server per test session."""
    multiprocessing.set_forkserver_preload([*RANK_PRELOAD, fn.__module__])
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


_EMPTY_STORE: list[pathlib.Path] = []  # an empty SQLite store at MLflow's schema, made once


def metric_history(client, run_id: str, key: str) -> dict[int, float]:
    """{step: value} of one metric of an MLflow run (`client`: an MlflowClient)."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def sqlite_uri(path: str | pathlib.Path) -> str:
    """`sqlite:///<path>` for a test's own MLflow store, which starts as a copy of one empty
    store. MLflow builds a new store's schema by running its migrations (about 0.8 CPU-s and a
    second of SQLite syncs on the 2-core VM); the copy has the same schema and the same
    Default experiment. A store made from nothing, as a user's first run makes it, is still
    tested: the demo's console (test_console, which also sees MLflow's messages as it does
    so) and test_tracking's stores."""
    path = pathlib.Path(path)
    if not _EMPTY_STORE:
        from mlflow.tracking import MlflowClient

        folder = tempfile.mkdtemp(prefix="micl-empty-store-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # nothing left in /tmp
        empty = pathlib.Path(folder) / "mlflow.db"
        MlflowClient(f"sqlite:///{empty}").search_experiments()  # runs the migrations
        _EMPTY_STORE.append(empty)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_EMPTY_STORE[0], path)
    return f"sqlite:///{path}"
