"""Regenerate the golden files that pin qconvert's output format (tests/test_golden.py).

Run after an intentional format change, and review the diff:  python scripts/make_goldens.py
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden"
CASES = {  # golden name -> settings
    "int4-g32-asym-compressed-tensors": dict(bits=4, group_size=32, symmetric=False, layout="compressed-tensors"),
    "int3-g24-sym-native": dict(bits=3, group_size=24, symmetric=True, layout="native"),
}


def golden_source(folder: Path) -> Path:
    """Two small weights built without randomness, so every machine makes the same bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = torch.arange(24 * 64, dtype=torch.float32).view(24, 64)
    tensors = {
        "blocks.0.proj.weight": (torch.sin(ramp * 0.37) * 0.1).to(torch.bfloat16),
        "blocks.0.norm.weight": torch.linspace(0.5, 1.5, 64).to(torch.bfloat16),
    }
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def normalized_manifest(output: Path) -> dict:
    manifest = json.loads((output / "qconvert.json").read_text())
    manifest["source"]["path"] = "<source>"  # the only machine-dependent field
    manifest["qconvert_version"] = "<version>"
    return manifest


def header_bytes(output: Path) -> bytes:
    """The safetensors header with the manifest (which holds the version and path) removed."""
    data = (output / "model.safetensors").read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = {"format": header["__metadata__"]["format"]}
    return json.dumps(header, separators=(",", ":")).encode() + data[8 + length :]


def make(name: str, scratch: Path) -> tuple[dict, bytes]:
    import qconvert

    source = golden_source(scratch / "source")
    output = qconvert.convert(source, scratch / name, qconvert.Settings(**CASES[name]), force=True).output
    return normalized_manifest(output), header_bytes(output)


def main() -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for name in CASES:
            manifest, content = make(name, Path(scratch))
            (GOLDEN / f"{name}.manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            (GOLDEN / f"{name}.safetensors-body").write_bytes(content)
            print(f"wrote {name}", file=sys.stderr)


if __name__ == "__main__":
    main()
