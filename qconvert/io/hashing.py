"""sha256 of the source's weight files, computed on a background thread from the moment the command
knows its source.

A conversion records the checksum of every source file in its manifest. Hashing takes about a second
of one core per 1.5 GB; started before torch is imported (which keeps the other core busy for 1.2 s),
it is done by the time the tensors are read, instead of competing with quantization for the cores.
A hash is used only for the very file it was started on: same path, size and modification time.
"""

import hashlib
import json
import os
import threading
from pathlib import Path

_started: dict[Path, "_Hash"] = {}


class _Hash:
    def __init__(self, path: Path) -> None:
        stat = path.stat()
        self.path, self.identity = path, (stat.st_size, stat.st_mtime_ns)
        self.digest: str | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True, name=f"sha256 {path.name}").start()

    def _run(self) -> None:
        try:
            self.digest = sha256_file(self.path)
        except OSError:
            pass  # the reader reports the file's problem; the hash is then simply not used
        finally:
            self.done.set()


def sha256_file(path: Path, chunk_bytes: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)  # releases the GIL: other threads run meanwhile
    return digest.hexdigest()


def start_for_source(source: str) -> None:
    """Start hashing the weight files of a local checkpoint folder or file, chosen as the loader chooses
    them (the shard index's files, else model.safetensors, else the folder's safetensors, else its
    pytorch_model*.bin); a hub id: nothing to do."""
    path = Path(source).expanduser()
    try:
        if path.is_file():
            start([path])
        elif path.is_dir():
            start(_weight_files(path))
    except Exception:  # a malformed index, an unreadable folder: only a head start is lost, and the loader
        return  # reports the problem itself in one sentence


def start(files: list[Path]) -> None:
    """Start hashing these files on background threads (those already started are left as they are)."""
    for file in files:
        resolved = file.resolve()
        if resolved not in _started and os.access(resolved, os.R_OK):
            _started[resolved] = _Hash(resolved)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def started(path: Path) -> bool:
    """Whether a background hash of this file (as it is now) was started."""
    h = _started.get(path.resolve())
    if h is None:
        return False
    stat = path.stat()
    return h.identity == (stat.st_size, stat.st_mtime_ns)


def result(path: Path) -> str | None:
    """The background hash of `path`, waiting for it if needed; None when none was started for it as it is now."""
    if not started(path):
        return None
    h = _started[path.resolve()]
    h.done.wait()
    return h.digest
