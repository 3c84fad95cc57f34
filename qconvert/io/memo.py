"""Answers to slow, deterministic questions asked of transformers, kept on disk between runs.

Two questions dominate a round-to-nearest conversion that otherwise takes seconds: which module each
checkpoint tensor lands in (`skeleton.py`: importing transformers' modelling code and building the
model on the meta device, 3 s for a Llama), and whether transformers loads the output with every
weight in place (`compatibility.publish_check`, 1-2 s). Each answer is a function of small inputs
only: the library versions, the config, and the tensor names, shapes and dtypes. So it is kept as
JSON under the sha256 of those inputs, in `$QCONVERT_CACHE` (default `$XDG_CACHE_HOME/qconvert/memo`,
i.e. ~/.cache/qconvert/memo), and the next run with the same inputs reads it instead of importing
transformers. `QCONVERT_CACHE=off` turns it off. An entry is written to a temporary name and renamed,
and one that cannot be read or parsed counts as absent: the question is asked again.

Only answers that cannot hide a fault are kept: a skeleton whose keys transformers does not rename,
and a check that found no problem (problems are always looked for afresh).
"""

import hashlib
import json
import os
import tempfile
from functools import cache
from importlib import metadata
from pathlib import Path

LIBRARIES = ("qconvert", "torch", "transformers", "compressed-tensors", "accelerate")


def cache_folder() -> Path | None:
    """Where answers are kept, or None when the cache is turned off."""
    chosen = os.environ.get("QCONVERT_CACHE")
    if chosen == "off":
        return None
    if chosen:
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qconvert" / "memo"


@cache  # read once per process: a conversion asks the cache a few dozen times
def library_versions() -> dict[str, str | None]:
    """The installed versions of the libraries an answer depends on (without importing them)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _path(kind: str, inputs: dict) -> Path | None:
    folder = cache_folder()
    if folder is None:
        return None
    text = json.dumps({"kind": kind, "libraries": library_versions(), **inputs}, sort_keys=True, default=str)
    return folder / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()}.json"


def recall(kind: str, inputs: dict) -> dict | None:
    """The answer kept for `kind` with these inputs (JSON values), or None."""
    path = _path(kind, inputs)
    if path is None:
        return None
    try:
        answer = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


def remember(kind: str, inputs: dict, answer: dict) -> None:
    """Keep `answer` (JSON values) for `kind` with these inputs; a cache that cannot be written is skipped."""
    path = _path(kind, inputs)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".partial", delete=False) as f:
            json.dump(answer, f)
        os.replace(f.name, path)
    except OSError:
        try:
            os.unlink(f.name)
        except (OSError, UnboundLocalError):
            pass
