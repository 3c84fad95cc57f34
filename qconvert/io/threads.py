"""Overlap reading and writing with quantization.

File I/O and sha256 release the GIL, as do torch's kernels, so a reader thread that fetches and
hashes the next tensors and a writer thread that writes and hashes finished ones keep both cores
busy. Bounded queues keep at most a few tensors in flight, so memory stays flat.
"""

import os
import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def idle_threads_sleep() -> None:
    """Make torch's OpenMP threads sleep rather than spin while they wait for work; effective only when
    called before torch is imported (libgomp reads it once). A user's own OMP_WAIT_POLICY wins.

    By default libgomp's threads spin-wait at every barrier before they sleep. On cores that other
    processes share (a CI runner, `batch --jobs 2`) they spin while the thread they wait for is off its
    core: with two busy neighbours, converting the 730M Llama took 16.4 CPU-seconds against 8.9 on a
    quiet machine (scripts/compare.py --neighbours 2).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_DONE = object()


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `items` in a background thread, staying at most `depth` items ahead."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put((item, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            slots.put((None, exc))
            return
        slots.put((_DONE, None))

    thread = threading.Thread(target=produce, daemon=True, name="qconvert-reader")
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get(timeout=0.05)
            except queue.Empty:
                pass


class BackgroundWorker:
    """Runs submitted calls one at a time, in order, on a thread; errors surface on the next call."""

    def __init__(self, depth: int = 2) -> None:
        self._tasks: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, daemon=True, name="qconvert-writer")
        self._thread.start()

    def submit(self, call: Callable[[], None]) -> None:
        self._raise_pending()
        self._tasks.put(call)

    def join(self) -> None:
        """Wait for every submitted call; re-raise the first failure."""
        self._tasks.put(None)
        self._thread.join()
        self._raise_pending()

    def _work(self) -> None:
        while (call := self._tasks.get()) is not None:
            if self._error is None:
                try:
                    call()
                except BaseException as exc:
                    self._error = exc

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
