"""sha256 of the source's weight files, computed on a background thread from the moment the command
knows its source.

A conversion records the checksum of every source file in its manifest. Hashing takes about a second
of one core per 1.5 GB; started before torch is imported (which keeps the other core busy for 1.2 s),
it is done by the time the tensors are read, instead of competing with quantization for the cores.
A hash is used only for the very file it was started on (`file_identity`).

A file's hash is also kept between runs (`memo.py`, kind "sha256") under its identity: resolved path,
device, inode, size, modification and change times in nanoseconds, the way git's index and DVC trust
a file they have hashed before. Rewriting a file changes its change time (which no user call can
set back), so a kept hash is never used for other bytes. A file changed less than `SETTLED_S` before
it was hashed may still be being written (and timestamps are coarse: a change within the same tick
would keep them), so its hash is not kept. `qconvert verify` always reads
every byte. The sha256 of a tensor's bytes that a conversion copies unchanged from a source file
(an embedding, a head) is kept the same way, under the file's identity and the bytes' offset and
length (`file_key`), so that the writer can copy them inside the kernel without reading them.
"""

import hashlib
import json
import os
import threading
import time
from pathlib import Path

from qconvert.io import memo

SETTLED_S = 2.0  # seconds: a file changed more recently than this when hashed: its hash is not kept

_started: dict[Path, "_Hash"] = {}


def file_identity(stat: os.stat_result) -> dict:
    """What a kept hash is filed under (with the resolved path): any rewrite of the file changes it."""
    return {
        "device": stat.st_dev,
        "inode": stat.st_ino,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
    }


class _Hash:
    def __init__(self, path: Path) -> None:
        stat = path.stat()
        self.path, self.identity = path, file_identity(stat)
        self.key = file_key(path, stat)
        self.done = threading.Event()
        self.digest = recall(self.key)
        if self.digest is not None:
            self.done.set()
        else:
            threading.Thread(target=self._run, daemon=True, name=f"sha256 {path.name}").start()

    def _run(self) -> None:
        try:
            self.digest = sha256_file(self.path)
            keep(self.key, self.digest)
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
    return h.identity == file_identity(path.stat())


def result(path: Path) -> str | None:
    """The background hash of `path`, waiting for it if needed; None when none was started for it as it is now."""
    if not started(path):
        return None
    h = _started[path.resolve()]
    h.done.wait()
    return h.digest


def file_key(file: Path, stat: os.stat_result, **part: int) -> dict | None:
    """What the sha256 of `file` (or of a `part` of it: offset=, nbytes=) is kept under, given the file's
    stat as it was opened; None while the file is not settled (changed less than SETTLED_S ago)."""
    if max(stat.st_mtime, stat.st_ctime) >= time.time() - SETTLED_S:
        return None
    return {"path": str(file.resolve()), **file_identity(stat), **part}


def recall(key: dict | None) -> str | None:
    """The sha256 kept under `file_key`'s key, or None."""
    return None if key is None else (memo.recall("sha256", key) or {}).get("sha256")


def keep(key: dict | None, digest: str) -> None:
    """Keep `digest`, read just now, under `key` if the file is still the one the key was made for."""
    if key is not None:
        try:
            if {**key, **file_identity(Path(key["path"]).stat())} == key:
                memo.remember("sha256", key, {"sha256": digest})
        except OSError:
            pass
