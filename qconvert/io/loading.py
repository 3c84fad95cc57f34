"""Find a checkpoint's files and read its tensors lazily, one at a time.

Accepted sources: a folder holding `model.safetensors`, sharded `model-*-of-*.safetensors` with
their index, or `pytorch_model.bin` (and shards); a single `.safetensors` or `.bin` file; or a hub
id (`org/name`) already in the local Hugging Face cache. Pickled `.bin` files are opened only with
`torch.load(weights_only=True, mmap=True)`, which refuses to run code.
"""

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from qconvert.errors import SourceError
from qconvert.io import hashing
from qconvert.io.dtypes import SAFETENSORS_DTYPES
from qconvert.io.hashing import sha256_file

# Files copied next to the output: everything a runtime needs besides the weights.
AUXILIARY_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "added_tokens.json",
    "chat_template*",
    "preprocessor_config.json",
    "*.model",
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

UNBUILT = object()  # a skeleton not yet built (None means: none can be)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute byte offset of the data in a .safetensors file

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class Checkpoint:
    """A checkpoint whose tensor headers are known and whose data is read on demand.

    Attributes:
        source: what the user named (path or hub id).
        hub_id, revision: set when the source came from the Hugging Face cache.
        folder: the folder holding config and tokenizer files, or None for a lone weights file.
        files: the weight files, in order.
        tensors: name -> TensorInfo, in file order.
    """

    source: str
    folder: Path | None
    files: list[Path]
    tensors: dict[str, TensorInfo]
    hub_id: str | None = None
    revision: str | None = None
    _digests: dict[Path, str] = field(default_factory=dict, repr=False)
    _skeleton: object = field(default=UNBUILT, repr=False, compare=False)  # a Skeleton, or None, once built

    @property
    def config(self) -> dict | None:
        path = self.folder / "config.json" if self.folder else None
        if path is None or not path.is_file():
            return None
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise SourceError(
                f"{path} holds a JSON {type(config).__name__}, not the object of settings a config must be."
            )
        return config

    def skeleton(self):
        """The model transformers builds from the config, with each tensor's role (`skeleton.py`), or None."""
        if self._skeleton is UNBUILT:
            from qconvert.io import skeleton  # looked up at call time, so a test can stand in for it

            self._skeleton = skeleton.build_skeleton(self.folder, self.config, list(self.tensors))
        return self._skeleton

    def stored_scheme(self, name: str) -> str | None:
        """How the source stores weight `name` when it is already quantized ("gptq int4 g128"), else None."""
        return None

    def auxiliary_files(self) -> list[Path]:
        """Config, tokenizer and generation files to copy beside the converted weights."""
        if self.folder is None:
            return []
        found = {p for pattern in AUXILIARY_PATTERNS for p in self.folder.glob(pattern) if p.is_file()}
        return sorted(found - set(self.files))

    def iter_tensors(
        self, names: list[str], hash_on_the_way: bool = True, unread: frozenset[str] = frozenset()
    ) -> Iterator[tuple[str, "torch.Tensor | SourceBytes"]]:
        """Yield (name, tensor) for `names` in order, holding one tensor at a time; for the safetensors
        tensors named in `unread`, where their bytes lie (`SourceBytes`) instead of reading them.

        Safetensors data is read with plain sequential reads rather than a memory map, so pages
        already used do not stay resident. A file read from start to end in order is hashed on
        the way (see `sha256`), which saves reading it twice; a reader of a few tensors passes
        `hash_on_the_way=False` so that gaps between them are skipped, not read.
        """
        position = 0
        while position < len(names):
            file = self.tensors[names[position]].file
            end = position
            while end < len(names) and self.tensors[names[end]].file == file:
                end += 1
            run = names[position:end]
            if file.suffix == ".safetensors":
                yield from self._read_safetensors(file, run, hash_on_the_way, unread)
            else:
                state = _load_bin(file)
                yield from ((name, state[name]) for name in run)
            position = end

    def sha256(self, file: Path) -> str:
        """sha256 of a source file: from the last complete sequential read if there was one, or the
        background hash the command started (`hashing.py`), else read now."""
        if file not in self._digests:
            self._digests[file] = hashing.result(file) or sha256_file(file)
        return self._digests[file]

    def _read_safetensors(
        self, file: Path, names: list[str], hash_on_the_way: bool, unread: frozenset[str]
    ) -> Iterator[tuple[str, "torch.Tensor | SourceBytes"]]:
        infos = [self.tensors[n] for n in names]
        # Not when a background thread hashes the file already (`hashing.py`), or bytes are left unread.
        whole = hash_on_the_way and not hashing.started(file) and not unread.intersection(names)
        digest = hashlib.sha256() if whole else None
        position = 0
        with open(file, "rb") as f:
            for info in infos:
                if info.name in unread:
                    yield info.name, SourceBytes(file, info.offset, info.nbytes, info.dtype, info.shape)
                    continue
                if info.offset < position:  # out of file order: hashing on the way is off
                    digest = None
                f.seek(info.offset)
                if digest is not None and info.offset > position:
                    f.seek(position)
                    digest.update(f.read(info.offset - position))
                data = bytearray(info.nbytes)
                if f.readinto(data) != info.nbytes:
                    raise SourceError(f"{file} is truncated: tensor {info.name} is cut short.")
                if digest is not None:
                    digest.update(data)
                position = info.offset + info.nbytes
                yield info.name, _tensor_from_bytes(data, info)
            if digest is not None and not f.read(1) and position == file.stat().st_size:
                self._digests[file] = digest.hexdigest()


@dataclass(frozen=True)
class SourceBytes:
    """Where a tensor's bytes lie in a source file, for copying them unchanged without holding them."""

    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _tensor_from_bytes(data: bytearray, info: TensorInfo) -> torch.Tensor:
    if not data:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(data, dtype=info.dtype).reshape(info.shape)


def read_checkpoint(source: str | Path, revision: str | None = None) -> Checkpoint:
    """Resolve `source` to its weight files and read every tensor's name, dtype and shape, as stored
    (`qconvert.io.sources.open_checkpoint` also reads an already-quantized checkpoint as its weights).

    Raises:
        SourceError: nothing usable at `source`, or its files are unreadable.
    """
    path = Path(source).expanduser()
    hub_id = None
    if not path.exists():
        if not HUB_ID.match(str(source)):
            raise SourceError(f"{source} does not exist.")
        hub_id = str(source)
        path, revision = _resolve_hub_id(hub_id, revision)
    folder, files, weight_map = _weight_files(path)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for info in _read_headers(file):
            tensors.setdefault(info.name, info)
    for name, file in (weight_map or {}).items():  # the index is what runtimes trust: it must be true
        if name not in tensors or tensors[name].file != file:
            raise SourceError(
                f"the shard index of {path} says tensor {name} is in {file.name}, but that file does not "
                "hold it; the checkpoint is incomplete or its index is stale."
            )
    if not tensors:
        raise SourceError(f"{source} holds no tensors.")
    return Checkpoint(str(source), folder, files, tensors, hub_id=hub_id, revision=revision)


def _resolve_hub_id(hub_id: str, revision: str | None) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", *AUXILIARY_PATTERNS]
    try:
        folder = snapshot_download(hub_id, revision=revision, allow_patterns=patterns, local_files_only=True)
    except Exception:
        try:  # not cached: fetch it when the hub is reachable (never when HF_HUB_OFFLINE=1)
            folder = snapshot_download(hub_id, revision=revision, allow_patterns=patterns)
        except Exception as exc:
            raise SourceError(
                f"{hub_id} is not a local path and is not in the Hugging Face cache "
                f"({type(exc).__name__}); download it first or pass a folder."
            ) from exc
    folder = Path(folder)
    return folder, folder.name  # cache snapshots are named by commit hash


def _weight_files(path: Path) -> tuple[Path | None, list[Path], dict[str, Path] | None]:
    """(folder, weight files, the index's tensor -> file map when there is an index)."""
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise SourceError(f"{path} is not a .safetensors or .bin weights file.")
        return None, [path], None
    for index_name, single in [
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ]:
        index = path / index_name
        if index.is_file():
            weight_map = _read_index(index)
            return path, list(dict.fromkeys(weight_map.values())), weight_map
        if (path / single).is_file():
            return path, [path / single], None
    shards = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if shards:
        return path, shards, None
    raise SourceError(
        f"no weights found in {path}: expected model.safetensors, sharded safetensors or pytorch_model.bin."
    )


def _read_index(index: Path) -> dict[str, Path]:
    """The index's tensor -> shard file map, every shard checked to exist inside the checkpoint folder:
    an index can name any path, and qconvert opens nothing outside the folder because an index says so."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SourceError(f"{index} is not a valid shard index: {exc}") from exc
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise SourceError(f"{index} is not a valid shard index: its weight_map must map tensor names to file names.")
    files: dict[str, Path] = {}
    for name in dict.fromkeys(weight_map.values()):
        file = index.parent / name
        # Judged by the name, not by where it resolves: the Hugging Face cache links every shard into ../../blobs.
        if Path(name).is_absolute() or os.path.normpath(name).split(os.sep)[0] in ("..", ".") or not name.strip():
            raise SourceError(
                f"{index} names the shard {name!r}, which lies outside {index.parent}; "
                "qconvert reads shards only from the checkpoint's own folder."
            )
        if not file.is_file():
            raise SourceError(f"{index} names shard files that are missing: {name}.")
        files[name] = file
    return {tensor: files[name] for tensor, name in weight_map.items()}


MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


def _read_headers(file: Path) -> list[TensorInfo]:
    if file.suffix != ".safetensors":
        state = _load_bin(file)
        return [TensorInfo(k, v.dtype, tuple(v.shape), file) for k, v in state.items() if isinstance(v, torch.Tensor)]
    return read_safetensors_header(file)


def read_safetensors_header(file: Path) -> list[TensorInfo]:
    """Tensor entries of a safetensors file in data order, checked as the safetensors library checks them.

    We read the (8-byte length + JSON) header ourselves because the library exposes no data
    offsets, and offsets are what let us stream the file sequentially.
    """

    def corrupt(why: str) -> SourceError:
        return SourceError(f"cannot read {file}: it is not a valid safetensors file, or it is truncated ({why}).")

    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise corrupt("shorter than 8 bytes")
        length = struct.unpack("<Q", prefix)[0]
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise corrupt(f"header of {length} bytes in a {size}-byte file")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise corrupt(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    header.pop("__metadata__", None)
    infos, expected = [], 0
    try:
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        for name, entry in entries:
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise SourceError(f"tensor {name} in {file} has dtype {entry['dtype']}, which qconvert cannot read.")
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise corrupt(f"tensor {name} has shape {list(shape)}")
            info = TensorInfo(name, dtype, shape, file, offset=8 + length + begin)
            if begin != expected or end - begin != info.nbytes:
                raise corrupt(f"tensor {name} has inconsistent data offsets")
            infos.append(info)
            expected = end
    except (KeyError, TypeError, ValueError) as exc:
        raise corrupt(f"malformed tensor entry: {exc}") from exc
    if 8 + length + expected != size:
        raise corrupt(f"the header describes {8 + length + expected} bytes but the file has {size}")
    return infos


_BIN_STATES: dict[Path, dict] = {}


def _load_bin(file: Path) -> dict:
    """Memory-map a PyTorch pickle checkpoint without executing any code from it."""
    if file not in _BIN_STATES:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise SourceError(
                f"cannot read {file} safely: {str(exc).splitlines()[0]} "
                "(qconvert only loads weights-only, zip-format PyTorch files; re-save it with torch.save)."
            ) from exc
        if not isinstance(state, dict):
            raise SourceError(f"{file} does not hold a state dict of tensors.")
        _BIN_STATES.clear()  # keep at most one memory-mapped .bin file open
        _BIN_STATES[file] = state
    return _BIN_STATES[file]
