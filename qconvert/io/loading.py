"""Find a checkpoint's files and read its tensors lazily, one at a time.

Accepted sources: a folder holding `model.safetensors`, sharded `model-*-of-*.safetensors` with
their index, or `pytorch_model.bin` (and shards); a single `.safetensors` or `.bin` file; or a hub
id (`org/name`) already in the local Hugging Face cache. Pickled `.bin` files are opened only with
`torch.load(weights_only=True, mmap=True)`, which refuses to run code.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from qconvert.errors import SourceError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Files copied next to the output: everything a runtime needs besides the weights.
AUXILIARY_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab.*",
    "merges.txt", "added_tokens.json", "chat_template*", "preprocessor_config.json", "*.model",
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path

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

    @property
    def config(self) -> dict | None:
        path = self.folder / "config.json" if self.folder else None
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SourceError(f"{path} is not valid JSON: {exc}") from exc

    def auxiliary_files(self) -> list[Path]:
        """Config, tokenizer and generation files to copy beside the converted weights."""
        if self.folder is None:
            return []
        found = {p for pattern in AUXILIARY_PATTERNS for p in self.folder.glob(pattern) if p.is_file()}
        return sorted(found - set(self.files))

    def iter_tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for `names` in order, holding one tensor at a time.

        Each safetensors file is opened once per run of consecutive names from that file, and
        closed after, which unmaps the pages read so far and keeps resident memory low.
        """
        position = 0
        while position < len(names):
            file = self.tensors[names[position]].file
            end = position
            while end < len(names) and self.tensors[names[end]].file == file:
                end += 1
            yield from self._read_run(file, names[position:end])
            position = end

    def _read_run(self, file: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        if file.suffix == ".bin":
            state = _load_bin(file)
            for name in names:
                yield name, state[name]
            return
        try:
            with safe_open(file, framework="pt") as handle:
                for name in names:
                    yield name, handle.get_tensor(name)
        except SafetensorError as exc:
            raise SourceError(f"cannot read {file}: it is truncated or corrupt ({exc}).") from exc


def open_checkpoint(source: str | Path, revision: str | None = None) -> Checkpoint:
    """Resolve `source` to its weight files and read every tensor's name, dtype and shape.

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
    folder, files = _weight_files(path)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for info in _read_headers(file):
            tensors.setdefault(info.name, info)
    if not tensors:
        raise SourceError(f"{source} holds no tensors.")
    return Checkpoint(str(source), folder, files, tensors, hub_id=hub_id, revision=revision)


def sha256_file(path: Path, chunk_bytes: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


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


def _weight_files(path: Path) -> tuple[Path | None, list[Path]]:
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise SourceError(f"{path} is not a .safetensors or .bin weights file.")
        return None, [path]
    for index_name, single in [("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")]:
        index = path / index_name
        if index.is_file():
            return path, _files_from_index(index)
        if (path / single).is_file():
            return path, [path / single]
    shards = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if shards:
        return path, shards
    raise SourceError(f"no weights found in {path}: expected model.safetensors, sharded safetensors or pytorch_model.bin.")


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SourceError(f"{index} is not a valid shard index: {exc}") from exc
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SourceError(f"{index} names shard files that are missing: {', '.join(missing)}.")
    return files


def _read_headers(file: Path) -> list[TensorInfo]:
    if file.suffix != ".safetensors":
        state = _load_bin(file)
        return [TensorInfo(k, v.dtype, tuple(v.shape), file) for k, v in state.items() if isinstance(v, torch.Tensor)]
    try:
        with safe_open(file, framework="pt") as handle:
            infos = []
            for name in handle.keys():
                view = handle.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise SourceError(f"tensor {name} in {file} has dtype {view.get_dtype()}, which qconvert cannot read.")
                infos.append(TensorInfo(name, dtype, tuple(view.get_shape()), file))
            return infos
    except SafetensorError as exc:
        raise SourceError(f"cannot read {file}: it is not a valid safetensors file, or it is truncated ({exc}).") from exc


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
