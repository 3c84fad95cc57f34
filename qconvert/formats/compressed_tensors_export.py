"""Export a qconvert output in the compressed-tensors layout (what `--layout compressed-tensors` writes,
and transformers and vLLM load): the same codes, scales and zero points, re-packed tensor by tensor.

Nothing is requantized: either the layout holds every quantized tensor exactly (it is still a qconvert
output, with a manifest whose records now name the re-packed tensors and their checksums), or the
export is refused with the reason (e.g. quantized embeddings, which transformers cannot load from it).
"""

import dataclasses
import json
from pathlib import Path

from qconvert.errors import SchemeError, UnsupportedModelError
from qconvert.formats import choose_layout
from qconvert.formats.base import record_config
from qconvert.formats.exporting import WEIGHTS_FILE, ExportReport, copy_tokenizer_files, read_config
from qconvert.io.skeleton import build_skeleton
from qconvert.io.writing import SafetensorsStreamWriter, TensorSpec, staged_output
from qconvert.manifest import MANIFEST_FILE, METADATA_KEY, StoredRecord, TensorRecord, read_manifest
from qconvert.output import iter_records, quantized_tensor


def export_compressed_tensors(output: Path, destination: Path, force: bool = False) -> ExportReport:
    """Write `output` re-packed in the compressed-tensors layout at `destination`.

    Raises:
        UnsupportedModelError: the layout cannot hold one of the quantized tensors.
        OutputError: `destination` exists and `force` is false.
    """
    manifest = read_manifest(output)
    config = read_config(output, "a compressed-tensors checkpoint")
    quantized = [(r.name, tuple(r.shape), record_config(r)) for r in manifest.tensors if r.action == "quantized"]
    try:
        layout = choose_layout("compressed-tensors", quantized)
    except SchemeError as exc:
        raise UnsupportedModelError(str(exc).replace("--layout compressed-tensors", "compressed-tensors")) from exc
    records = [_relaid(r, layout) for r in manifest.tensors]
    relaid = dataclasses.replace(manifest, layout=layout.name, tensors=records)
    relaid.compute_totals()
    specs = [TensorSpec(name, s.dtype, tuple(s.shape)) for r in records for name, s in r.stored.items()]
    report = ExportReport(destination, "compressed-tensors")
    with staged_output(destination, force, [output]) as folder:
        writer = SafetensorsStreamWriter(
            folder / WEIGHTS_FILE, specs, metadata_bytes=len(json.dumps(relaid.to_json())) + 80 * len(specs) + 1024
        )
        try:
            for (record, stored), new in zip(iter_records(output, manifest), records):
                tensors = (
                    layout.encode(record.name, quantized_tensor(manifest, record, stored))
                    if record.action == "quantized"
                    else {record.name: stored[record.name]}
                )
                for name, tensor in tensors.items():
                    new.stored[name].sha256 = writer.write(name, tensor)
                report.exact.append(record.name)
            writer.finish({"format": "pt", METADATA_KEY: relaid.to_json()})
        finally:
            writer.close()
        skeleton = build_skeleton(output, config, [r.name for r in records])
        config["quantization_config"] = layout.quantization_config(records, skeleton.runtime_name if skeleton else None)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / MANIFEST_FILE).write_text(relaid.to_json() + "\n")
        copy_tokenizer_files(output, folder)
    return report


def _relaid(record: TensorRecord, layout) -> TensorRecord:
    """The record with its stored tensors as `layout` names and shapes them (checksums filled on writing)."""
    if record.action != "quantized":
        stored = {n: dataclasses.replace(s, file=WEIGHTS_FILE) for n, s in record.stored.items()}
    else:
        specs = layout.specs(record.name, tuple(record.shape), record_config(record))
        stored = {
            s.name: StoredRecord(dtype=s.dtype, shape=list(s.shape), bytes=s.nbytes, file=WEIGHTS_FILE) for s in specs
        }
    return dataclasses.replace(record, stored=stored)
