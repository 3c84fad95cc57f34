"""Open any checkpoint qconvert reads: a float one as stored (`loading.py`), or one already quantized
(GPTQ, AWQ, compressed-tensors) as the float weights it encodes (`quantized_sources.py`)."""

from pathlib import Path

from qconvert.io.loading import Checkpoint, read_checkpoint
from qconvert.io.quantized_sources import open_quantized


def open_checkpoint(source: str | Path, revision: str | None = None) -> Checkpoint:
    """The checkpoint at `source` (a folder, a weights file or a cached hub id), its tensors known by header.

    Raises:
        SourceError: nothing usable at `source`, its files are unreadable, or it is quantized in a way
            qconvert does not read.
    """
    return open_quantized(read_checkpoint(source, revision))
