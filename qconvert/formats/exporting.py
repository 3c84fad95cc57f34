"""Write a qconvert output in another runtime's format: one exporter per format, one report for all.

Every exporter reads the output one tensor at a time, moves codes and scales across unchanged where
the target's grid is the same one (exact), re-expresses them where only the float encoding of an
offset changes (repacked), dequantizes and requantizes onto a grid the target has otherwise
(requantized), and writes the dequantized float weights where no grid of the target fits the tensor's
rows (dequantized: bigger, never wrong); the report names every tensor in each of the four, so a user
knows what, if anything, changed on the way.
"""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from qconvert.errors import SourceError
from qconvert.manifest import MANIFEST_FILE

WEIGHTS_FILE = "model.safetensors"


def recomputed_by_runtimes(name: str) -> bool:
    """Buffers every runtime rebuilds itself, which no export writes."""
    return name.endswith("rotary_emb.inv_freq")


@dataclass
class ExportReport:
    destination: Path
    format: str
    exact: list[str] = field(default_factory=list)
    repacked: list[str] = field(default_factory=list)  # same grid; an offset re-expressed in float16
    requantized: list[str] = field(default_factory=list)
    dequantized: list[str] = field(default_factory=list)  # written as float: no block of the format fits its rows
    types: dict[str, str] = field(default_factory=dict)  # target tensor name -> the target's type for it

    def to_dict(self) -> dict:
        return {
            "destination": str(self.destination),
            "format": self.format,
            "exact": self.exact,
            "repacked": self.repacked,
            "requantized": self.requantized,
            "dequantized": self.dequantized,
            "types": self.types,
        }


def read_config(output: Path, needed_by: str) -> dict:
    """The output's config.json without its quantization_config (the target format writes its own).

    Raises:
        SourceError: there is no config.json.
    """
    path = output / "config.json"
    if not path.is_file():
        raise SourceError(f"{output} has no config.json, which {needed_by} needs.")
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)
    return config


def copy_tokenizer_files(output: Path, folder: Path) -> None:
    """Everything beside the weights that a runtime reads (tokenizer, generation config, chat template)."""
    for path in output.iterdir():
        if (
            path.is_file()
            and path.suffix != ".safetensors"
            and not path.name.startswith(".")
            and path.name not in {MANIFEST_FILE, "config.json", "model.safetensors.index.json"}
        ):
            shutil.copy2(path, folder / path.name)
