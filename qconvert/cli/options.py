"""The options several commands share, declared once (each as a typed alias typer reads), and the
choices they offer, built from the one list of format names (`qconvert.formats`). Importing this
module must stay cheap: no torch."""

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from qconvert.formats import EXPORTS, LAYOUT_CHOICES
from qconvert.limits import ACTIVATION_SCHEMES, GRID_NAMES, SUPPORTED_BITS


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum of `values` for typer's choices, built from the one list of format names."""
    return Enum(name, {value: value for value in values}, type=str)


ExportFormat = _choices("ExportFormat", EXPORTS)  # qconvert export --to
OutputFormat = _choices("OutputFormat", ("qconvert", *EXPORTS))  # qconvert model --format: its own output, or an export
LayoutChoice = _choices("LayoutChoice", LAYOUT_CHOICES)  # qconvert model --layout


class FloatDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class ScaleDtype(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"


BITS_TEXT = ", ".join(map(str, SUPPORTED_BITS[:-1])) + f" or {SUPPORTED_BITS[-1]}"
RecipeOption = Annotated[
    Optional[Path],
    typer.Option("--recipe", help="A TOML recipe (see configs/); the flags below override its defaults."),
]
BitsOption = Annotated[
    Optional[int],
    typer.Option("--bits", help=f"Bits per weight code: {BITS_TEXT}. (default: 4)", show_default=False),
]
GridOption = Annotated[
    Optional[str],
    typer.Option(
        "--grid",
        help=(
            f"Code values: {', '.join(GRID_NAMES)}. int: integers with scales (and zero points); any other: "
            "that format's values, bits and scales (README, Grids). (default: int)"
        ),
        show_default=False,
    ),
]
ActivationsOption = Annotated[
    Optional[str],
    typer.Option(
        "--activations",
        help=f"W8A8: quantize each linear's input too ({', '.join(ACTIVATION_SCHEMES)}): int8 per token at run "
        "time, int8 with one scale per layer from --calib text, or FP8 per token. Implies 8-bit weights per "
        "output channel (int8, or fp8 for fp8-dynamic); written as compressed-tensors.",
        show_default=False,
    ),
]
SmoothOption = Annotated[
    Optional[str],
    typer.Option(
        "--smooth",
        help="SmoothQuant with --activations: migrate activation outliers into the weights with strength "
        "ALPHA in [0, 1] (0.5 is the paper's default), or 'auto' to choose it per layer group on the "
        "--calib text.",
        metavar="ALPHA|auto",
        show_default=False,
    ),
]
GroupOption = Annotated[
    Optional[int],
    typer.Option(
        "--group-size",
        help="Weights per scale within a row; 0 = one scale per output channel. (default: 64)",
        show_default=False,
    ),
]
SymmetricOption = Annotated[
    Optional[bool],
    typer.Option(
        "--symmetric/--asymmetric",
        help="Symmetric grid (no zero point) or asymmetric (integer zero point). (default: asymmetric)",
        show_default=False,
    ),
]
QuantizerOption = Annotated[
    Optional[str],
    typer.Option(
        "-q", "--quantizer", help="Quantizer name; see `qconvert quantizers`. (default: rtn)", show_default=False
    ),
]
TargetBpwOption = Annotated[
    Optional[float],
    typer.Option(
        "--target-bpw",
        help=(
            "Choose each tensor's bits to average this many bits per quantized weight (scales and zero points counted)."
        ),
    ),
]
BudgetGridsOption = Annotated[
    Optional[str],
    typer.Option(
        "--budget-grids",
        help="With --target-bpw/--target-size: table grids the budget may also choose per tensor, comma-separated "
        "(e.g. nf4,fp8), each at its own bits and block.",
        metavar="GRID,...",
        show_default=False,
    ),
]
TargetSizeOption = Annotated[
    Optional[str],
    typer.Option("--target-size", help="Choose each tensor's bits so the whole output fits this size, e.g. 90MB."),
]
IncludeOption = Annotated[
    Optional[list[str]],
    typer.Option("--include", help="Also quantize 2-D tensors whose name matches this regex (repeatable)."),
]
ExcludeOption = Annotated[
    Optional[list[str]],
    typer.Option("--exclude", help="Keep tensors whose name matches this regex in float (repeatable)."),
]
CalibOption = Annotated[
    Optional[Path],
    typer.Option(
        "--calib",
        help="Calibration text file: for gptq and awq, --smooth, --activations int8-static, and size budgets "
        "(weighs their errors).",
        rich_help_panel="Calibration",
    ),
]
CalibSamplesOption = Annotated[
    Optional[int],
    typer.Option(
        "--calib-samples", help="Calibration windows. (default: 128)", show_default=False, rich_help_panel="Calibration"
    ),
]
CalibSeqlenOption = Annotated[
    Optional[int],
    typer.Option(
        "--calib-seqlen",
        help="Tokens per calibration window. (default: 512)",
        show_default=False,
        rich_help_panel="Calibration",
    ),
]
OutputOption = Annotated[
    Optional[Path], typer.Option("-o", "--output", help="Output folder (default: <source>-<scheme> beside the source).")
]


DtypeOption = Annotated[
    Optional[FloatDtype],
    typer.Option(help="Cast kept float tensors to this dtype (default: keep the source dtype)."),
]
ScaleDtypeOption = Annotated[
    Optional[ScaleDtype], typer.Option(help="dtype of stored scales. (default: float16)", show_default=False)
]
LayoutOption = Annotated[
    LayoutChoice, typer.Option(help="auto: compressed-tensors when it can hold the scheme, else native.")
]
MaxShardOption = Annotated[
    Optional[str], typer.Option(help="Split the weights into shards of at most this size, e.g. 2GB.")
]
RevisionOption = Annotated[Optional[str], typer.Option(help="Revision of a hub id.")]
CalibDatasetOption = Annotated[
    Optional[str],
    typer.Option(help="Calibration from a public set through `datasets`: wikitext2.", rich_help_panel="Calibration"),
]
CalibBatchOption = Annotated[
    Optional[int],
    typer.Option(help="Windows per forward pass. (default: 4)", show_default=False, rich_help_panel="Calibration"),
]
CalibDtypeOption = Annotated[
    Optional[str],
    typer.Option(
        help="What the blocks' forward passes compute in: float32, bfloat16, or auto (bfloat16 for gptq on a "
        "bfloat16 checkpoint, else float32). (default: auto)",
        show_default=False,
        rich_help_panel="Calibration",
    ),
]
SeedOption = Annotated[
    Optional[int],
    typer.Option(
        help="Seed for the calibration window positions. (default: 0)",
        show_default=False,
        rich_help_panel="Calibration",
    ),
]
DampOption = Annotated[
    Optional[float],
    typer.Option(
        help="gptq: dampening, a fraction of the mean Hessian diagonal (default 0.01).", rich_help_panel="Calibration"
    ),
]
ActOrderOption = Annotated[
    Optional[bool],
    typer.Option(
        "--act-order/--no-act-order",
        help="gptq: quantize columns by decreasing activation energy (default on).",
        rich_help_panel="Calibration",
    ),
]
EpochsOption = Annotated[
    Optional[int],
    typer.Option(
        help="qat: passes over the calibration windows per block (default 4).", rich_help_panel="Training (qat)"
    ),
]
LrOption = Annotated[
    Optional[float],
    typer.Option(help="qat: Adam's learning rate for the weights (default 5e-4).", rich_help_panel="Training (qat)"),
]
ScaleLrOption = Annotated[
    Optional[float],
    typer.Option(
        help="qat: Adam's learning rate for scales and zero points (default 1e-4).", rich_help_panel="Training (qat)"
    ),
]
StartOption = Annotated[
    Optional[str],
    typer.Option(
        help="qat: the codes training starts from: gptq, clip or rtn (default gptq).", rich_help_panel="Training (qat)"
    ),
]
EventsOption = Annotated[
    Optional[Path],
    typer.Option(
        help="Append a JSON-lines stream of progress events (phase, tensor i of N, RSS, ETA, errors) to this file."
    ),
]
FormatOption = Annotated[
    OutputFormat,
    typer.Option(
        "--format",
        help=(
            "qconvert: safetensors + manifest; gguf, mlx, gptq: that runtime's format (converted, then "
            "exported); compressed-tensors: that layout or an error."
        ),
    ),
]
ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Overwrite the output if it exists, and start even when the plan predicts too little memory or disk.",
    ),
]
CheckOption = Annotated[
    bool,
    typer.Option(
        "--check/--no-check",
        help=(
            "Before publishing a compressed-tensors output, run transformers' own loading of it on the "
            "meta device and refuse it if any weight would be missing or ignored."
        ),
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
FullOption = Annotated[bool, typer.Option("--full", help="One row per tensor instead of per tensor kind.")]

ClusterOption = Annotated[
    Optional[str],
    typer.Option(
        "--cluster",
        metavar="ADDRESS",
        help="Run on a Ray cluster: its address (ray://host:10001 or host:6379), auto (the one this machine "
        "joined), or local (start one here). Needs pip install 'qconvert\\[cluster]' and paths every node sees.",
    ),
]
