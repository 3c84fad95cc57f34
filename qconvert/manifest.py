"""The manifest: what was done to every tensor, with checksums and provenance.

Written as `qconvert.json` beside the weights and, as the same sorted-key JSON string, under the
`"qconvert"` key of every safetensors file's `__metadata__`, so a lone weights file still explains
itself. No timestamps: the same command gives byte-identical output.

Schema 2 adds two structured fields to every tensor record, so tools need not parse `reason` (which
stays human text): `decided_by` (fixed at plan time: which rule chose the tensor's fate) and `origin`
(how its stored values came about, known once converted). Schema 1 outputs read with both None.
"""

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from qconvert.errors import SourceError

SCHEMA_VERSION = 2
# How a tensor's stored values came about:
QUANTIZED = "quantized"  # quantized here from float weights
REPACKED = "repacked"  # a quantized source's own codes and scales, moved exactly into this layout
REQUANTIZED = "requantized"  # a quantized source on another grid: dequantized, then quantized again
KEPT = "kept"  # the source tensor as it was (cast to --dtype, if given)
RESCALED = "rescaled"  # kept in float, but changed by the calibrated quantizer (a norm absorbing AWQ's scales)
ORIGINS = (QUANTIZED, REPACKED, REQUANTIZED, KEPT, RESCALED)
# decided_by is a rule's label ("--include PATTERN", "rule 2 of r.toml (line 14)") or one of these:
BY_DEFAULT = "default rule"  # the default: linear weights inside the blocks quantized, the rest kept
BY_RUNTIME = "runtime module"  # a rule asked for quantization, but the runtime's module cannot hold it
BY_BUDGET = "size budget"  # the grid was chosen by --target-bpw / --target-size
WIDEST_FLOAT = -2.2250738585072014e-308  # the longest text a float takes in JSON (24 characters)
MANIFEST_FILE = "qconvert.json"
METADATA_KEY = "qconvert"


@dataclass
class StoredRecord:
    """One tensor as stored in the file."""

    dtype: str
    shape: list[int]
    bytes: int
    sha256: str = ""
    file: str = ""


@dataclass
class TensorRecord:
    """One source tensor and what became of it.

    `action` is "quantized" or "kept" (what is stored); `reason` says why, for people; `decided_by`
    names the rule that decided (see BY_*); `origin` says how the stored values came about (ORIGINS).
    Scheme fields are None for kept tensors. `relative_mse` is |W - deq(Q(W))|² / |W|², the weight
    reconstruction error.
    """

    name: str
    shape: list[int]
    source_dtype: str
    action: str
    reason: str
    stored: dict[str, StoredRecord]
    quantizer: str | None = None
    quantizer_version: str | None = None
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    scale_dtype: str | None = None
    grid: str | None = None  # "int" or a table grid (quantizers/grids.py); None for kept tensors and schema 1
    activations: str | None = None  # W8A8: how the runtime quantizes this linear's input (quantizers/activations.py)
    input_scale: float | None = None  # int8-static: the input scale found at calibration (float32 value)
    relative_mse: float | None = None
    decided_by: str | None = None
    origin: str | None = None

    @property
    def parameters(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def stored_bytes(self) -> int:
        return sum(s.bytes for s in self.stored.values())


@dataclass
class Manifest:
    qconvert_version: str
    layout: str
    source: dict
    settings: dict
    tensors: list[TensorRecord]
    command: list[str] | None = None
    schema_version: int = SCHEMA_VERSION
    totals: dict = field(default_factory=dict)
    # A quantizer that learns (qat): {"blocks": [per block: losses, steps, which codes were kept]}; the
    # text, seed and learning rates it learned with are in `settings`. Left out of the JSON when None.
    training: dict | None = None

    def compute_totals(self) -> None:
        quantized = [t for t in self.tensors if t.action == "quantized"]
        q_params = sum(t.parameters for t in quantized)
        q_bytes = sum(t.stored_bytes for t in quantized)
        params = sum(t.parameters for t in self.tensors)
        stored = sum(t.stored_bytes for t in self.tensors)
        self.totals = {
            "parameters": params,
            "quantized_parameters": q_params,
            "stored_bytes": stored,
            "quantized_bytes": q_bytes,
            # bits per weight with scales and zero points counted
            "quantized_bits_per_weight": round(8 * q_bytes / q_params, 4) if q_params else None,
            "bits_per_weight": round(8 * stored / params, 4) if params else None,
        }

    def to_json(self) -> str:
        data = asdict(self)
        if data["training"] is None:  # absent unless a quantizer trained: other outputs read as before
            del data["training"]
        return json.dumps(data, sort_keys=True, indent=1)

    def widest_json(self) -> str:
        """The JSON this manifest can grow to once converted: every field filled while streaming
        (checksums, errors, origins) at its widest, so header room reserved from it always suffices."""
        widest_origin = max(ORIGINS, key=len)
        tensors = [
            replace(
                t,
                relative_mse=WIDEST_FLOAT if t.action == QUANTIZED else t.relative_mse,
                input_scale=WIDEST_FLOAT if t.activations else t.input_scale,
                origin=widest_origin,
                stored={n: replace(s, sha256="f" * 64) for n, s in t.stored.items()},
            )
            for t in self.tensors
        ]
        return replace(self, tensors=tensors).to_json()

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        tensors = [
            TensorRecord(**{**t, "stored": {k: StoredRecord(**v) for k, v in t["stored"].items()}})
            for t in data.pop("tensors")
        ]
        return cls(tensors=tensors, **data)


def read_manifest(output: Path) -> Manifest:
    """The manifest of a qconvert output folder (or of one of its safetensors files).

    Raises:
        SourceError: `output` is not a qconvert output or its manifest is damaged.
    """
    from safetensors import SafetensorError, safe_open

    if output.is_dir():
        path = output / MANIFEST_FILE
        if not path.is_file():
            raise SourceError(f"{output} is not a qconvert output: {MANIFEST_FILE} is missing.")
        text = path.read_text()
    else:
        try:
            with safe_open(output, framework="pt") as handle:
                text = (handle.metadata() or {}).get(METADATA_KEY)
        except SafetensorError as exc:
            raise SourceError(f"cannot read {output}: {exc}.") from exc
        if text is None:
            raise SourceError(f"{output} carries no qconvert manifest in its metadata.")
    try:
        manifest = Manifest.from_json(text)
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise SourceError(f"the qconvert manifest of {output} is damaged: {exc}.") from exc
    if manifest.schema_version > SCHEMA_VERSION:
        raise SourceError(
            f"{output} was written by a newer qconvert (manifest schema {manifest.schema_version}); upgrade qconvert."
        )
    return manifest
