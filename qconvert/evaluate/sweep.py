"""`qconvert sweep`: convert a model at many settings, evaluate each on the same text, report the trade-off.

Each evaluation runs in its own process (`qconvert.worker`, given the job as JSON), so its peak memory
is its own and a setting that fails cannot stop the others. Outputs already converted with the same
source and settings are reused.
"""

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from qconvert.calibration.samples import CalibrationSettings
from qconvert.conversion import convert
from qconvert.errors import QConvertError
from qconvert.evaluate.evaluation import EvalSettings
from qconvert.io.loading import sha256_file
from qconvert.io.sources import open_checkpoint
from qconvert.manifest import MANIFEST_FILE, read_manifest
from qconvert.quantizers import get
from qconvert.quantizers.activations import needs_calibration, weights_of
from qconvert.quantizers.grids import grid_defaults
from qconvert.settings import Settings, settings_dict
from qconvert.worker import run_in_process


@dataclass(frozen=True)
class EvalText:
    """What every model of a sweep is scored on: a text file or a public dataset by name."""

    path: Path | None = None
    dataset: str | None = None

    def job(self) -> dict:
        return {"text": str(self.path.resolve()) if self.path else None, "dataset": self.dataset}


@dataclass
class SweepRow:
    label: str
    role: str  # "float", "qconvert" or "reference"
    path: str
    status: str = "ok"  # "ok" or "failed"
    error: str | None = None
    conversion_seconds: float | None = None  # None: not converted (float, reference, or reused)
    reused: bool = False
    quantized_bits_per_weight: float | None = None
    bits_per_weight: float | None = None
    size_mb: float | None = None
    perplexity: float | None = None
    ppl_change_pct: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_ms_per_token: float | None = None
    weight_memory_mb: float | None = None
    peak_rss_mb: float | None = None


def setting_grid(
    bits: list[int],
    group_sizes: list[int],
    quantizers: list[str],
    symmetric: bool,
    calibration: CalibrationSettings | None = None,
    grids: list[str] = (),
    activations: list[str] = (),
    smooth: float | str | None = None,
) -> list[Settings]:
    """Every combination of integer bits and group sizes, then every table grid (`quantizers/grids.py`,
    with the bits and groups each implies), then every W8A8 scheme (`quantizers/activations.py`, with
    SmoothQuant at `smooth` if given), for each quantizer; calibrated settings get `calibration`, the
    others none.

    Raises:
        QConvertError: a calibrated setting and no `calibration`.
    """

    def calibration_for(name: str, needs: bool = False) -> CalibrationSettings | None:
        try:
            if not (needs or get(name).requires_calibration):
                return None
        except QConvertError:
            return None  # an unknown quantizer fails its own row, not the whole sweep
        if calibration is None:
            why = f"quantizer {name} learns from" if not needs else "--smooth and static schemes measure"
            raise QConvertError(f"{why} activations: give the sweep --calib FILE.")
        return calibration

    integer = [
        Settings(quantizer=q, bits=b, group_size=g, symmetric=symmetric, calibration=calibration_for(q))
        for q, b, g in itertools.product(quantizers, bits, group_sizes)
    ]
    tables = [
        Settings(quantizer=q, grid=grid, calibration=calibration_for(q), **grid_defaults(grid, {}))
        for q, grid in itertools.product(quantizers, grids)
    ]
    w8a8 = [
        Settings(
            quantizer=q,
            activations=a,
            smooth=smooth,
            calibration=calibration_for(q, needs_calibration(a, smooth)),
            **weights_of(a),
        )
        for q, a in itertools.product(quantizers, activations)
    ]
    return integer + tables + w8a8


def label(settings: Settings) -> str:
    if settings.activations:
        smooth = f" smooth {settings.smooth}" if settings.smooth is not None else ""
        return f"{settings.quantizer} w8a8 {settings.activations}{smooth}"
    group = f"g{settings.group_size}" if settings.group_size else "per-channel"
    if settings.grid != "int":
        return f"{settings.quantizer} {settings.grid} {group}"
    return f"{settings.quantizer} int{settings.bits} {group}{' sym' if settings.symmetric else ''}"


def run_sweep(
    source: Path,
    grid: list[Settings],
    report_dir: Path,
    text: EvalText,
    eval_settings: EvalSettings,
    references: list[Path] = (),
    log: Callable[[str], None] = print,
    map_settings: Callable[[Callable, list[tuple]], list[SweepRow]] | None = None,
) -> list[SweepRow]:
    """Convert, evaluate and collect one row per setting, plus the float model and references; every
    model is scored with the source's tokenizer. `map_settings(setting_row, arguments)` runs the settings'
    rows (default: here, one after another; `cluster.py`: one Ray task each)."""
    models_dir = report_dir / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    evaluation = {"task": "evaluate", **text.job(), "tokenizer": str(source), "settings": asdict(eval_settings)}
    rows = [_evaluated(SweepRow("float", "float", str(source)), evaluation, log)]
    arguments = [(source, s, str(models_dir / f"{source.name}-{s.suffix()}"), evaluation, log) for s in grid]
    if map_settings is None:
        rows += [setting_row(*a) for a in arguments]
    else:
        rows += map_settings(setting_row, [a[:-1] for a in arguments])
    for reference in references:
        rows.append(_evaluated(SweepRow(reference.name, "reference", str(reference)), evaluation, log))
    float_ppl = rows[0].perplexity
    for row in rows:
        if float_ppl and row.perplexity:
            row.ppl_change_pct = 100 * (row.perplexity / float_ppl - 1)
    return rows


def setting_row(
    source: Path, settings: Settings, path: str, evaluation: dict, log: Callable[[str], None] = lambda line: None
) -> SweepRow:
    """One setting's row: convert (or reuse the output already there), then evaluate in a fresh process."""
    row = SweepRow(label(settings), "qconvert", path)
    try:
        _convert_or_reuse(source, settings, Path(path), row, log)
    except QConvertError as exc:
        row.status, row.error = "failed", str(exc)
        log(f"{row.label}: conversion failed: {exc}")
        return row
    return _evaluated(row, evaluation, log)


def _convert_or_reuse(source: Path, settings: Settings, output: Path, row: SweepRow, log) -> None:
    if _same_conversion(source, settings, output):
        row.reused = True
        log(f"{row.label}: reusing {output}")
        return
    log(f"{row.label}: converting to {output}")
    start = time.perf_counter()
    convert(source, output, settings, force=True)
    row.conversion_seconds = time.perf_counter() - start


def _same_conversion(source: Path, settings: Settings, output: Path) -> bool:
    """Whether `output` already holds this source converted with these settings (by its manifest)."""
    if not (output / MANIFEST_FILE).is_file():
        return False
    try:
        manifest = read_manifest(output)
        checkpoint = open_checkpoint(source)
    except QConvertError:
        return False
    base = checkpoint.folder or checkpoint.files[0].parent
    current = {str(f.relative_to(base)): sha256_file(f) for f in checkpoint.files}
    recorded = manifest.source.get("sha256", {})
    expected = settings_dict(settings)
    calibration, done = expected.get("calibration"), manifest.settings.get("calibration")
    if isinstance(calibration, dict) and isinstance(done, dict) and calibration.get("dtype") == "auto":
        calibration["dtype"] = done.get("dtype")  # "auto" is decided by the checkpoint, which the checksums pin
    return manifest.settings == expected and all(recorded.get(k) == v for k, v in current.items())


def _evaluated(row: SweepRow, evaluation: dict, log) -> SweepRow:
    log(f"{row.label}: evaluating {row.path}")
    code, stdout, stderr, _ = run_in_process({**evaluation, "model": row.path})
    if code:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        row.status, row.error = "failed", (lines[-1] if lines else f"exit code {code}")
        log(f"{row.label}: evaluation failed: {row.error}")
        return row
    result = json.loads(stdout)
    row.perplexity = result["perplexity"]
    row.bits_per_weight = result["bits_per_weight"]
    row.size_mb = result["bytes_on_disk"] / 1e6
    row.prefill_tokens_per_s = result["prefill_tokens_per_s"]
    row.decode_ms_per_token = result["decode_ms_per_token"]
    row.weight_memory_mb = result["weight_memory_bytes"] / 1e6
    row.peak_rss_mb = result["peak_rss_bytes"] / 1e6
    if row.role == "qconvert":
        row.quantized_bits_per_weight = read_manifest(Path(row.path)).totals["quantized_bits_per_weight"]
    return row


def rows_as_dicts(rows: list[SweepRow]) -> list[dict]:
    return [asdict(r) for r in rows]
