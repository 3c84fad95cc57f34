"""A JSON-lines stream of what a conversion is doing, for CI dashboards (`--events FILE`).

One object per line, always with `event`, `elapsed_s` and `rss_bytes`:

    {"event": "start", "source": ..., "settings": {...}}
    {"event": "block", "stage": "block 3: gptq", "done": 3, "total": 30, "eta_s": 210.4}
    {"event": "tensor", "name": ..., "index": 12, "total": 272, "bytes_done": ..., "bytes_total": ...,
     "eta_s": 4.1, "action": "quantized", "bits": 4, "relative_mse": 0.0091}
    {"event": "warning", "message": ...}
    {"event": "done", "output": ..., "totals": {...}}  or  {"event": "error", "message": ..., "exit_code": 2}

Each line is flushed as it is written, so a dashboard tailing the file sees progress live.
"""

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import IO, Any

from qconvert.errors import QConvertError


def current_rss() -> int:
    """Resident memory of this process in bytes (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_rss() -> int:
    """This process's own peak resident memory in bytes: VmHWM on Linux, which exec resets (ru_maxrss
    of a child also counts the memory of the parent it was forked from), else ru_maxrss."""
    high_water = proc_kilobytes("/proc/self/status", "VmHWM")
    return high_water if high_water is not None else maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def proc_kilobytes(path: str, key: str) -> int | None:
    """The "key: N kB" line of a /proc file, in bytes; None off Linux."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def maxrss_bytes(ru_maxrss: int) -> int:
    """ru_maxrss is in kilobytes on Linux and in bytes on macOS."""
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024


class EventLog:
    """Writes events to `path`; every method is a no-op when `path` is None."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.handle: IO[str] | None = None
        self.started = time.monotonic()
        self.phase_started: dict[str, float] = {}  # ETAs extrapolate each phase from its own start
        self.tensor_index = 0

    def __enter__(self) -> "EventLog":
        if self.path is not None:
            try:
                self.handle = open(self.path, "a", buffering=1)
            except OSError as exc:
                raise QConvertError(f"cannot write events to {self.path}: {exc.strerror}.") from exc
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        if exc is not None:
            code = exc.exit_code if isinstance(exc, QConvertError) else 130 if isinstance(exc, KeyboardInterrupt) else 1
            self.emit("error", message=str(exc) or type(exc).__name__, exit_code=code)
        if self.handle is not None:
            self.handle.close()

    def emit(self, event: str, **fields: Any) -> None:
        if self.handle is None:
            return
        line = {
            "event": event,
            "elapsed_s": round(time.monotonic() - self.started, 3),
            "rss_bytes": current_rss(),
            **fields,
        }
        self.handle.write(json.dumps(line, default=str) + "\n")

    def start(self, source: str, settings) -> None:
        from qconvert.settings import settings_dict

        self.emit("start", source=str(source), settings=settings_dict(settings))

    def tensor(self, record, done: int, total: int, count: int) -> None:
        self.tensor_index += 1
        self.emit(
            "tensor",
            name=record.name,
            index=self.tensor_index,
            total=count,
            bytes_done=done,
            bytes_total=total,
            eta_s=self._eta("tensor", done, total),
            action=record.action,
            origin=record.origin,
            bits=record.bits,
            relative_mse=record.relative_mse,
        )

    def block(self, stage: str, done: int, total: int) -> None:
        self.emit("block", stage=stage, done=done, total=total, eta_s=self._eta("block", done, total))

    def warning(self, message: str) -> None:
        self.emit("warning", message=message)

    def done(self, result) -> None:
        self.emit(
            "done",
            output=str(result.output),
            files=[str(f) for f in result.files],
            totals=result.manifest.totals,
            peak_rss_bytes=peak_rss(),
        )

    def _eta(self, phase: str, done: float, total: float) -> float | None:
        elapsed = time.monotonic() - self.phase_started.setdefault(phase, time.monotonic())
        return round(elapsed * (total - done) / done, 1) if done else None
