"""Write safetensors files tensor by tensor, and publish an output folder atomically.

The safetensors library can only save tensors it holds all at once. We stream instead: every
tensor's dtype and shape is known before any is computed, so the header (and every data offset)
is fixed up front and each tensor is written, hashed and dropped as soon as it exists. The header
reserves room for the metadata, which is patched in at the end and padded with spaces (JSON
whitespace, allowed by the format) so the data never moves. Files are readable by `safe_open`.
"""

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import torch

from qconvert.errors import OutputError
from qconvert.io import hashing
from qconvert.io.dtypes import DTYPE_NAMES, SAFETENSORS_DTYPES

if TYPE_CHECKING:
    from qconvert.io.loading import SourceBytes


@dataclass(frozen=True)
class TensorSpec:
    """A tensor planned for the output: its stored name, safetensors dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = SAFETENSORS_DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n


class SafetensorsStreamWriter:
    """Writes the tensors of `specs`, in that order, into a safetensors file at `path`.

    Args:
        path: the file to create.
        specs: every tensor the file will hold, in write order.
        metadata_bytes: room to reserve for the `__metadata__` JSON written by `finish`.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata_bytes: int) -> None:
        self.path = path
        self.specs = specs
        self._next = 0
        self._entries = self._entries_of(specs)
        self.data_bytes = sum(spec.nbytes for spec in specs)
        placeholder = self._header_json({"": " " * metadata_bytes})
        self._header_length = len(placeholder) + (-len(placeholder) % 8)  # data starts 8-byte aligned
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", self._header_length) + b" " * self._header_length)

    @classmethod
    def reopen(cls, path: Path, specs: list[TensorSpec], metadata_bytes: int) -> "SafetensorsStreamWriter":
        """A file another writer filled with every tensor of `specs` and closed unfinished, ready for `finish`
        (a shard written as a part of a conversion split across machines)."""
        writer = cls.__new__(cls)
        writer.path, writer.specs = path, specs
        writer._entries = cls._entries_of(specs)
        placeholder = writer._header_json({"": " " * metadata_bytes})
        writer._header_length = len(placeholder) + (-len(placeholder) % 8)
        expected = 8 + writer._header_length + sum(spec.nbytes for spec in specs)
        if not path.is_file() or path.stat().st_size != expected:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "no file"
            raise OutputError(
                f"{path} should hold {expected} bytes of converted tensors and has {found}: the part that wrote it "
                "did not finish, or wrote where this machine does not see (use a folder every node shares)."
            )
        writer._file = open(path, "r+b")
        writer._next = len(specs)
        return writer

    def write(self, name: str, tensor: torch.Tensor) -> str:
        """Append the next planned tensor and return the sha256 of its bytes."""
        spec = self.specs[self._next]
        actual = (DTYPE_NAMES.get(tensor.dtype), tuple(tensor.shape))
        if spec.name != name or actual != (spec.dtype, spec.shape):
            raise AssertionError(f"planned {spec} but got {name} {actual}")  # a bug in the planner
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(data)
        self._next += 1
        return hashlib.sha256(data).hexdigest()

    def copy(self, name: str, source: "SourceBytes", chunk_bytes: int = 1 << 23) -> str:
        """Append the next planned tensor by copying its bytes from a source file, and return their sha256.

        Bytes (at least 1 MB) whose sha256 an earlier run kept (`hashing.file_key`) are copied inside
        the kernel (copy_file_range), never entering this process; others are read a chunk at a time
        (memory stays flat whatever the tensor's size), hashed and written, and their sha256 kept for
        the next run.

        Raises:
            OutputError: the source file is shorter than its header says (it changed meanwhile).
        """
        spec = self.specs[self._next]
        actual = (DTYPE_NAMES.get(source.dtype), tuple(source.shape))
        if spec.name != name or actual != (spec.dtype, spec.shape):
            raise AssertionError(f"planned {spec} but got {name} {actual}")  # a bug in the planner
        with open(source.file, "rb") as f:
            # The key of the file as opened (not as a path names it): small tensors (norms) are read, cheaper
            # than asking the cache.
            opened = os.fstat(f.fileno())
            key = (
                hashing.file_key(source.file, opened, offset=source.offset, nbytes=source.nbytes)
                if source.nbytes >= 1 << 20
                else None
            )
            known = hashing.recall(key)
            if known is not None and self._copy_in_kernel(f, source, name):
                if hashing.file_identity(os.fstat(f.fileno())) != hashing.file_identity(opened):
                    raise OutputError(f"{source.file} changed while it was being converted: {name} may be mixed.")
            else:
                known = self._copy_hashing(f, source, name, chunk_bytes)
                hashing.keep(key, known)
        self._next += 1
        return known

    def _copy_in_kernel(self, f, source: "SourceBytes", name: str) -> bool:
        """Copy the bytes with copy_file_range; False (nothing written) where the filesystems refuse it."""
        self._file.flush()
        start = self._file.tell()
        copied = 0
        try:
            while copied < source.nbytes:
                n = os.copy_file_range(
                    f.fileno(), self._file.fileno(), source.nbytes - copied, source.offset + copied, start + copied
                )
                if n == 0 and not copied:
                    return False  # some filesystems say "not supported" this way: read the bytes instead
                if n == 0:
                    raise OutputError(f"{source.file} changed while it was being converted: {name} is cut short.")
                copied += n
        except OSError as exc:
            refused = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM)
            if copied or exc.errno not in refused:  # EPERM: sandboxes that forbid the call
                raise
            return False
        self._file.seek(start + copied)
        return True

    def _copy_hashing(self, f, source: "SourceBytes", name: str, chunk_bytes: int) -> str:
        digest, buffer = hashlib.sha256(), bytearray(min(chunk_bytes, source.nbytes))
        f.seek(source.offset)
        left = source.nbytes
        while left:
            view = memoryview(buffer)[: min(left, len(buffer))]
            if f.readinto(view) != len(view):
                raise OutputError(f"{source.file} changed while it was being converted: {name} is cut short.")
            digest.update(view)
            self._file.write(view)
            left -= len(view)
        return digest.hexdigest()

    def finish(self, metadata: dict[str, str]) -> None:
        """Patch the final metadata into the reserved header space and close the file."""
        if self._next != len(self.specs):
            raise AssertionError(f"{self.path} got {self._next} of {len(self.specs)} planned tensors")
        header = self._header_json(metadata)
        if len(header) > self._header_length:
            raise AssertionError(f"metadata needs {len(header)} header bytes, {self._header_length} reserved")
        self._file.seek(8)
        self._file.write(header + b" " * (self._header_length - len(header)))
        self._file.close()

    def close(self) -> None:
        self._file.close()

    @staticmethod
    def _entries_of(specs: list[TensorSpec]) -> dict[str, dict]:
        entries, offset = {}, 0
        for spec in specs:
            entries[spec.name] = {
                "dtype": spec.dtype,
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        return entries

    def _header_json(self, metadata: dict[str, str]) -> bytes:
        header = {"__metadata__": metadata, **self._entries}
        return json.dumps(header, separators=(",", ":")).encode()


def split_into_shards(groups: list[list[TensorSpec]], max_shard_bytes: int | None) -> list[list[TensorSpec]]:
    """Split tensor groups (kept whole: a weight with its scales) into shards of at most `max_shard_bytes`."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for group in groups:
        group_bytes = sum(spec.nbytes for spec in group)
        if max_shard_bytes and shards[-1] and size + group_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += group_bytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_destination(destination: Path, force: bool, protected: Iterable[Path] = ()) -> None:
    """Refuse to write `destination` when it exists (without `force`), or when it is, contains or lies
    inside a `protected` path (the source): a converter must never destroy its input.

    The destination's own last component is not resolved: a link there is replaced, never followed.

    Raises:
        OutputError: as above.
    """
    where = _unfollowed(destination)
    for path in protected:
        source = Path(path).resolve()
        if where == source or where in source.parents or source in where.parents:
            relation = "is" if where == source else "contains" if where in source.parents else "lies inside"
            raise OutputError(f"the output {destination} {relation} the source {path}; choose an output outside it.")
    if os.path.lexists(destination) and not force:
        kind = (
            " (a symbolic link; --force replaces the link, not what it points to)" if destination.is_symlink() else ""
        )
        raise OutputError(f"{destination} already exists; pass --force to overwrite it{kind}.")


def _unfollowed(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    return path.parent.resolve() / path.name


@contextmanager
def staged_output(
    destination: Path, force: bool, protected: Iterable[Path] = (), folder: bool = True
) -> Iterator[Path]:
    """Yield a staging path beside `destination` (an empty folder, or a file name when `folder` is
    false); on success it replaces `destination` in one atomic rename.

    The run holds `destination`'s lock throughout (`output_lock`), so two runs never share a staging
    path; a staging path left by a killed run is cleared first. On failure or interruption the staging
    path is removed, so nothing half-written ever sits where a finished output belongs.

    Raises:
        OutputError: see `check_destination`; another run holds the lock; the staging path cannot be made.
    """
    check_destination(destination, force, protected)
    with output_lock(destination):
        staging = destination.with_name(f".{destination.name}.qconvert-partial")
        remove_path(staging)
        try:
            if folder:
                staging.mkdir(parents=True)
            else:
                staging.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {staging}: {exc.strerror}.") from exc
        try:
            yield staging
            check_destination(destination, force, protected)  # it may have appeared meanwhile
            publish(staging, destination)
        except BaseException:
            remove_path(staging)
            raise


def remove_path(path: Path) -> None:
    """Remove a file, folder or link at `path` (a link itself, never what it points to); absent is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def publish(staging: Path, destination: Path) -> None:
    """Move `staging` to `destination` atomically: a plain rename when nothing is there, else an atomic
    exchange of the two (Linux renameat2), after which the old output is removed from the staging name.
    Where the exchange is unavailable, the old output is renamed aside first (a moment without it)."""
    if not os.path.lexists(destination):
        os.rename(staging, destination)
        return
    if _exchange(staging, destination):
        remove_path(staging)  # now the old output
        return
    retired = destination.with_name(f".{destination.name}.qconvert-old")
    remove_path(retired)
    os.rename(destination, retired)
    try:
        os.rename(staging, destination)
    except BaseException:
        os.rename(retired, destination)  # put the old output back rather than leave nothing
        raise
    remove_path(retired)


RENAME_EXCHANGE = 2
AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where the system lacks it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False  # a filesystem or kernel without the exchange
    raise OSError(error, os.strerror(error), str(b))


@contextmanager
def output_lock(destination: Path) -> Iterator[None]:
    """Hold an exclusive lock on writing `destination` (a `.<name>.qconvert-lock` file beside it, removed
    on release), so two runs writing the same output never mix their files.

    Raises:
        OutputError: another run holds it.
    """
    path = destination.with_name(f".{destination.name}.qconvert-lock")
    key = _unfollowed(path)
    if key in _HELD:  # this process holds it already (an export inside a conversion's run)
        yield
        return
    created = _missing_folders(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(
                f"another qconvert run is writing {destination}; wait for it to finish or choose another output."
            ) from None
        try:  # the holder before us may have removed the file between our open and our lock: retry on the new one
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        path.unlink(missing_ok=True)
        os.close(fd)
        for folder in reversed(created):  # folders made for an output that never arrived: leave nothing behind
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the output is in it


def _missing_folders(folder: Path) -> list[Path]:
    """The folders from the first missing ancestor of `folder` down to `folder`, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


_HELD: set[Path] = set()
